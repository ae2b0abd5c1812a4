"""Run-level settings: the config sections every run has, whatever its method.

A method's own section (``on_policy:``, ``zephyr:``, ...) lives with the method
(:mod:`kdistill.methods`); :mod:`kdistill.config` composes them with these into the schema a
config file is validated against. Every section is a pydantic model with ``extra="forbid"``, so a
typo in a key is an error that names the key, never silently ignored. This module is the single
source of the run-level defaults.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from kdistill.answers import GenerateConfig
from kdistill.eval_settings import BenchmarksConfig, JudgeSettings, ReportConfig, check_answer_regex
from kdistill.filters import FiltersConfig, JudgeConfig  # noqa: F401  (re-exported)
from kdistill.losses.divergences import registered as divergence_names
from kdistill.section import ALIASED, Section
from kdistill.topk_cache import CacheConfig
from kdistill.student_settings import LoraConfig, SearchConfig, WidthConfig

LAYER_SELECTIONS = ("uniform", "first", "last", "first_last", "importance")
ENGINE_DESCRIPTION = "how the student's samples are generated: transformers (generate, KV cache) or vllm (see vllm:)"


class TeacherApiConfig(Section):
    """A teacher behind an OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang, llama.cpp, Ollama)."""

    base_url: str = Field(..., description="e.g. http://127.0.0.1:8000/v1 (the part before /chat/completions)")
    model: str = Field(..., description="model name the endpoint serves")
    api_key_env: Optional[str] = Field(
        None, description="environment variable holding the API key (never logged or written); none = no key"
    )
    max_concurrency: int = Field(8, ge=1, description="requests in flight at once")
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    max_retries: int = Field(6, ge=0, description="retries per request on 429, 5xx, connection errors, timeouts, bad answers")
    backoff_base: float = Field(1.0, gt=0, description="first retry delay in seconds (doubles each retry, with jitter)")
    backoff_max: float = Field(60.0, gt=0, description="longest delay between retries (Retry-After is honoured above it)")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="extra request fields, e.g. {top_p: 0.9, seed: 0}")
    logprobs: Optional[int] = Field(
        None, ge=1, le=4096, description="white-box signal from a vLLM server: the teacher's top-k log-probs of every "
        "token (POST /completions with prompt_logprobs) for methods logit and on_policy, for candidate scores in "
        "on_policy_filter / self_distill, and for cache-teacher; "
        "vLLM allows at most its --max-logprobs (default 20); none = text only")
    prefetch: bool = Field(
        True, description="with logprobs: ask for the next micro-batches' log-probs while the student trains on "
        "this one (hides the server's latency; the same numbers either way)")


class TeacherConfig(Section):
    """Where the teacher signal comes from."""

    model: Optional[str] = Field(
        None, description="Hub id, local folder, or a .gguf file. 'demo' = the bundled SmolLM2-135M-Instruct."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    cache: Optional[str] = Field(
        None, description="an offline top-k cache (from `kdistill cache-teacher`): train from it without running the teacher"
    )
    weight: float = Field(1.0, gt=0.0, description="this teacher's weight in a `teachers:` list (normalized to sum to 1)")
    api: Optional[TeacherApiConfig] = Field(
        None, description="a teacher behind an HTTP API; with teacher.model too, text comes from the API"
    )
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="how a local teacher.model generates text (vllm: optional extra, GPU)"
    )
    placement: Literal["auto", "replicated"] = Field(
        "auto", description="under FSDP2 / DeepSpeed ZeRO-3: auto = sharded like the student (inference only), "
        "replicated = a full copy on every process")
    kind: Optional[str] = Field(
        None, description="the teacher kind that serves this section (a registered kdistill.teachers kind); "
        "none = chosen from model / cache / api"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="settings of a teacher kind given by `kind`")
    end_of_turn: Optional[str] = Field(
        None, description="the text that ends this teacher's answers when it has no chat template (default: its EOS "
        "token), e.g. \"\\n\" for a base model prompted few-shot; with loss.cross_tokenizer it is aligned with the "
        "student's EOS")

    @model_validator(mode="after")
    def _one_signal(self) -> "TeacherConfig":
        if self.api is not None and self.api.logprobs is not None and (self.model is not None or self.cache is not None):
            raise ValueError("api.logprobs: the served teacher gives the signal; give it without model or cache "
                             "(and the student as student.model, or cut from a local copy with student.init.from)")
        return self


class StudentInit(Section):
    """Build the student by cutting layers out of the teacher (or out of ``from``: a local copy of a
    served teacher's weights)."""

    model_config = ALIASED

    from_teacher: bool = True
    from_: Optional[str] = Field(None, alias="from", description="cut from this model (folder, hub id, .gguf) instead "
                                 "of teacher.model: a local copy of the weights of a teacher served over HTTP")
    num_layers: Optional[int] = Field(None, ge=1)
    layer_selection: Union[Literal["uniform", "first", "last", "first_last", "importance"], list[int]] = "uniform"
    importance_samples: int = Field(32, ge=1, description="training rows used to score block (and width) importance")
    width: Optional[WidthConfig] = Field(None, description="width pruning: shares of MLP channels, head groups, "
                                         "hidden channels kept (with width and no num_layers, every block is kept)")
    search: Optional[SearchConfig] = Field(None, description="pick the depth/width split by short distillation probes")
    moe: Literal["dense", "keep"] = Field("dense", description="a mixture-of-experts teacher: dense = each block's "
                                          "most-used expert becomes a dense MLP; keep = the student keeps the experts")

    @field_validator("layer_selection", mode="before")
    @classmethod
    def _check_selection(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in LAYER_SELECTIONS:
            raise ValueError(f"expected one of {', '.join(LAYER_SELECTIONS)} or a list of layer indices, got {v!r}")
        return v


class StudentConfig(Section):
    model: Optional[str] = None
    init: Optional[StudentInit] = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    freeze_embeddings: bool = False
    lora: Optional[LoraConfig] = Field(None, description="train LoRA adapters (peft) instead of the student's weights")

    @model_validator(mode="after")
    def _one_source(self) -> "StudentConfig":
        if self.model is None and self.init is None:
            raise ValueError("set either student.model or student.init")
        if self.model is not None and self.init is not None:
            raise ValueError("set only one of student.model and student.init")
        if self.init is not None and not self.init.from_teacher and self.init.from_ is None:
            raise ValueError("student.init.from_teacher must be true (or give student.init.from, or student.model)")
        if self.init is not None and self.init.search is not None and (
                self.init.num_layers or self.init.width or isinstance(self.init.layer_selection, list)):
            raise ValueError("student.init.search: picks num_layers and width itself; remove them (or the search)")
        return self


class TaskConfig(Section):
    """One task of a multi-task run (``data.tasks``): its rows, held-out rows and mixture weight."""

    name: str = Field(..., min_length=1, description="shown in the report; prefixes the task's row ids")
    train: str = Field(..., description="JSONL rows of this task")
    eval: Optional[str] = Field(None, description="held-out rows; none = a data.eval_fraction split of train")
    weight: Optional[float] = Field(
        None, gt=0.0, description="share of the training rows (normalized over tasks); none on every task = "
        "the tasks' natural sizes"
    )
    group: Optional[str] = Field(None, description="capability group in the report (retention per group, floor)")

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if "/" in v or v.strip() != v:
            raise ValueError(f"task names may not contain '/' or surrounding spaces, got {v!r}")
        return v


class DataConfig(Section):
    train: Optional[str] = None
    eval: Optional[str] = None
    tasks: Optional[list[TaskConfig]] = Field(
        None, description="several tasks instead of train/eval: mixed by weight, reported per task"
    )
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="held-out share of train when data.eval is unset")
    max_eval_rows: int = Field(200, ge=1)
    max_length: int = Field(256, ge=8)
    system_prompt: Optional[str] = Field(
        None, description="system message added to every row without one (overrides a template's default)"
    )
    chat_template: bool = Field(True, description="render rows with the tokenizer's chat template when it has one")
    holdout_by: Optional[str] = Field(
        None, description="split held-out rows from train by whole groups of this row field (e.g. template, task)")

    @model_validator(mode="after")
    def _check_tasks(self) -> "DataConfig":
        if self.tasks is not None:
            if self.train is not None or self.eval is not None:
                raise ValueError("data.tasks: give either tasks or train/eval, not both")
            if not self.tasks:
                raise ValueError("data.tasks: give at least one task")
            names = [t.name for t in self.tasks]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"data.tasks: task names must be unique (repeated: {', '.join(dup)})")
            weighted = [t.weight is not None for t in self.tasks]
            if any(weighted) and not all(weighted):
                raise ValueError("data.tasks: give a weight to every task, or to none (natural sizes)")
        return self


