"""Hugging Face `Trainer` against the real MLflow server and a real offline W&B run: the tables land in the
run of `report_to`, whole, the scores are their sums, text panels come from the recorded texts alone."""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast, TrainingArguments

from tests.conftest import ROOT, in_process_training, run_command
from tracking.analyze import analyze_run
from tracking.backends import MLflowTracker
from tracking.backends.wandb_backend import OfflineRun
from tracking.errors import ActionScoresError
from tracking.integrations.huggingface import ActionScoresCallback, ActionScoresTrainer, add_sample_ids
from tracking.report.panels import read_panel_rows

EPOCHS = 3
WORDS = {1: ["good", "great", "fun", "love"], 0: ["bad", "dull", "hate", "awful"]}
FILLER = ["the", "movie", "was", "and", "plot", "a", "very", "it"]


def sentences(count: int, seed: int) -> tuple[list[str], list[int]]:
    """Short reviews whose sentiment word gives the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count).tolist()
    texts = [" ".join([*rng.choice(FILLER, 3), rng.choice(WORDS[y]), *rng.choice(FILLER, 2)]) for y in labels]
    return texts, labels


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *FILLER, *WORDS[0], *WORDS[1]])}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")


def items(tok: PreTrainedTokenizerFast, texts: list[str], labels: list[int]) -> list[dict]:
    encodings = tok(texts)
    return [{"input_ids": ids, "attention_mask": mask, "labels": label, "text": text}
            for ids, mask, label, text in zip(encodings["input_ids"], encodings["attention_mask"], labels, texts)]


def trainer(report_to: str, eval_dataset: object, output_dir: str, epochs: int = EPOCHS,
            callbacks: list | None = None, train_dataset: object = None, **arguments: object) -> ActionScoresTrainer:
    tok = tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    settings = dict(output_dir=output_dir, num_train_epochs=epochs, learning_rate=5e-3, per_device_train_batch_size=16,
                    per_device_eval_batch_size=16, eval_strategy="epoch", save_strategy="no", report_to=[report_to],
                    use_cpu=True, disable_tqdm=True, seed=0) | arguments
    return ActionScoresTrainer(model=BertForSequenceClassification(config), args=TrainingArguments(**settings),
                               train_dataset=train_dataset if train_dataset is not None else items(
                                   tok, *sentences(96, seed=0)), eval_dataset=eval_dataset,
                               processing_class=tok, callbacks=callbacks)


TEST_TEXTS, TEST_LABELS = sentences(30, seed=1)


@pytest.fixture(scope="module")
def mlflow_run(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ActionScoresTrainer]:
    """A Trainer reporting to MLflow, the test split tracked by its own evaluations."""
    experiment = f"hf-{uuid.uuid4().hex[:8]}"
    test = add_sample_ids(items(tokenizer(), TEST_TEXTS, TEST_LABELS))
    with in_process_training(mlflow_server), tempfile.TemporaryDirectory() as output_dir:
        mlflow.set_tracking_uri(mlflow_server)
        mlflow.set_experiment(experiment)
        hf = trainer("mlflow", {"test": test}, output_dir)
        hf.train()
        mlflow.end_run()
    return hf.action_scores.run.run_id, hf


def _tables(client: mlflow.MlflowClient, run_id: str, dst: Path) -> list[pd.DataFrame]:
    folder = Path(client.download_artifacts(run_id, "per_sample_losses/test", str(dst)))
    return [pd.read_parquet(path) for path in sorted(folder.glob("epoch_*.parquet"))]


def test_tables_are_whole_in_the_trainers_run_and_the_last_is_the_models_loss(
        mlflow_run: tuple[str, ActionScoresTrainer], client: mlflow.MlflowClient, tmp_path: Path) -> None:
    run_id, hf = mlflow_run
    run = client.get_run(run_id)
    assert "eval_test_loss" in run.data.metrics  # the Trainer's own metric, in the same run
    tables = _tables(client, run_id, tmp_path)
    assert len(tables) == EPOCHS
    for table in tables:
        assert table["sample_id"].tolist() == list(range(len(TEST_TEXTS)))
        assert table["target"].tolist() == TEST_LABELS
    # The last evaluation's losses are the trained model's cross-entropy, sample by sample.
    batch = tokenizer()(TEST_TEXTS, padding=True, return_tensors="pt")
    hf.model.eval()
    with torch.no_grad():
        logits = hf.model(**batch).logits
    expected = F.cross_entropy(logits, torch.tensor(TEST_LABELS), reduction="none").numpy()
    np.testing.assert_allclose(tables[-1]["loss"].to_numpy(), expected, rtol=1e-4, atol=1e-5)
    media = pd.read_parquet(client.download_artifacts(run_id, "per_sample_media/test/media.parquet", str(tmp_path)))
    assert media["text"].tolist() == TEST_TEXTS
    assert media["label_name"].tolist() == [["negative", "positive"][y] for y in TEST_LABELS]


def test_scores_are_the_sums_and_text_panels_come_from_the_recorded_texts(
        mlflow_run: tuple[str, ActionScoresTrainer], mlflow_server: str, client: mlflow.MlflowClient,
        tmp_path: Path) -> None:
    run_id, _ = mlflow_run
    action = np.sum([t["loss"].to_numpy(np.float64) for t in _tables(client, run_id, tmp_path / "t")], axis=0)
    assert analyze_run(MLflowTracker(mlflow_server), run_id, top_k=4).status == "done"
    scores = pd.read_parquet(client.download_artifacts(run_id, "action_scores/test/scores.parquet", str(tmp_path)))
    np.testing.assert_allclose(scores.set_index("sample_id").sort_index()["action"].to_numpy(), action, rtol=1e-6)
    hardest = np.lexsort((np.arange(action.size), -action))[:4].tolist()
    panel = client.download_artifacts(run_id, "action_scores/test/loss/hardest.png", str(tmp_path))
    assert [i for row in read_panel_rows(panel) for i in row["sample_ids"]] == hardest
    table = pd.read_csv(client.download_artifacts(run_id, "action_scores/test/loss/hardest.csv", str(tmp_path)))
    assert table["sample_id"].tolist() == hardest
    assert table["text"].tolist() == [TEST_TEXTS[i] for i in hardest]


def test_wandb_report_to_gets_the_tables_in_its_own_run(
        wandb_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    import wandb

    test = add_sample_ids(items(tokenizer(), TEST_TEXTS, TEST_LABELS))
    hf = trainer("wandb", test, str(tmp_path / "out"), epochs=2)
    hf.train()
    live = wandb.run
    assert live is not None and live.id == hf.action_scores.run.run_id
    wandb.finish()
    run = OfflineRun(hf.action_scores.run.target)
    files = run.files("per_sample_losses/eval")  # one eval dataset: the split is "eval"
    assert sorted(Path(p).name for p in files) == ["epoch_0000.parquet", "epoch_0001.parquet"]
    for path in files.values():
        assert pd.read_parquet(path)["sample_id"].tolist() == list(range(len(TEST_TEXTS)))
    assert "per_sample_media/eval/media.parquet" in run.files("per_sample_media")
    assert any(key.startswith("eval/") or key.startswith("eval_") for key in run.summary)  # the Trainer's metrics


def test_bad_datasets_and_settings_are_errors_that_write_nothing(mlflow_server: str,
                                                                  client: mlflow.MlflowClient) -> None:
    plain = items(tokenizer(), TEST_TEXTS, TEST_LABELS)
    with tempfile.TemporaryDirectory() as output_dir:
        with pytest.raises(ActionScoresError, match="add_sample_ids"):
            trainer("none", {"test": plain}, output_dir)
        repeated = [{**item, "sample_id": min(index, 5)} for index, item in enumerate(plain)]
        with pytest.raises(ActionScoresError, match=r"sample ids \[5\] appear more than once; pass each sample once"):
            trainer("none", {"test": repeated}, output_dir)
        experiment = client.create_experiment(f"hf-bad-{uuid.uuid4().hex[:8]}")
        with in_process_training(mlflow_server), mlflow.start_run(experiment_id=experiment) as active:
            hf = trainer("mlflow", {"test": add_sample_ids(plain)}, output_dir, eval_strategy="no")
            with pytest.raises(ActionScoresError, match="eval_strategy"):
                hf.train()
        assert client.list_artifacts(active.info.run_id) == []
        assert not any(key.startswith("action_scores") for key in client.get_run(active.info.run_id).data.params)
    with pytest.raises(ActionScoresError, match="unknown keys"):
        ActionScoresCallback({"test": add_sample_ids(plain)}, media={"test": {"pictures": []}})


@pytest.mark.parametrize("strategy", ["epoch", "steps"])
def test_a_resumed_trainer_goes_on_numbering_its_evaluations(
        strategy: str, mlflow_server: str, client: mlflow.MlflowClient, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """96 samples in batches of 16: 6 steps an epoch. By epoch: evaluations after epochs 1 and 2, then the
    resumed Trainer's third. By steps (every 4, the first skipped by eval_delay=5):
    evaluations at steps 8 and 12, then the resumed Trainer's at 16 and 18 (its last step, between two)."""
    schedule = ({"eval_strategy": "epoch", "save_strategy": "epoch"} if strategy == "epoch" else
                {"eval_strategy": "steps", "eval_steps": 4, "eval_delay": 5, "save_strategy": "steps",
                 "save_steps": 12})
    test = add_sample_ids(items(tokenizer(), TEST_TEXTS, TEST_LABELS))
    experiment = client.create_experiment(f"hf-resume-{uuid.uuid4().hex[:8]}")
    output_dir = str(tmp_path / "out")
    with in_process_training(mlflow_server):
        mlflow.set_tracking_uri(mlflow_server)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
        first = trainer("mlflow", {"test": test}, output_dir, epochs=2, **schedule)
        first.train()
        run_id = first.action_scores.run.run_id
        mlflow.end_run()
        expected = ["epoch_0000.parquet", "epoch_0001.parquet"]
        assert [Path(f.path).name for f in client.list_artifacts(run_id, "per_sample_losses/test")] == expected
        written = {f.path: f.file_size for f in client.list_artifacts(run_id, "per_sample_losses/test")}
        monkeypatch.setenv("MLFLOW_RUN_ID", run_id)  # the Trainer's MLflow integration resumes the run
        again = trainer("mlflow", {"test": test}, output_dir, epochs=3, **schedule)
        again.train(resume_from_checkpoint=True)
        mlflow.end_run()
    assert again.action_scores.run.run_id == run_id
    names = [Path(f.path).name for f in client.list_artifacts(run_id, "per_sample_losses/test")]
    assert names == [f"epoch_{e:04d}.parquet" for e in range(3 if strategy == "epoch" else 4)]
    sizes = {f.path: f.file_size for f in client.list_artifacts(run_id, "per_sample_losses/test")}
    assert {path: sizes[path] for path in written} == written  # the first Trainer's tables, untouched


