"""How each task turns canonical rows into model inputs, and how its loss is counted.

- ``classification``: ``text`` → tokens, ``label`` → class index; loss is cross-entropy per example.
- ``causal-lm`` (instruction tuning): each row is a conversation: its ``messages``, or ``prompt`` and
  ``response`` as one user and one assistant turn. With a chat template (``model.chat_template``, else the
  tokenizer's own) the conversation is rendered with ``apply_chat_template``; without one, a prompt/response
  pair is ``prompt`` + ``response`` + eos. The loss covers the assistant turns only: every other position
  (system and user turns, the template's own text, padding) carries the ignore index.
- ``preference``: each row is two such conversations, the turns before the replies followed by the chosen and by
  the rejected assistant reply (:class:`Pair`); the loss is DPO's (:mod:`fedfm.preference`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from fedfm.config import FederationConfig
from fedfm.errors import DataError

IGNORE_INDEX = -100

Example = dict[str, list[int] | int]
# A preference row: the conversation ending in the chosen reply and the one ending in the rejected reply.
Pair = dict[str, Example]


def encode(frame: pd.DataFrame, tokenizer, cfg: FederationConfig) -> list[Example] | list[Pair]:
    """Tokenize every row of a canonical frame once (a preference row into a :data:`Pair`); batches are cut from
    the result."""
    if cfg.task == "classification":
        encoded = tokenizer(list(frame["text"]), truncation=True, max_length=cfg.model.max_length)
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": int(label)}
            for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], frame["label"])
        ]
    if cfg.task == "preference":
        return [{reply: _conversation_example([*turns, {"role": "assistant", "content": text}], tokenizer, cfg,
                                              f"the {reply} conversation of pair {number} ({_excerpt(turns)})")
                 for reply, text in (("chosen", chosen), ("rejected", rejected))}
                for number, (turns, chosen, rejected) in enumerate(zip(frame["messages"], frame["chosen"],
                                                                        frame["rejected"]))]
    return [_conversation_example(conversation, tokenizer, cfg, f"conversation {number} ({_excerpt(conversation)})")
            for number, conversation in enumerate(_as_conversations(frame))]


def _conversation_example(conversation: list[dict[str, str]], tokenizer, cfg: FederationConfig, what: str
                          ) -> Example:
    """One conversation as an example labelled on its assistant turns (``what`` names it in errors)."""
    if cfg.model.chat_template or getattr(tokenizer, "chat_template", None):
        ids, spans = _render(conversation, tokenizer, cfg.model.chat_template, what)
    else:
        ids, spans = _concatenate(conversation, tokenizer, cfg, what)
    return _fit(ids, spans, cfg.model.max_length, what)


def _as_conversations(frame: pd.DataFrame) -> list[list[dict[str, str]]]:
    """A causal-lm frame's rows as conversations: its ``messages``, or each prompt/response pair as a user turn and
    an assistant turn."""
    if "messages" in frame.columns:
        return list(frame["messages"])
    return [[{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            for prompt, response in zip(frame["prompt"], frame["response"])]


def _excerpt(conversation: list[dict[str, str]]) -> str:
    text = " ".join(conversation[0]["content"].split())
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def _concatenate(conversation: list[dict[str, str]], tokenizer, cfg: FederationConfig, what: str
                 ) -> tuple[list[int], list[tuple[int, int]]]:
    """Without a chat template: a user turn's text (with the tokenizer's special tokens) followed by the assistant's
    and eos, the one assistant turn being the target."""
    roles = [turn["role"] for turn in conversation]
    if roles != ["user", "assistant"]:
        raise DataError(f"{what} has the turns {', '.join(roles)}, and model {cfg.model.name_or_path}'s tokenizer "
                        "has no chat template to render them with; set model.chat_template (a Jinja template), or "
                        "give each row one user and one assistant turn (prompt/response)")
    prompt = tokenizer(conversation[0]["content"], add_special_tokens=True)["input_ids"]
    response = tokenizer(conversation[1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + response, [(len(prompt), len(prompt) + len(response))]


def _render(conversation: list[dict[str, str]], tokenizer, template: str | None, what: str
            ) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation through the chat template (``template``, else the tokenizer's), and the token spans of its
    assistant turns. A turn's span runs from where the template, asked for the next reply after the turns before
    it, stops (its generation prompt) to where the rendering that ends with the turn ends, less trailing
    whitespace: the content and the end-of-turn token(s) the template emits after it."""

    def render(turns: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja errors, and a template's own raise_exception
            raise DataError(f"the chat template cannot render {what}: {type(exc).__name__}: {exc}") from None

    text = render(conversation, False)
    ids = _token_ids(tokenizer, text)
    spans = []
    for index, turn in enumerate(conversation):
        if turn["role"] != "assistant":
            continue
        through = render(conversation[: index + 1], False)
        if not text.startswith(through):
            raise DataError(f"the chat template renders the turns of {what} up to assistant turn {index} "
                            "differently once later turns follow, so its assistant tokens cannot be told apart; "
                            "split the conversation, or set model.chat_template to a template that renders each "
                            "turn the same whatever follows")
        if index:
            start = len(os.path.commonprefix([render(conversation[:index], True), through]))
        else:  # no turns before it to render: the content's place in its own rendering
            start = max(through.find(turn["content"].strip()), 0)
        end = max(len(through.rstrip()), start)
        spans.append((_token_boundary(tokenizer, text[:start], ids, straddling=False),
                      _token_boundary(tokenizer, text[:end], ids, straddling=True)))
    return ids, spans


def _token_ids(tokenizer, text: str) -> list[int]:
    # a rendered template already holds its special tokens (bos included) as text
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _token_boundary(tokenizer, prefix: str, ids: list[int], *, straddling: bool) -> int:
    """How many of ``ids`` (the whole text's tokens) lie within the text's first characters ``prefix``; a token
    that spans the boundary (the tokenizer merged across it) counts when ``straddling``."""
    prefix_ids = _token_ids(tokenizer, prefix)
    same = 0
    for own, whole in zip(prefix_ids, ids):
        if own != whole:
            break
        same += 1
    return same + 1 if straddling and same < len(prefix_ids) else same


def _fit(ids: list[int], spans: list[tuple[int, int]], limit: int, what: str) -> Example:
    """One example of at most ``limit`` tokens, labelled on the assistant spans. Tokens after the last assistant
    turn carry no loss and go; a longer conversation loses its start, never all of its last answer (an answer too
    long for ``limit`` keeps one token of what precedes it and its beginning)."""
    spans = [(start, end) for start, end in spans if end > start]
    if not spans:
        raise DataError(f"{what}: the chat template renders no token of its assistant turns, so there is nothing "
                        "to learn; check model.chat_template")
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    last_start, end = spans[-1]
    start = max(end - limit, 0)
    if start >= last_start:
        start = max(last_start - 1, 0)
        end = min(start + limit, end)
    return {"input_ids": ids[start:end], "attention_mask": [1] * (end - start), "labels": labels[start:end]}


def collate(examples: list[Example] | list[Pair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch; a list of pairs becomes one batch of their chosen conversations
    followed by their rejected ones (the policy scores both in one forward pass)."""
    if examples and "chosen" in examples[0]:
        examples = [pair["chosen"] for pair in examples] + [pair["rejected"] for pair in examples]
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
    """Additive evaluation counts: merge clients by adding, then read the global means.

    For ``preference`` the unit is a pair: ``loss_sum`` sums DPO losses, ``correct`` counts the pairs whose chosen
    reply's implicit reward beats the rejected's, and ``margin_sum`` sums the reward margins (a signed float, so
    the global mean margin is a sum over tenants like the rest)."""

    loss_sum: float = 0.0
    count: int = 0  # examples (classification), target tokens (causal-lm) or pairs (preference)
    correct: int = 0
    examples: int = 0
    margin_sum: float = 0.0  # preference only

    def add(self, other: LossSums) -> None:
        self.loss_sum += other.loss_sum
        self.count += other.count
        self.correct += other.correct
        self.examples += other.examples
        self.margin_sum += other.margin_sum

    @classmethod
    def parse(cls, data: Any, *, client: str, task: str) -> LossSums:
        """A client's answer (the JSON object its evaluation sent), checked: exactly the four counting fields (and
        ``margin_sum``, for preference), counts that are integers from 0 to MAX_SAMPLES, a finite non-negative loss
        sum, and counts that agree (classification and preference: as many scored as examples, at most that many
        correct; causal-lm: none correct, since it scores tokens). Raises EvaluationError naming the client and
        what is wrong."""
        from fedfm.adapters import MAX_SAMPLES
        from fedfm.errors import EvaluationError

        fields = ("loss_sum", "count", "correct", "examples")
        expected = [*fields, "margin_sum"] if task == "preference" else list(fields)
        if not isinstance(data, dict) or sorted(data) != sorted(expected):
            got = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
            raise EvaluationError(f"client {client}'s evaluation must be an object with exactly {', '.join(expected)}; "
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
        margin = data.get("margin_sum", 0.0)
        if type(margin) not in (int, float) or not math.isfinite(margin):
            raise EvaluationError(f"client {client}'s evaluation margin_sum is {str(margin)[:40]}, not a finite sum "
                                  "of reward margins")
        sums = cls(**data)
        if task != "causal-lm" and not sums.correct <= sums.count == sums.examples:
            raise EvaluationError(f"client {client}'s evaluation counts disagree: {sums.correct} correct of "
                                  f"{sums.count} scored, {sums.examples} examples")
        if task == "causal-lm" and sums.correct:
            raise EvaluationError(f"client {client}'s evaluation of a causal LM counts {sums.correct} correct "
                                  "predictions; it scores none")
        return sums

    def answer(self, task: str) -> dict[str, float | int]:
        """The fields a client's evaluation sends for ``task`` (what :meth:`parse` reads back)."""
        fields = dataclasses.asdict(self)
        if task != "preference":
            del fields["margin_sum"]
        return fields

    def scaled(self, factor: float) -> LossSums:
        """These sums as if from ``factor`` times as many examples (the same means)."""
        return LossSums(self.loss_sum * factor, self.count * factor, self.correct * factor,
                        round(self.examples * factor), self.margin_sum * factor)

    def metrics(self, task: str) -> dict[str, float | int]:
        loss = self.loss_sum / self.count if self.count else float("nan")
        if task == "classification":
            accuracy = self.correct / self.count if self.count else float("nan")
            return {"loss": loss, "accuracy": accuracy, "samples": self.examples}
        if task == "preference":
            accuracy = self.correct / self.count if self.count else float("nan")
            margin = self.margin_sum / self.count if self.count else float("nan")
            return {"loss": loss, "accuracy": accuracy, "reward_margin": margin, "samples": self.examples}
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
