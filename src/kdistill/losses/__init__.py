"""Distillation losses: divergences as pure functions, a plain path and a chunked fused path.

Notation: P = teacher, Q = student, both ``softmax(logits / T)``. Every divergence returns the
per-token value summed over the vocabulary; the losses multiply it by T² (Hinton et al. 2015) and
average over the tokens whose label is not -100.

* ``forward_kl``       KL(P‖Q)
* ``reverse_kl``       KL(Q‖P)
* ``jsd``              β·KL(P‖M) + (1−β)·KL(Q‖M), M = β·P + (1−β)·Q (GKD). As in TRL's
                       ``generalized_jsd_loss``, β = 0 is forward KL and β = 1 reverse KL.
* ``skew_forward_kl``  KL(P‖αP + (1−α)Q)  (DistiLLM), α = ``skew``
* ``skew_reverse_kl``  KL(Q‖(1−α)P + αQ)
* ``tvd``              ½·Σ|P − Q|

More are added by registering one function (:func:`kdistill.losses.divergences.register`).

With ``hard_label_weight`` w the per-token loss is ``(1 − w)·T²·D(P_T‖Q_T) + w·CE(Q_1, label)``
(cross-entropy at temperature 1).

Labels are *aligned with the logits*: ``labels[i]`` is the token that ``logits[i]`` predicts
(already shifted for causal LMs), -100 where the position is ignored. The loss is the sum of the
per-token losses divided by ``num_items`` (the global count of unmasked tokens, for gradient
accumulation and data parallelism; it defaults to the local count); 0, with zero gradients, when
no token is kept.

All math is float32 whatever the input dtype. ``-inf`` log-probabilities (a masked vocabulary,
in the teacher or the student) are replaced by ``-1e4``, whose ``exp`` is exactly 0 in float32:
``0·log 0`` terms are then 0, and a token the student rules out but the teacher does not costs a
large finite amount instead of ``inf``. Finite values are never clamped, so extreme logits
(±1e4) keep their exact value and gradient.

Top-k teachers (an offline cache keeps only the teacher's k most likely tokens per position) are
given as ``TopK(indices, logprobs)`` and coarse-grained onto the k tokens plus a "rest" bucket
(:mod:`kdistill.losses.topk`).

The fused path (:func:`fused_distill_loss`) never builds the ``[tokens, vocab]`` logits: it walks
the unmasked tokens in chunks and computes each chunk's loss and its gradient in closed form
(:mod:`kdistill.losses.distill`). The plain path (:func:`distill_loss`) differentiates the same
formulas with autograd and is the reference the tests hold the fused path to.

Modules (each imports only the ones above it):

* :mod:`~kdistill.losses.divergences`  the registry of divergences (value and ``∂D/∂log Q``)
* :mod:`~kdistill.losses.topk`         :class:`TopK` and the rest-bucket coarse-graining
* :mod:`~kdistill.losses.chunked`      kept rows, chunk walking and projection, :func:`auto_chunk_size`
* :mod:`~kdistill.losses.tokens`       :class:`LossSpec` and the per-token loss (both paths)
* :mod:`~kdistill.losses.distill`      :func:`distill_loss` (plain) and :func:`fused_distill_loss`
* :mod:`~kdistill.losses.likelihood`   :func:`label_logprobs` (chunked), :func:`cross_entropy_sum`
* :mod:`~kdistill.losses.preference`   :func:`sequence_logprobs`, :func:`dpo_loss`
* :mod:`~kdistill.losses.cross_tokenizer`  ULD and the GOLD-style mapped loss for a teacher with another
                                       tokenizer (:func:`~kdistill.losses.cross_tokenizer.cross_tokenizer_loss`)
"""

from __future__ import annotations

from kdistill.losses.chunked import IGNORE_INDEX, auto_chunk_size
from kdistill.losses.distill import distill_loss, fused_distill_loss
from kdistill.losses.divergences import divergence, registered as _registered
from kdistill.losses.likelihood import cross_entropy_sum, label_logprobs
from kdistill.losses.preference import dpo_loss, sequence_logprobs
from kdistill.losses.tokens import LossSpec, token_losses
from kdistill.losses.topk import TopK

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "LossSpec",
    "TopK",
    "auto_chunk_size",
    "cross_entropy_sum",
    "distill_loss",
    "divergence",
    "dpo_loss",
    "fused_distill_loss",
    "label_logprobs",
    "sequence_logprobs",
    "token_losses",
]


def __getattr__(name: str):
    if name == "DIVERGENCES":  # the registered names, read from the registry on every access
        return _registered()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
