"""The training side: record each sample's loss every epoch into the run.

    recorder = LossRecorder("test", num_samples=len(test_set), tracker=tracker)
    recorder.update(batch["sample_id"], F.cross_entropy(logits, y, reduction="none"))
    recorder.end_epoch(epoch)

Needs torch; the post-hoc job (`tracking.scoring`, `tracking.report`) does not.
"""

from tracking.record.columns import classification_columns
from tracking.record.indexed import IndexedDataset
from tracking.record.media import MediaSummary, record_media
from tracking.record.recorder import LossRecorder, write_table

__all__ = ["IndexedDataset", "LossRecorder", "MediaSummary", "classification_columns", "record_media", "write_table"]
