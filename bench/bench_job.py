"""The post-hoc job end to end, as a user runs it, against its floor: the same files fetched raw.

    nice -n 10 python bench/bench_job.py                                  # 1M x 100: the issue's size
    nice -n 10 python bench/bench_job.py --samples 100000 --epochs 20     # quick
    nice -n 10 python bench/bench_job.py --code /work/main                # another checkout's job, same runs
    nice -n 10 python bench/bench_job.py --cases experiment --experiment-runs 200 --workers 1,4

Builds each run once (cached under `--cache`, default `<tmp>/action-scores-bench-job`, reused on the
next call), starts a real `mlflow server` on 127.0.0.1 over it (sqlite backend, local artifact folder
served over HTTP), then, per case, in one run:
- the job: `action-scores analyze --run-id <id> --no-panels --force` in a subprocess, timed from
  process start to exit, with that process's peak RSS (`os.wait4`);
- the floor: the same epoch files fetched by 8 threads of raw HTTP GETs from the server's artifact
  proxy, and a `pq.read_table` of them; the ratio job / download (target <= 1.5x) and RSS (<= 1 GB);
- the server's CPU seconds during the job and during the raw download: the server runs on the same
  cores, so what it spends serving the bytes bounds how fast any client can fetch them.
Cases (`--cases`, comma separated):
- `pyarrow`: tables as any client writes them (`pq.write_table`, pyarrow defaults: snappy, dictionary),
  `sample_id` int64 + `loss` float32, `--samples` x `--epochs`, on the served store;
- `recorder`: the same, written by the project's writer (`LossRecorder`'s zstd layout, ~3.5 B/sample);
- `sqlite`: pyarrow-default tables in a run of a `sqlite:///` tracking URI with a local artifact
  folder (no server): the job reads them in place; the floor is the read alone;
- `wandb`: a W&B offline run of `--wandb-samples` x `--epochs` written by the project's writer
  (`analyze --wandb-dir`); the floor is the read alone;
- `experiment`: `--experiment-runs` small runs (`--experiment-samples` x `--experiment-epochs`) in one
  experiment, `analyze --experiment` with each of `--workers` (default 1 and 4; runs per minute, and the CPU
  seconds a run costs the job and the server: wall time on shared cores says how busy they were);
- `panels`: a digits-sized run (`--panel-samples` x `--panel-epochs`, default 1,437 x 20, with the media
  training records: scikit-learn's 8x8 digits and their label names), the job with panels against the
  same job with `--no-panels` (target <= 1.5x; wall and CPU seconds);
- `experiment-panels`: as `experiment`, each run with its digits media, analyzed with panels
  (target >= 100 runs a minute, peak RSS < 400 MB).
The job's result is checked: exit 0, "done", and its `action_mean` metric against the files' own sum.
Figures also go to `bench/results/bench_job/<samples>x<epochs>.md` with `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from tests.conftest import BIN, _free_port, start_server, stop_server  # noqa: E402
from tracking import contract  # noqa: E402

SPLIT = "train"
RAW_THREADS = 8
WANDB_SETTINGS = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_BASE_URL": "http://127.0.0.1:9"}


def pyarrow_writer(table: pa.Table, path: Path) -> None:
    """Parquet as any client writes it: pyarrow's defaults."""
    pq.write_table(table, path)


def recorder_writer(table: pa.Table, path: Path) -> None:
    """The project's own layout (`tracking.record.recorder.write_table`; imports torch, once)."""
    from tracking.record.recorder import write_table

    write_table(table, path)


WRITERS = {"pyarrow": pyarrow_writer, "recorder": recorder_writer}


def write_epochs(folder: Path, samples: int, epochs: int, writer: str, seed: int = 0):
    """Yield (epoch, path) of freshly written tables, one at a time (disk holds one at once if the caller
    deletes each after logging it)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(samples, dtype=np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    for epoch in range(epochs):
        path = folder / contract.epoch_file_name(epoch)
        WRITERS[writer](pa.table({"sample_id": ids, "loss": rng.exponential(1.0, samples).astype(np.float32)}), path)
        yield epoch, path


def digits_media(work: Path, samples: int) -> Path:
    """The split's media table as a training script records it: `samples` 8x8 digit pictures and label names."""
    from sklearn.datasets import load_digits

    from tracking.record import record_media

    digits = load_digits()
    chosen = np.arange(samples) % len(digits.target)
    pictures = np.round(digits.images[chosen] * (255 / 16)).astype(np.uint8)
    return record_media(None, SPLIT, np.arange(samples), labels=[str(label) for label in digits.target[chosen]],
                        images=pictures, local_dir=work / "media").path


