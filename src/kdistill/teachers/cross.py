"""A teacher whose tokenizer is not the student's (``loss.cross_tokenizer: uld | gold``).

:class:`CrossTokenizerTeacher` wraps a teacher that speaks its own tokenizer (a local model, or a
cache made with it) and turns every *student* batch into a
:class:`~kdistill.losses.cross_tokenizer.CrossTarget`:

1. each row is rendered again for the teacher, with the teacher's chat template (or, without one,
   as plain text ending with ``teacher.end_of_turn``); rows the student sampled (``on_policy``) are
   first decoded from the student's ids, and that text is what the teacher reads;
2. both tokenizations of every answer are aligned into spans over the same characters, the two
   end-of-turn tokens into one span (:mod:`kdistill.alignment`);
3. the teacher runs on its own tokens, and its log-probs before each span (and of each span's later
   tokens) are handed to the loss with the student positions they belong to.

The run builds it (:func:`cross_teacher`) in place of the plain kind when a teacher's tokenizer
differs from the student's; without ``loss.cross_tokenizer`` that is refused in one line
(:func:`refusal`). What differs is printed first (:func:`preflight`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from kdistill.alignment import Answer, TurnRenderer, align, answer_from_ids, encode_aligned, end_of_turn
from kdistill.data import IGNORE_INDEX, collate, renderer_for
from kdistill.errors import ConfigError, DataError
from kdistill.losses.cross_tokenizer import CrossTarget
from kdistill.models import eos_ids, load_model, load_tokenizer, output_vocab_size, tokenizer_fingerprint
from kdistill.teachers.base import Teacher, TeacherSignal
from kdistill.teachers.local import LocalTeacher
from kdistill.vocab_match import describe_differences, vocab_classes

__all__ = ["CrossTokenizerTeacher", "cross_teacher", "preflight", "refusal"]


def refusal(teacher_name: str, student_name: str, key: str = "teacher") -> str:
    """The one line for different tokenizers without ``loss.cross_tokenizer``."""
    return (f"{key}.model: the teacher's tokenizer ({teacher_name}) differs from the student's ({student_name}); "
            "token-level distillation needs loss.cross_tokenizer: uld or gold (or method: sequence)")


def teacher_renderer(cfg, tok, spec) -> TurnRenderer:
    """How the teacher ``spec`` renders rows: its own chat template, or plain text ending with its
    ``end_of_turn``; room for 4x the student's ``data.max_length`` (another tokenizer may need more)."""
    return TurnRenderer(tok, 4 * cfg.data.max_length, cfg.data.system_prompt, cfg.data.chat_template,
                        getattr(spec, "end_of_turn", None))


def _ends(model, tok, renderer, spec=None):
    eot = end_of_turn(renderer, eos_ids(model, tok) if model is not None else (), getattr(spec, "end_of_turn", None))
    ids = eot.ids if eot.text is None else tuple(tok(eot.text, add_special_tokens=False)["input_ids"][:1])
    return eot, ids


def preflight(cfg, t_model, t_tok, student, s_tok, say, spec=None) -> int:
    """Different tokenizers for a token-level method: refuse without ``loss.cross_tokenizer``, else
    print what differs (vocabulary sizes, templates, BOS/EOS, end of turn); returns the student's vocabulary."""
    spec = spec or cfg.teacher
    if cfg.loss.cross_tokenizer is None:
        raise ConfigError(refusal(spec.model, (cfg.student.model if cfg.student else None) or "student"))
    v_s = min(output_vocab_size(student), len(s_tok))
    v_t = min(output_vocab_size(t_model), len(t_tok))
    s_eot, s_ids = _ends(student, s_tok, renderer_for(cfg, s_tok))
    t_eot, t_ids = _ends(t_model, t_tok, teacher_renderer(cfg, t_tok, spec), spec)
    classes = vocab_classes(s_tok, t_tok, v_s, v_t, s_ids, t_ids)
    say(f"cross-tokenizer distillation (loss.cross_tokenizer: {cfg.loss.cross_tokenizer}); the tokenizers differ:")
    for line in describe_differences(s_tok, t_tok, v_s, v_t, s_eot, t_eot, classes):
        say(f"  {line}")
    return v_s


