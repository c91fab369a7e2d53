"""Two CPU processes under torchrun (gloo) training the Hugging Face `ActionScoresTrainer`, the test split and
the training pass tracked: `torchrun --nproc-per-node 2 tests/hf_ddp.py <output dir>`, with the MLflow run's
experiment in `MLFLOW_EXPERIMENT_NAME`. Rank 0 prints `run <id>` and writes the trained model's own
cross-entropy of each test sample to `<output dir>/expected.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.test_huggingface import TEST_LABELS, TEST_TEXTS, items, sentences, tokenizer, trainer

TRAIN = 90  # not a multiple of 2 ranks x 8: the DistributedSampler pads the last shares with repeats
from tracking.integrations.huggingface import ActionScoresCallback, add_sample_ids


def main(output_dir: str) -> None:
    test = add_sample_ids(items(tokenizer(), TEST_TEXTS, TEST_LABELS))
    callback = ActionScoresCallback({"test": test}, train_split="train")
    train = add_sample_ids(items(tokenizer(), *sentences(TRAIN, seed=0)))
    hf = trainer("mlflow", None, output_dir, epochs=2, callbacks=[callback], train_dataset=train, ddp_backend="gloo",
                 per_device_train_batch_size=8, per_device_eval_batch_size=4)
    hf.train()
    if hf.is_world_process_zero():
        hf.model.eval()
        with torch.no_grad():
            logits = hf.model(**tokenizer()(TEST_TEXTS, padding=True, return_tensors="pt")).logits
        expected = F.cross_entropy(logits, torch.tensor(TEST_LABELS), reduction="none").tolist()
        (Path(output_dir) / "expected.json").write_text(json.dumps(expected))
        print(f"run {callback.run.run_id}")


if __name__ == "__main__":
    main(sys.argv[1])