class LossConfig(Section):
    divergence: str = "forward_kl"
    temperature: float = Field(1.0, gt=0.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the distillation term; 1-alpha on cross-entropy")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd interpolation (0 = forward KL, 1 = reverse KL)")
    skew: float = Field(0.1, ge=0.0, le=1.0, description="skew KL mixing coefficient")
    fused: Union[bool, Literal["auto"]] = Field(
        "auto", description="chunked loss from hidden states (never materializes [tokens x vocab]); auto = when possible"
    )
    chunk_size: Union[Literal["auto"], int] = Field(
        "auto", description="tokens per chunk of the fused loss; auto = about one [chunk x vocab] block per hidden-state size"
    )

    @field_validator("chunk_size")
    @classmethod
    def _check_chunk(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("expected 'auto' or a positive integer")
        return v
    cross_tokenizer: Optional[Literal["uld", "gold"]] = Field(
        None, description="teacher and student tokenize differently: uld = Wasserstein-1 between sorted probability "
        "vectors; gold = tokens with the same string compared with `divergence`, the rest through uld (see "
        "kdistill.losses.cross_tokenizer); none = the tokenizers must match")
    teacher_mix: Literal["mixture", "sum"] = Field(
        "mixture", description="several teachers: mixture = divergence to their weighted mixture in probability space; "
        "sum = weighted sum of per-teacher divergences"
    )

    @field_validator("divergence")
    @classmethod
    def _check_divergence(cls, v: str) -> str:
        names = divergence_names()
        if v not in names:
            hint = difflib.get_close_matches(v, names, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"unknown divergence {v!r}{extra}; expected one of {', '.join(names)}")
        return v


class FeaturesConfig(Section):
    """Feature (hidden-state) distillation, added to the ``logit`` / ``on_policy`` loss when
    ``weight > 0``: the outputs of mapped student blocks are matched to the outputs of teacher
    blocks (through a trained linear adapter when the widths differ), on the trained positions.

    ``layers``: ``auto`` maps each block of a student cut from the teacher to the teacher block it
    was copied from, and otherwise spreads the student's blocks evenly over the teacher's (the last
    onto the last); or a list of ``[student_block, teacher_block]`` pairs (0-based).
    """

    weight: float = Field(0.0, ge=0.0, description="weight of the feature term (0 = off)")
    layers: Union[Literal["auto"], list[tuple[int, int]]] = Field("auto", description="auto, or [[student, teacher], ...]")
    loss: Literal["cosine", "mse"] = Field("cosine", description="per position: 1 - cos, or mean squared error")
    normalize: bool = Field(True, description="mse: layer-normalize both sides first (LLM activations vary in scale)")

    @field_validator("layers", mode="before")
    @classmethod
    def _check_layers(cls, v: Any) -> Any:
        if isinstance(v, list):
            for pair in v:
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in pair)):
                    raise ValueError(f"expected 'auto' or [[student_block, teacher_block], ...] (0-based ints), got {pair!r}")
        return v