class CrossTokenizerTeacher(Teacher):
    """Serves a student batch from a teacher with another tokenizer (see the module docstring).

    Args:
        inner: the teacher in its own tokens (``signal`` on teacher batches: hidden + weight, logits
            or top-k); ``vocab_size``: its vocabulary.
        t_tok, s_tok: the two tokenizers; ``t_renderer``/``s_renderer``: how each renders rows.
        rows: the training rows by id (their text is what the teacher reads).
        classes: the vocabulary classes (:func:`kdistill.vocab_match.vocab_classes`).
    """

    can_fuse = True  # the cross target works with the student's chunked and plain paths alike
    cross_tokenizer = True  # several teachers: combined as a sum of losses (see kdistill.teachers.multi)

    def __init__(self, inner, t_tok, s_tok, t_renderer, s_renderer, rows: dict, classes, s_eot, t_eot,
                 device=None, key: str = "teacher"):
        self.inner, self.t_tok, self.s_tok = inner, t_tok, s_tok
        self.t_renderer, self.s_renderer, self.rows = t_renderer, s_renderer, rows
        self.classes, self.s_eot, self.t_eot = classes, s_eot, t_eot
        self.vocab_size = inner.vocab_size
        self.device = device
        self.key, self.name, self.kind = key, inner.name, inner.kind
        self.model = inner.model
        self.tokenizer = t_tok
        self.offers = inner.offers & frozenset({"distribution", "any_sequence"})
        self.what = f"{inner.what} with another tokenizer"
        self._s_feats: dict = {}
        self._t_feats: dict = {}
        self.stats = {"batches": 0, "spans": 0, "student_tokens": 0, "aligned_tokens": 0, "end_of_turn_spans": 0,
                      "matched_mass": 0.0}

    # -- per row: both tokenizations and their spans ---------------------------------------------

    def _row(self, batch: dict, b: int) -> tuple[dict, list[tuple[list[int], list[int]]]]:
        """The teacher's feature for row ``b`` of the student ``batch`` and the row's spans."""
        sid = batch["ids"][b]
        ex = self.rows.get(sid)
        if ex is None:
            raise DataError(f"{self.key}: batch row {sid!r} is not a training row (the teacher re-tokenizes rows by id)")
        labels = batch["labels"][b]
        if batch.get("source") in ("student", "teacher"):  # sampled: the teacher reads the decoded completion
            pos = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
            comp = labels[pos].tolist()
            start = int(pos[0]) + 1 if pos.numel() else 0
            text, s_ans = answer_from_ids(self.s_tok, comp, start, self.s_eot)
            t_feat = encode_aligned(self.t_renderer, ex, self.t_eot, response=text)
            s_answers = [s_ans]
            t_answers = t_feat["answers"][-1:]
        else:
            if sid not in self._s_feats:
                self._s_feats[sid] = encode_aligned(self.s_renderer, ex, self.s_eot)
                self._t_feats[sid] = encode_aligned(self.t_renderer, ex, self.t_eot)
            s_feat, t_feat = self._s_feats[sid], self._t_feats[sid]
            n = len(s_feat["input_ids"])
            if batch["input_ids"][b, :n].tolist() != s_feat["input_ids"]:
                raise DataError(f"{self.key}: row {sid!r} is not tokenized as the run tokenizes it (data changed?)")
            s_answers, t_answers = s_feat["answers"], t_feat["answers"]
        spans = []
        for sa, ta in zip(s_answers, t_answers):
            spans += align(sa, ta)
        return t_feat, spans

    # -- the signal --------------------------------------------------------------------------

    @torch.no_grad()
    def signal(self, batch: dict, hidden: bool = True, feature_layers=None) -> TeacherSignal:
        """``TeacherSignal(cross=CrossTarget)`` for the student ``batch`` (``[batch, seq]`` labels)."""
        labels = batch["labels"]
        B, S = labels.shape
        t_feats, s_first, s_cont, cont_span, t_first, t_cont, t_next = [], [], [], [], [], [], []
        n_eot = 0
        for b in range(B):
            t_feat, spans = self._row(batch, b)
            t_feats.append(t_feat)
            for s_pos, t_pos in spans:
                k = len(s_first)
                s_first.append(b * S + s_pos[0] - 1)
                s_cont += [b * S + p - 1 for p in s_pos[1:]]
                cont_span += [k] * (len(s_pos) - 1)
                t_first.append((b, t_pos[0] - 1))
                t_cont += [(b, p - 1, k) for p in t_pos[1:]]
                n_eot += int(len(s_pos) == 1 and int(batch["input_ids"][b, s_pos[0]]) in self.s_eot.ids)
        t_batch = collate([{"input_ids": f["input_ids"], "labels": f["labels"], "id": f["id"]} for f in t_feats],
                          self.t_tok.pad_token_id)
        dev = labels.device
        t_batch = {k: (v.to(self.device or dev) if isinstance(v, torch.Tensor) else v) for k, v in t_batch.items()}
        S_t = t_batch["input_ids"].shape[1]
        t_ids = t_batch["input_ids"].reshape(-1)
        t_token = t_ids[torch.tensor([b * S_t + t + 1 for b, t in t_first], dtype=torch.long, device=t_ids.device)]
        t_multi = torch.zeros(len(s_first), dtype=torch.bool)
        t_multi[[k for _, _, k in t_cont]] = True
        t_logp, t_logc = self._teacher_logprobs(t_batch, [b * S_t + t for b, t in t_first],
                                                [(b * S_t + t, k) for b, t, k in t_cont], len(s_first))
        s_first_t = torch.tensor(s_first, dtype=torch.long, device=dev)
        flat = labels.reshape(-1)
        if s_first and bool((flat[s_first_t] == IGNORE_INDEX).any()):  # pragma: no cover - an alignment bug
            raise RuntimeError("cross-tokenizer alignment points at an untrained student position")
        if self.classes is not None and s_first:  # the teacher's mass on tokens the student's vocabulary has too
            self.stats["matched_mass"] += float(t_logp.exp()[:, self.classes.teacher.to(t_logp.device) >= 0].sum())
        st = self.stats
        st["batches"] += 1
        st["spans"] += len(s_first)
        st["student_tokens"] += int((flat != IGNORE_INDEX).sum())
        st["aligned_tokens"] += len(s_first) + len(s_cont)
        st["end_of_turn_spans"] += n_eot
        classes = self.classes
        if classes is not None and classes.student.device != dev:
            self.classes = classes = type(classes)(classes.student.to(dev), classes.teacher.to(dev), classes.n)
        return TeacherSignal(cross=CrossTarget(
            s_first_t, torch.tensor(s_cont, dtype=torch.long, device=dev),
            torch.tensor(cont_span, dtype=torch.long, device=dev), t_logp.to(dev), t_token.to(dev), t_logc.to(dev),
            classes, t_multi.to(dev)))

    def _teacher_logprobs(self, t_batch: dict, first: list[int], cont: list[tuple[int, int]], n: int):
        """``(log-probs [n, V_t] before each span, log-prob [n] of each span's later tokens)`` (T = 1)."""
        V = self.vocab_size
        sig = self.inner.signal(t_batch, hidden=True)
        ids = t_batch["input_ids"].reshape(-1)
        cont_rows = [r for r, _ in cont]
        cont_tok = ids[torch.tensor([r + 1 for r in cont_rows], dtype=torch.long, device=ids.device)] if cont else None
        if sig.topk is not None:
            full_first = _topk_full(sig.topk, first, V)
            cont_lp = _topk_full(sig.topk, cont_rows, V).gather(-1, cont_tok.unsqueeze(-1)).squeeze(-1) if cont else None
        else:
            if sig.hidden is not None:
                h = sig.hidden.reshape(-1, sig.hidden.shape[-1])
                rows_logits = lambda rows: (h[rows].to(sig.weight.dtype) @ sig.weight[:V].t()).float()  # noqa: E731
            else:
                lg = sig.logits.reshape(-1, sig.logits.shape[-1])
                rows_logits = lambda rows: lg[rows, :V].float()  # noqa: E731
            full_first = _chunked(rows_logits, first, lambda x: torch.log_softmax(x, -1))
            cont_lp = None
            if cont:
                lp = _chunked(rows_logits, cont_rows, lambda x: torch.log_softmax(x, -1))
                cont_lp = lp.gather(-1, cont_tok.unsqueeze(-1)).squeeze(-1)
        t_logc = torch.zeros(n, dtype=torch.float32, device=full_first.device)
        if cont:
            span = torch.tensor([k for _, k in cont], dtype=torch.long, device=t_logc.device)
            t_logc.index_add_(0, span, cont_lp.to(t_logc.device).float())
        return full_first, t_logc

    # -- reporting -----------------------------------------------------------------------------

    def cross_summary(self) -> dict:
        st = self.stats
        return {
            "teacher_vocab": self.vocab_size,
            "student_vocab": int(self.classes.student.numel()) if self.classes is not None else None,
            "spans": st["spans"],
            "aligned_student_tokens": round(st["aligned_tokens"] / st["student_tokens"], 4) if st["student_tokens"] else None,
            "end_of_turn_spans": st["end_of_turn_spans"],
            "matched_teacher_mass": round(st["matched_mass"] / st["spans"], 4) if st["spans"] and self.classes is not None
            else None,
            "note": "matched_teacher_mass: the teacher's mean probability on tokens whose string the student's "
                    "vocabulary also has, before each span",
        }

    def refuse(self, need: str, method: str, hint: str = "") -> str:
        if need == "weights":
            return (f"{self.key}: the teacher's tokenizer differs from the student's; on_policy.seq_kd samples the "
                    "teacher in the student's tokens, which does not work across tokenizers (set seq_kd: false)")
        if need == "hidden_states":
            return "features: feature distillation needs teacher and student positions to match; not across tokenizers"
        return self.inner.refuse(need, method, hint)

    def describe(self) -> dict:
        return self.inner.describe()

    def heldout(self, ho):
        return self.inner.heldout(ho)

    def unavailable(self, figures: dict) -> dict:
        return self.inner.unavailable(figures)


