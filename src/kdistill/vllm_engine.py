"""vLLM engines: fast sampling for the teacher (``kdistill generate``) and for a student in training.

vLLM is an optional extra (``pip install 'kdistill[vllm]'``, a CUDA GPU). Two uses:

* :func:`build_llm` — an offline engine over a saved model (``teacher.engine: vllm``).
* :class:`VllmSampler` — a *colocated* engine for the student being trained (``engine: vllm`` in
  ``on_policy``, ``on_policy_filter``, ``self_distill``). It runs in the training process, on the
  training GPU (``vllm.gpu_memory_utilization`` of it), one engine per process, as TRL's "colocate"
  mode does. It starts from the student's config with dummy weights and is handed the student's
  current weights (``model.load_weights`` through ``LLM.apply_model``) before the first generation
  and before every generation that follows an optimizer step, so the samples are exactly
  on-policy. After a weight load the prefix cache is reset: KV blocks computed with the old weights
  must not be reused. With ``vllm.enable_sleep_mode`` the engine frees its GPU memory between
  generations (``sleep(level=2)``) and is woken, reloaded and used again on the next one.

The sampler has the same call shape as :func:`kdistill.sampling.sample_completions`'s wrapper
:class:`kdistill.sampling.HFSampler`: ``sampler(model, prompt_ids, max_new_tokens, temperature,
num_samples)`` returns completion ids cut after the first EOS (EOS kept).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional

from torch import nn

from kdistill.errors import ConfigError
from kdistill.models.introspect import cut_at_eos, eos_ids, hf_model


def import_vllm(key: str):
    """The ``vllm`` module, or a one-line error naming the config key that asked for it."""
    try:
        import vllm
    except ImportError:
        raise ConfigError(f"{key}: vllm is not installed (pip install 'kdistill[vllm]'; it needs a CUDA GPU)") from None
    return vllm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _engine_kwargs(vcfg, max_model_len: Optional[int]) -> dict:
    kw = dict(gpu_memory_utilization=vcfg.gpu_memory_utilization, dtype=vcfg.dtype, enforce_eager=vcfg.enforce_eager)
    if vcfg.max_model_len or max_model_len:
        kw["max_model_len"] = int(vcfg.max_model_len or max_model_len)
    kw.update(vcfg.extra)
    return kw


def build_llm(model: str, vcfg, key: str, seed: int = 0, trust_remote_code: bool = False,
              max_model_len: Optional[int] = None, **kwargs):
    """``vllm.LLM`` over the saved model at ``model`` (a folder or hub id); errors name ``key``."""
    vllm = import_vllm(key)
    try:
        return vllm.LLM(model=str(model), seed=seed, trust_remote_code=trust_remote_code,
                        **{**_engine_kwargs(vcfg, max_model_len), **kwargs})
    except Exception as e:  # noqa: BLE001 - vLLM raises many kinds; the user needs its message, on one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{key}: vLLM could not start: {type(e).__name__}: {first}") from e


def colocate_env(process_index: int, local_process_index: int, num_processes: int) -> None:
    """The environment vLLM's ``external_launcher`` executor reads (as torchrun would set it).

    The engine must run in this process (no engine-core subprocess) so that weights can be
    loaded into it directly, hence ``VLLM_ENABLE_V1_MULTIPROCESSING=0``.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("RANK", str(process_index))
    os.environ.setdefault("LOCAL_RANK", str(local_process_index))
    os.environ.setdefault("WORLD_SIZE", str(num_processes))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if num_processes > 1:  # every process must agree on the port; a launcher always sets it
            raise ConfigError("engine: vllm under a multi-process launch needs MASTER_PORT (accelerate/torchrun set it)")
        os.environ["MASTER_PORT"] = str(_free_port())


class VllmSampler:
    """A colocated vLLM engine that samples from the student being trained (see the module doc).

    Args:
        model: the student (or its DDP / :class:`~kdistill.methods.base.StudentLM` wrapper); only
            its config is read here, its weights are loaded before the first generation.
        tokenizer: the student's tokenizer (saved beside the config for the engine).
        workdir: where the engine's model folder (config, tokenizer; no weights) is written.
        vcfg: the config's ``vllm`` section. key: the config key that chose vllm (for errors).
    """

    def __init__(self, model: nn.Module, tokenizer, workdir: Path, vcfg, key: str, seed: int = 0,
                 max_model_len: Optional[int] = None):
        from accelerate import PartialState

        import_vllm(key)
        self.key, self.vcfg, self.tokenizer = key, vcfg, tokenizer
        hf = hf_model(model)
        self.eos = eos_ids(hf, tokenizer)
        state = PartialState()
        workdir = Path(workdir)
        if state.is_local_main_process:
            workdir.mkdir(parents=True, exist_ok=True)
            hf.config.save_pretrained(workdir)
            if getattr(hf, "generation_config", None) is not None:
                hf.generation_config.save_pretrained(workdir)
            tokenizer.save_pretrained(workdir)
        state.wait_for_everyone()
        colocate_env(state.process_index, state.local_process_index, state.num_processes)
        self.llm = build_llm(
            workdir, vcfg, key, seed=seed + state.process_index, max_model_len=max_model_len,
            load_format="dummy", distributed_executor_backend="external_launcher",
            enable_sleep_mode=vcfg.enable_sleep_mode,
        )
        if not hasattr(self.llm, "apply_model"):
            raise ConfigError(f"{key}: this vllm has no LLM.apply_model (needed to load the student's weights); "
                              "upgrade vllm")
        self.stale = True  # the engine's weights are dummies until the first load
        self.asleep = False
        self.stats = {"generations": 0, "weight_loads": 0}
        if vcfg.enable_sleep_mode:
            self.llm.sleep(level=2)
            self.asleep = True

    def mark_stale(self) -> None:
        """The student's weights changed (an optimizer step); load them before the next generation."""
        self.stale = True

    def _load_weights(self, model: nn.Module) -> None:
        hf = hf_model(model)
        weights = [(name, t.detach()) for name, t in hf.state_dict().items()]
        self.llm.apply_model(lambda m: m.load_weights(iter(weights)))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.stale = False
        self.stats["weight_loads"] += 1

    def __call__(self, model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 num_samples: int = 1) -> list[list[int]]:
        """Completion ids for each prompt (``num_samples`` consecutive entries per prompt)."""
        from vllm import SamplingParams

        if self.asleep:
            self.llm.wake_up(tags=["weights"])
            self.stale = True  # level-2 sleep discards the weights
        if self.stale:
            self._load_weights(model)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        params = SamplingParams(n=num_samples, temperature=float(temperature), top_p=1.0, top_k=0,
                                max_tokens=int(max_new_tokens), stop_token_ids=list(self.eos), detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        result: list[list[int]] = []
        for o in outs:
            for c in o.outputs[:num_samples]:
                ids = cut_at_eos(list(c.token_ids), self.eos)
                if c.finish_reason == "stop" and (not ids or ids[-1] not in self.eos):
                    # stopped on an EOS that is not in token_ids: put it back (the student learns to stop)
                    ids.append(int(c.stop_reason) if isinstance(c.stop_reason, int) else self.eos[0])
                result.append(ids)
        self.stats["generations"] += 1
        if self.vcfg.enable_sleep_mode:
            self.llm.sleep(level=2)
            self.asleep = True
        return result
