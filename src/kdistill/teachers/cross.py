"""A teacher whose tokenizer is not the student's (``loss.cross_tokenizer: uld | gold``).

:class:`CrossTokenizerTeacher` turns every *student* batch into a
:class:`~kdistill.losses.cross_tokenizer.CrossTarget`:

1. each row is rendered again for the teacher, with the teacher's chat template (or, without one,
   as plain text ending with ``teacher.end_of_turn``); rows the student sampled (``on_policy``) are
   first decoded from the student's ids, and that text is what the teacher reads;
2. both tokenizations of every answer are aligned into spans over the same characters, the two
   end-of-turn tokens into one span (:mod:`kdistill.alignment`);
3. the teacher's log-probs before each span (and of each span's later tokens) come from the model
   run on its own tokens, or from a cross-tokenizer cache (:mod:`kdistill.teachers.cross_sources`),
   and are handed to the loss with the student positions they belong to.

The run builds it (:func:`cross_teacher`) in place of the plain kind when a teacher's tokenizer
differs from the student's; without ``loss.cross_tokenizer`` that is refused in one line
(:func:`refusal`). What differs is printed first (:func:`preflight`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import AutoTokenizer

from kdistill.alignment import align, answer_from_ids, encode_aligned, end_of_turn
from kdistill.data import IGNORE_INDEX, renderer_for
from kdistill.errors import ConfigError, DataError
from kdistill.losses.cross_tokenizer import CrossTarget
from kdistill.models import eos_ids, load_model, load_tokenizer, output_vocab_size, tokenizer_fingerprint
from kdistill.teachers.base import Teacher, TeacherSignal
from kdistill.teachers.cache import CachedTeacher
from kdistill.teachers.cross_sources import CachedSource, LiveSource, teacher_renderer
from kdistill.teachers.local import LocalTeacher
from kdistill.topk_cache import CacheError, TopKCache
from kdistill.vocab_match import describe_differences, vocab_classes

__all__ = ["TEACHER_TOKENIZER_DIR", "CrossTokenizerTeacher", "cross_teacher", "preflight", "refusal",
           "teacher_renderer"]

TEACHER_TOKENIZER_DIR = "teacher_tokenizer"  # in a cross-tokenizer cache folder


def refusal(teacher_name: str, student_name: str, key: str = "teacher") -> str:
    """The one line for different tokenizers without ``loss.cross_tokenizer``."""
    return (f"{key}: the teacher's tokenizer ({teacher_name}) differs from the student's (student.model: {student_name}); "
            "token-level distillation needs loss.cross_tokenizer: uld or gold (or method: sequence)")


def ends(model, tok, renderer, spec=None):
    """``(EndOfTurn, its ids)`` of a side; a text end of turn's ids are its first token."""
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
    v_t = min(output_vocab_size(t_model), len(t_tok)) if t_model is not None else len(t_tok)
    s_eot, s_ids = ends(student, s_tok, renderer_for(cfg, s_tok))
    t_eot, t_ids = ends(t_model, t_tok, teacher_renderer(cfg, t_tok, spec), spec)
    classes = vocab_classes(s_tok, t_tok, v_s, v_t, s_ids, t_ids)
    say(f"cross-tokenizer distillation (loss.cross_tokenizer: {cfg.loss.cross_tokenizer}); the tokenizers differ:")
    for line in describe_differences(s_tok, t_tok, v_s, v_t, s_eot, t_eot, classes):
        say(f"  {line}")
    return v_s


