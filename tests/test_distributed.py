"""torchrun with two CPU processes (gloo) against the real MLflow server, classification and detection:
one run, each epoch a folder of one sorted part per rank whose union holds every sample, and losses that a
single process computes again from the weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from experiments.detect import DetectionStep
from experiments.loop import _EvalShard
from experiments.detection_data import detection_collate, digit_scenes
from experiments.models import KerasCifarCNN, tiny_ssd
from experiments.ssd_loss import ssd_per_image_losses
from tests.conftest import BIN, ROOT, _free_port, run_command, sharded_epochs
from tracking.analyze import analyze_run
from experiments.datasets import load_split
from tracking.record.recorder import LossRecorder
from tracking.backends import MLflowTracker
from tracking.errors import ActionScoresError

EPOCHS = 2
TWO_RANKS = ROOT / "tests" / "two_ranks.py"
SIZES = {"train": 1437, "test": 360}  # 1437 is odd: DistributedSampler pads rank 1 with a copy


def _record_share(rank: int, init_file: str, out_dir: str, gather: bool) -> None:
    """One of two ranks: record this rank's share of a 6-sample split and end epoch 0; then record epoch 1 with
    ids 4 and 5 on no rank, end it (refused), add them and end it again."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        recorder = LossRecorder("test", num_samples=6, local_dir=Path(out_dir) / f"rank{rank}")
        recorder._gather_to_rank_0 = gather
        if rank == 0:
            recorder.update(torch.tensor([4, 0, 2]), torch.tensor([4.0, 0.0, 2.0]), target=torch.tensor([0, 0, 0]))
        else:  # a copy of 0, as DistributedSampler pads, and 5 twice within the rank
            recorder.update(torch.tensor([1, 3, 5]), torch.tensor([1.0, 3.0, 5.0]), target=torch.tensor([1, 1, 1]))
            recorder.update(torch.tensor([5, 0]), torch.tensor([55.0, 99.0]), target=torch.tensor([1, 1]))
        results = {"epoch 0": str(recorder.end_epoch(0))}
        recorder.update(torch.tensor([0, 2]) + rank, torch.ones(2), target=torch.zeros(2, dtype=torch.int64))
        try:
            recorder.end_epoch(1)
            results["missing"] = "not refused"
        except ActionScoresError as error:
            results["missing"] = str(error)
        recorder.update(torch.tensor([4 + rank]), torch.ones(1), target=torch.zeros(1, dtype=torch.int64))
        results["epoch 1"] = str(recorder.end_epoch(1))  # the refused epoch kept its batches
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _spawn_two_shares(tmp_path: Path, gather: bool) -> list[dict[str, str]]:
    mp.spawn(_record_share, args=(str(tmp_path / "init"), str(tmp_path), gather), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_each_rank_writes_its_own_sorted_part_whose_union_keeps_the_first_occurrence_in_rank_order(
        tmp_path: Path) -> None:
    results = _spawn_two_shares(tmp_path, gather=False)
    parts = [tmp_path / f"rank{rank}" / "per_sample_losses" / "test" / "epoch_0000" / f"part-0000{rank}.parquet"
             for rank in (0, 1)]
    assert [r["epoch 0"] for r in results] == [str(part) for part in parts]
    assert pq.read_table(parts[0]).to_pydict() == {"sample_id": [0, 2, 4], "loss": [0.0, 2.0, 4.0],
                                                   "target": [0, 0, 0]}
    assert pq.read_table(parts[1]).to_pydict() == {"sample_id": [0, 1, 3, 5], "loss": [99.0, 1.0, 3.0, 5.0],
                                                   "target": [1, 1, 1, 1]}  # its first 5; its padded copy of 0
    union = pd.concat([pd.read_parquet(part) for part in parts]).drop_duplicates("sample_id").sort_values("sample_id")
    assert union["loss"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # what one process recording both gets
    for r in results:  # the same error on both ranks, naming the ids no rank recorded
        assert r["missing"] == ("end_epoch(1) of split 'test' failed on every rank: split 'test', epoch 1: "
                                "2 of 6 samples missing: [4, 5]")
    assert [pd.read_parquet(r["epoch 1"])["sample_id"].tolist() for r in results] == [[0, 2, 4], [1, 3, 5]]


def test_gathered_shares_are_written_by_rank_0_alone_keeping_the_first_occurrence_in_rank_order(
        tmp_path: Path) -> None:
    """The path of a W&B run (one process's folder), kept for it and selectable for the bench."""
    results = _spawn_two_shares(tmp_path, gather=True)
    assert results[1]["epoch 0"] == results[1]["epoch 1"] == "None"
    assert not (tmp_path / "rank1").exists()  # rank 1 wrote nothing
    table = pq.read_table(results[0]["epoch 0"]).to_pydict()
    assert table["sample_id"] == [0, 1, 2, 3, 4, 5]
    assert table["loss"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # rank 0's 0 beats rank 1's copy; 5's first value
    assert table["target"] == [0, 1, 0, 1, 0, 1]
    assert [r["missing"] for r in results] == ["end_epoch(1) of split 'test' failed on rank 0 of 2: split 'test', "
                                               "epoch 1: 2 of 6 samples missing: [4, 5]"] * 2


def _eval_shares(rank: int, init_file: str, out_dir: str) -> None:
    """One of two ranks: this rank's eval share of a 5-sample split, and the error for a 1-sample split."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        share = list(_EvalShard(TensorDataset(torch.arange(5)), "val"))
        try:
            _EvalShard(TensorDataset(torch.arange(1)), "val")
            refused = "not refused"
        except ActionScoresError as error:
            refused = str(error)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"share": share, "refused": refused}))
    finally:
        dist.destroy_process_group()


def test_eval_shares_are_disjoint_and_unpadded_and_a_split_smaller_than_the_world_is_refused(tmp_path: Path) -> None:
    mp.spawn(_eval_shares, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["share"] for r in ranks] == [[0, 2, 4], [1, 3]]  # every sample once: no padded copy of 0
    for r in ranks:
        assert r["refused"] == "split 'val' has 1 sample(s) for 2 processes: " \
                               "track a split with at least one sample per process"


def _two_ranks(scenario: str, launcher: str, out_dir: Path, **env: str) -> tuple[list[str], list[float]]:
    """Run `tests/two_ranks.py <scenario>` on two processes, started by torchrun or by hand (the variables a
    launcher such as srun sets): each rank's report lines and each process's seconds from start to exit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **env, PYTHONPATH=str(ROOT))
    started = time.monotonic()
    if launcher == "torchrun":
        result = run_command([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(TWO_RANKS), scenario,
                              str(out_dir)], env, check=False)
        assert result.returncode != 0, result.stdout
        seconds = [time.monotonic() - started] * 2
    else:
        port = str(_free_port())
        processes = [subprocess.Popen([str(BIN / "python"), str(TWO_RANKS), scenario, str(out_dir)], cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                               MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                     for rank in (0, 1)]
        seconds = []
        for process in processes:
            assert process.wait(timeout=300) == 1
            seconds.append(time.monotonic() - started)
    return [(out_dir / f"rank{rank}.txt").read_text() for rank in (0, 1)], seconds


@pytest.mark.parametrize("launcher", ["torchrun", "by hand"])
@pytest.mark.parametrize("scenario, message", [
    ("bad-id", "ActionScoresError: end_epoch(1) of split 'test' failed on rank 0 of 2: split 'test', epoch 1: "
               "sample ids out of range [0, 4): [99]"),
    ("no-batch", "ActionScoresError: end_epoch(0) of split 'test' failed on rank 1 of 2: split 'test': no batch "
                 "was recorded this epoch; call update() with the epoch's batches before end_epoch()"),
])
def test_a_mistake_on_one_rank_raises_the_same_error_on_every_rank_at_once(
        tmp_path: Path, launcher: str, scenario: str, message: str) -> None:
    """Rank 0 records an id out of range in epoch 1, or rank 1 records no batch: both ranks raise the same
    `ActionScoresError`, instead of a gloo "Connection closed by peer" on one and a wait in the gather on the other."""
    reports, seconds = _two_ranks(scenario, launcher, tmp_path)
    for report in reports:
        outcome, stopped = report.splitlines()
        assert outcome == message
        assert float(re.fullmatch(r"stopped after ([\d.]+) s", stopped).group(1)) < 15  # the mistake's epoch alone
    assert max(seconds) < 240  # the whole launch, imports included; a hang would last gloo's 30 minutes


def test_a_run_that_rank_0_cannot_start_stops_every_rank_instead_of_leaving_them_in_ddps_constructor(
        mlflow_server: str, tmp_path: Path) -> None:
    missing = uuid.uuid4().hex
    reports, _ = _two_ranks("tracker-fails", "by hand", tmp_path, MLFLOW_TRACKING_URI=mlflow_server,
                            MLFLOW_RUN_ID=missing)
    assert [report.splitlines()[0] for report in reports] == [
        "ActionScoresError: opening the run on rank 0 failed on rank 0 of 2: RestException: RESOURCE_DOES_NOT_EXIST: "
        f"Run with id={missing} not found"] * 2


@pytest.fixture(scope="module")
def ddp_run(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """`torchrun --nproc_per_node=2 -m experiments.classify` on digits: (run id, experiment, saved weights);
    the spool folders are under `<weights' folder>/spool`."""
    weights = tmp_path_factory.mktemp("ddp") / "model.pt"
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server, OMP_NUM_THREADS="1",
               ACTION_SCORES_SPOOL=str(weights.parent / "spool"))
    env.pop("MLFLOW_RUN_ID", None)
    experiment = f"ddp-{uuid.uuid4().hex[:8]}"
    result = run_command(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "experiments.classify",
         "--epochs", str(EPOCHS), "--track", "train,test", "--experiment", experiment, "--batch-size", "64",
         "--save-model", str(weights)],
        env,
    )
    finished = re.findall(r"run (\w+) finished", result.stdout)
    assert len(finished) == 1, result.stdout  # only rank 0 speaks for the run
    return finished[0], experiment, weights


def _tables(client: mlflow.MlflowClient, run_id: str, split: str, dst: Path) -> list[pd.DataFrame]:
    """Each epoch of the two ranks' parts, as one table (`tests.conftest.sharded_epochs`)."""
    return sharded_epochs(client, run_id, split, dst)


def _epoch_folders(client: mlflow.MlflowClient, run_id: str, split: str) -> list[str]:
    return [info.path for info in client.list_artifacts(run_id, f"per_sample_losses/{split}")]


def test_torchrun_opens_one_run_whose_epochs_are_one_part_per_rank_holding_every_sample(
        mlflow_server: str, ddp_run, tmp_path: Path) -> None:
    run_id, experiment, weights = ddp_run
    client = mlflow.MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [run.info.run_id for run in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    spools = sorted((weights.parent / "spool").iterdir())  # each rank uploaded its parts through its own spool
    assert [folder.name for folder in spools] == [f"mlflow-{run_id}", f"mlflow-{run_id}-rank1"]
    for folder in spools:
        assert json.loads((folder / "run.json").read_text())["run_id"] == run_id
        assert list((folder / "pending").iterdir()) == []  # every write done
        assert list(folder.rglob("*.parquet")) == []  # each part left its rank's spool once the server had it
    for split, size in SIZES.items():
        assert _epoch_folders(client, run_id, split) == [f"per_sample_losses/{split}/epoch_{e:04d}" for e in range(EPOCHS)]
        for table in _tables(client, run_id, split, tmp_path / split):
            assert table["sample_id"].tolist() == list(range(size))
            assert np.isfinite(table["loss"]).all()
            assert (table["target"].to_numpy() == load_split("digits", split).labels).all()


def test_torchrun_losses_equal_a_single_process_pass(
        mlflow_server: str, ddp_run, tmp_path: Path) -> None:
    """The last epoch's test parts were computed by the two ranks, each with its own replica: a
    single process with rank 0's saved weights must get the same loss for every sample of their union,
    which fails if gradients were not synchronised or shares were mixed up."""
    run_id, _, weights = ddp_run
    client = mlflow.MlflowClient(mlflow_server)
    test = load_split("digits", "test")
    model = KerasCifarCNN(1, 10, 8)
    model.load_state_dict(torch.load(weights))
    model.eval()
    inputs = torch.stack([test.dataset[i][0] for i in range(len(test.labels))])
    with torch.no_grad():
        logits = model(inputs)
        expected = F.cross_entropy(logits, torch.as_tensor(test.labels), reduction="none").numpy()
    last = _tables(client, run_id, "test", tmp_path / "in")[-1]  # the union of the ranks' parts
    np.testing.assert_allclose(last["loss"], expected, rtol=1e-4, atol=1e-6)
    assert (last["correct"].to_numpy() == (logits.argmax(1).numpy() == test.labels)).all()
    # Metrics are means over both ranks' samples, not rank 0's half.
    logged = client.get_metric_history(run_id, "test_loss")
    assert [m.step for m in logged] == list(range(EPOCHS))
    assert logged[-1].value == pytest.approx(float(expected.mean()), rel=1e-4)



def test_torchrun_scores_equal_the_sum_of_the_parts_union(mlflow_server: str, ddp_run, tmp_path: Path) -> None:
    run_id, _, _ = ddp_run
    client = mlflow.MlflowClient(mlflow_server)
    tables = {split: _tables(client, run_id, split, tmp_path / "in" / split) for split in SIZES}
    result = analyze_run(MLflowTracker(mlflow_server), run_id, panels=False)
    assert result.status == "done" and result.epochs == {"train": EPOCHS, "test": EPOCHS}
    for split, split_tables in tables.items():
        summed = sum(t.set_index("sample_id")["loss"].astype(np.float64) for t in split_tables)
        local = client.download_artifacts(run_id, f"action_scores/{split}/scores.parquet", str(tmp_path / "out"))
        scores = pd.read_parquet(local).set_index("sample_id")
        assert scores.index.tolist() == list(range(SIZES[split]))
        np.testing.assert_allclose(scores["action"], summed.loc[scores.index], rtol=1e-12)


DETECT_LIMIT = 21  # odd: DistributedSampler pads rank 1's share of train with a copy of image 0 (not val's)


def test_torchrun_detection_writes_a_part_per_rank_whose_union_has_the_losses_one_process_computes(
        mlflow_server: str, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 -m experiments.detect` on digit-scenes: one run, one val part per rank
    and epoch (the eval pass's unpadded shares: every image in exactly one part), and loss parts that a single process recomputes from rank 0's weights
    (the tiny SSD has no BatchNorm, so an image's parts do not depend on its rank or batch mates)."""
    weights = tmp_path / "detector.pt"
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server, OMP_NUM_THREADS="1")
    env.pop("MLFLOW_RUN_ID", None)
    experiment = f"ddp-detect-{uuid.uuid4().hex[:8]}"
    result = run_command(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "experiments.detect",
         "--epochs", str(EPOCHS), "--limit", str(DETECT_LIMIT), "--batch-size", "4", "--experiment", experiment,
         "--save-model", str(weights)],
        env,
    )
    finished = re.findall(r"run (\w+) finished", result.stdout)
    assert len(finished) == 1, result.stdout
    run_id = finished[0]
    client = mlflow.MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [run.info.run_id for run in runs] == [run_id] and runs[0].info.status == "FINISHED"
    assert _epoch_folders(client, run_id, "val") == [f"per_sample_losses/val/epoch_{e:04d}" for e in range(EPOCHS)]
    tables = _tables(client, run_id, "val", tmp_path / "in")
    first_part = pd.read_parquet(next((tmp_path / "in").rglob("part-00000.parquet")))
    assert first_part["sample_id"].tolist() == list(range(0, DETECT_LIMIT, 2))  # rank 0's share alone
    scenes = digit_scenes("val")
    for table in tables:
        assert table["sample_id"].tolist() == list(range(DETECT_LIMIT))
        assert table["num_objects"].tolist() == [len(scenes.scene(i)[2]) for i in range(DETECT_LIMIT)]
        parts = sum(table[f"loss_{part}"].astype(np.float64) for part in ("loc", "pos", "neg"))
        np.testing.assert_allclose(table["loss"], parts, rtol=1e-6)
    maps = client.get_metric_history(run_id, "val_map_50")  # gathered from both ranks before it is logged
    assert [m.step for m in maps] == list(range(EPOCHS)) and all(0 <= m.value <= 1 for m in maps)

    model = tiny_ssd(11)  # ten digits and the background
    model.load_state_dict(torch.load(weights))
    images, targets = zip(*(scenes[i] for i in range(DETECT_LIMIT)))
    with torch.no_grad():
        expected = ssd_per_image_losses(model.eval(), list(images), list(targets))
    for part, values in expected.items():
        np.testing.assert_allclose(tables[-1][f"loss_{part}"], values.numpy(), rtol=1e-4, atol=1e-6)
    # The eval pass's metrics count every image once, not DistributedSampler's padded copy of image 0 again.
    val_loss = client.get_metric_history(run_id, "val_loss")[-1].value
    assert val_loss == pytest.approx(float(tables[-1]["loss"].mean()), rel=1e-5)
    step = DetectionStep("val")
    with torch.no_grad():
        step(model, detection_collate([{"sample_id": i, "input": images[i], "target": targets[i]}
                                       for i in range(DETECT_LIMIT)]))
    assert maps[-1].value == pytest.approx(step.epoch_metrics()["val_map_50"], abs=1e-6)
