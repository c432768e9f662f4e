"""Issue 18, item 4: causal-LM data as people have it: a ``messages`` column of {role, content} turns beside
prompt/response, rendered with the chat template, with the loss on the assistant turns only."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fedfm.config import FederationConfig
from fedfm.data import load_client_data
from fedfm.errors import ConfigError, DataError
from fedfm.tasks import IGNORE_INDEX, encode

SPECIAL = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = ["<pad>", "<unk>", "<s>", "</s>", *SPECIAL,
         "hi", "hello", "there", "how", "are", "you", "fine", "thanks", "be", "brief", "and", "a", "b", "c", "d"]
# Every turn is "<|role|> content <|end|>"; asked for the next reply, the template opens an assistant turn.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine thanks"}]


def word_tokenizer(chat_template: str | None = TEMPLATE):
    """One token per whitespace-separated word, the template's markers special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.WordLevel(vocab={word: index for index, word in enumerate(WORDS)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", additional_special_tokens=SPECIAL)
    tokenizer.chat_template = chat_template
    return tokenizer


def causal_cfg(**model) -> FederationConfig:
    return FederationConfig(task="causal-lm", clients=1, data={"source": "chats.jsonl", "partition": "iid"},
                            model={"max_length": 64, **model})


def tokens_and_targets(tokenizer, example) -> list[tuple[str, bool]]:
    return list(zip(tokenizer.convert_ids_to_tokens(example["input_ids"]),
                    [label != IGNORE_INDEX for label in example["labels"]]))


# --------------------------------------------------------------------------------------------------
# Reading conversations
# --------------------------------------------------------------------------------------------------


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    CHAT,
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "user", "content": "d"}, {"role": "assistant", "content": "  "}],  # nothing to learn: left out
]


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_a_messages_column_is_read_from_jsonl_csv_and_parquet(tmp_path, suffix):
    """JSON lines hold the lists, CSV their JSON text, Parquet a list of structs; each is the same canonical
    ``messages`` frame (only role and content kept), and the prompt/response columns beside it are not used."""
    rows = [{"prompt": "unused", "messages": [{**turn, "name": "x"} for turn in conversation]}
            for conversation in CONVERSATIONS]
    path = tmp_path / f"chats.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix == "csv":
        pd.DataFrame({"prompt": ["unused"] * 4, "messages": [json.dumps(row["messages"]) for row in rows]}).to_csv(
            path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    cfg = causal_cfg().with_overrides({"data.source": str(path)})
    part = load_client_data(cfg, "tenant-0")
    assert list(part.train.columns) == ["messages"]
    read = [conversation for frame in (part.train, part.eval) for conversation in frame["messages"]]
    assert sorted(map(json.dumps, read)) == sorted(map(json.dumps, CONVERSATIONS[:3]))


@pytest.mark.parametrize("cell, message", [
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "b"}],
     "row 1 of column 'messages': message 0 has role 'robot', not one of system, user, assistant"),
    ([{"role": "user", "content": "hi"}], "row 1 of column 'messages' has no assistant turn, so nothing to learn"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 7}],
     "row 1 of column 'messages': message 1 (assistant) has content '7', a int, not a string"),
    ([], "row 1 of column 'messages' is an empty conversation"),
    ([{"role": "user"}], "row 1 of column 'messages': message 0 is \"{'role': 'user'}\", not an object with a role "
                         "and a content"),
    ("[{'role': 'user'", "row 1 of column 'messages' is text that is not JSON"),
    ({"role": "user", "content": "hi"}, "row 1 of column 'messages' is a dict, not a list of messages"),
])
def test_a_malformed_conversation_is_named_by_file_row_and_column(tmp_path, cell, message):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": good}) + "\n" + json.dumps({"messages": cell}) + "\n")
    with pytest.raises(DataError) as info:
        load_client_data(causal_cfg().with_overrides({"data.source": str(path)}), "tenant-0")
    assert str(info.value).startswith(f"data.source {path}: {message}")