class CrossTokenizerTeacher(Teacher):
    """Serves a student batch from a teacher with another tokenizer (see the module docstring).

    Args:
        inner: the teacher kind in its own tokens (reporting, refusals); ``source``: where its
            numbers come from (:class:`~kdistill.teachers.cross_sources.LiveSource` or ``CachedSource``).
        s_tok, s_renderer: the student's tokenizer and renderer (the run's).
        rows: the training rows by id (their text is what the teacher reads).
        classes: the vocabulary classes (:func:`kdistill.vocab_match.vocab_classes`); ``s_eot``: the
            student's end of turn.
    """

    can_fuse = True  # the cross target works with the student's chunked and plain paths alike
    cross_tokenizer = True  # several teachers: combined as a sum of losses (see kdistill.teachers.multi)

    def __init__(self, inner, source, s_tok, s_renderer, rows: dict, classes, s_eot, key: str = "teacher"):
        self.inner, self.source, self.s_tok, self.s_renderer, self.rows = inner, source, s_tok, s_renderer, rows
        self.classes, self.s_eot = classes, s_eot
        self.vocab_size = source.vocab_size
        self.key, self.name, self.kind = key, inner.name, inner.kind
        self.model = inner.model
        self.tokenizer = source.renderer.tok
        self.offers = inner.offers & frozenset({"distribution", "any_sequence"})
        self.what = f"{inner.what} with another tokenizer"
        self._s_feats: dict = {}
        self.stats = {"batches": 0, "spans": 0, "student_tokens": 0, "aligned_tokens": 0, "end_of_turn_spans": 0,
                      "matched_mass": 0.0}

    def _row(self, batch: dict, b: int):
        """The teacher's row for row ``b`` of the student ``batch``, and the row's spans."""
        sid = batch["ids"][b]
        ex = self.rows.get(sid)
        if ex is None:
            raise DataError(f"{self.key}: batch row {sid!r} is not a training row (the teacher re-tokenizes rows by id)")
        labels = batch["labels"][b]
        if batch.get("source") in ("student", "teacher"):  # sampled: the teacher reads the decoded completion
            pos = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
            start = int(pos[0]) + 1 if pos.numel() else 0
            text, s_ans = answer_from_ids(self.s_tok, labels[pos].tolist(), start, self.s_eot)
            t_row = self.source.row(ex, response=text)
            s_answers, t_answers = [s_ans], t_row["answers"][-1:]
        else:
            if sid not in self._s_feats:
                self._s_feats[sid] = encode_aligned(self.s_renderer, ex, self.s_eot)
            s_feat = self._s_feats[sid]
            n = len(s_feat["input_ids"])
            if batch["input_ids"][b, :n].tolist() != s_feat["input_ids"]:
                raise DataError(f"{self.key}: row {sid!r} is not tokenized as the run tokenizes it (data changed?)")
            t_row = self.source.row(ex)
            s_answers, t_answers = s_feat["answers"], t_row["answers"]
        spans = []
        for sa, ta in zip(s_answers, t_answers):
            spans += align(sa, ta)
        return t_row, spans

    @torch.no_grad()
    def signal(self, batch: dict, hidden: bool = True, feature_layers=None) -> TeacherSignal:
        """``TeacherSignal(cross=CrossTarget)`` for the student ``batch`` (``[batch, seq]`` labels)."""
        labels = batch["labels"]
        B, S = labels.shape
        t_rows, s_first, s_cont, cont_span, t_first, t_cont = [], [], [], [], [], []
        n_eot = 0
        for b in range(B):
            t_row, spans = self._row(batch, b)
            t_rows.append(t_row)
            for s_pos, t_pos in spans:
                k = len(s_first)
                s_first.append(b * S + s_pos[0] - 1)
                s_cont += [b * S + p - 1 for p in s_pos[1:]]
                cont_span += [k] * (len(s_pos) - 1)
                t_first.append((b, t_pos[0]))
                t_cont += [(b, p, k) for p in t_pos[1:]]
                n_eot += int(len(s_pos) == 1 and int(batch["input_ids"][b, s_pos[0]]) in self.s_eot.ids)
        t_logp, t_token, t_logc = self.source.logprobs(t_rows, t_first, t_cont)
        dev = labels.device
        s_first_t = torch.tensor(s_first, dtype=torch.long, device=dev)
        flat = labels.reshape(-1)
        if s_first and bool((flat[s_first_t] == IGNORE_INDEX).any()):  # pragma: no cover - an alignment bug
            raise RuntimeError("cross-tokenizer alignment points at an untrained student position")
        t_multi = torch.zeros(len(s_first), dtype=torch.bool)
        t_multi[[k for _, _, k in t_cont]] = True
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


