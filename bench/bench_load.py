"""Load: many training processes log to one MLflow server at once while analysis jobs run.

    nice -n 10 python bench/bench_load.py                       # 16 writers x 100k samples x 10 epochs, 4 jobs
    python bench/bench_load.py --processes 4 --samples 2000 --epochs 3 --jobs 2   # quick

Starts an `mlflow server` on 127.0.0.1 (sqlite backend, served artifacts in a temp dir, as the
tests do). First `--jobs` writers record runs to completion: the "past runs" the analysis jobs
start on. Then, at once, `--processes` writer processes record, each through the real
`LossRecorder` (random losses via `update`, `end_epoch` writes the table into the spool and queues
it for the background uploader, `finish` waits for the queue), while `--jobs` job slots run
`action-scores analyze --run-id` on the past runs, then on each new run as it finishes.

Checked afterwards: every table arrived whole and once (listed, downloaded, the bytes the writer
spooled, ids 0..samples-1 once each; each epoch's metric once), no run is left RUNNING, every
analysed run's `action` equals a numpy sum of its downloaded tables. Printed: throughput of the
load phase (tables/s, MB/s, from the first `end_epoch` to the last writer's `finish`), the worst
and median time inside `end_epoch` (each writer reports its own in a JSON file), the jobs' times,
and the machine's load average. Anything still running at `--timeout` is killed and named.
Exit status 1 if a check failed or anything was killed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SPLIT = "train"
BATCHES = 10  # update() calls per epoch


def write_run(uri: str, experiment: str, name: str, samples: int, epochs: int, seed: int, report: Path) -> None:
    """One writer process: a run of `epochs` tables through the recorder; its timings and the sha256 of
    each spooled table go to `report` (JSON)."""
    import torch

    from tracking.backends import MLflowTracker
    from tracking.record.recorder import LossRecorder

    tracker = MLflowTracker(uri)
    run_id = tracker.start(experiment=experiment, run_name=name)
    recorder = LossRecorder(SPLIT, num_samples=samples, tracker=tracker)
    rng = np.random.default_rng(seed)
    latencies, paths, started = [], [], time.time()
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(samples))
        losses = torch.from_numpy(rng.exponential(1.0, samples).astype(np.float32))
        for batch in torch.chunk(torch.arange(samples), BATCHES):
            recorder.update(order[batch], losses[batch])
        before = time.perf_counter()
        paths.append(recorder.end_epoch(epoch))
        latencies.append(time.perf_counter() - before)
        tracker.log_metrics({"loss_mean": float(losses.mean())}, step=epoch)
    before = time.perf_counter()
    tracker.finish()  # the tables are written (in the background) by now
    hashes = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}
    report.write_text(json.dumps({
        "run_id": run_id, "name": name, "end_epoch_s": latencies, "finish_s": time.perf_counter() - before,
        "first_epoch_at": started, "finished_at": time.time(), "sha256": hashes,
        "bytes": sum(path.stat().st_size for path in recorder.local_dir.rglob("epoch_*.parquet")),
        "left_behind": tracker.left_behind,
    }))


@dataclass
class Load:
    """The processes of one phase, each with its report or log file, and what failed or was killed."""

    writers: dict[str, tuple[subprocess.Popen, Path]] = field(default_factory=dict)
    jobs: dict[str, tuple[subprocess.Popen, float]] = field(default_factory=dict)  # run id -> (job, started)
    job_seconds: dict[str, float] = field(default_factory=dict)
    job_failures: dict[str, str] = field(default_factory=dict)
    killed: list[str] = field(default_factory=list)


def start_writer(uri: str, experiment: str, name: str, args: argparse.Namespace, seed: int, work: Path,
                 env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    report = work / "reports" / f"{name}.json"
    log = open(work / "logs" / f"{name}.log", "wb")
    process = subprocess.Popen(
        [sys.executable, __file__, "--write", name, "--uri", uri, "--experiment", experiment, "--samples",
         str(args.samples), "--epochs", str(args.epochs), "--seed", str(seed), "--report", str(report)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    log.close()
    return process, report


def start_job(run_id: str, work: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(work / "logs" / f"job-{run_id}.log", "wb")
    process = subprocess.Popen([str(Path(sys.executable).parent / "action-scores"), "analyze", "--run-id", run_id,
                                "--no-panels"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                               start_new_session=True)
    log.close()
    return process


def kill(process: subprocess.Popen) -> None:
    """The process and its children (its own session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_phase(uri: str, experiment: str, names: list[str], queue: list[str] | None, args: argparse.Namespace,
              work: Path, env: dict[str, str], deadline: float) -> tuple[Load, list[dict]]:
    """Start the writers `names` at once and, unless `queue` is None, keep `args.jobs` analysis jobs busy
    with `queue` (run ids), to which each writer's run is added when it finishes; until all are done or
    `deadline`."""
    from tqdm import tqdm

    load = Load()
    for name in names:
        load.writers[name] = start_writer(uri, experiment, name, args, zlib.crc32(name.encode()), work, env)
    reports: list[dict] = []
    jobs_wanted = 0 if queue is None else args.jobs
    queue = list(queue or [])
    with tqdm(total=len(names), desc=f"{len(names)} writers", unit="run", leave=False) as bar:
        while time.monotonic() < deadline:
            for name, (process, report) in list(load.writers.items()):
                if process.poll() is None:
                    continue
                del load.writers[name]
                bar.update()
                if process.returncode == 0 and report.is_file():
                    reports.append(json.loads(report.read_text()))
                    if jobs_wanted:
                        queue.append(reports[-1]["run_id"])
                else:
                    log = (work / "logs" / f"{name}.log").read_text()[-500:]
                    load.killed.append(f"writer {name} exited with {process.returncode}: {log}")
            for run_id, (process, started) in list(load.jobs.items()):
                if process.poll() is None:
                    continue
                del load.jobs[run_id]
                load.job_seconds[run_id] = time.monotonic() - started
                if process.returncode != 0:
                    load.job_failures[run_id] = (work / "logs" / f"job-{run_id}.log").read_text()[-500:]
            while queue and len(load.jobs) < jobs_wanted:
                run_id = queue.pop(0)
                load.jobs[run_id] = (start_job(run_id, work, env), time.monotonic())
            if not load.writers and not load.jobs and not queue:
                break
            time.sleep(0.2)
    for name, (process, _) in load.writers.items():
        kill(process)
        load.killed.append(f"writer {name} still running at the timeout")
    for run_id, (process, _) in load.jobs.items():
        kill(process)
        load.killed.append(f"job on run {run_id} still running at the timeout")
    load.killed += [f"job on run {run_id} never started (timeout)" for run_id in queue]
    return load, reports


def check_run(client, report: dict, samples: int, epochs: int, analysed: bool, work: Path) -> list[str]:
    """What is wrong with one run on the server (empty: nothing)."""
    import pandas as pd
    import pyarrow.parquet as pq

    run_id, problems = report["run_id"], []
    run = client.get_run(run_id)
    if run.info.status != "FINISHED":
        problems.append(f"status {run.info.status}")
    names = [info.path for info in client.list_artifacts(run_id, f"per_sample_losses/{SPLIT}")]
    expected = [f"per_sample_losses/{SPLIT}/epoch_{e:04d}.parquet" for e in range(epochs)]
    if names != expected:
        problems.append(f"tables {names} instead of {len(expected)} epochs")
    steps = sorted(m.step for m in client.get_metric_history(run_id, "loss_mean"))
    if steps != list(range(epochs)):
        problems.append(f"metric steps {steps}")
    action = np.zeros(samples)
    folder = work / "check" / run_id
    for name in names:
        local = Path(client.download_artifacts(run_id, name, str(folder)))
        if hashlib.sha256(local.read_bytes()).hexdigest() != report["sha256"].get(local.name):
            problems.append(f"{name}: not the bytes the writer spooled")
        table = pq.read_table(local)
        ids = table["sample_id"].to_numpy()
        if table.num_rows != samples or not np.array_equal(np.sort(ids), np.arange(samples)):
            problems.append(f"{name}: {table.num_rows} rows, ids not 0..{samples - 1} once each")
            continue
        np.add.at(action, ids, table["loss"].to_numpy().astype(np.float64))
    if analysed and not problems:
        if run.data.tags.get("action_scores.status") != "done" or "action_scores.lock" in run.data.tags:
            problems.append(f"tags after the job: {run.data.tags}")
        scores = pd.read_parquet(client.download_artifacts(run_id, f"action_scores/{SPLIT}/scores.parquet",
                                                           str(folder / "scores")))
        scored = scores.sort_values("sample_id")["action"].to_numpy()
        if not np.allclose(scored, action, rtol=1e-12, atol=0):
            problems.append(f"scores differ from the numpy sum by up to {np.abs(scored - action).max():.3g}")
    return [f"run {report['name']} ({run_id}): {problem}" for problem in problems]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=16, help="training processes logging at once")
    parser.add_argument("--samples", type=int, default=100_000, help="samples per run")
    parser.add_argument("--epochs", type=int, default=10, help="epochs (tables) per run")
    parser.add_argument("--jobs", type=int, default=4, help="analysis jobs running at once (and past runs)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for everything; stragglers are killed")
    parser.add_argument("--server-workers", type=int, default=2, help="`mlflow server --workers`")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    parser.add_argument("--write", default="", help=argparse.SUPPRESS)  # a writer process: its run's name
    parser.add_argument("--uri", default="", help=argparse.SUPPRESS)
    parser.add_argument("--experiment", default="", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write_run(args.uri, args.experiment, args.write, args.samples, args.epochs, args.seed, args.report)
        return 0

    import mlflow

    from tests.conftest import local_mlflow_server

    deadline = time.monotonic() + args.timeout
    experiment = f"bench-load-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = Path(tmp)
        for folder in ("server", "reports", "logs", "spool", "check"):
            (work / folder).mkdir()
        with local_mlflow_server(work / "server", workers=args.server_workers) as uri:
            env = dict(os.environ, MLFLOW_TRACKING_URI=uri, ACTION_SCORES_SPOOL=str(work / "spool"),
                       PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
            env.pop("MLFLOW_RUN_ID", None)
            print(f"server {uri}; {args.jobs} past run(s) first, then {args.processes} writers x {args.samples:,} "
                  f"samples x {args.epochs} epochs with {args.jobs} analysis job(s) at once")
            past, past_reports = run_phase(uri, experiment, [f"past-{i}" for i in range(args.jobs)], None, args, work,
                                           env, deadline)
            load_started = time.monotonic()
            load, reports = run_phase(uri, experiment, [f"writer-{i:02d}" for i in range(args.processes)],
                                      [r["run_id"] for r in past_reports], args, work, env, deadline)
            wall = time.monotonic() - load_started
            loadavg = os.getloadavg()
            client = mlflow.MlflowClient(uri)
            every = past_reports + reports
            with ThreadPoolExecutor(4) as pool:
                problems = [p for found in pool.map(
                    lambda r: check_run(client, r, args.samples, args.epochs, r["run_id"] in load.job_seconds, work),
                    every) for p in found]
            running = [run.info.run_id for run in client.search_runs(
                [client.get_experiment_by_name(experiment).experiment_id], filter_string="attributes.status = 'RUNNING'")]
            problems += [f"run {run_id} left RUNNING" for run_id in running]
            problems += [f"job on run {run_id} failed: {tail}" for run_id, tail in load.job_failures.items()]
            problems += [f"{r['name']}: {r['left_behind']}" for r in every if r["left_behind"]]
    killed = past.killed + load.killed
    if reports:
        first = min(r["first_epoch_at"] for r in reports)
        last = max(r["finished_at"] for r in reports)
        tables = len(reports) * args.epochs
        megabytes = sum(r["bytes"] for r in reports) / 1e6
        latencies = [s for r in reports for s in r["end_epoch_s"]]
        worst = max(reports, key=lambda r: max(r["end_epoch_s"]))
        figures = {
            "processes": args.processes, "samples": args.samples, "epochs": args.epochs, "jobs": args.jobs,
            "load_phase_s": round(wall, 1), "upload_window_s": round(last - first, 1),
            "tables": tables, "megabytes": round(megabytes, 1),
            "tables_per_s": round(tables / (last - first), 2), "mb_per_s": round(megabytes / (last - first), 2),
            "end_epoch_worst_ms": round(max(latencies) * 1e3, 1), "end_epoch_median_ms": round(statistics.median(latencies) * 1e3, 1),
            "end_epoch_worst_per_process_ms": {r["name"]: round(max(r["end_epoch_s"]) * 1e3, 1) for r in reports},
            "finish_wait_max_s": round(max(r["finish_s"] for r in reports), 1),
            "jobs_done": len(load.job_seconds) - len(load.job_failures),
            "job_s_median": round(statistics.median(load.job_seconds.values()), 1) if load.job_seconds else None,
            "job_s_max": round(max(load.job_seconds.values()), 1) if load.job_seconds else None,
            "loadavg_1_5_15": [round(x, 1) for x in loadavg], "cpus": os.cpu_count(),
            "problems": problems, "killed": killed,
        }
        print(f"load phase {wall:.1f}s; {tables} tables ({megabytes:.1f} MB) uploaded in {last - first:.1f}s from the "
              f"first end_epoch to the last finish: {figures['tables_per_s']} tables/s, {figures['mb_per_s']} MB/s")
        print(f"end_epoch: worst {figures['end_epoch_worst_ms']} ms ({worst['name']}), median "
              f"{figures['end_epoch_median_ms']} ms over {len(latencies)} epochs; finish waited up to "
              f"{figures['finish_wait_max_s']} s for the queue")
        print(f"analysis: {figures['jobs_done']} job(s) done ({len(past_reports)} past runs, then new runs as they "
              f"finished), median {figures['job_s_median']} s, max {figures['job_s_max']} s each")
        print(f"load average {loadavg[0]:.1f} {loadavg[1]:.1f} {loadavg[2]:.1f} on {os.cpu_count()} cores")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(figures, indent=1))
    checked = len(past_reports) + len(reports)
    for line in problems + killed:
        print(f"PROBLEM: {line}")
    if not problems and not killed:
        print(f"checked {checked} runs: every table arrived whole and once, no run left RUNNING, every analysed run's "
              "scores equal the numpy sum of its tables")
    return 1 if problems or killed else 0


if __name__ == "__main__":
    sys.exit(main())
