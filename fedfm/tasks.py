"""How each task turns canonical rows into model inputs, and how its loss is counted.

- ``classification``: ``text`` → tokens, ``label`` → class index; loss is cross-entropy per example.
- ``causal-lm`` (instruction tuning): ``prompt`` + ``response`` + eos → tokens; the loss covers the
  response tokens only (prompt and padding positions carry the ignore index).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from fedfm.config import FederationConfig

IGNORE_INDEX = -100

Example = dict[str, list[int] | int]


def encode(frame: pd.DataFrame, tokenizer, cfg: FederationConfig) -> list[Example]:
    """Tokenize every row of a canonical frame once; batches are cut from the result."""
    if cfg.task == "classification":
        encoded = tokenizer(list(frame["text"]), truncation=True, max_length=cfg.model.max_length)
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": int(label)}
            for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], frame["label"])
        ]
    prompts = tokenizer(list(frame["prompt"]), add_special_tokens=True)["input_ids"]
    responses = tokenizer(list(frame["response"]), add_special_tokens=False)["input_ids"]
    limit = cfg.model.max_length
    examples = []
    for prompt, response in zip(prompts, responses):
        response = (response + [tokenizer.eos_token_id])[: limit - 1]
        prompt = prompt[-(limit - len(response)) :]  # drop the prompt's start, never the target
        examples.append({
            "input_ids": prompt + response,
            "attention_mask": [1] * (len(prompt) + len(response)),
            "labels": [IGNORE_INDEX] * len(prompt) + response,
        })
    return examples


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch."""
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    per_token_labels = isinstance(examples[0]["labels"], list)
    labels = (torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long) if per_token_labels
              else torch.tensor([example["labels"] for example in examples], dtype=torch.long))
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        attention_mask[row, :length] = 1
        if per_token_labels:
            labels[row, :length] = torch.tensor(example["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class LossSums:
    """Additive evaluation counts: merge clients by adding, then read the global means."""

    loss_sum: float = 0.0
    count: int = 0  # examples (classification) or target tokens (causal-lm)
    correct: int = 0
    examples: int = 0

    def add(self, other: LossSums) -> None:
        self.loss_sum += other.loss_sum
        self.count += other.count
        self.correct += other.correct
        self.examples += other.examples

    @classmethod
    def parse(cls, data: Any, *, client: str, task: str) -> LossSums:
        """A client's answer (the JSON object its evaluation sent), checked: exactly these four fields, counts
        that are integers from 0 to MAX_SAMPLES, a finite non-negative loss sum, and counts that agree
        (classification: as many scored as examples, at most that many correct; causal-lm: none correct,
        since it scores tokens). Raises EvaluationError naming the client and what is wrong."""
        from fedfm.adapters import MAX_SAMPLES
        from fedfm.errors import EvaluationError

        fields = ("loss_sum", "count", "correct", "examples")
        if not isinstance(data, dict) or sorted(data) != sorted(fields):
            got = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
            raise EvaluationError(f"client {client}'s evaluation must be an object with exactly {', '.join(fields)}; "
                                  f"it has {got}")
        for key in fields[1:]:
            value = data[key]
            if type(value) is not int or not 0 <= value <= MAX_SAMPLES:
                raise EvaluationError(f"client {client}'s evaluation {key} is {str(value)[:40]}, not a count from 0 "
                                      f"to {MAX_SAMPLES:.0e}")
        loss = data["loss_sum"]
        if type(loss) not in (int, float) or not math.isfinite(loss) or loss < 0:
            raise EvaluationError(f"client {client}'s evaluation loss_sum is {str(loss)[:40]}, not a finite sum "
                                  "of losses")
        sums = cls(**data)
        if task == "classification" and not sums.correct <= sums.count == sums.examples:
            raise EvaluationError(f"client {client}'s evaluation counts disagree: {sums.correct} correct of "
                                  f"{sums.count} scored, {sums.examples} examples")
        if task != "classification" and sums.correct:
            raise EvaluationError(f"client {client}'s evaluation of a causal LM counts {sums.correct} correct "
                                  "predictions; it scores none")
        return sums

    def scaled(self, factor: float) -> LossSums:
        """These sums as if from ``factor`` times as many examples (the same means)."""
        return LossSums(self.loss_sum * factor, self.count * factor, self.correct * factor,
                        round(self.examples * factor))

    def metrics(self, task: str) -> dict[str, float | int]:
        loss = self.loss_sum / self.count if self.count else float("nan")
        if task == "classification":
            accuracy = self.correct / self.count if self.count else float("nan")
            return {"loss": loss, "accuracy": accuracy, "samples": self.examples}
        return {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "samples": self.examples,
                "tokens": self.count}


def batches(examples: list[Example], pad_token_id: int, size: int) -> Iterator[dict[str, torch.Tensor]]:
    """``examples`` in order, ``size`` at a time, each collated (:func:`collate`) into a batch."""
    for start in range(0, len(examples), size):
        yield collate(examples[start : start + size], pad_token_id)


def batch_sums(logits: torch.Tensor, labels: torch.Tensor, task: str) -> LossSums:
    """Summed loss (and correct predictions) of one batch, from the model's logits."""
    logits = logits.float()
    if task == "classification":
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        correct = int((logits.argmax(dim=-1) == labels).sum())
        return LossSums(float(loss), len(labels), correct, len(labels))
    # next-token prediction: position t predicts token t+1
    shifted_logits = logits[:, :-1, :].reshape(-1, logits.size(-1))
    shifted_labels = labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX,
                                             reduction="sum")
    tokens = int((shifted_labels != IGNORE_INDEX).sum())
    return LossSums(float(loss), tokens, 0, labels.size(0))
