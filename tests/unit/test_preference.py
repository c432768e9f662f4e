"""Issue 20: preference pairs (prompt or turns, chosen, rejected), read and checked row by row, rendered with the SFT
path's chat template, and the DPO loss they train with."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from fedfm.builtin_data import load_builtin
from fedfm.config import FederationConfig, PreferenceConfig
from fedfm.data import load_client_data
from fedfm.errors import DataError
from fedfm.preference import dpo_loss, sequence_logps
from fedfm.tasks import IGNORE_INDEX, LossSums, collate, encode
from test_chat_data import TEMPLATE, tokens_and_targets, word_tokenizer


def preference_cfg(path, **data) -> FederationConfig:
    return FederationConfig(task="preference", clients=1, data={"source": str(path), "partition": "iid", **data},
                            model={"max_length": 64})


def write_jsonl(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


GOOD = {"prompt": "how are you", "chosen": "fine thanks", "rejected": "hello there"}


# --------------------------------------------------------------------------------------------------
# Reading pairs
# --------------------------------------------------------------------------------------------------


def test_prompt_rows_and_conversation_rows_become_pairs_under_any_column_names(tmp_path):
    """A prompt column becomes one user turn; a messages column keeps its turns (system included); the reply
    columns are found by data.chosen_column / data.rejected_column. Every row is kept."""
    path = tmp_path / "pairs.csv"
    pd.DataFrame({"question": ["how are you", "hi"], "good": ["fine thanks", "hello"],
                  "bad": ["hello there", "how are you"]}).to_csv(path, index=False)
    cfg = preference_cfg(path, prompt_column="question", chosen_column="good", rejected_column="bad",
                         eval_fraction=0.5)
    data = load_client_data(cfg, "tenant-0")
    frame = pd.concat([data.train, data.eval], ignore_index=True).sort_values("chosen", ignore_index=True)
    assert list(frame.columns) == ["messages", "chosen", "rejected"]
    assert frame.to_dict("records") == [
        {"messages": [{"role": "user", "content": "how are you"}], "chosen": "fine thanks", "rejected": "hello there"},
        {"messages": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "how are you"},
    ]
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    path = tmp_path / "turns.jsonl"
    write_jsonl(path, [{"messages": turns, "chosen": "hello", "rejected": "a"}] * 2)
    data = load_client_data(preference_cfg(path), "tenant-0")
    assert data.train["messages"].tolist() + data.eval["messages"].tolist() == [turns, turns]


@pytest.mark.parametrize("bad, message", [
    ({"chosen": None}, "row 1 has no reply in column 'chosen' (set by data.chosen_column)"),
    ({"rejected": "  "}, "row 1 has no reply in column 'rejected' (set by data.rejected_column)"),
    ({"rejected": "fine thanks"}, "row 1: columns 'chosen' and 'rejected' hold the same reply ('fine thanks')"),
    ({"prompt": ""}, "row 1 has an empty prompt in column 'prompt'"),
    ({"prompt": None}, "row 1 has an empty prompt in column 'prompt'"),
])
def test_a_bad_pair_is_named_by_source_row_and_column(tmp_path, bad, message):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [GOOD, {**GOOD, **bad}, GOOD])
    with pytest.raises(DataError) as info:
        load_client_data(preference_cfg(path), "tenant-0")
    assert str(info.value).startswith(f"data.source {path}: {message}")


def test_turns_before_a_pair_must_end_with_the_user_and_the_reply_columns_must_exist(tmp_path):
    path = tmp_path / "turns.jsonl"
    ends_with_reply = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    write_jsonl(path, [{"messages": ends_with_reply, "chosen": "fine", "rejected": "a"}])
    with pytest.raises(DataError, match=r"row 0 of column 'messages' ends with the assistant's turn; the turns "
                                        r"before a preference pair end with the user's"):
        load_client_data(preference_cfg(path), "tenant-0")
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"prompt": "hi", "good": "hello", "rejected": "a"}])
    with pytest.raises(DataError, match=r"has no column 'chosen' \(set by data.chosen_column\).*a preference row is "
                                        r"a prompt"):
        load_client_data(preference_cfg(path), "tenant-0")


def test_the_builtin_preferences_choose_the_labelled_topic_over_another_or_an_evasive_reply():
    pairs = load_builtin("topics-preferences")
    instructions = load_builtin("topics-instructions")
    assert len(pairs) == len(instructions) == 2400
    assert pairs["prompt"].tolist() == instructions["prompt"].tolist()
    assert pairs["chosen"].tolist() == instructions["response"].tolist()
    assert (pairs["chosen"] != pairs["rejected"]).all()
    topics = {" business", " health", " science", " sports"}
    evasive = {" unsure", " no idea", " hard to say", " it depends"}
    assert set(pairs["rejected"]) == topics | evasive
    assert 0.45 < pairs["rejected"].isin(topics).mean() < 0.55
    assert load_builtin("topics-preferences").equals(pairs)  # fixed: the same frame every time


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def test_a_pair_is_two_conversations_through_the_chat_template_with_the_loss_on_the_reply_only(tmp_path):
    """The SFT path renders each: the turns before, then the chosen (or the rejected) reply as the assistant's
    turn; only the reply and its end-of-turn token are targets, and both conversations share their prompt."""
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [GOOD, GOOD])
    cfg = preference_cfg(path)
    frame = load_client_data(cfg, "tenant-0").train
    tokenizer = word_tokenizer(TEMPLATE)
    [pair] = encode(frame, tokenizer, cfg)
    prompt = [("<s>", False), ("<|user|>", False), ("how", False), ("are", False), ("you", False),
              ("<|end|>", False), ("<|assistant|>", False)]
    assert tokens_and_targets(tokenizer, pair["chosen"]) == prompt + [("fine", True), ("thanks", True),
                                                                      ("<|end|>", True)]
    assert tokens_and_targets(tokenizer, pair["rejected"]) == prompt + [("hello", True), ("there", True),
                                                                        ("<|end|>", True)]
    batch = collate([pair, pair], tokenizer.pad_token_id)  # the chosen conversations, then the rejected
    assert batch["input_ids"][0].tolist() == batch["input_ids"][1].tolist() == pair["chosen"]["input_ids"]
    assert batch["input_ids"][2].tolist() == pair["rejected"]["input_ids"]


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------


def test_sequence_log_probability_sums_the_target_tokens_each_predicted_from_before():
    """Vocabulary of 3. Position 0 gives softmax (1/4, 1/4, 1/2) and predicts token 2; position 1 gives
    (3/5, 1/5, 1/5) and predicts token 0; position 2 predicts nothing."""
    logits = torch.tensor([[[0.0, 0.0, math.log(2)], [math.log(3), 0.0, 0.0], [5.0, 0.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 2, 0]])
    assert sequence_logps(logits, labels).item() == pytest.approx(math.log(0.5) + math.log(0.6), abs=1e-6)
    assert sequence_logps(logits, labels, mean=True).item() == pytest.approx(math.log(0.3) / 2, abs=1e-6)


def test_the_dpo_loss_equals_its_hand_computed_value_for_sigmoid_and_ipo():
    """Two pairs, β = 0.1. Log-ratio margins h = (π_c − ref_c) − (π_r − ref_r): (−1 + 1.5) − (−3 + 2) = 1.5 and
    (−2 + 2) − (−1.5 + 1) = 0.5. Sigmoid: −log σ(0.15) = log(1 + e^−0.15) = 0.620957...; −log σ(0.05) = 0.668460...
    IPO: (1.5 − 5)² = 12.25, (0.5 − 5)² = 20.25. Reward margins β·h: 0.15, 0.05."""
    chosen, rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5])
    reference_chosen, reference_rejected = torch.tensor([-1.5, -2.0]), torch.tensor([-2.0, -1.0])
    losses, margins = dpo_loss(chosen, rejected, reference_chosen, reference_rejected,
                               PreferenceConfig(beta=0.1, loss="sigmoid"))
    assert losses.tolist() == pytest.approx([0.6209570, 0.6684596], abs=1e-6)
    assert margins.tolist() == pytest.approx([0.15, 0.05], abs=1e-6)
    losses, margins = dpo_loss(chosen, rejected, reference_chosen, reference_rejected,
                               PreferenceConfig(beta=0.1, loss="ipo"))
    assert losses.tolist() == pytest.approx([12.25, 20.25], abs=1e-5)
    # the policy equal to its reference: every pair's loss is log 2 (sigmoid), its margin 0
    losses, margins = dpo_loss(chosen, rejected, chosen, rejected, PreferenceConfig(beta=0.5))
    assert losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7) and margins.tolist() == [0.0, 0.0]


def test_preference_evaluation_counts_are_sums_that_add_across_tenants_and_travel_with_their_margin():
    a, b = LossSums(1.5, 3, 2, 3, 0.6), LossSums(0.5, 1, 0, 1, -0.2)
    total = LossSums()
    for sums in (a, b):
        total.add(sums)
    assert total.metrics("preference") == pytest.approx({"loss": 0.5, "accuracy": 0.5, "reward_margin": 0.1,
                                                         "samples": 4})
    assert LossSums.parse(a.answer("preference"), client="a", task="preference") == a
    assert sorted(a.answer("causal-lm")) == ["correct", "count", "examples", "loss_sum"]  # as before issue 20
    with pytest.raises(Exception, match="exactly loss_sum, count, correct, examples, margin_sum"):
        LossSums.parse(a.answer("causal-lm"), client="a", task="preference")
    with pytest.raises(Exception, match="margin_sum is nan"):
        LossSums.parse({**a.answer("preference"), "margin_sum": float("nan")}, client="a", task="preference")


def test_validate_names_a_bad_pair_and_a_pair_the_run_could_not_render(tmp_path, tiny_causal_lm):
    """`fedfm validate` stops on what the run would: a pair without a rejected reply (its row and column), and
    turns with a system message on a model without a chat template (the tenant and the pair)."""
    from typer.testing import CliRunner

    from fedfm.cli import app

    def validate(rows: list[dict]) -> object:
        write_jsonl(tmp_path / "pairs.jsonl", rows)
        config = {"task": "preference", "model": {"name_or_path": tiny_causal_lm, "max_length": 32},
                  "data": {"source": str(tmp_path / "pairs.jsonl"), "partition": "iid"}, "clients": 2}
        (tmp_path / "federation.yaml").write_text(json.dumps(config))
        return CliRunner().invoke(app, ["validate", "-c", str(tmp_path / "federation.yaml")])

    result = validate([{"prompt": f"question {i}", "chosen": "yes", "rejected": "no" if i != 5 else None}
                       for i in range(12)])
    assert isinstance(result.exception, DataError), result.output
    assert "row 5 has no reply in column 'rejected'" in str(result.exception)
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "question"}]
    result = validate([{"messages": turns, "chosen": "yes", "rejected": "no"}] * 12)
    assert isinstance(result.exception, DataError), result.output
    assert str(result.exception).startswith("client tenant-0's training data: the chosen conversation of pair 0 "
                                            "('be brief') has the turns system, user, assistant")
    result = validate([{"prompt": f"question {i}", "chosen": "yes", "rejected": "no"} for i in range(12)])
    assert result.exit_code == 0, result.output
