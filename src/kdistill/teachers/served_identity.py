"""Who a served teacher is: what a vLLM server reports about itself, plus a measurement.

A served teacher is named only by ``teacher.api.model``, and the same name can stand for another
checkpoint, context length, vLLM release or dtype after a restart (a bfloat16 server's log-probs
differ from a float32 server's by up to ~0.5 nats). ``kdistill cache-teacher`` stores
:func:`served_identity` in the cache manifest and refuses to extend a cache whose server now says
something else (:func:`identity_mismatch`), unless ``cache.accept_teacher_change`` is set.

The identity is: the model name; ``/v1/models``' ``root`` and ``max_model_len`` for it;
``/version``; the dtype the server's log-probs were computed in, measured on a probe sequence
(:func:`logprob_dtype`); and the probe's top-1 log-probs themselves. A server without one of
these endpoints gives None there (and None matches None).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

PROBE_TOLERANCE = 0.01  # nats: the same server and dtype repeat its probe log-probs far closer than this
_GRIDS = [2.0 ** -e for e in range(0, 14)]  # candidate spacings of logit differences, coarsest first


def _row_grid(d: np.ndarray) -> float | None:
    """The coarsest power-of-two spacing all of a row's logit differences lie on (None: none >= 2^-13)."""
    for g in _GRIDS:
        r = d / g
        if np.all(np.abs(r - np.round(r)) * g < 1e-5):  # within float32 rounding of the log-softmax
            return g
    return None


def logprob_dtype(logprobs: np.ndarray) -> str:
    """The precision of the logits behind top-k log-probs ``[n, k]`` (rows sorted descending).

    A log-prob is ``logit - logsumexp``, so within a row ``lp_j - lp_0`` are differences of logits.
    Logits of one row have similar magnitudes, so in bfloat16 (8 significant bits) or float16 (11)
    the differences lie on a coarse power-of-two grid; in float32 practically never (a grid finer
    than 2^-13 is not tested). When 90% of the rows lie on a grid, the spread of a row in grid steps
    tells the two apart: about 2^5 steps in bfloat16, 2^8 in float16 (threshold 2^7). Returns
    ``"bfloat16"``, ``"float16"``, ``"float32"`` or ``"unknown"`` (fewer than 4 usable rows).
    """
    lp = np.asarray(logprobs, np.float64)
    if lp.ndim != 2 or lp.shape[1] < 3:
        return "unknown"
    steps = []
    for row in lp:
        d = row[1:] - row[0]
        d = d[np.isfinite(d) & (d != 0)]
        if d.size >= 2:
            g = _row_grid(d)
            steps.append(None if g is None else float(np.abs(d).max() / g))
    if len(steps) < 4:
        return "unknown"
    on_grid = [x for x in steps if x is not None]
    if len(on_grid) < 0.9 * len(steps):
        return "float32"
    return "bfloat16" if float(np.median(on_grid)) < 2 ** 7 else "float16"


def _get_json(url: str, headers: dict, timeout: float) -> Optional[dict]:
    import httpx

    try:
        resp = httpx.get(url, headers=headers, timeout=timeout)
        return resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def served_identity(teacher, tokenizer, probe_text: str) -> dict:
    """What the server behind ``teacher`` (a :class:`~kdistill.teachers.served.ServedTeacher`) says
    about itself, and the dtype and top-1 log-probs measured on ``probe_text`` (tokenized with
    ``tokenizer``, asked with the teacher's own top-k)."""
    cfg = teacher.cfg
    base = cfg.base_url.rstrip("/")
    root = base[: -len("/v1")] if base.endswith("/v1") else base
    headers = teacher.api._headers()
    models = _get_json(base + "/models", headers, cfg.timeout) or {}
    entry = next((m for m in models.get("data", []) if isinstance(m, dict) and m.get("id") == cfg.model), {})
    version = _get_json(root + "/version", headers, cfg.timeout) or {}
    ids = tokenizer.encode(probe_text, add_special_tokens=False)
    _, lp, _ = teacher.sequence_logprobs([ids])[0]
    return {
        "model": cfg.model,
        "root": entry.get("root"),
        "max_model_len": entry.get("max_model_len"),
        "version": version.get("version"),
        "logprob_dtype": logprob_dtype(lp),
        "probe_top1": [round(float(x), 5) for x in lp[:, 0]],
    }


def identity_mismatch(old: dict, new: dict) -> Optional[str]:
    """How ``new`` differs from ``old`` (one phrase), or None when it is the same teacher."""
    for key, what in (("model", "model"), ("root", "model root (/v1/models)"),
                      ("max_model_len", "max_model_len (/v1/models)"), ("version", "server version (/version)"),
                      ("logprob_dtype", "log-prob dtype (measured on a probe)")):
        if old.get(key) != new.get(key):
            return f"{what} was {old.get(key)!r}, now {new.get(key)!r}"
    a, b = old.get("probe_top1") or [], new.get("probe_top1") or []
    if len(a) != len(b):
        return f"the probe's length was {len(a)} tokens, now {len(b)} (another tokenizer?)"
    gap = max((abs(x - y) for x, y in zip(a, b)), default=0.0)
    if gap > PROBE_TOLERANCE:
        return f"its log-probs on a probe text moved by up to {gap:.3g} nats (another checkpoint or dtype)"
    return None
