"""On an accelerator nothing waits for the device before `end_epoch`: no batch, and no mid-epoch reduce of
the kept logits, syncs; the targets are range-checked once there. Needs CUDA (skipped without it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from tracking.errors import ActionScoresError
from tracking.record import recorder as recorder_module
from tracking.record.recorder import LossRecorder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batches(targets: torch.Tensor, size: int = 4):
    logits = torch.linspace(-1, 1, targets.numel() * 3, device="cuda").reshape(-1, 3)
    for start in range(0, targets.numel(), size):
        yield torch.arange(start, min(start + size, targets.numel()), device="cuda"), \
            logits[start:start + size], targets[start:start + size]


def test_no_batch_and_no_mid_epoch_reduce_syncs_and_the_table_equals_cross_entropy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder_module, "PENDING_LOGITS_LIMIT", 12)  # a reduce every 4 rows of 3 classes
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], device="cuda")
    recorder = LossRecorder("test", num_samples=10, local_dir=tmp_path)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any op that waits for the device raises
    try:
        for ids, logits, batch_targets in _batches(targets):
            recorder.update_classification(ids, logits, batch_targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    table = pq.read_table(recorder.end_epoch(0)).to_pydict()
    all_logits = torch.cat([logits for _, logits, _ in _batches(targets)])
    np.testing.assert_allclose(table["loss"], F.cross_entropy(all_logits, targets, reduction="none").cpu().numpy(),
                               rtol=1e-6)
    assert table["target"] == targets.tolist()


def test_an_out_of_range_target_on_the_device_is_refused_at_end_epoch_not_a_device_assert(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder_module, "PENDING_LOGITS_LIMIT", 12)  # the bad target is reduced mid-epoch
    targets = torch.tensor([0, 1, 7, 0, 1, 2, 0, 1, 2, -1], device="cuda")
    recorder = LossRecorder("test", num_samples=10, local_dir=tmp_path)
    for ids, logits, batch_targets in _batches(targets):
        recorder.update_classification(ids, logits, batch_targets)
    with pytest.raises(ActionScoresError, match=r"^targets must be class indices in \[0, 3\), got values from -1 to 7$"):
        recorder.end_epoch(0)
    assert torch.ones(1, device="cuda").item() == 1.0  # the device is still usable
