"""Chaos: trainings, uploads and analysis jobs killed with SIGKILL at random points, the server too; nothing may be lost.

    nice -n 10 python bench/chaos.py --faults 100 --out bench/results/chaos    # the full run (about 20 min on 2 cores)
    python bench/chaos.py --faults 8                                           # a quick look

Starts an `mlflow server` on 127.0.0.1 (sqlite backend, served artifacts in a temp dir), then keeps
`--parallel` processes busy, each as a user would run it: trainings of the own loop
(`python -m experiments.classify` on digits, tables of `test` and `train` every epoch) and of the
Keras callback (`examples/keras_example.py --no-analyze`), `action-scores upload` of a killed
training's spool, and `action-scores analyze` once a run is finished. Until `--faults` faults are
injected, a process is killed with SIGKILL at a random moment (a seeded RNG), and the server is
killed and restarted at random. At the kill, the training's spool says where it was: before its
first table (startup), tables queued for upload (mid-upload), or none queued (mid-epoch).

Recovery, as the README says: a killed training is resumed on its run (`MLFLOW_RUN_ID`), or first
its spool is uploaded with `action-scores upload` (every table queued at the kill must then be on
the server byte for byte) and then resumed; a killed upload or job is run again. A training that
ends with writes left behind (the server was away) gets `action-scores upload`, as its message says.
A process that failed without a kill (the server away at its start: an error naming the server) is run
again once the server answers. Each process bounds its waits for the server: MLflow's HTTP retries
(`MLflowTracker`'s `HTTP_BOUNDS`, about 8 s a request while the server refuses) and the end of a training
(`--upload-wait`, 30 s), so none should pass `--hang`.

Reported: faults injected by kind and phase; tables expected (runs x splits x epochs, and those
queued at a kill) and how many arrived, were lost or duplicated (a table beyond the epochs, a sample
id twice, a job's score not the sum of each epoch once); runs marked
done wrongly (FINISHED, or tagged done by the job, while incomplete); hangs (a process past
`--hang` seconds, killed and counted, not a fault); spool bytes and operation files left, and temp
bytes left by killed processes. Exit status 1 if anything was lost, duplicated, wrongly done or hung.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
# The tables each kind of training writes: split -> samples (digits: 1,437 train, 360 test).
SPLITS = {"loop": {"test": 360, "train": 1437}, "keras": {"test": 360}}
KILL_CHANCE = {"train": 0.8, "upload": 0.5, "job": 0.6}  # that a process started gets a planned kill
MAX_KILLS = 4  # per training (its attempts, uploads and jobs together): then it is left to finish
MAX_ATTEMPTS = 24  # per step of a training, faults and failures (the server away at its start) together: then
# it is given up and named
POLL_SECONDS = 0.1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a process and every child it started (each runs in its own session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


class Server:
    """An `mlflow server` on one port of 127.0.0.1 that can be killed with SIGKILL (with its workers: its own
    process group) and started again on the same port, over the same sqlite file and artifact folder.
    Starting never blocks: `poll` says when it answers."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.up = False
        self.up_since = 0.0  # when it last started to answer
        self.restart_at: float | None = None
        self.downtime = 0.0
        self._down_since = 0.0

    def start(self) -> None:
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=self.env, start_new_session=True)
        self.restart_at = None

    def poll(self) -> bool:
        """Whether the server answers now; starts it again once its restart time has come."""
        if self.restart_at is not None and time.monotonic() >= self.restart_at:
            self.start()
        if self.up or self.process is None or self.restart_at is not None:
            return self.up
        if self.process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {self.process.returncode}; see {self.root / 'server.log'}")
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=0.5) as response:
                self.up = response.status == 200
        except OSError:
            return False
        if self.up:
            self.up_since = time.monotonic()
        if self.up and self._down_since:
            self.downtime += time.monotonic() - self._down_since
            self._down_since = 0.0
        return self.up

    def kill(self, down_for: float) -> None:
        """SIGKILL now; start again after `down_for` seconds."""
        if self.process is not None:
            kill_group(self.process)
        self.up, self._down_since = False, time.monotonic()
        self.restart_at = time.monotonic() + down_for