def test_the_callbacks_datasets_are_evaluated_and_old_spellings_warn(mlflow_server: str, client: mlflow.MlflowClient,
                                                                     tmp_path: Path) -> None:
    test = add_sample_ids(items(tokenizer(), TEST_TEXTS, TEST_LABELS))
    halved = ActionScoresCallback({"probe": test}, loss_fn=lambda outputs, labels: F.cross_entropy(
        outputs.logits, labels, reduction="none") / 2)
    experiment = client.create_experiment(f"hf-shape-{uuid.uuid4().hex[:8]}")
    with in_process_training(mlflow_server), mlflow.start_run(experiment_id=experiment) as run:
        hf = trainer("none", None, str(tmp_path / "a"), epochs=1, callbacks=[halved])
        hf.train()
    assert halved.run.run_id == run.info.run_id  # the active run, joined
    assert [f.path for f in client.list_artifacts(run.info.run_id, "per_sample_losses/probe")] == [
        "per_sample_losses/probe/epoch_0000.parquet"]
    table = pd.read_parquet(client.download_artifacts(run.info.run_id, "per_sample_losses/probe/epoch_0000.parquet",
                                                      str(tmp_path)))
    batch = tokenizer()(TEST_TEXTS, padding=True, return_tensors="pt")
    hf.model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(hf.model(**batch).logits, torch.tensor(TEST_LABELS), reduction="none").numpy() / 2
    np.testing.assert_allclose(table["loss"].to_numpy(), expected, rtol=1e-4, atol=1e-5)

    with pytest.warns(DeprecationWarning) as warned:
        ActionScoresCallback(["test"], per_sample_loss=lambda outputs, labels: outputs.logits[:, 0])
    assert [str(w.message) for w in warned] == [
        "action-scores: per_sample_loss= is deprecated and will be removed in the next release; use loss_fn= (the "
        "same (outputs, labels) signature)",
        "action-scores: ActionScoresCallback(['test']) (split names) is deprecated and will be removed in the next "
        "release; use ActionScoresCallback({'test': add_sample_ids(dataset)}), which the Trainer then evaluates"]
    with pytest.raises(ActionScoresError, match=r"different datasets for \['probe'\]"):
        trainer("none", {"probe": add_sample_ids(items(tokenizer(), TEST_TEXTS, TEST_LABELS))}, str(tmp_path / "b"),
                callbacks=[ActionScoresCallback({"probe": test})])


