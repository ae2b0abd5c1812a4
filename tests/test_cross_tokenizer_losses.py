"""Cross-tokenizer losses (ULD and the GOLD-style mapped loss) against float64 references written
out element by element; identical tokenizers give the ordinary divergence; the chunked path agrees
with the plain one (values and gradients)."""

import math

import pytest
import torch

from kdistill.losses import distill_loss
from kdistill.losses.cross_tokenizer import CrossTarget, VocabClasses, cross_tokenizer_loss


def _softmax64(x, T):
    x = [v / T for v in x]
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]


def _div64(kind, p, q, beta=0.5):
    kl = lambda a, b: sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b) if x > 0)  # noqa: E731
    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    raise KeyError(kind)


def _sorted_l1_64(a, b):
    a, b = sorted(a, reverse=True), sorted(b, reverse=True)
    n = max(len(a), len(b))
    a, b = a + [0.0] * (n - len(a)), b + [0.0] * (n - len(b))
    return sum(abs(x - y) for x, y in zip(a, b))


def _merged64(p, first, logc):
    """(p(text), vector with the first token's entry p(first)·(1 − c))."""
    c = math.exp(logc)
    v = list(p)
    v[first] = p[first] * (1.0 - c)
    return p[first] * c, v


def reference(kind, logits, labels, tgt, classes, divergence="forward_kl", T=1.0, w=0.0, beta=0.5):
    """The loss in float64 Python arithmetic, span by span and class by class."""
    V = logits.shape[-1]
    z = logits.reshape(-1, V).double().tolist()
    lab = labels.reshape(-1).tolist()
    s_lp1 = lambda r, y: math.log(_softmax64(z[r], 1.0)[y])  # noqa: E731
    total = 0.0
    for k, first in enumerate(tgt.s_first.tolist()):
        s_c = sum(s_lp1(r, lab[r]) for r, sp in zip(tgt.s_cont.tolist(), tgt.cont_span.tolist()) if sp == k)
        es, vs = _merged64(_softmax64(z[first], T), lab[first], s_c)
        et, vt = _merged64(_softmax64(tgt.t_logp[k].double().tolist(), T), int(tgt.t_token[k]), float(tgt.t_logc[k]))
        if kind == "uld":
            d = _sorted_l1_64([et] + vt, [es] + vs)
        else:
            sc, tc = classes.student.tolist(), classes.teacher.tolist()
            bt = [et] + [sum(vt[i] for i in range(len(vt)) if tc[i] == c) for c in range(classes.n)]
            bs = [es] + [sum(vs[i] for i in range(len(vs)) if sc[i] == c) for c in range(classes.n)]
            # the class whose string is the span's text (a one-token side's token) joins "the text"
            t_single = not bool(tgt.t_multi[k]) if tgt.t_multi is not None else float(tgt.t_logc[k]) == 0.0
            s_single = k not in tgt.cont_span.tolist()
            for text in {sc[lab[first]] if s_single else -1, tc[int(tgt.t_token[k])] if t_single else -1}:
                if text >= 0:
                    for bins in (bt, bs):
                        bins[0] += bins[1 + text]
                        bins[1 + text] = 0.0
            bt.append(sum(vt[i] for i in range(len(vt)) if tc[i] < 0))
            bs.append(sum(vs[i] for i in range(len(vs)) if sc[i] < 0))
            d = _div64(divergence, bt, bs, beta)
            d += _sorted_l1_64([vt[i] for i in range(len(vt)) if tc[i] < 0], [vs[i] for i in range(len(vs)) if sc[i] < 0])
        total += (1 - w) * T * T * d
    ce = -sum(s_lp1(r, y) for r, y in enumerate(lab) if y != -100)
    return (total + w * ce) / sum(1 for y in lab if y != -100)


def _case(seed=0, Vs=7, Vt=9, H=5):
    g = torch.Generator().manual_seed(seed)
    B, S = 2, 6
    hidden = torch.randn(B, S, H, generator=g, dtype=torch.float64).float()
    weight = torch.randn(Vs, H, generator=g).mul(1.5)
    labels = torch.full((B, S), -100, dtype=torch.long)
    labels[0, 1:5] = torch.tensor([1, 4, 2, 6])
    labels[1, 2:6] = torch.tensor([3, 0, 5, 2])
    # spans (flat label positions): [1] [2,3] [4] | [8] [9,10,11] -> firsts 1, 2, 4, 8, 9
    first = torch.tensor([1, 2, 4, 8, 9])
    cont = torch.tensor([3, 10, 11])
    cont_span = torch.tensor([1, 4, 4])
    t_logp = torch.log_softmax(torch.randn(5, Vt, generator=g) * 2, -1)
    t_token = torch.tensor([2, 0, 7, 5, 1])
    t_logc = torch.tensor([0.0, -0.7, 0.0, 0.0, -1.9])
    classes = VocabClasses(torch.tensor([0, 1, -1, 2, 3, -1, 4]), torch.tensor([1, -1, 0, 3, -1, 2, 4, -1, -1]), 5)
    tgt = CrossTarget(first, cont, cont_span, t_logp, t_token, t_logc, classes)
    return hidden, weight, labels, tgt, classes


