"""Hugging Face `Trainer` on a tiny sentiment task built in code: every test sentence's loss each epoch, text panels.

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000        # or sqlite:///mlflow.db
    python examples/huggingface_example.py --experiment hf-sentiment
    python examples/huggingface_example.py --report-to wandb  # an offline W&B run (WANDB_MODE=offline)

No download: the sentences come from a seeded generator (5% of training labels flipped), the
word-level tokenizer and the one-layer BERT are built from code. The lines that add action
scores are marked `# action-scores`. Prints `run <id> finished` and where the panels are.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast, TrainingArguments

from tracking.integrations.huggingface import (ActionScoresCallback, ActionScoresTrainer,  # action-scores
                                              add_sample_ids)

POSITIVE = ["good", "great", "excellent", "fun", "love", "wonderful", "best", "nice", "moving", "clever"]
NEGATIVE = ["bad", "awful", "boring", "hate", "worst", "poor", "terrible", "dull", "silly", "slow"]
NEUTRAL = ["the", "movie", "film", "plot", "actors", "was", "and", "it", "story", "a", "really", "very", "but",
           "ending", "music", "script", "i", "this", "quite", "at", "times"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
LABELS = {0: "negative", 1: "positive"}


def sentences(count: int, seed: int, flip: float) -> tuple[list[str], list[int]]:
    """Reviews of 4 to 10 words with 1 to 3 words of one sentiment, its label; a `flip` share of labels flipped."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(count):
        label = int(rng.integers(0, 2))
        words = [*rng.choice(NEUTRAL, size=rng.integers(3, 8)), *rng.choice(POSITIVE if label else NEGATIVE,
                                                                            size=rng.integers(1, 4))]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(1 - label if rng.random() < flip else label)
    return texts, labels


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the task's vocabulary, built without any download."""
    vocab = {word: index for index, word in enumerate(SPECIAL + sorted(set(POSITIVE + NEGATIVE + NEUTRAL)))}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.post_processor = TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", vocab["[CLS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def encoded(tokenizer: PreTrainedTokenizerFast, texts: list[str], labels: list[int]) -> list[dict]:
    """Dict items as the Trainer takes them; `text` is dropped from batches with the other unused columns."""
    encodings = tokenizer(texts, truncation=True, max_length=32)
    return [{"input_ids": ids, "attention_mask": mask, "labels": label, "text": text}
            for ids, mask, label, text in zip(encodings["input_ids"], encodings["attention_mask"], labels, texts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="huggingface-example")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=800)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--report-to", choices=["mlflow", "wandb"], default="mlflow")
    parser.add_argument("--no-analyze", action="store_true", help="train only")
    args = parser.parse_args()

    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", args.experiment)  # the Trainer's MLflow integration reads it
    os.environ.setdefault("WANDB_PROJECT", args.experiment)
    tokenizer = word_tokenizer()
    train = encoded(tokenizer, *sentences(args.train_size, seed=0, flip=0.05))
    test = encoded(tokenizer, *sentences(args.test_size, seed=1, flip=0.05))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2, id2label=LABELS,
                        label2id={name: index for index, name in LABELS.items()})
    with tempfile.TemporaryDirectory(prefix="hf-example-") as output_dir:
        training = TrainingArguments(output_dir=output_dir, num_train_epochs=args.epochs, learning_rate=5e-3,
                                     per_device_train_batch_size=16, per_device_eval_batch_size=128,
                                     eval_strategy="epoch", logging_strategy="epoch", save_strategy="no",
                                     report_to=[args.report_to], use_cpu=True, disable_tqdm=True, seed=0)
        trainer = ActionScoresTrainer(  # action-scores: a Trainer that keeps sample ids
            model=BertForSequenceClassification(config), args=training, train_dataset=train,
            callbacks=[ActionScoresCallback({"test": add_sample_ids(test)})],  # action-scores: ids are positions
            processing_class=tokenizer)
        trainer.train()
    run = trainer.action_scores.run  # action-scores: where the tables went
    print(f"run {run.run_id} finished")
    if args.no_analyze:
        return
    if args.report_to == "wandb":
        import wandb

        wandb.finish()  # the job resumes the run
    run.analyze()  # action-scores: the post-hoc job, as `action-scores analyze` runs it


if __name__ == "__main__":
    main()
