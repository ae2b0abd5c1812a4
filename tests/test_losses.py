"""Divergences against hand-computed float64 references; the fused path against the plain one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kdistill.losses as losses
from kdistill.losses import (
    DIVERGENCES,
    LossSpec,
    TopK,
    auto_chunk_size,
    distill_loss,
    divergence,
    fused_distill_loss,
    token_losses,
)
from kdistill.losses.divergences import Pair, register, unregister

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP hand-off costs (large on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# β for jsd, α for the skews; endpoints included
PARAMS = {
    "forward_kl": [{}],
    "reverse_kl": [{}],
    "jsd": [{"beta": b} for b in (0.0, 0.1, 0.5, 0.9, 1.0)],
    "skew_forward_kl": [{"skew": a} for a in (0.0, 0.1, 0.5, 1.0)],
    "skew_reverse_kl": [{"skew": a} for a in (0.0, 0.1, 0.5, 1.0)],
    "tvd": [{}],
}


# ---------------------------------------------------------------------------------------------
# independent float64 reference: explicit loops over tokens, numpy


def _softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _kl64(a: np.ndarray, b: np.ndarray) -> float:
    return float(sum(ai * math.log(ai / bi) for ai, bi in zip(a, b) if ai > 0))


def ref_divergence(p: np.ndarray, q: np.ndarray, kind: str, beta=0.5, skew=0.1) -> float:
    """Textbook definitions on one token's distributions (P teacher, Q student)."""
    if kind == "forward_kl":
        return _kl64(p, q)
    if kind == "reverse_kl":
        return _kl64(q, p)
    if kind == "jsd":  # TRL's generalized JSD with its endpoint convention
        if beta == 0.0:
            return _kl64(p, q)
        if beta == 1.0:
            return _kl64(q, p)
        m = beta * p + (1 - beta) * q
        return beta * _kl64(p, m) + (1 - beta) * _kl64(q, m)
    if kind == "skew_forward_kl":
        return _kl64(p, skew * p + (1 - skew) * q)
    if kind == "skew_reverse_kl":
        return _kl64(q, (1 - skew) * p + skew * q)
    if kind == "tvd":
        return 0.5 * float(np.abs(p - q).sum())
    raise ValueError(kind)


def ref_loss(s_logits, t_logits, labels, kind, T=1.0, beta=0.5, skew=0.1, w=0.0, num_items=None, topk=None) -> float:
    """Σ over kept tokens of (1−w)·T²·D + w·CE, divided by num_items (default: the kept count)."""
    s = s_logits.detach().double().reshape(-1, s_logits.shape[-1]).numpy()
    lab = labels.reshape(-1).numpy()
    total, n = 0.0, 0
    for i in range(len(lab)):
        if lab[i] == -100:
            continue
        n += 1
        q = _softmax64(s[i] / T)
        if topk is None:
            p = _softmax64(t_logits.double().reshape(-1, s.shape[-1]).numpy()[i] / T)
        else:  # coarse-grain: k cached tokens + one rest bucket
            idx = topk.indices.reshape(-1, topk.indices.shape[-1]).numpy()[i]
            t1 = np.exp(topk.logprobs.double().reshape(len(lab), -1).numpy()[i])
            bins = np.append(t1, max(1.0 - t1.sum(), 0.0)) ** (1.0 / T)
            p = bins / bins.sum()
            if len(idx) < s.shape[-1]:  # bin the student at T = 1 too, then temper its bins alike
                q1 = _softmax64(s[i])
                sb = np.append(q1[idx], max(1.0 - q1[idx].sum(), 0.0)) ** (1.0 / T)
                q = sb / sb.sum()
            else:
                q = np.append(q[idx], 1.0 - q[idx].sum())
        total += (1 - w) * T * T * ref_divergence(p, q, kind, beta, skew)
        if w > 0:
            total += w * -math.log(_softmax64(s[i])[lab[i]])
    return total / (num_items if num_items is not None else max(n, 1))


def _data(n=40, V=23, seed=0, scale=2.0, masked=9):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, V, generator=g) * scale
    t = torch.randn(n, V, generator=g) * scale
    labels = torch.randint(0, V, (n,), generator=g)
    labels[torch.randperm(n, generator=g)[:masked]] = -100
    return s, t, labels