def test_a_configured_messages_column_must_exist_and_without_one_prompt_response_is_asked_for(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"dialog": CHAT}) + "\n")
    cfg = causal_cfg().with_overrides({"data.source": str(path)})
    with pytest.raises(DataError, match=r"has no column 'prompt' \(set by data.prompt_column\).*; or, for "
                                        r"conversations, give a column 'messages'"):
        load_client_data(cfg, "tenant-0")
    chats = load_client_data(cfg.with_overrides({"data.messages_column": "dialog"}), "tenant-0")
    assert chats.train["messages"].tolist() + chats.eval["messages"].tolist() == [CHAT]
    with pytest.raises(DataError, match=r"has no column 'turns' \(set by data.messages_column\)"):
        load_client_data(cfg.with_overrides({"data.messages_column": "turns"}), "tenant-0")


# --------------------------------------------------------------------------------------------------
# Rendering and the loss mask
# --------------------------------------------------------------------------------------------------


def test_the_tokenizers_chat_template_renders_and_only_assistant_turns_carry_loss():
    tokenizer = word_tokenizer()
    conversation = CHAT + [{"role": "user", "content": "and you"}]  # a last user turn has nothing to learn
    [example] = encode(pd.DataFrame({"messages": [conversation]}), tokenizer, causal_cfg())
    rendered = tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == rendered  # the template's rendering, up to the last assistant turn
    assert tokens_and_targets(tokenizer, example) == [
        ("<s>", False), ("<|system|>", False), ("be", False), ("brief", False), ("<|end|>", False),
        ("<|user|>", False), ("hi", False), ("<|end|>", False),
        ("<|assistant|>", False), ("hello", True), ("there", True), ("<|end|>", True),
        ("<|user|>", False), ("how", False), ("are", False), ("you", False), ("<|end|>", False),
        ("<|assistant|>", False), ("fine", True), ("thanks", True), ("<|end|>", True),
    ]
    assert example["labels"][9:12] == example["input_ids"][9:12]  # a target is the token itself


def test_prompt_response_rows_go_through_the_template_as_a_user_and_an_assistant_turn():
    tokenizer = word_tokenizer()
    [example] = encode(pd.DataFrame({"prompt": ["how are you"], "response": ["fine"]}), tokenizer, causal_cfg())
    assert tokens_and_targets(tokenizer, example) == [
        ("<s>", False), ("<|user|>", False), ("how", False), ("are", False), ("you", False), ("<|end|>", False),
        ("<|assistant|>", False), ("fine", True), ("<|end|>", True),
    ]


def test_a_configured_template_is_used_in_place_of_the_tokenizers_or_where_it_has_none():
    configured = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% if m.role == 'assistant' %}</s>"
                  "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    cfg = causal_cfg(chat_template=configured)
    frame = pd.DataFrame({"messages": [CHAT[1:3]]})
    expected = [("<|user|>", False), ("hi", False), ("<|assistant|>", False), ("hello", True), ("there", True),
                ("</s>", True)]
    for tokenizer in (word_tokenizer(), word_tokenizer(chat_template=None)):
        assert tokens_and_targets(tokenizer, encode(frame, tokenizer, cfg)[0]) == expected
    with pytest.raises(ConfigError, match="model.chat_template: model.chat_template is empty"):
        FederationConfig.parse({"task": "causal-lm", "model": {"chat_template": " "}})


def test_without_any_template_prompt_response_is_concatenated_and_a_longer_conversation_is_refused():
    tokenizer = word_tokenizer(chat_template=None)
    [example] = encode(pd.DataFrame({"messages": [CHAT[1:3]]}), tokenizer, causal_cfg())
    assert tokens_and_targets(tokenizer, example) == [("hi", False), ("hello", True), ("there", True), ("</s>", True)]
    with pytest.raises(DataError) as info:
        encode(pd.DataFrame({"messages": [CHAT[1:3], CHAT]}), tokenizer, causal_cfg(name_or_path="tiny-base"))
    assert str(info.value) == (
        "conversation 1 ('be brief') has the turns system, user, assistant, user, assistant, and model tiny-base's "
        "tokenizer has no chat template to render them with; set model.chat_template (a Jinja template), or give "
        "each row one user and one assistant turn (prompt/response)")


