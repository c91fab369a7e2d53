"""Per-sample columns a classification step records beside its loss, from the logits it already has.

The training-dynamics scores (`tracking.scoring`) read them: `correct`, `p_true`,
`margin` and `el2n` (see `tracking.contract`); `action-scores select` reads `prediction`.
"""

from __future__ import annotations

import torch

from tracking import contract


def classification_columns(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-sample columns the dynamics scores need, from the logits the loss already used.

    No second forward pass and no logits stored: five numbers per sample, kept on the device.
    """
    with torch.no_grad():
        logits = logits.detach().float()
        targets = targets.long()
        probabilities = logits.softmax(dim=1)
        true_logit = logits.gather(1, targets[:, None]).squeeze(1)
        others = logits.scatter(1, targets[:, None], float("-inf"))
        one_hot = torch.nn.functional.one_hot(targets, logits.shape[1]).float()
        prediction = logits.argmax(dim=1)
        return {
            contract.CORRECT: prediction == targets,
            contract.P_TRUE: probabilities.gather(1, targets[:, None]).squeeze(1),
            contract.MARGIN: true_logit - others.max(dim=1).values,
            contract.EL2N: (probabilities - one_hot).norm(dim=1),
            contract.PREDICTION: prediction,
        }