def _rel(a, b) -> float:
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    return abs(a - b) / max(abs(b), 1e-12)


# ---------------------------------------------------------------------------------------------
# plain path against the reference


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_matches_reference(kind):
    s, t, labels = _data()
    for params in PARAMS[kind]:
        for T in (0.5, 1.0, 2.5):
            for w in (0.0, 0.4, 1.0):
                got = distill_loss(s, t, labels, kind, temperature=T, hard_label_weight=w, **params)
                want = ref_loss(s, t, labels, kind, T=T, w=w, **params)
                assert got.dtype == torch.float32
                assert _rel(got, want) < 1e-5, (params, T, w, float(got), want)


def test_batched_shapes_and_num_items():
    s, t, labels = _data(n=24)
    got = distill_loss(s.reshape(4, 6, -1), t.reshape(4, 6, -1), labels.reshape(4, 6), "jsd", num_items=50)
    assert _rel(got, ref_loss(s, t, labels, "jsd", num_items=50)) < 1e-5
    # the global count only rescales: sum / num_items
    local = distill_loss(s, t, labels, "jsd")
    assert _rel(got * 50, local * int((labels != -100).sum())) < 1e-6


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t, labels = _data()
    for T in (1.0, 2.0):
        fkl = distill_loss(s, t, labels, "forward_kl", temperature=T)
        rkl = distill_loss(s, t, labels, "reverse_kl", temperature=T)
        assert float(distill_loss(s, t, labels, "jsd", temperature=T, beta=0.0)) == float(fkl)
        assert float(distill_loss(s, t, labels, "jsd", temperature=T, beta=1.0)) == float(rkl)
        # skew 0 is the plain KL in both directions; skew 1 compares a distribution with itself
        assert _rel(distill_loss(s, t, labels, "skew_forward_kl", temperature=T, skew=0.0), fkl) < 1e-6
        assert _rel(distill_loss(s, t, labels, "skew_reverse_kl", temperature=T, skew=0.0), rkl) < 1e-6
        assert float(distill_loss(s, t, labels, "skew_forward_kl", skew=1.0)) == 0.0


def test_generalized_jsd_hand_value():
    # P = (0.7, 0.2, 0.1), Q = (0.2, 0.5, 0.3), β = 0.5 -> M = (0.45, 0.35, 0.2)
    # KL(P‖M) = 0.7·ln(0.7/0.45) + 0.2·ln(0.2/0.35) + 0.1·ln(0.1/0.2) = 0.1280450510
    # KL(Q‖M) = 0.2·ln(0.2/0.45) + 0.5·ln(0.5/0.35) + 0.3·ln(0.3/0.2) = 0.1377909612
    # JSD = 0.5·0.1280450510 + 0.5·0.1377909612 = 0.1329180061
    p = torch.tensor([[0.7, 0.2, 0.1]]).log()
    q = torch.tensor([[0.2, 0.5, 0.3]]).log()
    assert abs(float(divergence(p, q, "jsd", beta=0.5)) - 0.1329180061) < 1e-6
    # TRL's formula (logsumexp mixture, kl_div with log targets) gives the same number
    b = torch.tensor(0.5)
    m = torch.logsumexp(torch.stack([q + torch.log1p(-b), p + torch.log(b)]), dim=0)
    kl = lambda target: torch.nn.functional.kl_div(m, target, reduction="none", log_target=True).sum()
    trl = b * kl(p) + (1 - b) * kl(q)
    assert abs(float(trl) - 0.1329180061) < 1e-6
    # as a loss from logits (log-probs are logits), times T² = 1, one token
    assert abs(float(distill_loss(q, p, torch.tensor([0]), "jsd", beta=0.5)) - 0.1329180061) < 1e-6


