"""Keras 3 on the torch backend, scikit-learn's digits: every test sample's loss each epoch, then analyse.

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000        # or sqlite:///mlflow.db
    python examples/keras_example.py --experiment keras-digits
    python examples/keras_example.py --tracker wandb          # an offline W&B run (WANDB_MODE=offline)

A small CNN in the spirit of the paper's Keras example. The lines that add action scores are
marked `# action-scores`. Prints `run <id> finished` and where the panels are.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from tracking.integrations.keras import ActionScoresCallback  # noqa: E402  # action-scores


def digits_splits(test_size: int = 360) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x_train, y_train, x_test, y_test (a fixed permutation), and the test images as uint8."""
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    images = (digits.images[order] / 16 * 255).round().astype(np.uint8)
    x = (images / 255).astype(np.float32)[..., None]
    y = digits.target[order]
    return x[test_size:], y[test_size:], x[:test_size], y[:test_size], images[:test_size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="keras-example")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--tracker", choices=["mlflow", "wandb"], default="mlflow")
    parser.add_argument("--no-analyze", action="store_true", help="train only")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    x_train, y_train, x_test, y_test, test_images = digits_splits()
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    scores = ActionScoresCallback(  # action-scores
        {"test": (x_test, y_test)},  # action-scores: predicted and recorded at every epoch end
        media={"test": {"images": test_images, "labels": [str(y) for y in y_test]}},  # action-scores
        tracker=args.tracker, experiment=args.experiment)  # action-scores
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=64, callbacks=[scores], verbose=2)
    run = scores.run  # action-scores: where the tables went
    print(f"run {run.run_id} finished")
    if args.no_analyze:
        return
    run.analyze()  # action-scores: the post-hoc job, as `action-scores analyze` runs it


if __name__ == "__main__":
    main()