def build_mlflow_run(uri: str, work: Path, samples: int, epochs: int, writer: str, experiment: str,
                     artifact_location: Path | None = None, media: bool = False) -> str:
    """One finished MLflow run with a split's epoch tables (and its digits media, if `media`); returns its id.
    `artifact_location`: a local folder for a new experiment's artifacts (a sqlite URI), instead of the server's."""
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "View run" line per run
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    location = artifact_location.as_uri() if artifact_location else None
    run = client.create_run(found.experiment_id if found else client.create_experiment(experiment, location))
    for _, path in write_epochs(work, samples, epochs, writer):
        client.log_artifact(run.info.run_id, str(path), contract.losses_dir(SPLIT))
        path.unlink()
    if media:
        client.log_artifact(run.info.run_id, str(digits_media(work, samples)), contract.media_dir(SPLIT))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def build_wandb_run(wandb_dir: Path, work: Path, samples: int, epochs: int) -> str:
    """A W&B offline run written as the recorder writes it; returns its first folder."""
    from tracking.backends import WandbTracker

    tracker = WandbTracker(project="bench-job", mode="offline")
    tracker.start()
    for _, path in write_epochs(work, samples, epochs, "recorder"):
        tracker.write_artifact(path, contract.losses_dir(SPLIT))
        path.unlink()
    folder = tracker.offline_folder
    tracker.finish()
    return str(folder)


@dataclass
class Job:
    seconds: float
    peak_mb: float
    stdout: str
    cpu_seconds: float = 0.0  # the job process's user + system CPU (its threads included)


# Times a command and reads its peak RSS from a small launcher: Linux keeps, across exec, the peak RSS of the
# process that forked, so a job forked straight from this (large) bench would report this bench's peak.
TIMER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
process = subprocess.Popen(sys.argv[2:], stdout=open(sys.argv[1] + ".out", "wb"), stderr=open(sys.argv[1] + ".err", "wb"))
_, status, usage = os.wait4(process.pid, 0)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": usage.ru_maxrss / 1024,
                  "cpu_seconds": usage.ru_utime + usage.ru_stime, "code": os.waitstatus_to_exitcode(status)}))
"""


def run_job(args: list[str], code: Path, env: dict[str, str] | None = None) -> Job:
    """`action-scores <args>` with `code` first on the path, timed from process start to exit; its own peak RSS."""
    environment = dict(env or os.environ, PYTHONPATH=str(code))
    environment.pop("MLFLOW_RUN_ID", None)
    with tempfile.TemporaryDirectory(prefix="bench-job-out-") as tmp:
        timed = subprocess.run([sys.executable, "-I", "-S", "-c", TIMER, f"{tmp}/job", str(BIN / "action-scores"),
                                *args], capture_output=True, text=True, env=environment, cwd=tmp, check=True)
        figures = json.loads(timed.stdout)
        stdout, stderr = Path(f"{tmp}/job.out").read_text(), Path(f"{tmp}/job.err").read_text()
    if figures["code"] not in (0, 1):
        raise RuntimeError(f"action-scores {' '.join(args)} exited {figures['code']}:\n{stdout}\n{stderr[-3000:]}")
    return Job(figures["seconds"], figures["peak_mb"], stdout, figures["cpu_seconds"])


def raw_download(uri: str, artifact_root: str, paths: list[str], dst: Path) -> float:
    """Seconds to GET every file from the server's artifact proxy in RAW_THREADS threads, into `dst`."""
    base = f"{uri}/api/2.0/mlflow-artifacts/artifacts/{artifact_root.split(':', 1)[1].lstrip('/')}"

    def get(path: str) -> None:
        target = dst / path
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(f"{base}/{path}", timeout=300) as response, open(target, "wb") as file:
            shutil.copyfileobj(response, file, 1 << 20)

    start = time.perf_counter()
    with ThreadPoolExecutor(RAW_THREADS) as pool:
        list(pool.map(get, paths))
    return time.perf_counter() - start


