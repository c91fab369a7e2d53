"""The job's choice of view on real MLflow runs: recorded media (pictures, texts, URIs) with the data
deleted, a `--pictures` function, or scores only with the reason; and the order of preference."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.conftest import snapshot_run
from tracking import cli, contract
from tracking.analyze import analyze_run
from tracking.backends import MLflowTracker, WandbTracker
from tracking.errors import ActionScoresError
from tracking.record import LossRecorder
from tracking.report.panels import grid_shape, read_panel_rows
from tracking.report.pictures import CARD_SIZE, text_card, wrap_to_width

N, EPOCHS, TOP_K = 12, 3, 4


def _train(tracker: MLflowTracker | WandbTracker, tmp: Path, media: dict | None, params: dict | None = None) -> tuple[str, np.ndarray]:
    """A finished run with EPOCHS tables of N random losses (given in shuffled batches) and, if given,
    `recorder.record_media(range(N), **media)`; returns the run id and each sample's action by numpy."""
    rng = np.random.default_rng(7)
    losses = rng.random((EPOCHS, N)).astype(np.float32) * 4
    run_id = tracker.start(experiment=f"views-{uuid.uuid4().hex[:8]}" if isinstance(tracker, MLflowTracker) else None)
    try:
        if params:
            tracker.write_params(params)
        recorder = LossRecorder("test", num_samples=N, tracker=tracker, local_dir=tmp / "spool")
        if media is not None:
            recorder.record_media(np.arange(N), **media)
        for epoch in range(EPOCHS):
            order = rng.permutation(N)
            for batch in (order[:5], order[5:]):
                recorder.update(torch.as_tensor(batch), torch.as_tensor(losses[epoch, batch]))
            recorder.end_epoch(epoch)
    finally:
        tracker.finish()
    return run_id, losses.astype(np.float64).sum(axis=0)


def _hardest(action: np.ndarray, k: int = TOP_K) -> list[int]:
    return [int(i) for i in np.argsort(-action, kind="stable")[:k]]


def _download(client: mlflow.MlflowClient, run_id: str, path: str, dst: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, str(dst)))


