"""Per-sample columns a classification step records beside its loss, from the logits it already has.

The training-dynamics scores (`tracking.scoring`) read them: `correct`, `p_true`,
`margin` and `el2n` (see `tracking.contract`); `action-scores select` reads `prediction`.
"""

from __future__ import annotations

import torch

from tracking import contract


def classification_outputs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The unreduced cross-entropy and the columns the dynamics scores need, from one log-softmax.

    Fused because recording runs beside every epoch: one log-softmax gives the loss, p of the
    true class and EL2N (``||p - onehot||``, the true entry replaced by ``p_true - 1``), and one
    top-2 gives the margin: about a dozen tensor operations, all on the logits' device.
    """
    with torch.no_grad():
        logits = logits.detach().float()
        targets = targets.long()
        log_p = logits.log_softmax(dim=1)
        log_p_true = log_p.gather(1, targets[:, None]).squeeze(1)
        p_true = log_p_true.exp()
        prediction = logits.argmax(dim=1)
        correct = prediction == targets
        if logits.shape[1] > 1:
            top = logits.topk(2, dim=1).values
            best_other = torch.where(correct, top[:, 1], top[:, 0])
        else:  # one class: no other class to be beaten by
            best_other = torch.full_like(p_true, float("-inf"))
        error = log_p.exp().scatter(1, targets[:, None], (p_true - 1)[:, None])  # p - onehot, no one-hot made
        return -log_p_true, {
            contract.CORRECT: correct,
            contract.P_TRUE: p_true,
            contract.MARGIN: logits.gather(1, targets[:, None]).squeeze(1) - best_other,
            contract.EL2N: error.norm(dim=1),
            contract.PREDICTION: prediction,
        }


def classification_columns(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-sample columns the dynamics scores need, for a loop that computes its own loss.

    No second forward pass and no logits stored: five numbers per sample, kept on the device.
    """
    return classification_outputs(logits, targets)[1]
