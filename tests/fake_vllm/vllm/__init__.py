"""A stand-in for the parts of vLLM's offline API that kdistill uses, for tests on a CPU.

It runs transformers underneath and enforces what the real engine would do (or silently get
wrong), so a test fails where real vLLM would misbehave:

* ``load_format="dummy"`` gives random weights; only ``load_weights`` makes them the student's;
* ``distributed_executor_backend="external_launcher"`` needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
  and the torchrun variables, as the real executor asserts;
* after a weight load, generating before ``reset_prefix_cache()`` would reuse KV blocks computed
  with the old weights: this fake raises instead;
* ``sleep(level=2)`` discards weights and KV cache: generating before waking up raises, and after
  ``wake_up(tags=["weights"])`` the weights are garbage until loaded again;
* like vLLM 0.32's CPU backend, the engine repacks its weights after loading (``repacks``): then
  ``model.load_weights`` through ``apply_model`` fails (``'Parameter' object has no attribute
  'weight_loader'``) and only ``collective_rpc("reload_weights", kwargs={"weights_iterator": ...})``
  takes new weights (``has_reload = False`` mimics an older worker without it);
* creating an engine re-seeds the process (python, numpy, torch, as vLLM's "The global random seed
  is set to N") and sets torch to one thread; sampling draws from torch's global generator.

Every engine built is kept in ``ENGINES`` (tests inspect them). Only the API surface is mimicked,
not vLLM's scheduling or speed.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

__version__ = "0.0-fake"
ENGINES: list["LLM"] = []


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    seed: Optional[int] = None
    stop_token_ids: Optional[list[int]] = None
    detokenize: bool = True
    skip_special_tokens: bool = True


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: tuple
    finish_reason: Optional[str]
    stop_reason: Any = None


@dataclass
class RequestOutput:
    prompt_token_ids: list
    outputs: list = field(default_factory=list)


class _EngineModel:
    """What ``LLM.apply_model`` hands to a function: the engine's copy of the model."""

    def __init__(self, hf):
        self.hf = hf
        self.version = 0  # weight loads so far
        self.repacked = False  # True once the engine has processed its weights after loading (CPU backend)

    def load_weights(self, weights) -> set:
        if self.repacked:
            raise AttributeError("'Parameter' object has no attribute 'weight_loader'")
        return self._load(weights)

    def _load(self, weights) -> set:
        params = dict(self.hf.named_parameters())
        tied = getattr(self.hf.config, "tie_word_embeddings", False)
        loaded = set()
        with torch.no_grad():
            for name, t in weights:
                if name == "lm_head.weight" and tied:
                    continue  # vLLM skips the tied head, as here
                if name not in params:
                    raise KeyError(name)  # what vLLM's weight loaders do with an unknown name
                params[name].copy_(t.to(params[name].dtype))
                loaded.add(name)
        self.version += 1
        return loaded