def _teacher_tokenizer(spec, key: str, env):
    """The teacher's tokenizer: the primary's (loaded by the run), the model's, or a cache's own copy."""
    if spec is env.primary and env.weights is not None:
        return env.weights[1]
    if spec.model is not None:
        return load_tokenizer(spec.model, f"{key}.model", spec.revision, spec.trust_remote_code)
    saved = Path(spec.cache) / TEACHER_TOKENIZER_DIR
    if (saved / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved))
    return None


def cross_teacher(spec, key: str, env) -> Optional[Teacher]:
    """The teacher for ``spec`` when its tokenizer differs from the student's and the method needs
    token-level signal: a :class:`CrossTokenizerTeacher` with ``loss.cross_tokenizer``, a one-line
    refusal without it; None when the tokenizers match (the plain kind serves it)."""
    if "distribution" not in env.needs or (spec.model is None and spec.cache is None):
        return None
    cfg = env.cfg
    t_tok = _teacher_tokenizer(spec, key, env)
    if spec.cache is not None:
        cache = TopKCache(spec.cache)
        if t_tok is None and cache.tokenizer_fingerprint == tokenizer_fingerprint(env.tokenizer):
            return None
        if t_tok is None:
            raise CacheError(f"{key}.cache: {spec.cache} was made with another tokenizer and holds no teacher "
                             "tokenization; rerun `kdistill cache-teacher` with loss.cross_tokenizer")
    if tokenizer_fingerprint(t_tok) == tokenizer_fingerprint(env.tokenizer):
        return None
    s_name = (cfg.student.model if cfg.student else None) or "student"
    if cfg.loss.cross_tokenizer is None:
        raise ConfigError(refusal(spec.model or spec.cache, s_name, key))
    s_ren, t_ren = renderer_for(cfg, env.tokenizer), teacher_renderer(cfg, t_tok, spec)
    model = env.weights[0] if spec is env.primary and env.weights is not None else None
    if spec.cache is not None:
        if cache.tokenizer_fingerprint != tokenizer_fingerprint(t_tok):
            raise CacheError(f"{key}.cache: {spec.cache} was made with another teacher tokenizer than {spec.model}")
        if model is None:  # a cache alone: say what differs here (the run had no teacher weights to compare)
            preflight(cfg, None, t_tok, env.student, env.tokenizer, env.say, spec)
        inner = CachedTeacher(cache, cache.vocab_size)
        inner.key, inner.name = key, f"{cache.teacher} (cache)"
        t_eot, t_ids = ends(model, t_tok, t_ren, spec)
        source = CachedSource(cache, t_ren, t_eot, f"{key}.cache")
        env.say(f"{key}: cross-tokenizer top-{cache.top_k} cache {spec.cache} ({len(cache):,} rows)")
    else:
        if model is None:
            model, t_tok = load_model(spec.model, f"{key}.model", spec.dtype, spec.revision, spec.trust_remote_code)
            preflight(cfg, model, t_tok, env.student, env.tokenizer, env.say, spec)
        inner = LocalTeacher(model, min(output_vocab_size(model), len(t_tok)), name=spec.model, device=env.device,
                             tokenizer=t_tok)
        inner.key = key
        t_eot, t_ids = ends(model, t_tok, t_ren, spec)
        source = LiveSource(inner, t_ren, t_eot, env.device)
    s_eot, s_ids = ends(env.student, env.tokenizer, s_ren)
    classes = vocab_classes(env.tokenizer, t_tok, env.vocab_size, source.vocab_size, s_ids, t_ids)
    return CrossTokenizerTeacher(inner, source, env.tokenizer, s_ren, {e.id: e for e in env.rows}, classes, s_eot,
                                 key=key)