class TrainConfig(Section):
    max_steps: Optional[int] = Field(None, ge=1)
    epochs: Optional[float] = Field(None, gt=0)
    max_minutes: Optional[float] = Field(None, gt=0, description="stop (and save) after this wall-clock time")
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(5.0e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    log_every: int = Field(1, ge=1)
    save_every: int = Field(50, ge=1, description="checkpoint every N optimizer steps")
    save_total_limit: int = Field(2, ge=1)
    num_threads: Optional[int] = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    resume: Literal["auto", "accept_changes"] = Field(
        "auto", description="auto: a rerun resumes only a run made with the same training settings and data (else it "
        "is refused, naming the changed keys); accept_changes: continue the run with the changed settings"
    )
    report_to: Optional[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        None, description="also log loss and eval figures per step to this tracker (through accelerate)")
    batching: Literal["shuffle", "length_grouped", "packed"] = Field(
        "length_grouped", description="shuffle: padded to each micro-batch's longest row; length_grouped: rows of "
        "similar length share a micro-batch (seeded; little padding); packed: each micro-batch's rows packed into "
        "rows of one width with per-sequence positions (see kdistill.batching)")
    peak_tflops: Optional[float] = Field(
        None, gt=0, description="peak TFLOP/s of one device for the utilisation (MFU) figures, e.g. a GPU's datasheet "
        "figure for the training dtype; none = measured once per machine with a matmul probe")

    @model_validator(mode="after")
    def _length(self) -> "TrainConfig":
        if self.max_steps is None and self.epochs is None:
            self.max_steps = 100
        return self


class CurriculumConfig(Section):
    """Easiest rows first (see :mod:`kdistill.curriculum`); ``by: none`` = ordinary shuffled epochs."""

    by: Literal["none", "length", "teacher_loss"] = Field(
        "none", description="difficulty: response length, or the teacher's mean loss on the response"
    )
    start: float = Field(0.3, gt=0.0, le=1.0, description="share of the (easiest) rows available at the first step")
    steps: float = Field(0.5, gt=0.0, le=1.0, description="share of the optimizer steps until every row is available")
    pacing: Literal["linear", "sqrt"] = Field("linear", description="how the pool grows from start to all rows")


class EvalConfig(Section):
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    match: Literal["contains", "exact", "regex", "first_line", "judge"] = Field(
        "contains", description="how a generation is compared to 'reference' (see kdistill.evaluate.matches)")
    answer_regex: Optional[str] = Field(None, description="match: regex: the answer is this regex's first group")
    judge: "EvalJudgeConfig" = Field(default_factory=lambda: EvalJudgeConfig())
    benchmarks: Optional[BenchmarksConfig] = Field(None, description="standard benchmarks through lm-eval")
    near_duplicate: float = Field(0.8, gt=0, le=1, description="contamination: word-shingle Jaccard for a near duplicate")
    generate: bool = Field(True, description="run generation for task accuracy when rows have a reference")
    teacher_answers: Literal["generate", "data"] = Field(
        "generate", description="data: the held-out rows' response IS the teacher's greedy answer (e.g. from "
        "`kdistill generate` at temperature 0): score it for the teacher's accuracy instead of generating again"
    )
    show_samples: int = Field(3, ge=0)
    speed_prompts: int = Field(4, ge=0, description="prompts used for the speed measurement (0 = skip)")
    speed_new_tokens: int = Field(32, ge=1)
    every: Optional[int] = Field(
        None, ge=1, description="also evaluate the student on the held-out rows every N optimizer steps (logged "
        "as eval_* in metrics.jsonl)"
    )
    select_best: Optional[Literal["accuracy", "perplexity", "kl_to_teacher", "top1_agreement"]] = Field(
        None, description="with every: keep the student of the best evaluation by this metric (task-specific "
        "model selection) instead of the last one"
    )

    @model_validator(mode="after")
    def _check_selection(self) -> "EvalConfig":
        if self.select_best is not None and self.every is None:
            raise ValueError("eval.select_best needs eval.every (how often the student is evaluated)")
        if self.select_best == "accuracy" and not self.generate:
            raise ValueError("eval.select_best: accuracy needs eval.generate: true")
        check_answer_regex(self.match, self.answer_regex)
        return self


class EvalJudgeConfig(JudgeSettings):
    api: Optional[TeacherApiConfig] = Field(None, description="an API model as the judge; none = the teacher")


EvalConfig.model_rebuild()


# --- on-policy, self- and preference distillation (issue 6) ---------------------------------


class VllmConfig(Section):
    """vLLM engine settings, used wherever ``engine: vllm`` is chosen (``teacher.engine`` for
    ``kdistill generate``; ``on_policy.engine`` / ``on_policy_filter.engine`` / ``self_distill.engine``
    / ``zephyr.engine`` for sampling from the student being trained). Optional extra: ``pip install 'kdistill[vllm]'``.

    A student engine is *colocated*: it runs in the training process, on the same GPU, and is given
    the student's current weights (vLLM's ``reload_weights``) before every generation that follows
    an optimizer step. One engine per training process (tensor parallel size 1).
    """

    gpu_memory_utilization: float = Field(
        0.3, gt=0.0, le=1.0, description="share of the GPU vLLM may take (weights + KV cache); the rest is training's"
    )
    max_model_len: Optional[int] = Field(None, ge=16, description="longest prompt + completion; none = data.max_length")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the engine's dtype; auto = a student engine computes in the student's compute dtype "
        "(another value: as asked, and the report names the mismatch), a teacher engine in the model's")
    enable_sleep_mode: bool = Field(
        False, description="free the engine's GPU memory (weights and KV cache) while the student trains"
    )
    enforce_eager: bool = Field(False, description="no CUDA graphs (less memory, slower decoding)")
    extra: dict[str, Any] = Field(default_factory=dict, description="further vllm.LLM keyword arguments, passed as given")