def test_the_training_pass_is_recorded_from_the_losses_compute_loss_already_has(
        mlflow_server: str, client: mlflow.MlflowClient, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Learning rate 0 and no dropout: every epoch's training losses are the initial model's cross-entropy of
    each sample, and the model runs once per training batch (6 a epoch), never a second pass."""
    tok = tokenizer()
    texts, labels = sentences(96, seed=0)
    train = add_sample_ids(items(tok, texts, labels))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    experiment = client.create_experiment(f"hf-train-{uuid.uuid4().hex[:8]}")

    def fit(**arguments: object) -> ActionScoresCallback:
        callback = ActionScoresCallback(train_split="train")
        settings = dict(output_dir=str(tmp_path / "out"), num_train_epochs=2, learning_rate=0.0,
                        per_device_train_batch_size=16, eval_strategy="no", save_strategy="no", report_to=[],
                        use_cpu=True, disable_tqdm=True, seed=0) | arguments
        with in_process_training(mlflow_server), mlflow.start_run(experiment_id=experiment):
            ActionScoresTrainer(model=model, args=TrainingArguments(**settings), train_dataset=train,
                                processing_class=tok, callbacks=[callback]).train()
        return callback

    whole = fit()
    assert len(forwards) == 12
    run_id = whole.run.run_id
    assert client.get_run(run_id).data.params["action_scores.scored_by.train"] == "train"
    names = [Path(f.path).name for f in client.list_artifacts(run_id, "per_sample_losses/train")]
    assert names == ["epoch_0000.parquet", "epoch_0001.parquet"]
    model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(**tok(texts, padding=True, return_tensors="pt")).logits,
                                   torch.tensor(labels), reduction="none").numpy()
    for name in names:
        table = pd.read_parquet(client.download_artifacts(run_id, f"per_sample_losses/train/{name}", str(tmp_path)))
        assert table["sample_id"].tolist() == list(range(96))  # shuffled batches, every sample once
        assert table["target"].tolist() == labels
        np.testing.assert_allclose(table["loss"].to_numpy(), expected, rtol=1e-4, atol=1e-5)

    cut = fit(max_steps=9)  # 1.5 epochs: the second saw half of the samples
    names = [Path(f.path).name for f in client.list_artifacts(cut.run.run_id, "per_sample_losses/train")]
    assert names == ["epoch_0000.parquet"]
    assert "epoch 1 was cut short (max_steps) at 1.500 epochs" in caplog.text
    with pytest.raises(ActionScoresError, match=r"^the training set has no 'sample_id' column: pass "
                                                r"add_sample_ids\(dataset\) as the train_dataset"):
        ActionScoresTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "x"), use_cpu=True),
                            train_dataset=items(tok, texts, labels), callbacks=[ActionScoresCallback(train_split="t")])


def _epoch_tables(client: mlflow.MlflowClient, run_id: str, split: str, dst: Path) -> list[pd.DataFrame]:
    """Each epoch of a split, whichever form it was written in: one file, or a folder of parts whose union
    (first occurrence of an id, in part order) is the epoch."""
    folder = Path(client.download_artifacts(run_id, f"per_sample_losses/{split}", str(dst)))
    epochs = sorted({path.name.removesuffix(".parquet") for path in folder.glob("epoch_*")})
    tables = []
    for epoch in epochs:
        parts = sorted((folder / epoch).glob("part-*.parquet")) or [folder / f"{epoch}.parquet"]
        table = pd.concat([pd.read_parquet(part) for part in parts]).drop_duplicates("sample_id", keep="first")
        tables.append(table.sort_values("sample_id", kind="stable").reset_index(drop=True))
    return tables


def test_ddp_under_torchrun_records_every_sample_of_both_passes_once(
        tracking_env: dict[str, str], client: mlflow.MlflowClient, tmp_path: Path) -> None:
    """2 gloo processes: each evaluates and trains on its share (the training shares padded with repeats) and
    writes its own part of each epoch;
    every epoch of both splits holds each sample once, and the last test epoch is the trained model's loss."""
    experiment = f"hf-ddp-{uuid.uuid4().hex[:8]}"
    out = run_command([str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2",
                       str(ROOT / "tests" / "hf_ddp.py"), str(tmp_path / "out")],
                      dict(tracking_env, MLFLOW_EXPERIMENT_NAME=experiment), cwd=tmp_path)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1 and f"run {runs[0].info.run_id}" in out.stdout
    run_id = runs[0].info.run_id
    for split in ("test", "train"):  # every rank wrote its own part: no gather to rank 0
        assert [file.path for file in client.list_artifacts(run_id, f"per_sample_losses/{split}/epoch_0001")] == [
            f"per_sample_losses/{split}/epoch_0001/part-00000.parquet",
            f"per_sample_losses/{split}/epoch_0001/part-00001.parquet"]
    test = _epoch_tables(client, run_id, "test", tmp_path / "test")
    train = _epoch_tables(client, run_id, "train", tmp_path / "train")
    assert [t["sample_id"].tolist() for t in test] == [list(range(len(TEST_TEXTS)))] * 2
    assert [t["sample_id"].tolist() for t in train] == [list(range(90))] * 2
    expected = json.loads((tmp_path / "out" / "expected.json").read_text())
    np.testing.assert_allclose(test[-1]["loss"].to_numpy(), expected, rtol=1e-4, atol=1e-5)
    assert test[-1]["target"].tolist() == TEST_LABELS