def _chunked(rows_logits, rows: list[int], fn, chunk: int = 256) -> torch.Tensor:
    """``fn(rows_logits(rows[a:b]))`` chunk by chunk, concatenated (``[len(rows), V]``)."""
    parts = [fn(rows_logits(rows[a:a + chunk])) for a in range(0, len(rows), chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def _topk_full(topk, rows: list[int], V: int) -> torch.Tensor:
    """Full log-probs ``[len(rows), V]`` from a top-k teacher: the cached tokens' values, the rest
    mass spread evenly over the other tokens (its shape is unknown)."""
    k = topk.indices.shape[-1]
    idx = topk.indices.reshape(-1, k)[rows]
    lp = topk.logprobs.reshape(-1, k)[rows].float()
    rest = torch.clamp(1.0 - lp.exp().sum(-1), min=0.0)
    fill = torch.log(rest / max(V - k, 1)) if V > k else torch.full_like(rest, -math.inf)
    return fill.unsqueeze(-1).expand(len(rows), V).clone().scatter_(-1, idx.long(), lp)


def cross_teacher(spec, key: str, env) -> Optional[Teacher]:
    """The teacher for ``spec`` when its tokenizer differs from the student's and the method needs
    token-level signal: a :class:`CrossTokenizerTeacher` with ``loss.cross_tokenizer``, a one-line
    refusal without it; None when the tokenizers match (the plain kind serves it)."""
    if "distribution" not in env.needs or spec.model is None:
        return None
    cfg = env.cfg
    primary = spec is env.primary and env.weights is not None
    t_tok = env.weights[1] if primary else load_tokenizer(spec.model, f"{key}.model", spec.revision,
                                                         spec.trust_remote_code)
    if tokenizer_fingerprint(t_tok) == tokenizer_fingerprint(env.tokenizer):
        return None
    if cfg.loss.cross_tokenizer is None:
        raise ConfigError(refusal(spec.model, (cfg.student.model if cfg.student else None) or "student", key))
    if primary:
        model = env.weights[0]
    else:
        model, t_tok = load_model(spec.model, f"{key}.model", spec.dtype, spec.revision, spec.trust_remote_code)
        preflight(cfg, model, t_tok, env.student, env.tokenizer, env.say, spec)
    v_t = min(output_vocab_size(model), len(t_tok))
    inner = LocalTeacher(model, v_t, name=spec.model, device=env.device, tokenizer=t_tok)
    inner.key = key
    s_ren, t_ren = renderer_for(cfg, env.tokenizer), teacher_renderer(cfg, t_tok, spec)
    s_eot, s_ids = _ends(env.student, env.tokenizer, s_ren)
    t_eot, t_ids = _ends(model, t_tok, t_ren, spec)
    classes = vocab_classes(env.tokenizer, t_tok, env.vocab_size, v_t, s_ids, t_ids)
    rows = {e.id: e for e in env.rows}
    return CrossTokenizerTeacher(inner, t_tok, env.tokenizer, t_ren, s_ren, rows, classes, s_eot, t_eot,
                                 device=env.device, key=key)