class RunConfig(Section):
    """The run-level part of a config; :func:`kdistill.config.schema` adds the methods' sections."""

    output_dir: str = Field(..., min_length=1, description="where everything of this run goes (a folder kdistill owns)")
    method: str = "logit"
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    teachers: Optional[list[TeacherConfig]] = Field(
        None, description="several teachers (each a model or a cache, with a weight); replaces `teacher`"
    )
    cache: CacheConfig = Field(default_factory=CacheConfig)
    student: Optional[StudentConfig] = None
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    generate: Optional[GenerateConfig] = None
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @field_validator("output_dir")
    @classmethod
    def _real_folder(cls, v: str) -> str:
        if not v.strip() or v.strip() in (".", "./"):
            raise ValueError("give a folder of its own for the run (not empty, not the current folder)")
        return v

    @model_validator(mode="after")
    def _teachers(self) -> "RunConfig":
        if self.teachers is not None:
            if not self.teachers:
                raise ValueError("teachers: give at least one teacher (each with model or cache)")
            if self.teacher.model is not None or self.teacher.cache is not None:
                raise ValueError("set either teacher or teachers, not both")
            for i, t in enumerate(self.teachers):
                if t.model is None and t.cache is None and t.kind is None and (t.api is None or t.api.logprobs is None):
                    raise ValueError(f"teachers[{i}]: give model, cache, or api with api.logprobs")
        return self
