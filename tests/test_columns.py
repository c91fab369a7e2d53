"""`tracking.record.columns`: each per-sample column of a classification batch against its definition,
computed independently (float64, the textbook formulas)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tracking.record.columns import classification_columns, classification_outputs


def test_each_column_is_its_definition() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 7, generator=generator) * 3
    targets = torch.randint(0, 7, (64,), generator=generator)
    loss, columns = classification_outputs(logits, targets)
    x, y = logits.double().numpy(), targets.numpy()
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    np.testing.assert_allclose(loss.numpy(), -np.log(p[rows, y]), rtol=1e-5)
    np.testing.assert_allclose(loss.numpy(), F.cross_entropy(logits, targets, reduction="none").numpy(), rtol=1e-6)
    np.testing.assert_allclose(columns["p_true"].numpy(), p[rows, y], rtol=1e-5)
    others = np.where(np.arange(7)[None, :] == y[:, None], -np.inf, x)
    np.testing.assert_allclose(columns["margin"].numpy(), x[rows, y] - others.max(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(columns["el2n"].numpy(), np.linalg.norm(p - np.eye(7)[y], axis=1), rtol=1e-5)
    np.testing.assert_array_equal(columns["prediction"].numpy(), x.argmax(axis=1))
    np.testing.assert_array_equal(columns["correct"].numpy(), x.argmax(axis=1) == y)
    assert (columns["margin"].numpy() > 0).tolist() == columns["correct"].numpy().tolist()  # AUM's sign: right or not


def test_one_class_has_no_margin_and_no_graph_is_kept() -> None:
    logits = torch.randn(4, 1, requires_grad=True)
    columns = classification_columns(logits, torch.zeros(4, dtype=torch.long))
    assert torch.isposinf(columns["margin"]).all()  # no other class to be beaten by
    assert columns["p_true"].tolist() == [1.0] * 4 and columns["correct"].all()
    assert not any(column.requires_grad for column in columns.values())
