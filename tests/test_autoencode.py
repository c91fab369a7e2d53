"""experiments.autoencode: the unsupervised step's per-sample loss, against numpy, and that labels never enter it."""

from __future__ import annotations

import numpy as np
import torch

from experiments.autoencode import DigitsAutoencoder, reconstruction_step


def test_loss_is_each_samples_summed_squared_reconstruction_error_and_ignores_the_target() -> None:
    torch.manual_seed(0)
    model = DigitsAutoencoder()
    images = torch.rand(5, 1, 8, 8)
    out = reconstruction_step(model, {"input": images, "target": torch.arange(5)})
    expected = ((model(images) - images).detach().numpy() ** 2).reshape(5, -1).sum(axis=1)
    np.testing.assert_allclose(out.losses.detach().numpy(), expected, rtol=1e-6)
    other = reconstruction_step(model, {"input": images, "target": torch.zeros(5, dtype=torch.long)})
    assert torch.equal(out.losses, other.losses)
    assert out.columns == {}  # no label-derived columns: no dynamics scores, the page shows action against rank
