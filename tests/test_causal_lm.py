"""Hugging Face causal LMs against the real MLflow server: a tiny GPT-2 built from a config, one loss per
sequence (the mean token NLL over its unmasked labels, shifted as the model shifts them), with `tokens` and
`nll_sum`, and the sequences' texts as media."""

from __future__ import annotations

import importlib.util
import re
import sys
import uuid
from pathlib import Path
from types import ModuleType

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast,
                          TrainingArguments)

from tests.conftest import ROOT, in_process_training, run_command
from tracking.integrations.huggingface import ActionScoresCallback, ActionScoresTrainer, add_sample_ids

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "rug", "fast", "slow", "home"]
TEXTS = ["the cat sat on a mat", "the dog ran home", "a dog sat", "the cat ran fast on a rug", "a cat sat slow",
         "the dog ran on a mat", "a cat", "the dog sat on the rug home"]


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: index for index, word in enumerate(["[PAD]", "[UNK]", *WORDS])}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def recorded(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ActionScoresTrainer]:
    tok = tokenizer()
    data = [{"input_ids": ids, "text": text} for ids, text in zip(tok(TEXTS)["input_ids"], TEXTS)]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                       pad_token_id=tok.pad_token_id))
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("out")), num_train_epochs=2, learning_rate=1e-2,
                             per_device_train_batch_size=4, per_device_eval_batch_size=3, eval_strategy="epoch",
                             save_strategy="no", report_to=["mlflow"], use_cpu=True, disable_tqdm=True, seed=0)
    experiment = f"causal-{uuid.uuid4().hex[:8]}"
    with in_process_training(mlflow_server):
        mlflow.set_tracking_uri(mlflow_server)
        mlflow.set_experiment(experiment)
        hf = ActionScoresTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                 data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                                 callbacks=[ActionScoresCallback({"test": add_sample_ids(data)})])
        hf.train()
        mlflow.end_run()
    return hf.action_scores.run.run_id, hf


def test_one_loss_per_sequence_is_the_models_own_loss_of_that_sequence(
        recorded: tuple[str, ActionScoresTrainer], client: mlflow.MlflowClient, tmp_path: Path) -> None:
    run_id, hf = recorded
    folder = Path(client.download_artifacts(run_id, "per_sample_losses/test", str(tmp_path)))
    assert sorted(p.name for p in folder.glob("*.parquet")) == ["epoch_0000.parquet", "epoch_0001.parquet"]
    table = pd.read_parquet(folder / "epoch_0001.parquet")
    assert table["sample_id"].tolist() == list(range(len(TEXTS)))
    ids = tokenizer()(TEXTS)["input_ids"]
    assert table["tokens"].tolist() == [len(sequence) - 1 for sequence in ids]  # shifted: the first predicts none
    hf.model.eval()
    with torch.no_grad():  # one sequence at a time, unpadded: the model's own mean loss of it
        own = [float(hf.model(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss) for s in ids]
    np.testing.assert_allclose(table["loss"].to_numpy(), own, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(table["nll_sum"].to_numpy(), np.asarray(own) * table["tokens"].to_numpy(), rtol=1e-4)
    media = pd.read_parquet(client.download_artifacts(run_id, "per_sample_media/test/media.parquet", str(tmp_path)))
    assert media["text"].tolist() == TEXTS
    assert media["kind"].tolist() == ["text"] * len(TEXTS)
    assert media["label_name"].isna().all()  # a sequence's labels are its tokens, not a class


def test_the_examples_corpus_corrupts_exactly_its_share_and_only_those_leave_their_template() -> None:
    example = _example()
    texts, corrupted = example.sequences(400, seed=3, corrupt=0.1)
    assert corrupted.sum() == 40
    # A clean sentence is one template with its slots filled; a corrupted one fits none.
    patterns = [re.compile("^" + " ".join((begin, end)).format(**{slot: f"({'|'.join(words)})"
                                                                  for slot, words in example.SLOTS.items()}) + "$")
                for begin, end in example.TEMPLATES]
    fits = np.array([any(pattern.match(text) for pattern in patterns) for text in texts])
    assert (fits == ~corrupted).all()


def test_the_causal_lm_example_ranks_its_corrupted_sequences_hardest(tracking_env: dict[str, str],
                                                                    client: mlflow.MlflowClient) -> None:
    experiment = f"causal-example-{uuid.uuid4().hex[:8]}"
    result = run_command([sys.executable, "examples/causal_lm_example.py", "--experiment", experiment,
                          "--train-size", "400", "--test-size", "100", "--epochs", "3"], tracking_env)
    found = re.search(r"among the (\d+) hardest test sequences by action: (\d+) of \d+", result.stdout)
    assert found is not None, result.stdout
    k, among = int(found.group(1)), int(found.group(2))
    assert k == 10 and among >= 8  # a random ranking finds 1
    run_id = re.search(r"run (\w+) finished", result.stdout).group(1)
    assert client.get_run(run_id).data.tags["action_scores.status"] == "done"
    assert "action_scores/test/loss/hardest.png" in result.stdout
    # A loss per sequence has no one class: the classification scores are not missed, with no warning.
    assert "no confidence" not in result.stdout + result.stderr


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("causal_lm_example", ROOT / "examples" / "causal_lm_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
