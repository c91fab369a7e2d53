"""Causal-LM fine-tuning with the Hugging Face `Trainer`: every test sequence's loss each epoch, text panels.

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000        # or sqlite:///mlflow.db
    python examples/causal_lm_example.py --experiment causal-lm

No download: a tiny GPT-2 is built from a config, the word-level tokenizer from the corpus's words,
and the corpus from templates ("the cat sat on the mat", "my brother cooks rice at noon", ...). A known
share of sequences (`--corrupt`, 10%) is corrupted: its word order shuffled, or its ending taken
from another template. The loss of a sequence is its mean token NLL over the labels the collator
keeps (`tokens` and `nll_sum` columns beside it); its action is that summed over epochs. The corrupted
sequences of the test split should rank hardest: the script prints how many of them are among the
k hardest (k = their number) next to what a random ranking would find. The lines that add action scores
are marked `# action-scores`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast,
                          TrainingArguments)

from tracking import contract
from tracking.backends import make_tracker
from tracking.integrations.huggingface import (ActionScoresCallback, ActionScoresTrainer,  # action-scores
                                              add_sample_ids)

SLOTS = {
    "animal": ["cat", "dog", "bird", "horse", "fox"],
    "verb": ["sat", "slept", "waited", "stood"],
    "place": ["mat", "rug", "roof", "porch"],
    "person": ["brother", "sister", "friend", "teacher"],
    "cooks": ["cooks", "eats", "buys"],
    "food": ["rice", "soup", "bread", "fish"],
    "time": ["noon", "night", "dawn"],
    "colour": ["red", "blue", "green"],
    "thing": ["car", "kite", "boat"],
    "moves": ["moves", "flies", "drifts"],
}
# Each template: a beginning and an ending; a corrupted sequence may take another template's ending.
TEMPLATES = [
    ("the {animal} {verb}", "on the {place}"),
    ("my {person} {cooks} {food}", "at {time}"),
    ("a {colour} {thing} {moves}", "far away"),
    ("every {time} the {animal}", "runs home"),
]
SPECIAL = ["[PAD]", "[UNK]"]


def sequences(count: int, seed: int, corrupt: float) -> tuple[list[str], np.ndarray]:
    """`count` template sentences and which are corrupted (a `corrupt` share, exactly): the corrupted ones have
    their words shuffled into another order, or their ending taken from another template."""
    rng = np.random.default_rng(seed)
    corrupted = np.zeros(count, dtype=bool)
    corrupted[rng.choice(count, size=round(corrupt * count), replace=False)] = True
    texts = []
    for index in range(count):
        template = int(rng.integers(len(TEMPLATES)))
        beginning, ending = TEMPLATES[template]
        if corrupted[index] and rng.random() < 0.5:
            ending = TEMPLATES[(template + int(rng.integers(1, len(TEMPLATES)))) % len(TEMPLATES)][1]
        words = " ".join((beginning, ending)).format(**{slot: rng.choice(words) for slot, words in SLOTS.items()}).split()
        if corrupted[index] and (beginning, ending) == TEMPLATES[template]:  # not given another ending: shuffled
            order = rng.permutation(len(words))
            while (order == np.arange(len(words))).all():
                order = rng.permutation(len(words))
            words = [words[i] for i in order]
        texts.append(" ".join(words))
    return texts, corrupted


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every word the templates can make, built without any download."""
    words = {word for slot in SLOTS.values() for word in slot}
    words |= {word for template in TEMPLATES for part in template for word in part.split() if "{" not in word}
    tokenizer = Tokenizer(WordLevel({word: i for i, word in enumerate(SPECIAL + sorted(words))}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def encoded(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[dict]:
    """Items as the Trainer takes them; `text` becomes the panels' cards and is dropped from batches."""
    return [{"input_ids": ids, "text": text} for ids, text in zip(tokenizer(texts)["input_ids"], texts)]


def corrupted_among_hardest(run_backend: str, run_target: str, corrupted: np.ndarray, work: Path) -> int:
    """How many corrupted test sequences are among the k hardest by action, k = their number."""
    tracker = make_tracker(run_backend)
    tracker.attach(run_target)
    scores = pd.read_parquet(tracker.download(f"{contract.scores_dir('test')}/{contract.SCORES_FILE}", work))
    hardest = scores.sort_values(["action", contract.SAMPLE_ID], ascending=[False, True])[contract.SAMPLE_ID]
    return int(corrupted[hardest.to_numpy()[: int(corrupted.sum())]].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="causal-lm-example")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--corrupt", type=float, default=0.1, help="share of corrupted sequences in each split")
    parser.add_argument("--report-to", choices=["mlflow", "wandb"], default="mlflow")
    args = parser.parse_args()

    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", args.experiment)  # the Trainer's MLflow integration reads it
    os.environ.setdefault("WANDB_PROJECT", args.experiment)
    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    train_texts, _ = sequences(args.train_size, seed=0, corrupt=args.corrupt)
    test_texts, corrupted = sequences(args.test_size, seed=1, corrupt=args.corrupt)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                       pad_token_id=tokenizer.pad_token_id))
    with tempfile.TemporaryDirectory(prefix="causal-lm-example-") as output_dir:
        training = TrainingArguments(output_dir=output_dir, num_train_epochs=args.epochs, learning_rate=5e-3,
                                     per_device_train_batch_size=32, per_device_eval_batch_size=128,
                                     eval_strategy="epoch", logging_strategy="epoch", save_strategy="no",
                                     report_to=[args.report_to], use_cpu=True, disable_tqdm=True, seed=0)
        trainer = ActionScoresTrainer(  # action-scores: a Trainer that keeps sample ids
            model=model, args=training, train_dataset=encoded(tokenizer, train_texts), processing_class=tokenizer,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            callbacks=[ActionScoresCallback({"test": add_sample_ids(encoded(tokenizer, test_texts))})])  # action-scores
        trainer.train()
        run = trainer.action_scores.run  # action-scores: where the tables went
        print(f"run {run.run_id} finished")
        if args.report_to == "wandb":
            import wandb

            wandb.finish()  # the job resumes the run
        run.analyze()  # action-scores: the post-hoc job, as `action-scores analyze` runs it
        found = corrupted_among_hardest(run.backend, run.target, corrupted, Path(output_dir))
    k = int(corrupted.sum())
    print(f"corrupted sequences among the {k} hardest test sequences by action: {found} of {k} "
          f"(a random ranking finds {k * k / len(corrupted):.1f})")


if __name__ == "__main__":
    main()
