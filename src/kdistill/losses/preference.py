"""Preference losses (DPO) and the sequence log-probs they compare.

Owned by the on-policy / preference methods (issue 6); kept separate from the divergences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.losses.chunked import IGNORE_INDEX

__all__ = ["dpo_loss", "sequence_logprobs"]


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probabilities of the labelled tokens of each sequence.

    Args:
        logits: ``[batch, seq, vocab]`` (any dtype; the log-softmax is taken in float32).
        labels: ``[batch, seq]`` aligned with the logits (``labels[b, t]`` is the token the logits
            at t predict), -100 on prompt, padding and everything that is not the completion.
    Returns:
        ``[batch]`` float32: ``Σ_t log softmax(logits[b, t])[labels[b, t]]`` over unmasked t.
    """
    mask = labels != IGNORE_INDEX
    lp = logits.float()
    tok = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lp, dim=-1)
    return (tok * mask).sum(-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023), per pair.

    With implicit rewards ``r_c = β·(log π(y_c|x) − log π_ref(y_c|x))`` and likewise ``r_r``, the
    loss of a pair is ``−log σ(r_c − r_r)`` (with ``label_smoothing`` ε: the conservative DPO mix
    ``−(1−ε)·log σ(m) − ε·log σ(−m)``).

    Args:
        *_logps: ``[pairs]`` sequence log-prob sums (see :func:`sequence_logprobs`); the reference
            ones are constants (computed under ``no_grad``).
    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[pairs]`` float32; the rewards are
        detached. Sum the losses and divide by the global number of pairs.
    """
    if beta <= 0:
        raise ValueError("beta must be > 0")
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    rc, rr = ref_chosen_logps.float().detach(), ref_rejected_logps.float().detach()
    margin = beta * ((pc - rc) - (pr - rr))
    losses = -F.logsigmoid(margin)
    if label_smoothing > 0:
        losses = (1.0 - label_smoothing) * losses + label_smoothing * (-F.logsigmoid(-margin))
    return losses, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()