class LLM:
    drop_stop_token = False  # True: token_ids leave out a stop token id (stop_reason names it), as some versions do
    repacks = True  # the weights are repacked after loading: apply_model(load_weights) fails afterwards
    has_reload = True  # the worker has reload_weights(weights_iterator=...)

    def __init__(self, model: str, *, seed: int = 0, load_format: str = "auto", trust_remote_code: bool = False,
                 distributed_executor_backend: Optional[str] = None, enable_sleep_mode: bool = False, **kwargs):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if distributed_executor_backend == "external_launcher":
            assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0", \
                "To get deterministic execution, please set VLLM_ENABLE_V1_MULTIPROCESSING=0"
            for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                assert var in os.environ, f"external_launcher needs {var}"
        if "max_model_len" in kwargs:
            assert int(kwargs["max_model_len"]) >= 16
        self.kwargs = {"seed": seed, "load_format": load_format, "distributed_executor_backend": distributed_executor_backend,
                       "enable_sleep_mode": enable_sleep_mode, **kwargs}
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        if load_format == "dummy":
            torch.manual_seed(1234)
            hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
        else:
            hf = AutoModelForCausalLM.from_pretrained(model)
        hf.eval()
        self.model = _EngineModel(hf)
        self.model.repacked = self.repacks
        self.dtype = kwargs.get("dtype", "auto")
        if self.dtype not in ("auto", None):
            hf.to(getattr(torch, self.dtype))
        random.seed(seed)  # what vLLM does to the process it runs in
        np.random.seed(seed)
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        self.enable_sleep_mode = enable_sleep_mode
        self.asleep: set = set()  # "weights", "kv_cache" while discarded
        self.cache_version: Optional[int] = None  # weights version the cached KV blocks were computed with
        self.calls: list[dict] = []  # one entry per generate call
        self.events: list[str] = []
        ENGINES.append(self)

    # -- the model inside -------------------------------------------------------------------
    def apply_model(self, func):
        assert "weights" not in self.asleep, "apply_model on sleeping weights"
        self.events.append("apply_model")
        return [func(self.model)]

    def collective_rpc(self, method: str, timeout=None, args: tuple = (), kwargs: Optional[dict] = None) -> list:
        """What the in-process worker does: here only ``reload_weights(weights_iterator=...)``."""
        if method != "reload_weights" or not self.has_reload:
            raise AttributeError(f"'CPUWorker' object has no attribute '{method}'")
        assert "weights" not in self.asleep, "reload_weights on sleeping weights"
        self.events.append("reload_weights")
        self.model._load((kwargs or {})["weights_iterator"])
        self.model.repacked = self.repacks
        return [None]

    def reset_prefix_cache(self, *a, **k) -> bool:
        self.events.append("reset_prefix_cache")
        self.cache_version = None
        return True

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        assert self.enable_sleep_mode, "sleep mode is not enabled"
        self.events.append(f"sleep{level}")
        self.asleep = {"weights", "kv_cache"} if level == 2 else {"kv_cache"}
        self.cache_version = None

    def wake_up(self, tags: Optional[list[str]] = None) -> bool:
        tags = tags or ["weights", "kv_cache"]
        self.events.append("wake_up:" + ",".join(tags))
        if "weights" in tags and "weights" in self.asleep:
            with torch.no_grad():  # level 2 dropped them: what comes back is not the model
                for p in self.model.hf.parameters():
                    p.normal_()
            self.model.version += 1
        self.asleep -= set(tags)
        return not self.asleep

    # -- generation -------------------------------------------------------------------------
    def _sample(self, prompt: list[int], sp: SamplingParams) -> list[CompletionOutput]:
        hf = self.model.hf
        eos = set(sp.stop_token_ids or [])
        g = getattr(hf.generation_config, "eos_token_id", None)
        eos |= set(g if isinstance(g, (list, tuple)) else ([g] if g is not None else []))
        outs = []
        with torch.no_grad():
            for k in range(sp.n):
                ids = torch.tensor([prompt])
                new: list[int] = []
                finish = "length"
                while len(new) < sp.max_tokens:  # no KV cache: tiny models, and nothing version-specific
                    logits = hf(input_ids=ids, use_cache=False).logits[0, -1].float()
                    if sp.temperature == 0:
                        t = int(logits.argmax())
                    else:
                        probs = torch.softmax(logits / sp.temperature, -1)
                        t = int(torch.multinomial(probs, 1))  # the global generator, as vLLM's sampler
                    new.append(t)
                    ids = torch.cat([ids, torch.tensor([[t]])], 1)
                    if t in eos and len(new) >= sp.min_tokens:
                        finish = "stop"
                        break
                stop_reason = None
                if finish == "stop" and self.drop_stop_token:
                    stop_reason = new.pop()
                outs.append(CompletionOutput(k, self.tokenizer.decode(new, skip_special_tokens=True), tuple(new), finish,
                                             stop_reason))
        return outs

    def generate(self, prompts, sampling_params: Optional[SamplingParams] = None, *, use_tqdm=True, **kw):
        sp = sampling_params or SamplingParams()
        if self.asleep:
            raise RuntimeError(f"fake vllm: generate while asleep ({sorted(self.asleep)})")
        if self.cache_version is not None and self.cache_version != self.model.version:
            raise RuntimeError("fake vllm: prefix cache holds KV from old weights (reset_prefix_cache not called)")
        prompts = prompts if isinstance(prompts, list) else [prompts]
        token_prompts = [list(p["prompt_token_ids"]) if isinstance(p, dict) else self.tokenizer(p)["input_ids"]
                         for p in prompts]
        state = {n: t.detach().clone() for n, t in self.model.hf.state_dict().items()}
        self.calls.append({"prompts": token_prompts, "params": sp, "state": state, "version": self.model.version})
        self.events.append("generate")
        self.cache_version = self.model.version
        return [RequestOutput(p, self._sample(p, sp)) for p in token_prompts]

    def chat(self, messages, sampling_params: Optional[SamplingParams] = None, use_tqdm=True, **kw):
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        ids = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in convs]
        ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in ids]
        return self.generate([{"prompt_token_ids": i} for i in ids], sampling_params, use_tqdm=use_tqdm)