@dataclass
class Training:
    """One training and what follows it: its run, its attempts, the upload of a killed one's spool, the job."""

    name: str
    kind: str  # a key of SPLITS
    experiment: str
    spool_root: Path
    run_id: str = ""
    step: str = "train"  # what comes next: find (the run after a kill), train, upload, check, job, or done
    after_find: str = "train"  # find, then this
    attempts: Counter = field(default_factory=Counter)  # per step
    kills: int = 0
    queued: dict[str, str] = field(default_factory=dict)  # artifact path -> sha256, queued at the last kill
    not_before: float = 0.0
    after_failure: bool = False  # its last process failed (no kill): run again once the server answers

    @property
    def spool(self) -> Path | None:
        """The run's spool folder, `$ACTION_SCORES_SPOOL/mlflow-<run id>`, once it exists."""
        folders = sorted(self.spool_root.glob("mlflow-*")) if self.spool_root.is_dir() else []
        return folders[0] if folders else None


@dataclass
class Child:
    """A process the bench started for a training's step, with its planned kill (None: left to end)."""

    training: Training
    step: str
    process: subprocess.Popen
    log: Path
    started: float
    kill_after: float | None
    tables_seen: set[str] = field(default_factory=set)  # tables this process wrote into its spool so far

    def look(self) -> None:
        """Note the tables written since this process started (a resumed run's spool holds older ones)."""
        spool = self.training.spool
        if self.step == "train" and spool is not None:
            since = time.time() - (time.monotonic() - self.started)
            self.tables_seen |= {str(path) for path in spool.glob("per_sample_losses/*/epoch_*.parquet")
                                 if path.stat().st_mtime >= since}


@dataclass
class Tally:
    """Everything counted while the bench runs."""

    faults: Counter = field(default_factory=Counter)  # "<what> <phase>" -> count
    hangs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    wrongly_done: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # exits != 0 that no fault caused (e.g. the server away)
    queued_expected: int = 0
    queued_arrived: int = 0
    durations: dict[str, list[float]] = field(default_factory=lambda: {"loop": [], "keras": [], "job": [],
                                                                        "upload": []})
    longest: Counter = field(default_factory=Counter)  # kind -> seconds of its longest process that ended itself
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fault_count(self) -> int:
        return sum(self.faults.values())


def operations(spool: Path) -> list[dict[str, Any]]:
    """The operations waiting in a spool folder (`pending/` and the set-aside `failed/`), oldest first."""
    files = sorted([*spool.glob("pending/*.json"), *spool.glob("failed/*.json")], key=lambda f: f.name)
    found = []
    for file in files:
        try:
            found.append(json.loads(file.read_text()))
        except (OSError, ValueError):  # done (deleted) or being replaced while read
            continue
    return found