def test_token_losses_and_spec_validation():
    s, t, labels = _data(n=6, masked=0)
    spec = LossSpec("tvd", temperature=2.0, hard_label_weight=0.25)
    per = token_losses(s, t, labels, spec)
    assert per.shape == (6,)
    assert _rel(per.mean(), ref_loss(s, t, labels, "tvd", T=2.0, w=0.25)) < 1e-5
    with pytest.raises(ValueError, match="unknown divergence"):
        LossSpec("kl")
    with pytest.raises(ValueError, match="beta"):
        LossSpec("jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(s, t, labels, temperature=0.0)


# ---------------------------------------------------------------------------------------------
# fused path against the plain path (value and gradients)


def _fused_case(n=30, H=12, V=37, seed=0, masked=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.8).to(dtype).requires_grad_()
    th = torch.randn(n, H + 4, generator=g).to(dtype)
    tw = (torch.randn(V, H + 4, generator=g) * 0.8).to(dtype)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[torch.randperm(n, generator=g)[:masked]] = -100
    return h, w, th, tw, labels


def _grads(loss, h, w):
    return torch.autograd.grad(loss, (h, w))


def _close(a, b, rtol=1e-5):
    a, b = a.detach(), b.detach()
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_fused_equals_plain(kind):
    h, w, th, tw, labels = _fused_case()  # 24 kept tokens
    params = PARAMS[kind][len(PARAMS[kind]) // 2]  # an interior β / α
    for T, hw, chunk in ((1.0, 0.0, 8), (2.0, 0.0, 5), (0.7, 0.3, 5), (1.0, 0.6, 8), (1.5, 0.3, "auto"), (1.0, 0.0, 1000)):
        kw = dict(divergence=kind, temperature=T, hard_label_weight=hw, num_items=31, **params)
        plain = distill_loss(h @ w.t(), th @ tw.t(), labels, **kw)
        fused = fused_distill_loss(h, w, th, tw, labels, chunk_size=chunk, **kw)
        assert fused.dtype == torch.float32
        _close(fused, plain)
        for gf, gp in zip(_grads(fused, h, w), _grads(plain, h, w)):
            _close(gf, gp)


@pytest.mark.parametrize("kind", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_fused_equals_plain_at_endpoints(kind):
    h, w, th, tw, labels = _fused_case(seed=1)
    for params in PARAMS[kind]:
        plain = distill_loss(h @ w.t(), th @ tw.t(), labels, kind, **params)
        fused = fused_distill_loss(h, w, th, tw, labels, kind, chunk_size=7, **params)
        _close(fused, plain)
        for gf, gp in zip(_grads(fused, h, w), _grads(plain, h, w)):
            torch.testing.assert_close(gf, gp, rtol=1e-5, atol=1e-6)


def test_fused_batched_shapes_and_no_grad():
    h, w, th, tw, labels = _fused_case(n=24)
    fused = fused_distill_loss(h.reshape(4, 6, -1), w, th.reshape(4, 6, -1), tw, labels.reshape(4, 6), "jsd", chunk_size=4)
    plain = distill_loss(h @ w.t(), th @ tw.t(), labels, "jsd")
    _close(fused, plain)
    _close(_grads(fused, h, w)[0], _grads(plain, h, w)[0])
    with torch.no_grad():
        assert _rel(fused_distill_loss(h, w, th, tw, labels, "jsd"), plain) < 1e-5
    with pytest.raises(ValueError, match="vocab"):
        fused_distill_loss(h, w, th, tw[:-1], labels)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_distill_loss(h, w, th, tw, labels, chunk_size=0)


def test_auto_chunk_size():
    assert auto_chunk_size(8192, 49152, 576) == 256  # the demo teacher's shape
    assert auto_chunk_size(8192, 128256, 4096) == 256  # Llama-3-8B's
    assert auto_chunk_size(10, 23, 12) == 10  # never more than the tokens
    assert auto_chunk_size(1 << 20, 1 << 10, 1 << 12) == 1 << 20


# ---------------------------------------------------------------------------------------------
# top-k teachers


def _topk(t_logits, k):
    lp = torch.log_softmax(t_logits.float(), -1)
    v, i = lp.topk(k, dim=-1)
    return TopK(i, v)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_topk_plain_matches_reference_and_full_vocab(kind):
    s, t, labels = _data()
    V = s.shape[-1]
    params = PARAMS[kind][len(PARAMS[kind]) // 2]
    for T in (1.0, 2.0):
        for w in (0.0, 0.3):
            kw = dict(temperature=T, hard_label_weight=w, **params)
            tk = _topk(t, 5)
            got = distill_loss(s, None, labels, kind, teacher_topk=tk, **kw)
            assert _rel(got, ref_loss(s, t, labels, kind, T=T, w=w, topk=tk, **params)) < 1e-5
            # k = vocab: exactly the full-vocabulary loss (a permutation, no rest bucket)
            full = distill_loss(s, None, labels, kind, teacher_topk=_topk(t, V), **kw)
            assert _rel(full, distill_loss(s, t, labels, kind, **kw)) < 1e-5
    # coarse-graining can only lose information: top-k KL is a lower bound of the full KL
    if kind in ("forward_kl", "reverse_kl"):
        for k in (1, 5, 20):
            assert float(distill_loss(s, None, labels, kind, teacher_topk=_topk(t, k))) <= float(distill_loss(s, t, labels, kind)) + 1e-6


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_topk_fused_equals_plain(kind):
    h, w, th, tw, labels = _fused_case(seed=2)
    V = w.shape[0]
    params = PARAMS[kind][len(PARAMS[kind]) // 2]
    for k, T, hw, chunk in ((6, 1.0, 0.0, 5), (6, 2.0, 0.3, 8), (V, 1.0, 0.0, 7), (V, 1.5, 0.2, "auto")):
        tk = _topk(th @ tw.t(), k)
        kw = dict(divergence=kind, temperature=T, hard_label_weight=hw, num_items=29, teacher_topk=tk, **params)
        plain = distill_loss(h @ w.t(), None, labels, **kw)
        fused = fused_distill_loss(h, w, None, None, labels, chunk_size=chunk, **kw)
        _close(fused, plain)
        for gf, gp in zip(_grads(fused, h, w), _grads(plain, h, w)):
            _close(gf, gp)
        if k == V:  # and the full-vocabulary fused loss
            _close(fused, fused_distill_loss(h, w, th, tw, labels, chunk_size=chunk, **{**kw, "teacher_topk": None}))


def test_topk_teacher_with_low_precision_and_masked_entries():
    s, t, labels = _data()
    tk = _topk(t, 4)
    half = TopK(tk.indices.int(), tk.logprobs.half())  # a cache may store fp16 / int32
    got = distill_loss(s, None, labels, "forward_kl", teacher_topk=half)
    assert torch.isfinite(got) and _rel(got, distill_loss(s, None, labels, "forward_kl", teacher_topk=tk)) < 1e-3
    # a teacher whose top-k holds all the mass (and -inf entries) has an empty rest bucket
    lp = torch.full_like(tk.logprobs, float("-inf"))
    lp[:, 0] = 0.0
    for kind in DIVERGENCES:
        s_ = s.clone().requires_grad_()
        loss = distill_loss(s_, None, labels, kind, teacher_topk=TopK(tk.indices, lp))
        (g,) = torch.autograd.grad(loss, s_)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), kind


# ---------------------------------------------------------------------------------------------
# edge cases: empty mask, extreme logits, -inf entries, identical distributions, bf16


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_empty_mask_is_zero_with_zero_gradients(kind):
    h, w, th, tw, labels = _fused_case()
    labels = torch.full_like(labels, -100)
    s = (h @ w.t()).detach().requires_grad_()
    for hw in (0.0, 0.5):
        for loss, inputs in (
            (distill_loss(s, th @ tw.t(), labels, kind, hard_label_weight=hw), (s,)),
            (distill_loss(s, None, labels, kind, teacher_topk=_topk(th @ tw.t(), 3), hard_label_weight=hw), (s,)),
            (fused_distill_loss(h, w, th, tw, labels, kind, hard_label_weight=hw), (h, w)),
            (fused_distill_loss(h, w, None, None, labels, kind, teacher_topk=_topk(th @ tw.t(), 3), num_items=0), (h, w)),
        ):
            assert float(loss) == 0.0
            for g in torch.autograd.grad(loss, inputs, allow_unused=True):
                assert g is None or (torch.isfinite(g).all() and not g.any())


def _torch64_loss(s, t, labels, kind, T=1.0, w=0.0, beta=0.5, skew=0.1):
    """Float64 textbook loss for autograd references (finite logits, every token kept)."""
    ls, lt = torch.log_softmax(s.double() / T, -1), torch.log_softmax(t.double() / T, -1)
    p, q = lt.exp(), ls.exp()
    kl = lambda a, la, lb: (a * (la - lb)).sum(-1)
    mix = lambda la, lb, c: torch.logaddexp(la + math.log(c), lb + math.log(1 - c))  # log(c·A + (1−c)·B)
    d = {
        "forward_kl": lambda: kl(p, lt, ls),
        "reverse_kl": lambda: kl(q, ls, lt),
        "jsd": lambda: beta * kl(p, lt, mix(lt, ls, beta)) + (1 - beta) * kl(q, ls, mix(lt, ls, beta)),
        "skew_forward_kl": lambda: kl(p, lt, mix(lt, ls, skew)),
        "skew_reverse_kl": lambda: kl(q, ls, mix(ls, lt, skew)),
        "tvd": lambda: 0.5 * (p - q).abs().sum(-1),
    }[kind]()
    ce = -torch.log_softmax(s.double(), -1).gather(-1, labels[:, None]).squeeze(-1)
    return ((1 - w) * T * T * d + w * ce).mean()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_extreme_logits_are_finite_and_exact(kind):
    g = torch.Generator().manual_seed(3)
    n, V, H = 16, 11, 4
    labels = torch.randint(0, V, (n,), generator=g)
    sign = lambda: torch.where(torch.rand(n, V, generator=g) < 0.5, -1.0, 1.0)
    s = (sign() * 1e4).requires_grad_()
    t = sign() * 1e4
    for T in (0.5, 1.0, 3.0):
        loss = distill_loss(s, t, labels, kind, temperature=T, hard_label_weight=0.2)
        (gs,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(gs).all()
        assert _rel(loss, _torch64_loss(s, t, labels, kind, T=T, w=0.2)) < 1e-5
    # hidden states / weights that produce logits beyond ±1e4
    h = (torch.randn(n, H, generator=g) * 100).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 100).requires_grad_()
    th, tw = torch.randn(n, H, generator=g) * 100, torch.randn(V, H, generator=g) * 100
    assert float((h @ w.t()).abs().max()) > 1e4
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _torch64_loss(h64 @ w64.t(), th.double() @ tw.double().t(), labels, kind, w=0.2)
    ref_grads = _grads(ref, h64, w64)
    plain = distill_loss(h @ w.t(), th @ tw.t(), labels, kind, hard_label_weight=0.2)
    fused = fused_distill_loss(h, w, th, tw, labels, kind, hard_label_weight=0.2, chunk_size=5)
    assert _rel(plain, ref) < 1e-5 and _rel(fused, ref) < 1e-5
    # the fused path's closed-form gradient stays exact; autograd through the formula (plain
    # path) loses digits to cancellation at this scale (reverse KL: ~1e-3 relative), but stays finite
    for gf, gp, gr in zip(_grads(fused, h, w), _grads(plain, h, w), ref_grads):
        assert torch.isfinite(gf).all() and torch.isfinite(gp).all()
        _close(gf.double(), gr)
        _close(gp.double(), gr, rtol=1e-2)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_masked_vocabulary(kind):
    s, t, labels = _data()
    banned = torch.tensor([2, 7, 19])
    s_m, t_m = s.clone(), t.clone()
    s_m[:, banned] = float("-inf")
    t_m[:, banned] = float("-inf")
    keep = torch.tensor([i for i in range(s.shape[-1]) if i not in set(banned.tolist())])
    labels = torch.where(torch.isin(labels, banned), -100, labels)
    params = PARAMS[kind][len(PARAMS[kind]) // 2]
    s_m.requires_grad_()
    for T in (1.0, 2.0):
        loss = distill_loss(s_m, t_m, labels, kind, temperature=T, hard_label_weight=0.3, **params)
        (g,) = torch.autograd.grad(loss, s_m)
        assert torch.isfinite(g).all() and not g[:, banned].any()
        # masking both sides == the divergence on the remaining vocabulary
        remap = torch.where(labels == -100, -100, torch.searchsorted(keep, labels.clamp(min=0)))
        want = ref_loss(s[:, keep], t[:, keep], remap, kind, T=T, w=0.3, **params)
        assert _rel(loss, want) < 1e-5
    # only the student masks tokens the teacher likes: large but finite, finite gradients
    s_only = s.clone()
    s_only[:, banned] = float("-inf")
    s_only.requires_grad_()
    loss = distill_loss(s_only, t, labels, kind, **params)
    (g,) = torch.autograd.grad(loss, s_only)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_identical_distributions(kind):
    h, w, _, _, labels = _fused_case()
    params = PARAMS[kind][len(PARAMS[kind]) // 2]
    s = (h @ w.t()).detach().requires_grad_()
    loss = distill_loss(s, s.detach(), labels, kind, **params)
    (g,) = torch.autograd.grad(loss, s)
    assert abs(float(loss)) < 1e-6 and torch.isfinite(g).all() and float(g.abs().max()) < 1e-6
    fused = fused_distill_loss(h, w, h.detach(), w.detach(), labels, kind, **params)
    gh, gw = _grads(fused, h, w)
    assert abs(float(fused)) < 1e-6 and float(gh.abs().max()) < 1e-5 and float(gw.abs().max()) < 1e-5


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_bf16_inputs(kind):
    h, w, th, tw, labels = _fused_case(dtype=torch.bfloat16, n=40, V=64)
    params = PARAMS[kind][len(PARAMS[kind]) // 2]
    kw = dict(divergence=kind, temperature=1.5, hard_label_weight=0.25, **params)
    fused = fused_distill_loss(h, w, th, tw, labels, chunk_size=16, **kw)
    gh, gw = _grads(fused, h, w)
    assert fused.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    # plain path on the same bf16 logits: float32 math, same value
    plain = distill_loss(h @ w.t(), th @ tw.t(), labels, **kw)
    assert _rel(fused, plain) < 1e-4
    # gradients against float32 autograd on the same (bf16-valued) inputs: bf16 rounding only
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = distill_loss(h32 @ w32.t(), th.float() @ tw.float().t(), labels, **kw)
    assert _rel(fused, ref) < 2e-2
    for gf, gr in zip((gh, gw), _grads(ref, h32, w32)):
        assert float((gf.float() - gr).abs().max()) < 3e-2 * float(gr.abs().max())



def test_fused_backward_scales_and_accumulates():
    h, w, th, tw, labels = _fused_case()
    fused = fused_distill_loss(h, w, th, tw, labels, "jsd", chunk_size=7)
    (3.0 * fused).backward(retain_graph=True)
    fused.backward()  # .grad accumulates 3 + 1 times the gradient
    gh, gw = _grads(4.0 * distill_loss(h @ w.t(), th @ tw.t(), labels, "jsd"), h, w)
    _close(h.grad, gh)
    _close(w.grad, gw)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_topk_teacher_equal_to_student_gives_zero_at_any_temperature(divergence, temperature):
    """Tempering treats the rest bucket alike on both sides: the minimum stays at the teacher."""
    from kdistill.losses import TopK, distill_loss, fused_distill_loss

    torch.manual_seed(0)
    N, H, V, k = 12, 8, 40, 5
    hidden = torch.randn(N, H)
    weight = torch.randn(V, H)
    logits = hidden @ weight.t()
    logp = torch.log_softmax(logits, -1)
    top = logp.topk(k, dim=-1)
    topk = TopK(top.indices, top.values)
    labels = torch.randint(0, V, (N,))
    s = logits.clone().requires_grad_(True)
    loss = distill_loss(s, None, labels, divergence=divergence, temperature=temperature, teacher_topk=topk)
    loss.backward()
    assert abs(float(loss)) < 1e-5
    if divergence != "tvd":  # |x| has no useful gradient at 0
        assert s.grad.abs().max() < 1e-5
    h = hidden.clone().requires_grad_(True)
    fused = fused_distill_loss(h, weight, None, None, labels, divergence=divergence, temperature=temperature,
                               teacher_topk=topk, chunk_size=5)
    fused.backward()
    assert abs(float(fused)) < 1e-5
    if divergence != "tvd":
        assert h.grad.abs().max() < 1e-4


def test_autocast_and_mixed_dtypes_inputs():
    """Hidden states from a bf16 autocast forward with an fp32 output layer (a mixed-precision run):
    the fused loss and the chunked label log-probs run, and agree with float32 inputs to bf16 accuracy."""
    from kdistill.losses import fused_distill_loss, label_logprobs

    torch.manual_seed(0)
    h0 = torch.randn(2, 6, 16)
    w = torch.randn(50, 16, requires_grad=True)
    tw = torch.randn(50, 16)
    th = torch.randn(2, 6, 16)
    labels = torch.randint(0, 50, (2, 6))
    labels[0, :2] = -100
    ref_lp = label_logprobs(h0, w, labels, 4)
    ref_kd = fused_distill_loss(h0, w, th, tw, labels, chunk_size=4)
    lin = torch.nn.Identity()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.nn.functional.linear(lin(h0), torch.eye(16))  # bf16 under autocast
        assert h.dtype == torch.bfloat16
        lp = label_logprobs(h, w, labels, 4)
        kd = fused_distill_loss(h, w, th.bfloat16(), tw, labels, chunk_size=4)
    (lp.sum() + kd).backward()
    assert w.grad is not None and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
    assert torch.allclose(lp, ref_lp, atol=0.1) and abs(float(kd) - float(ref_kd)) < 0.05 * abs(float(ref_kd))


# ---------------------------------------------------------------------------------------------
# the registry: a divergence defined here, in one function, runs on both paths


def test_registered_toy_divergence_fused_equals_plain():
    """Squared Hellinger distance Σ(√p − √q)², registered from this file: its value on the plain
    path (autograd) and its closed-form gradient on the fused path must agree, then it is removed."""
    name = "test_squared_hellinger"

    @register(name)
    def squared_hellinger(x: Pair, grad: bool = False):
        # ∂/∂ls_j Σ(√p − √q)² = q_j − √(p_j·q_j); the +q part is cancelled by the softmax Jacobian
        d = ((x.lt * 0.5).exp() - (x.ls * 0.5).exp()).square().sum(-1)
        return d, (((x.lt + x.ls) * 0.5).exp().neg_() if grad else None)

    try:
        assert losses.DIVERGENCES == (*DIVERGENCES, name)
        assert LossSpec(name).divergence == name
        with pytest.raises(ValueError, match="already registered"):
            register(name)(squared_hellinger)
        # the value against a float64 reference on one token
        p, q = [0.7, 0.2, 0.1], [0.2, 0.5, 0.3]
        want = float(((np.sqrt(p) - np.sqrt(q)) ** 2).sum())
        got = divergence(torch.tensor([p]).log(), torch.tensor([q]).log(), name)
        assert abs(float(got) - want) < 1e-6
        # fused (closed-form gradient) against plain (autograd), full-vocabulary and top-k teachers
        h, w, th, tw, labels = _fused_case(seed=4)
        V = w.shape[0]
        for T, hw, chunk in ((1.0, 0.0, 8), (2.0, 0.3, 5), (0.7, 0.0, "auto")):
            kw = dict(divergence=name, temperature=T, hard_label_weight=hw, num_items=27)
            plain = distill_loss(h @ w.t(), th @ tw.t(), labels, **kw)
            fused = fused_distill_loss(h, w, th, tw, labels, chunk_size=chunk, **kw)
            assert float(plain) > 0
            _close(fused, plain)
            for gf, gp in zip(_grads(fused, h, w), _grads(plain, h, w)):
                _close(gf, gp)
            for k in (6, V):
                tk = _topk(th @ tw.t(), k)
                plain = distill_loss(h @ w.t(), None, labels, teacher_topk=tk, **kw)
                fused = fused_distill_loss(h, w, None, None, labels, teacher_topk=tk, chunk_size=chunk, **kw)
                _close(fused, plain)
                for gf, gp in zip(_grads(fused, h, w), _grads(plain, h, w)):
                    _close(gf, gp)
        # the same distributions: 0
        s = (h @ w.t()).detach()
        assert abs(float(distill_loss(s, s, labels, name))) < 1e-6
    finally:
        unregister(name)
    assert losses.DIVERGENCES == tuple(DIVERGENCES) and name not in losses.DIVERGENCES
    with pytest.raises(ValueError, match="unknown divergence .*expected one of forward_kl, reverse_kl"):
        LossSpec(name)
