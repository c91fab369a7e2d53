"""Framework integrations: a callback per framework that records per-sample losses into the run
the framework's own logger writes to.

- `tracking.integrations.lightning.ActionScoresCallback` (PyTorch Lightning, `[lightning]` extra);
- `tracking.integrations.huggingface.ActionScoresCallback` and `ActionScoresTrainer` (`transformers`,
  `[huggingface]` extra);
- `tracking.integrations.keras.ActionScoresCallback` (Keras 3 on the torch backend, `[keras]` extra).

Each module imports its framework; this package imports none of them.
"""