def queued_tables(spool: Path | None) -> dict[str, str]:
    """Artifact path -> sha256 of each epoch table a spool has queued (its operation not done yet)."""
    tables = {}
    for operation in operations(spool) if spool is not None else []:
        path = Path(operation.get("path", ""))
        if operation.get("kind") == "artifact" and path.name.startswith("epoch_") and path.is_file():
            tables[f"{operation['artifact_dir']}/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return tables


def phase(child: Child) -> str:
    """Where a process was when it was killed, as its spool tells: a training before its first table
    (startup), with tables queued for upload (mid-upload), or with none queued (mid-epoch)."""
    if child.step != "train":
        return f"{child.step} mid-{child.step}"
    child.look()
    if not child.tables_seen:
        return "train startup"
    return "train mid-upload" if queued_tables(child.training.spool) else "train mid-epoch"


def last_line(log: Path) -> str:
    """The last line a process printed (where a process that hung was), cut to 200 characters."""
    lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return lines[-1][:200] if lines else "(nothing printed)"


def bytes_under(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def table_problems(client: Any, run_id: str, splits: dict[str, int], epochs: int, folder: Path
                   ) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Count a run's tables: expected, arrived, lost, duplicated; and each split's action (numpy sum of its
    epochs) from the tables that arrived whole."""
    import pyarrow.parquet as pq

    counts = Counter(expected=len(splits) * epochs)
    actions = {}
    for split, samples in splits.items():
        names = {Path(info.path).name for info in client.list_artifacts(run_id, f"per_sample_losses/{split}")}
        wanted = {f"epoch_{epoch:04d}.parquet" for epoch in range(epochs)}
        counts["lost"] += len(wanted - names)
        counts["duplicated"] += len(names - wanted)
        action = np.zeros(samples)
        for name in sorted(wanted & names):
            local = client.download_artifacts(run_id, f"per_sample_losses/{split}/{name}", str(folder / split))
            try:
                table = pq.read_table(local)
            except Exception:  # noqa: BLE001 - a truncated upload: the table did not arrive whole
                counts["lost"] += 1
                continue
            ids = table["sample_id"].to_numpy()
            if len(np.unique(ids)) != len(ids):  # a sample twice: its epoch would count it twice
                counts["duplicated"] += 1
                continue
            if not np.array_equal(np.sort(ids), np.arange(samples)):
                counts["lost"] += 1
                continue
            counts["arrived"] += 1
            np.add.at(action, ids, table["loss"].to_numpy().astype(np.float64))
        actions[split] = action
    return dict(counts), actions


def complete(client: Any, training: Training, epochs: int) -> bool:
    """Whether every table of the training's run is listed (what FINISHED promises)."""
    for split in SPLITS[training.kind]:
        names = {Path(info.path).name for info in client.list_artifacts(training.run_id, f"per_sample_losses/{split}")}
        if not {f"epoch_{epoch:04d}.parquet" for epoch in range(epochs)} <= names:
            return False
    return True


def job_problems(client: Any, run_id: str, actions: dict[str, np.ndarray], epochs: int, folder: Path) -> list[str]:
    """What is wrong with a run tagged done by the job: scores missing, or not each epoch summed once."""
    import pandas as pd

    problems = []
    for split, action in actions.items():
        try:
            local = client.download_artifacts(run_id, f"action_scores/{split}/scores.parquet", str(folder / "scores"))
        except Exception as error:  # noqa: BLE001 - the job said done without its scores
            problems.append(f"{split}: no scores ({type(error).__name__})")
            continue
        scores = pd.read_parquet(local).sort_values("sample_id")
        if set(scores["epochs"]) != {epochs}:
            problems.append(f"{split}: scored {sorted(set(scores['epochs']))} epochs, not {epochs}")
        elif not np.allclose(scores["action"].to_numpy(), action, rtol=1e-9, atol=0):
            problems.append(f"{split}: action is not the sum of each epoch once")
    return problems


class Bench:
    """The scheduler: starts each training's next step, plans and injects the faults, recovers, counts."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        import mlflow

        self.args, self.work = args, work
        self.rng = random.Random(args.seed)
        for folder in ("server", "logs", "spool", "tmp", "check"):
            (work / folder).mkdir(parents=True, exist_ok=True)
        base = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                    PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        base.pop("MLFLOW_RUN_ID", None)
        self.server = Server(work / "server", base)
        self.env = dict(base, MLFLOW_TRACKING_URI=self.server.uri, TMPDIR=str(work / "tmp"), TQDM_DISABLE="1",
                        KERAS_BACKEND="torch", ACTION_SCORES_UPLOAD_WAIT=f"{args.upload_wait:g}",
                        ACTION_SCORES_UPLOAD_BACKOFF="2")
        # The bench's own queries: one quick try each, so the scheduler never waits on a dead server.
        os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10",
                          MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
        self.client = mlflow.MlflowClient(self.server.uri)
        self.trainings: list[Training] = []
        self.children: list[Child] = []
        self.tally = Tally()
        self.server_uptime = self.rng.uniform(*args.server_every)  # before the next kill, once it answers

    # -- faults -------------------------------------------------------------------------------------------

    def planned(self) -> int:
        return self.tally.fault_count + sum(child.kill_after is not None for child in self.children)

    def budget_left(self) -> bool:
        return self.planned() < self.args.faults

    def plan_kill(self, training: Training, step: str) -> float | None:
        """Seconds after its start at which a new process is killed, or None. Drawn over the span its kind takes
        (the median so far), so that a kill falls anywhere from its imports to its last upload."""
        if not self.budget_left() or training.kills >= MAX_KILLS or self.rng.random() > KILL_CHANCE[step]:
            return None
        kind = training.kind if step == "train" else step
        seen = self.tally.durations[kind]
        span = statistics.median(seen) if seen else {"loop": 20.0, "keras": 20.0, "job": 10.0, "upload": 5.0}[kind]
        return self.rng.uniform(0.15, 1.0) * span

    def maybe_kill_server(self) -> None:
        now = time.monotonic()
        if not self.server.up or now < self.server.up_since + self.server_uptime:
            return
        self.server_uptime = self.rng.uniform(*self.args.server_every)
        if not self.budget_left():
            return
        down_for = self.rng.uniform(0.5, 6.0)
        self.server.kill(down_for)
        self.count_fault("server", "", f"down {down_for:.1f} s, then restarted")

    def count_fault(self, what: str, target: str, detail: str = "") -> None:
        self.tally.faults[what] += 1
        self.tally.log.append({"t": round(time.monotonic() - self.started, 1), "fault": what, "target": target,
                               "detail": detail})
        self.bar.update()

    # -- processes ----------------------------------------------------------------------------------------

    def command(self, training: Training, step: str) -> list[str]:
        if step == "upload":
            return [str(BIN / "action-scores"), "upload", "--spool", str(training.spool)]
        if step == "job":
            return [str(BIN / "action-scores"), "analyze", "--run-id", training.run_id, "--no-panels"]
        epochs = str(self.args.epochs)
        if training.kind == "keras":
            return [sys.executable, str(ROOT / "examples" / "keras_example.py"), "--no-analyze", "--epochs", epochs,
                    "--experiment", training.experiment]
        return [sys.executable, "-m", "experiments.classify", "--dataset", "digits", "--epochs", epochs,
                "--batch-size", "64", "--track", "test,train", "--experiment", training.experiment]

    def launch(self, training: Training, step: str) -> None:
        training.attempts[step] += 1
        training.after_failure = False
        log = self.work / "logs" / f"{training.name}-{step}-{training.attempts[step]}.log"
        env = dict(self.env, ACTION_SCORES_SPOOL=str(training.spool_root))
        if training.run_id and step == "train":
            env["MLFLOW_RUN_ID"] = training.run_id  # resume the run, as `mlflow run` does
        with open(log, "wb") as out:
            process = subprocess.Popen(self.command(training, step), env=env, stdout=out, stderr=subprocess.STDOUT,
                                       cwd=ROOT, start_new_session=True)
        self.children.append(Child(training, step, process, log, time.monotonic(), self.plan_kill(training, step)))

    def watch(self, child: Child) -> bool:
        """Kill a child whose time has come or that hangs; handle one that ended. True once it is gone."""
        elapsed = time.monotonic() - child.started
        training = child.training
        if child.process.poll() is None:
            child.look()
            if elapsed > self.args.hang:
                kill_group(child.process)
                self.tally.hangs.append(f"{training.name} {child.step} attempt {training.attempts[child.step]}: "
                                        f"past {self.args.hang:.0f} s, killed; its log ends "
                                        f"{last_line(child.log)!r} ({child.log})")
                self.after_kill(training, child.step)
                return True
            if child.kill_after is None or elapsed < child.kill_after:
                return False
            where = phase(child)
            kill_group(child.process)
            training.kills += 1
            self.count_fault(where, training.name, f"{elapsed:.1f} s after start")
            self.after_kill(training, child.step)
            return True
        kind = training.kind if child.step == "train" else child.step
        self.tally.longest[kind] = max(self.tally.longest[kind], round(elapsed, 1))
        training.after_failure = child.process.returncode != 0
        if child.process.returncode == 0:
            self.tally.durations[kind].append(elapsed)
            training.step = {"train": "find", "upload": "check", "job": "check job"}[child.step]
            training.after_find = {"train": "check", "upload": "verify"}.get(child.step, training.after_find)
        else:
            tail = child.log.read_text(errors="replace")[-300:].strip().replace("\n", " | ")
            self.tally.failures.append(f"{training.name} {child.step} exited {child.process.returncode}: {tail}")
            training.not_before = time.monotonic() + 2.0  # then the same step again, once the server answers
            if child.step == "train":
                training.step, training.after_find = "find", "train"
        return True

    def after_kill(self, training: Training, step: str) -> None:
        """What follows a kill: a job or an upload is run again; a training is resumed, or first its spool is
        uploaded (what it had queued is snapshot now, to be found on the server after the upload)."""
        if step != "train":
            training.step = "check job" if step == "job" else "upload"
            return
        training.queued = queued_tables(training.spool)
        # A spool without `run.json` (killed before its first write was queued) is nothing to upload: resume.
        spool = training.spool
        upload_first = spool is not None and (spool / "run.json").is_file() and self.rng.random() < 0.4
        training.step, training.after_find = "find", "upload" if upload_first else "train"

    # -- steps that talk to the server (the bench's own quick queries) -------------------------------------

    def find_run(self, training: Training) -> None:
        """The training's run, if its killed process got as far as creating it (its experiment holds it)."""
        experiment = self.client.get_experiment_by_name(training.experiment)
        runs = [] if experiment is None else self.client.search_runs([experiment.experiment_id])
        if len(runs) > 1:
            self.tally.problems.append(f"{training.name}: {len(runs)} runs in its experiment, one expected")
        if runs:
            training.run_id = runs[-1].info.run_id
        elif training.after_find == "check":
            self.tally.problems.append(f"{training.name}: its training ended well, but no run is in its experiment")
        training.step = training.after_find if training.run_id else "train"

    def verify_upload(self, training: Training) -> None:
        """Every table queued at the kill is on the server, byte for byte, after `action-scores upload`."""
        folder = self.work / "check" / f"{training.name}-queued-{training.attempts['upload']}"
        for path, digest in training.queued.items():
            self.tally.queued_expected += 1
            try:
                local = self.client.download_artifacts(training.run_id, path, str(folder))
                arrived = hashlib.sha256(Path(local).read_bytes()).hexdigest() == digest
            except Exception:  # noqa: BLE001 - not there
                arrived = False
            if arrived:
                self.tally.queued_arrived += 1
            else:
                self.tally.problems.append(f"{training.name}: {path}, queued at the kill, not on the server "
                                           "byte for byte after `action-scores upload`")
        training.queued = {}

    def check_run(self, training: Training) -> None:
        """After a training or an upload ended: FINISHED must mean complete. Not FINISHED: upload what is left
        (the server was away at the end), or resume if nothing is."""
        status = self.client.get_run(training.run_id).info.status
        whole = complete(self.client, training, self.args.epochs)
        if status == "FINISHED" and not whole:
            self.tally.wrongly_done.append(f"{training.name} ({training.run_id}): FINISHED without all its tables")
        if status == "FINISHED" and whole:
            training.step = "job"
        elif training.spool is not None and operations(training.spool) and training.after_find != "verify":
            training.step = "upload"
        else:
            training.step = "train"
        training.after_find = "train"

    def check_job(self, training: Training) -> None:
        """After a job ended or was killed: tagged done must mean scored whole; not done: run it again."""
        tags = self.client.get_run(training.run_id).data.tags
        if tags.get("action_scores.status") != "done":
            training.step = "job"
            return
        _, actions = table_problems(self.client, training.run_id, SPLITS[training.kind], self.args.epochs,
                                    self.work / "check" / f"{training.name}-job-{training.attempts['job']}")
        wrong = job_problems(self.client, training.run_id, actions, self.args.epochs, self.work / "check" /
                             f"{training.name}-job-{training.attempts['job']}")
        if wrong:
            self.tally.wrongly_done.append(f"{training.name} ({training.run_id}): tagged done by the job, but "
                                           + "; ".join(wrong))
        training.step = "done"

    def advance(self, training: Training) -> None:
        """Do or start the training's next step, if it is due and what it needs is up."""
        if time.monotonic() < training.not_before or training.step == "done":
            return
        if any(child.training is training for child in self.children):
            return
        step = training.step
        if step in ("train", "upload", "job"):
            if len(self.children) >= self.args.parallel or (training.after_failure and not self.server.up):
                return
            if training.attempts[step] >= MAX_ATTEMPTS:
                self.tally.problems.append(f"{training.name}: given up after {MAX_ATTEMPTS} {step} attempts")
                training.step = "done"
                return
            self.launch(training, step)
            return
        if not self.server.up:
            return
        try:
            if step == "find":
                self.find_run(training)
            elif step == "check":
                if training.after_find == "verify":
                    self.verify_upload(training)
                self.check_run(training)
            elif step == "check job":
                self.check_job(training)
        except Exception as error:  # noqa: BLE001 - the server went away under the query: ask again later
            training.not_before = time.monotonic() + 1.0
            self.tally.log.append({"t": round(time.monotonic() - self.started, 1), "query failed": training.name,
                                   "error": f"{type(error).__name__}: {str(error)[:120]}"})

    def new_training(self) -> None:
        """Start trainings while faults are left to inject (every third one Keras), up to `--max-trainings`, and
        at most four times `--parallel` unfinished at once: a process that fails fast or is killed early frees its
        slot within seconds, and a new training at each would leave dozens to finish at the end."""
        if not self.budget_left() or len(self.trainings) >= self.args.max_trainings:
            return
        if sum(t.step != "done" for t in self.trainings) >= 4 * self.args.parallel:
            return
        if len(self.children) >= self.args.parallel or any(t.step == "train" and t.attempts["train"] == 0
                                                            for t in self.trainings):
            return
        index = len(self.trainings)
        name = f"{'keras' if index % 3 == 2 else 'loop'}-{index:02d}"
        self.trainings.append(Training(name, name.split("-")[0], f"chaos-{self.args.seed}-{name}",
                                       self.work / "spool" / name))

    # -- the whole run ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        self.started = time.monotonic()
        deadline = self.started + self.args.timeout
        self.server.start()
        self.bar = tqdm(total=self.args.faults, desc="faults", unit="fault")
        while time.monotonic() < deadline:
            self.server.poll()
            self.maybe_kill_server()
            self.children = [child for child in self.children if not self.watch(child)]
            self.new_training()
            for training in self.trainings:
                self.advance(training)
            if self.trainings and all(t.step == "done" for t in self.trainings) and not self.budget_left():
                break
            if self.trainings and all(t.step == "done" for t in self.trainings) and \
                    len(self.trainings) >= self.args.max_trainings:
                break
            self.bar.set_postfix_str(f"{len(self.trainings)} trainings, {len(self.children)} running, server "
                                     f"{'up' if self.server.up else 'down'}")
            time.sleep(POLL_SECONDS)
        self.bar.close()
        for child in self.children:
            kill_group(child.process)
            self.tally.problems.append(f"{child.training.name} {child.step} still running at --timeout")
        self.children = []
        while not self.server.poll():  # the final check needs it; it was started above, or is due to
            time.sleep(0.5)
        wall = time.monotonic() - self.started
        try:
            return self.figures(wall)
        finally:
            kill_group(self.server.process)

    def settings(self) -> dict[str, str]:
        """What bounds each process's waits for the server: the upload wait of its end, and MLflow's HTTP retries
        (the tracker's `HTTP_BOUNDS` unless this environment sets them)."""
        from tracking.backends.mlflow_backend import HTTP_BOUNDS

        names = ["ACTION_SCORES_UPLOAD_WAIT", "ACTION_SCORES_UPLOAD_BACKOFF", *HTTP_BOUNDS]
        return {name: self.env.get(name, HTTP_BOUNDS.get(name, "")) for name in names}

    def figures(self, wall: float) -> dict[str, Any]:
        """The final count over every run, and the spools and temp folders left behind."""
        counts: Counter = Counter()
        for training in self.trainings:
            if training.step != "done" or not training.run_id:
                self.tally.problems.append(f"{training.name}: unfinished ({training.step})")
                continue
            folder = self.work / "check" / f"{training.name}-final"
            found, actions = table_problems(self.client, training.run_id, SPLITS[training.kind], self.args.epochs,
                                            folder)
            counts.update(found)
            run = self.client.get_run(training.run_id)
            if run.info.status == "FINISHED" and (found.get("lost") or found.get("duplicated")):
                self.tally.wrongly_done.append(f"{training.name} ({training.run_id}): FINISHED, tables incomplete")
            if run.info.status != "FINISHED":
                self.tally.problems.append(f"{training.name} ({training.run_id}): left {run.info.status}")
            wrong = job_problems(self.client, training.run_id, actions, self.args.epochs, folder)
            if run.data.tags.get("action_scores.status") != "done" or wrong:
                self.tally.problems.append(f"{training.name}: job not done whole: {wrong}")
            if "action_scores.lock" in run.data.tags:
                self.tally.problems.append(f"{training.name}: job lock tag left: {run.data.tags['action_scores.lock']}")
        spool = self.work / "spool"
        left_operations = sum(1 for _ in spool.rglob("pending/*.json")) + sum(1 for _ in spool.rglob("failed/*"))
        tally = self.tally
        return {
            "faults": tally.fault_count, "faults_by_kind": dict(sorted(tally.faults.items())),
            "trainings": len(self.trainings), "trainings_by_kind": dict(Counter(t.kind for t in self.trainings)),
            "epochs": self.args.epochs,
            "tables_expected": counts["expected"] + tally.queued_expected, "tables_expected_in_runs": counts["expected"],
            "tables_arrived": counts["arrived"] + tally.queued_arrived,
            "tables_lost": counts["lost"] + tally.queued_expected - tally.queued_arrived,
            "tables_duplicated": counts["duplicated"], "queued_at_kill_expected": tally.queued_expected,
            "queued_at_kill_arrived": tally.queued_arrived,
            "wrongly_done": tally.wrongly_done, "hangs": tally.hangs, "problems": tally.problems,
            "failures_without_fault": tally.failures,
            "spool_bytes_left": bytes_under(spool), "spool_operations_left": left_operations,
            "temp_bytes_left": bytes_under(self.work / "tmp"),
            "attempts": dict(sum((t.attempts for t in self.trainings), Counter())),
            "longest_s": dict(sorted(tally.longest.items())), "hang_s": self.args.hang,
            "settings": self.settings(),
            "server_down_s": round(self.server.downtime, 1), "wall_s": round(wall, 1),
            "loadavg_1_5_15": [round(x, 1) for x in os.getloadavg()], "cpus": os.cpu_count(),
            "seed": self.args.seed, "command": "python bench/chaos.py " + " ".join(self.args.argv),
            "fault_log": tally.log,
        }


def report(figures: dict[str, Any]) -> str:
    """The markdown table of one run: one line per figure, each a number and what it counts."""
    by_kind = ", ".join(f"{count} {kind}" for kind, count in figures["faults_by_kind"].items())
    queued = (f"{figures['queued_at_kill_arrived']} of {figures['queued_at_kill_expected']} tables queued at a kill "
              "on the server byte for byte after `action-scores upload`")
    rows = [
        ("faults", f"{figures['faults']} faults ({by_kind})"),
        ("trainings", f"{figures['trainings']} trainings ({', '.join(f'{n} {k}' for k, n in figures['trainings_by_kind'].items())}), "
                      f"{figures['epochs']} epochs each; attempts {figures['attempts']}"),
        ("tables expected", f"{figures['tables_expected']} tables expected ({figures['tables_expected_in_runs']} of "
                            f"the runs, splits x epochs; {figures['queued_at_kill_expected']} queued at a kill)"),
        ("arrived", f"{figures['tables_arrived']} tables arrived ({queued})"),
        ("lost", f"{figures['tables_lost']} tables lost"),
        ("duplicated", f"{figures['tables_duplicated']} tables duplicated"),
        ("marked done wrongly", f"{len(figures['wrongly_done'])} runs marked done wrongly"),
        ("hangs", f"{len(figures['hangs'])} hangs (a process past {figures['hang_s']:.0f} s); longest process that "
                  f"ended itself: {', '.join(f'{kind} {s:.0f} s' for kind, s in figures['longest_s'].items())}"),
        ("other problems", f"{len(figures['problems'])} other problems"),
        ("spool left", f"{figures['spool_bytes_left']:,} spool bytes left ({figures['spool_operations_left']} "
                       "operation files)"),
        ("temp left", f"{figures['temp_bytes_left']:,} temp bytes left by killed processes"),
        ("exits without a fault", f"{len(figures['failures_without_fault'])} exits != 0 that no kill caused, each "
                                  "run again"),
        ("settings", ", ".join(f"{name}={value}" for name, value in figures["settings"].items())),
        ("time", f"{figures['wall_s']:.0f} s wall, server down {figures['server_down_s']:.0f} s in all; "
                 f"{figures['cpus']} CPU cores, load average {' / '.join(map(str, figures['loadavg_1_5_15']))}"),
    ]
    lines = [f"`{figures['command']}`", "", "| measure | result |", "| --- | --- |",
             *(f"| {name} | {value} |" for name, value in rows)]
    for title, key in (("Runs marked done wrongly", "wrongly_done"), ("Hangs", "hangs"), ("Other problems", "problems"),
                       ("Exits that no kill caused", "failures_without_fault")):
        if figures[key]:
            lines += ["", f"{title}:", *(f"- {line}" for line in figures[key])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=100, help="faults to inject (default 100)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each training (default 3)")
    parser.add_argument("--parallel", type=int, default=3, help="processes at once, the server aside (default 3)")
    parser.add_argument("--max-trainings", type=int, default=60, help="trainings at most (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang", type=float, default=120.0, help="seconds after which a process hangs (default 120)")
    parser.add_argument("--upload-wait", type=float, default=30.0,
                        help="ACTION_SCORES_UPLOAD_WAIT of the trainings, seconds (default 30: with a training's "
                             "imports and epochs on 2 loaded cores, under --hang)")
    parser.add_argument("--server-every", type=float, nargs=2, default=(15.0, 45.0), metavar=("MIN", "MAX"),
                        help="seconds the server answers before its next kill, drawn uniformly (default 15 45)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for everything (default 3600)")
    parser.add_argument("--out", type=Path, default=None, help="write chaos.md and chaos.json into this folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, spools, server)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    work = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    try:
        figures = Bench(args, work).run()
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}")
    text = report(figures)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "chaos.md").write_text("# bench/chaos.py: faults survived\n\n" + text)
        (args.out / "chaos.json").write_text(json.dumps(figures, indent=1))
    bad = (figures["tables_lost"] or figures["tables_duplicated"] or figures["wrongly_done"] or figures["hangs"] or figures["problems"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