def server_cpu_seconds(process: subprocess.Popen) -> float:
    """CPU seconds used so far by the server and its workers (Linux `/proc`; 0 elsewhere)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process has just exited
            continue
        pid = int(stat.parent.name)
        parents[pid], times[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
    tree, grown = {process.pid}, True
    while grown:
        found = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= found
        grown = bool(found)
    return sum(times.get(pid, 0.0) for pid in tree)


def read_all(files: list[Path]) -> tuple[float, float, int]:
    """Seconds to `pq.read_table` every file, the total of their losses (to check the job's sums) and bytes."""
    start = time.perf_counter()
    total = 0.0
    for path in files:
        total += float(np.sum(pq.read_table(path).column("loss").to_numpy(), dtype=np.float64))
    return time.perf_counter() - start, total, sum(p.stat().st_size for p in files)


def checked(job: Job, run_label: str) -> None:
    if " done" not in job.stdout and ": done" not in job.stdout:
        raise RuntimeError(f"{run_label}: the job did not finish: {job.stdout[-2000:]}")


def report_line(case: str, job: Job, floor_label: str, floor_s: float | None, read_s: float, size: int,
                samples: int, epochs: int, server_s: tuple[float, float] | None = None) -> str:
    ratio = f"{job.seconds / floor_s:.2f}x" if floor_s else "-"
    floor = f"{floor_s:.2f}" if floor_s else "-"
    server = f"{server_s[0]:.1f} / {server_s[1]:.1f}" if server_s else "-"
    return (f"| {case} | {samples:,} x {epochs} | {size / 1e6:.0f} MB | {job.seconds:.2f} | {floor} | {read_s:.2f} | "
            f"{ratio} | {job.seconds / read_s:.2f}x | {job.peak_mb:.0f} | {server} |")


HEADER = ("| case | samples x epochs | size | job end to end (s) | raw download, 8 threads (s) | pyarrow read (s) | "
          "job / download | job / read | job peak RSS (MB) | server CPU during job / raw download (s) |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def mlflow_case(case: str, uri: str, run_id: str, code: Path, work: Path, samples: int, epochs: int,
                server: subprocess.Popen | None) -> str:
    """Time the job on one MLflow run, then its floor; check the job's sums; return the table row.
    `server`: the process serving the run's store (None: a local store, read in place)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    before = server_cpu_seconds(server) if server else 0.0
    job = run_job(["analyze", "--run-id", run_id, "--no-panels", "--force", "--tracking-uri", uri], code)
    job_server_s = server_cpu_seconds(server) - before if server else 0.0
    checked(job, case)
    info = client.get_run(run_id).info
    paths = [f"{contract.losses_dir(SPLIT)}/{contract.epoch_file_name(e)}" for e in range(epochs)]
    fetched = work / f"raw-{case}"
    shutil.rmtree(fetched, ignore_errors=True)
    server_s = None
    if server:
        before = server_cpu_seconds(server)
        download_s = raw_download(uri, info.artifact_uri, paths, fetched)
        server_s = (job_server_s, server_cpu_seconds(server) - before)
        files = [fetched / p for p in paths]
    else:
        download_s = None
        files = [Path(info.artifact_uri.removeprefix("file://")) / p for p in paths]
    read_s, total, size = read_all(files)
    shutil.rmtree(fetched, ignore_errors=True)
    logged = client.get_run(run_id).data.metrics[f"action_scores.{SPLIT}.action_mean"]
    if not np.isclose(logged, total / samples, rtol=1e-6):
        raise RuntimeError(f"{case}: the job's action_mean {logged} differs from the files' {total / samples}")
    return report_line(case, job, "raw download", download_s, read_s, size, samples, epochs, server_s)


def wandb_case(folder: str, code: Path, samples: int, epochs: int) -> str:
    job = run_job(["analyze", "--wandb-dir", folder, "--no-panels", "--force"], code)
    checked(job, "wandb")
    files = sorted((Path(folder) / "files" / contract.losses_dir(SPLIT)).glob("epoch_*.parquet"))
    read_s, _, size = read_all(files)
    return report_line("wandb (offline folder)", job, "", None, read_s, size, samples, epochs)


def panels_case(uri: str, run_id: str, code: Path, samples: int, epochs: int) -> str:
    """The job on a run with media, with panels and with `--no-panels`: what drawing costs."""
    drawn = run_job(["analyze", "--run-id", run_id, "--force", "--tracking-uri", uri], code)
    bare = run_job(["analyze", "--run-id", run_id, "--no-panels", "--force", "--tracking-uri", uri], code)
    checked(drawn, run_id)
    checked(bare, run_id)
    return (f"| digits-sized run, media recorded | {samples:,} x {epochs} | {drawn.seconds:.2f} s | {bare.seconds:.2f} s | "
            f"{drawn.seconds / bare.seconds:.2f}x | {drawn.cpu_seconds:.2f} s | {bare.cpu_seconds:.2f} s | "
            f"{drawn.cpu_seconds / bare.cpu_seconds:.2f}x | {drawn.peak_mb:.0f} MB | {bare.peak_mb:.0f} MB |")


def experiment_case(uri: str, experiment: str, runs: int, code: Path, workers: list[int], server: subprocess.Popen,
                    panels: bool = False) -> list[str]:
    """`analyze --experiment` over every run, with each of `workers` (if the checkout has `--workers`), with
    panels or without; the CPU a run costs, the job's and the server's: on cores that others share, wall time
    says how busy they were, CPU what the job needs."""
    helped = subprocess.run([str(BIN / "action-scores"), "analyze", "--help"], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(code))).stdout
    counts = workers if "--workers" in helped else [None]
    lines = []
    for count in counts:
        extra = ["--workers", str(count)] if count else []
        drawing = [] if panels else ["--no-panels"]
        before = server_cpu_seconds(server)
        job = run_job(["analyze", "--experiment", experiment, *drawing, "--force", "--tracking-uri", uri, *extra],
                      code)
        server_s = server_cpu_seconds(server) - before
        done = job.stdout.count(": done")
        if done != runs:
            raise RuntimeError(f"experiment: {done} of {runs} runs done:\n{job.stdout[-3000:]}")
        lines.append(f"| analyze --experiment{'' if panels else ' --no-panels'}, "
                     f"{count or 'serial (no --workers)'} worker(s) | {runs} runs | "
                     f"{job.seconds:.1f} s | {runs / job.seconds * 60:.0f} runs/min | {job.peak_mb:.0f} MB | "
                     f"{job.cpu_seconds / runs:.2f} s + {server_s / runs:.2f} s |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--wandb-samples", type=int, default=100_000)
    parser.add_argument("--cases", default="pyarrow,recorder,sqlite,wandb",
                        help="comma separated: pyarrow, recorder, sqlite, wandb, experiment, panels, experiment-panels")
    parser.add_argument("--panel-samples", type=int, default=1437)
    parser.add_argument("--panel-epochs", type=int, default=20)
    parser.add_argument("--experiment-runs", type=int, default=200)
    parser.add_argument("--experiment-samples", type=int, default=1000)
    parser.add_argument("--experiment-epochs", type=int, default=10)
    parser.add_argument("--workers", default="1,4", help="the experiment case's worker counts, comma separated")
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose job is timed (default: this one)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "action-scores-bench-job")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this markdown file")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    root = args.cache.resolve()
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "runs.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    os.environ.update(WANDB_SETTINGS, WANDB_DIR=str(root / "wandb"), WANDB_CACHE_DIR=str(root / "wandb-cache"),
                      WANDB_DATA_DIR=str(root / "wandb-data"), WANDB_CONFIG_DIR=str(root / "wandb-config"))
    (root / "server").mkdir(exist_ok=True)
    work = root / "work"
    size = f"{args.samples}x{args.epochs}"
    process = start_server(root / "server", port := _free_port())
    uri = f"http://127.0.0.1:{port}"
    try:
        for case in cases:  # build what the cache lacks
            start = time.perf_counter()
            if case in WRITERS and f"{case}/{size}" not in manifest:
                manifest[f"{case}/{size}"] = build_mlflow_run(uri, work, args.samples, args.epochs, case, "bench-job")
            elif case == "sqlite" and f"sqlite/{size}" not in manifest:
                (root / "local").mkdir(exist_ok=True)
                manifest[f"sqlite/{size}"] = build_mlflow_run(f"sqlite:///{root / 'local' / 'mlflow.db'}", work,
                                                              args.samples, args.epochs, "pyarrow", "bench-job",
                                                              root / "local" / "artifacts")
            elif case == "wandb" and f"wandb/{args.wandb_samples}x{args.epochs}" not in manifest:
                manifest[f"wandb/{args.wandb_samples}x{args.epochs}"] = build_wandb_run(
                    root / "wandb", work, args.wandb_samples, args.epochs)
            elif case == "panels" and f"panels/{args.panel_samples}x{args.panel_epochs}" not in manifest:
                manifest[f"panels/{args.panel_samples}x{args.panel_epochs}"] = build_mlflow_run(
                    uri, work, args.panel_samples, args.panel_epochs, "pyarrow", "bench-job-panels", media=True)
            elif case in ("experiment", "experiment-panels"):
                key = f"{case}/{args.experiment_runs}x{args.experiment_samples}x{args.experiment_epochs}"
                if key not in manifest:
                    name = f"bench-job-{args.experiment_runs}-runs-{time.time_ns()}"
                    for index in range(args.experiment_runs):
                        build_mlflow_run(uri, work, args.experiment_samples, args.experiment_epochs, "pyarrow", name,
                                         media=case == "experiment-panels")
                    manifest[key] = name
            else:
                continue
            manifest_path.write_text(json.dumps(manifest, indent=1))
            print(f"built {case} in {time.perf_counter() - start:.1f}s", flush=True)
        load = os.getloadavg()
        lines = [f"job from {args.code}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the start, "
                 f"{os.cpu_count()} cores"]
        if any(case in (*WRITERS, "sqlite", "wandb") for case in cases):  # the cases against a floor
            lines += ["", HEADER]
        for case in cases:
            if case in WRITERS:
                lines.append(mlflow_case(case, uri, manifest[f"{case}/{size}"], args.code, work, args.samples,
                                         args.epochs, process))
            elif case == "sqlite":
                lines.append(mlflow_case("sqlite (local store)", f"sqlite:///{root / 'local' / 'mlflow.db'}",
                                         manifest[f"sqlite/{size}"], args.code, work, args.samples, args.epochs,
                                         None))
            elif case == "wandb":
                lines.append(wandb_case(manifest[f"wandb/{args.wandb_samples}x{args.epochs}"], args.code,
                                        args.wandb_samples, args.epochs))
            else:
                continue
            print(lines[-1], flush=True)
        if "panels" in cases:
            lines += ["", "| case | samples x epochs | job with panels | with --no-panels | ratio | job CPU with | "
                      "CPU without | CPU ratio | peak RSS with | peak RSS without |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
                      panels_case(uri, manifest[f"panels/{args.panel_samples}x{args.panel_epochs}"], args.code,
                                  args.panel_samples, args.panel_epochs)]
            print(lines[-1], flush=True)
        for case in ("experiment", "experiment-panels"):
            if case not in cases:
                continue
            key = f"{case}/{args.experiment_runs}x{args.experiment_samples}x{args.experiment_epochs}"
            lines += ["", f"{args.experiment_runs} runs of {args.experiment_samples:,} samples x "
                      f"{args.experiment_epochs} epochs{', media recorded' if case != 'experiment' else ''}:", "",
                      "| job | runs | wall | throughput | peak RSS | CPU a run: job + server |",
                      "| --- | --- | --- | --- | --- | --- |"]
            lines += experiment_case(uri, manifest[key], args.experiment_runs, args.code,
                                     [int(count) for count in args.workers.split(",")], process,
                                     panels=case == "experiment-panels")
        load = os.getloadavg()
        lines.append(f"\nload average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end")
        print("\n".join(lines))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(lines) + "\n")
    finally:
        stop_server(process)


if __name__ == "__main__":
    main()