@pytest.mark.parametrize("kind,divergence,T,w", [
    ("uld", "forward_kl", 1.0, 0.0), ("uld", "forward_kl", 2.0, 0.3),
    ("gold", "forward_kl", 1.0, 0.0), ("gold", "reverse_kl", 1.5, 0.0), ("gold", "jsd", 1.0, 0.5),
    ("gold", "tvd", 1.0, 0.0),
])
def test_losses_match_float64_reference(kind, divergence, T, w):
    hidden, weight, labels, tgt, classes = _case()
    logits = hidden @ weight.t()
    got = cross_tokenizer_loss(kind, labels, tgt, logits=logits, divergence=divergence, temperature=T,
                               hard_label_weight=w)
    want = reference(kind, logits, labels, tgt, classes, divergence, T, w)
    assert float(got) == pytest.approx(want, rel=2e-5, abs=1e-6)


@pytest.mark.parametrize("kind", ["uld", "gold"])
def test_chunked_path_equals_plain_path(kind):
    hidden, weight, labels, tgt, _ = _case(seed=3)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain = cross_tokenizer_loss(kind, labels, tgt, logits=h1 @ w1.t(), divergence="jsd", temperature=1.5,
                                 hard_label_weight=0.25, num_items=11)
    plain.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    chunked = cross_tokenizer_loss(kind, labels, tgt, hidden=h2, weight=w2, divergence="jsd", temperature=1.5,
                                   hard_label_weight=0.25, num_items=11, chunk_size=2)
    chunked.backward()
    assert float(chunked) == pytest.approx(float(plain), rel=1e-5)
    assert torch.allclose(h2.grad, h1.grad, atol=1e-6, rtol=1e-4)
    assert torch.allclose(w2.grad, w1.grad, atol=1e-6, rtol=1e-4)
    assert torch.isfinite(h2.grad).all() and h2.grad.abs().sum() > 0


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "tvd"])
def test_mapped_loss_with_identical_tokenizers_is_the_ordinary_divergence(divergence):
    """Same vocabulary (classes = ids, every span one token, no continuation): exactly the logit loss."""
    g = torch.Generator().manual_seed(1)
    B, S, V = 2, 5, 11
    s_logits = torch.randn(B, S, V, generator=g, requires_grad=True)
    t_logits = torch.randn(B, S, V, generator=g) * 2
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[:, 0] = -100
    keep = (labels.reshape(-1) != -100).nonzero().squeeze(-1)
    t_logp = torch.log_softmax(t_logits.reshape(-1, V)[keep], -1)
    ids = torch.arange(V)
    tgt = CrossTarget(keep, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), t_logp,
                      labels.reshape(-1)[keep], torch.zeros(keep.numel()), VocabClasses(ids, ids, V))
    got = cross_tokenizer_loss("gold", labels, tgt, logits=s_logits, divergence=divergence, temperature=2.0,
                               hard_label_weight=0.2)
    want = distill_loss(s_logits, t_logits, labels, divergence=divergence, temperature=2.0, hard_label_weight=0.2)
    assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-7)
    (g1,) = torch.autograd.grad(got, s_logits)
    (g2,) = torch.autograd.grad(want, s_logits)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_uld_is_zero_for_permuted_equal_distributions_and_positive_otherwise():
    """ULD ignores which token carries which probability (it compares sorted vectors)."""
    p = torch.tensor([[0.1, 2.0, -1.0, 0.5]])
    tgt = CrossTarget(torch.tensor([0]), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                      torch.log_softmax(p[:, [2, 0, 3, 1]], -1), torch.tensor([3]), torch.zeros(1))
    labels = torch.tensor([[1]])
    assert float(cross_tokenizer_loss("uld", labels, tgt, logits=p.unsqueeze(0))) == pytest.approx(0.0, abs=1e-7)
    tgt.t_logp = torch.log_softmax(torch.tensor([[3.0, 0.0, 0.0, 0.0, 0.0, 0.0]]), -1)  # another vocabulary size
    assert float(cross_tokenizer_loss("uld", labels, tgt, logits=p.unsqueeze(0))) > 0.1


def test_a_span_the_teacher_covers_in_one_token_asks_the_student_for_the_text():
    """Teacher tokens ``ab``, ``a``, ``b`` (p = 0.9, 0.05, 0.05); student tokens ``a``, ``b``: the span
    "ab" is one teacher token and two student tokens. The loss raises the student's p(b | a) until
    p(a)·p(b | a) = 0.9, where it is 0 (the merged distributions agree bin for bin)."""
    labels = torch.tensor([[0, 1]])  # the student's span: a, then b
    t_logp = torch.log(torch.tensor([[0.9, 0.05, 0.05]]))
    classes = VocabClasses(torch.tensor([0, 1]), torch.tensor([-1, 0, 1]), 2)
    tgt = CrossTarget(torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), t_logp, torch.tensor([0]),
                      torch.zeros(1), classes)
    first = torch.log(torch.tensor([0.95, 0.05]))
    for p_b, zero in ((0.5, False), (0.9 / 0.95, True)):
        logits = torch.stack([first, torch.log(torch.tensor([1 - p_b, p_b]))]).unsqueeze(0).requires_grad_()
        loss = cross_tokenizer_loss("gold", labels, tgt, logits=logits, num_items=1)
        if zero:
            assert float(loss) == pytest.approx(0.0, abs=1e-6)
            continue
        assert float(loss) > 0.1
        loss.backward()
        assert logits.grad[0, 1, 1] < 0 < logits.grad[0, 1, 0]  # gradient descent raises p(b | a)