def test_a_byte_level_bpe_with_a_chatml_template_trains_on_exactly_the_assistant_contents():
    """A tokenizer that merges across word boundaries (byte-level BPE, trained here on a few lines) with the
    ChatML template many chat models use: the target tokens decode to each assistant content and its <|im_end|>,
    and nothing else."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    lines = [turn["content"] for turn in CHAT] * 20 + ["system user assistant\n"] * 20
    model.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    [example] = encode(pd.DataFrame({"messages": [CHAT]}), tokenizer, causal_cfg())
    targets, run = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            targets.append(tokenizer.decode(run))
            run = []
    targets.append(tokenizer.decode(run))
    assert targets == ["hello there<|im_end|>", "fine thanks<|im_end|>"]


def test_a_long_conversation_loses_its_start_never_its_last_answer():
    tokenizer = word_tokenizer()
    [example] = encode(pd.DataFrame({"messages": [CHAT]}), tokenizer, causal_cfg(max_length=8))
    assert tokens_and_targets(tokenizer, example) == [
        ("<|user|>", False), ("how", False), ("are", False), ("you", False), ("<|end|>", False),
        ("<|assistant|>", False), ("fine", True), ("thanks", True), ("<|end|>", True),
    ][-8:]
    answer = " ".join(["fine"] * 20)  # longer than max_length: one token of context, then the answer's start
    [example] = encode(pd.DataFrame({"messages": [[CHAT[1], {"role": "assistant", "content": answer}]]}), tokenizer,
                       causal_cfg(max_length=8))
    assert tokens_and_targets(tokenizer, example) == [("<|assistant|>", False)] + [("fine", True)] * 7


def test_a_template_that_renders_earlier_turns_differently_later_is_refused():
    counting = "{% for m in messages %}{{ messages|length - loop.index }} {{ m.content }} {% endfor %}"
    with pytest.raises(DataError, match=r"the chat template renders the turns of conversation 0 \('hi'\) up to "
                                        "assistant turn 1 differently once later turns follow"):
        encode(pd.DataFrame({"messages": [CHAT[1:]]}), word_tokenizer(counting), causal_cfg())


def test_evaluation_scores_the_assistant_tokens_only(tiny_causal_lm):
    """The evaluation of a causal LM encodes its eval frame the same way: its token count is the number of
    assistant targets (each predicted from the position before it), whatever the other turns hold."""
    import torch
    from transformers import AutoModelForCausalLM

    from fedfm.evaluation import _evaluate_frame
    from fedfm.modeling import load_tokenizer

    plain = ("{{ bos_token }}{% for m in messages %}{{ m.role }} : {{ m.content }} </s> {% endfor %}"
             "{% if add_generation_prompt %}assistant : {% endif %}")
    cfg = causal_cfg(name_or_path=tiny_causal_lm, chat_template=plain)
    tokenizer = load_tokenizer(cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm).eval()
    frame = pd.DataFrame({"messages": [CHAT, CHAT[1:3]]})
    with torch.no_grad():
        sums = _evaluate_frame(model, tokenizer, frame, cfg)
    # "hello there </s>" and "fine thanks </s>" in the first, "hello there </s>" in the second
    assert sums.count == 3 + 3 + 3
    assert sums.examples == 2


def test_validate_refuses_conversations_the_run_could_not_render_and_passes_them_with_a_template(
        tmp_path, tiny_causal_lm):
    """Issue 18, items 3 and 4: conversations with a system turn, on a model whose tokenizer has no chat template,
    would stop the run at its first fine-tune; `fedfm validate` refuses them first, naming the tenant, and accepts
    them once model.chat_template says how to render them."""
    from typer.testing import CliRunner

    from fedfm.cli import app

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": f"question {i}"},
                                                      {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
                             for i in range(12)))
    config = {"task": "causal-lm", "model": {"name_or_path": tiny_causal_lm, "max_length": 32},
              "data": {"source": str(chats), "partition": "iid"}, "clients": 2}
    (tmp_path / "federation.yaml").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["validate", "-c", str(tmp_path / "federation.yaml")])
    assert isinstance(result.exception, DataError), result.output
    assert str(result.exception).startswith("client tenant-0's training data: conversation 0 ('be brief') has the "
                                            "turns system, user, assistant, and model ")
    config["model"]["chat_template"] = TEMPLATE
    (tmp_path / "federation.yaml").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["validate", "-c", str(tmp_path / "federation.yaml")])
    assert result.exit_code == 0, result.output
    assert "data: tenant-0 " in " ".join(result.output.split())