@pytest.fixture()
def job(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> MLflowTracker:
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return MLflowTracker(mlflow_server)


def test_picture_panels_come_from_recorded_media_after_the_data_is_deleted(
        job: MLflowTracker, client: mlflow.MlflowClient, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
    images = [np.asarray(Image.open(data / f"{i}.png")) for i in range(N)]
    names = ["cat" if i % 3 else "dog" for i in range(N)]
    run_id, action = _train(job, tmp_path, dict(images=images, labels=names), params={contract.DATASET_PARAM: "digits"})
    shutil.rmtree(data)
    shutil.rmtree(tmp_path / "spool")  # the local copy of the media too

    result = analyze_run(job, run_id, top_k=TOP_K)
    assert result.views == {"test": "recorded media (image)"}  # media win over the dataset param
    panel = _download(client, run_id, "action_scores/test/loss/hardest.png", tmp_path / "out")
    rows = read_panel_rows(panel)
    assert rows[0]["sample_ids"] == _hardest(action)
    assert [caption.split("\n")[1] for caption in rows[0]["captions"]] == [names[i] for i in _hardest(action)]
    dogs = np.array([i % 3 == 0 for i in range(N)])
    by_class = read_panel_rows(_download(client, run_id, "action_scores/test/loss/by_class/dog.png", tmp_path / "out"))
    assert by_class[0]["sample_ids"] == [int(i) for i in np.flatnonzero(dogs)[np.argsort(-action[dogs])][:TOP_K]]
    with Image.open(panel) as picture:
        assert picture.size[0] <= 680  # a grid that MLflow's artifact pane shows unscaled, not a 10-image strip


def test_text_media_give_text_panels_and_a_table_with_the_text(
        job: MLflowTracker, client: mlflow.MlflowClient, tmp_path: Path) -> None:
    texts = [f"review {i}: " + "a rather long sentence about the film " * (i % 4 + 1) for i in range(N)]
    run_id, action = _train(job, tmp_path, dict(texts=texts, labels=["pos", "neg"] * (N // 2)))
    result = analyze_run(job, run_id, top_k=TOP_K)
    assert result.views == {"test": "recorded media (text)"}
    rows = read_panel_rows(_download(client, run_id, "action_scores/test/loss/hardest.png", tmp_path / "out"))
    assert rows[0]["sample_ids"] == _hardest(action)
    table = pd.read_csv(_download(client, run_id, "action_scores/test/loss/hardest.csv", tmp_path / "out"))
    assert table["sample_id"].tolist() == _hardest(action)
    assert table["text"].tolist() == [texts[i] for i in _hardest(action)]
    np.testing.assert_allclose(table["action"], action[_hardest(action)], rtol=1e-6)
    assert table["label"].tolist() == [["pos", "neg"][i % 2] for i in _hardest(action)]


def test_uri_media_show_local_images_and_other_uris_as_cards(
        job: MLflowTracker, client: mlflow.MlflowClient, tmp_path: Path) -> None:
    Image.fromarray(np.full((40, 30, 3), 200, dtype=np.uint8)).save(tmp_path / "local.png")
    uris = [str(tmp_path / "local.png") if i % 2 else f"s3://bucket/sample-{i}.jpg" for i in range(N)]
    run_id, action = _train(job, tmp_path, dict(uris=uris))
    analyze_run(job, run_id, top_k=TOP_K)
    rows = read_panel_rows(_download(client, run_id, "action_scores/test/loss/hardest.png", tmp_path / "out"))
    assert rows[0]["sample_ids"] == _hardest(action)
    table = pd.read_csv(_download(client, run_id, "action_scores/test/loss/hardest.csv", tmp_path / "out"))
    assert table["text"].tolist() == [uris[i] for i in _hardest(action)]


def test_without_media_or_dataset_a_picture_function_from_the_command_line_draws_the_panels(
        job: MLflowTracker, client: mlflow.MlflowClient, mlflow_server: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    run_id, action = _train(job, tmp_path, None)
    module = f"pictures_{uuid.uuid4().hex[:6]}"
    (tmp_path / f"{module}.py").write_text(
        "import numpy as np\n"
        "def picture(sample_id):\n"
        "    return np.full((8, 8), sample_id * 20, dtype=np.uint8)\n"
        "def broken(sample_id):\n"
        "    return np.zeros((8, 8), dtype=np.float32)\n"
    )
    monkeypatch.chdir(tmp_path)
    before = snapshot_run(client, run_id)
    for spec, message in [("nomodule_xyz:picture", "cannot import 'nomodule_xyz'"),
                          (f"{module}:missing", f"has no function 'missing'; its functions: \\['broken', 'picture'\\]"),
                          ("no_colon", "give module:function")]:
        with pytest.raises(ActionScoresError, match=message):
            analyze_run(job, run_id, pictures=spec)
    with pytest.raises(ActionScoresError, match=r"returned float32 \(8, 8\) for sample \d+; return a uint8 array"):
        analyze_run(job, run_id, pictures=f"{module}:broken")
    assert snapshot_run(client, run_id) == before  # refused: nothing written

    code = cli.main(["analyze", "--run-id", run_id, "--tracking-uri", mlflow_server, "--top-k", str(TOP_K),
                     "--pictures", f"{module}:picture"])
    assert code == 0
    rows = read_panel_rows(_download(client, run_id, "action_scores/test/loss/hardest.png", tmp_path / "out"))
    assert rows[0]["sample_ids"] == _hardest(action)


def test_with_nothing_to_draw_the_job_logs_scores_and_says_why(job: MLflowTracker, tmp_path: Path) -> None:
    run_id, _ = _train(job, tmp_path, None)
    result = analyze_run(job, run_id)
    assert result.status == "done" and result.panels == [] and result.views == {}
    assert "no panels for split 'test': the run records no media" in result.message
    assert "record media with LossRecorder.record_media, or pass --pictures module:function" in result.message


def test_experiments_the_tracker_creates_open_in_the_model_training_view(
        job: MLflowTracker, client: mlflow.MlflowClient) -> None:
    created, existing = f"kind-{uuid.uuid4().hex[:8]}", f"kind-{uuid.uuid4().hex[:8]}"
    client.create_experiment(existing, tags={"mlflow.experimentKind": "genai_development"})
    for name in (created, existing):
        job.start(experiment=name)
        job.finish()
    assert client.get_experiment_by_name(created).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment_by_name(existing).tags["mlflow.experimentKind"] == "genai_development"  # the user's


def test_text_panels_of_a_wandb_offline_run(wandb_env: dict[str, str], tmp_path: Path) -> None:
    texts = [f"sample {i}: " + "words " * i for i in range(N)]
    tracker = WandbTracker()
    run_id, action = _train(tracker, tmp_path, dict(texts=texts))
    folder = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))[0]
    job = WandbTracker()
    result = analyze_run(job, str(folder), top_k=TOP_K)
    assert result.views == {"test": "recorded media (text)"}
    job.attach(str(folder))
    rows = read_panel_rows(job.download("action_scores/test/loss/hardest.png", tmp_path / "back"))
    assert rows[0]["sample_ids"] == _hardest(action)
    table = pd.read_csv(job.download("action_scores/test/loss/hardest.csv", tmp_path / "back"))
    assert table["text"].tolist() == [texts[i] for i in _hardest(action)]


def test_grids_are_balanced_and_text_wraps_by_width_cutting_long_words() -> None:
    assert [grid_shape(n, 5) for n in (1, 5, 7, 10, 11)] == [(1, 1), (1, 5), (2, 4), (2, 5), (3, 4)]
    assert grid_shape(10, 2) == (5, 2)
    fits = lambda line: len(line) <= 10  # noqa: E731
    assert wrap_to_width("the quick brown fox jumps", fits) == ["the quick", "brown fox", "jumps"]
    assert wrap_to_width("see https://example.org/long now", fits) == ["see", "https://ex", "ample.org/", "long now"]
    assert wrap_to_width("", fits) == [""]
    card = text_card("word " * 500)
    assert card.shape == (CARD_SIZE[1], CARD_SIZE[0], 3) and card.dtype == np.uint8
    assert (card < 128).any() and (card[-8:] > 200).all()  # text drawn, cut before the bottom margin


def test_a_view_an_installed_package_registers_for_the_dataset_draws_old_runs(
        job: MLflowTracker, client: mlflow.MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset, package = f"tiny-{uuid.uuid4().hex[:6]}", f"tinyviews_{uuid.uuid4().hex[:6]}"
    (tmp_path / f"{package}.py").write_text(
        "import numpy as np\n"
        "from tracking.report.views import classification_view\n"
        "def view(dataset, split, sample_ids, data_root):\n"
        "    labels = np.arange(12) % 2\n"
        "    return classification_view(sample_ids, lambda i: np.full((8, 8), i * 20, np.uint8), labels,\n"
        "                               ['even', 'odd'], dataset, split)\n")
    info = tmp_path / f"{package}-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[action_scores.views]\n{dataset} = {package}:view\n")
    run_id, action = _train(job, tmp_path, None, params={contract.DATASET_PARAM: dataset})
    assert (f"no panels for split 'test': the run records no media (per_sample_media/test/media.parquet), no view "
            f"registered for its classification dataset {dataset!r}") in analyze_run(job, run_id, top_k=TOP_K).message
    monkeypatch.syspath_prepend(str(tmp_path))  # the package is installed: its entry point is found
    result = analyze_run(job, run_id, top_k=TOP_K, force=True)
    assert result.views == {"test": f"the {dataset!r} data"}
    rows = read_panel_rows(_download(client, run_id, "action_scores/test/loss/hardest.png", tmp_path / "out"))
    assert rows[0]["sample_ids"] == _hardest(action)
    assert [caption.split("\n")[1] for caption in rows[0]["captions"]] == [["even", "odd"][i % 2] for i in _hardest(action)]
    odd = read_panel_rows(_download(client, run_id, "action_scores/test/loss/by_class/odd.png", tmp_path / "out"))
    assert all(i % 2 for i in odd[0]["sample_ids"])


def test_scores_parquet_is_the_same_with_and_without_panels(
        job: MLflowTracker, client: mlflow.MlflowClient, tmp_path: Path) -> None:
    names = ["cat" if i % 3 else "dog" for i in range(N)]
    images = [np.full((8, 8), i, np.uint8) for i in range(N)]
    run_id, _ = _train(job, tmp_path, dict(images=images, labels=names))
    saved = {}
    for panels in (False, True):
        result = analyze_run(job, run_id, top_k=TOP_K, panels=panels, force=True)
        assert bool(result.panels) == panels
        saved[panels] = pd.read_parquet(_download(client, run_id, "action_scores/test/scores.parquet",
                                                  tmp_path / f"out-{panels}"))
    pd.testing.assert_frame_equal(saved[True], saved[False])
    assert contract.LABEL_NAME not in saved[True]
