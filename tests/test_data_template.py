"""Chat templates and loss masks: the DeepSeek-V4 presets render the release's chat and thinking
formats (preference pairs too), the mask covers exactly the assistant replies with their EOS, and a
custom template follows its config."""

import json
import re

import numpy as np
import pytest

from configs.data import get_config
from data.chat_template import DEEPSEEK_V4, get_template, render, render_text
from data.encode import Encoder, encode_preference, encode_prompt, preference_sequences
from data.errors import DataError, InvalidRecord
from data.formats import Message, PreferencePair, PromptRecord, parse_sft
from data.pipeline import load_preferences
from data.tokenizer import Tokenizer

CONVERSATION = (
    Message("system", "Reply with the answer only."),
    Message("user", "add 1 2"),
    Message("assistant", "3"),
    Message("user", "upper ab"),
    Message("assistant", "AB"),
)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.load(get_config().tokenizer_path)


def _encoder(tokenizer, mode="all_assistant_turns", template=DEEPSEEK_V4):
    return Encoder(tokenizer, template, mode, get_config().vocab_size)


def test_deepseek_v4_chat_format():
    assert render_text(DEEPSEEK_V4, CONVERSATION) == (
        "<｜begin▁of▁sentence｜>Reply with the answer only."
        "<｜User｜>add 1 2<｜Assistant｜></think>3<｜end▁of▁sentence｜>"
        "<｜User｜>upper ab<｜Assistant｜></think>AB<｜end▁of▁sentence｜>"
    )
    assert render_text(DEEPSEEK_V4, CONVERSATION[:2], generation_prompt=True) == (
        "<｜begin▁of▁sentence｜>Reply with the answer only.<｜User｜>add 1 2<｜Assistant｜></think>"
    )


def test_piece_ids_equal_whole_string_ids(tokenizer):
    ((ids, _),) = _encoder(tokenizer).pieces_to_ids([render(DEEPSEEK_V4, CONVERSATION)])
    assert ids == tokenizer.encode(render_text(DEEPSEEK_V4, CONVERSATION))


@pytest.mark.parametrize("mode, targets", [("all_assistant_turns", ["3", "AB"]), ("last_assistant_turn", ["AB"])])
def test_loss_mask_marks_replies_and_their_eos(tokenizer, mode, targets):
    ((ids, mask),) = _encoder(tokenizer, mode).pieces_to_ids([render(DEEPSEEK_V4, CONVERSATION)])
    ids, mask = np.array(ids), np.array(mask)
    eos = tokenizer.token_id(DEEPSEEK_V4.eos)
    # Split the masked tokens into runs; each run is one reply followed by EOS.
    runs = np.split(ids[mask == 1], np.flatnonzero(ids[mask == 1] == eos)[:-1] + 1)
    assert [tokenizer.decode(run) for run in runs] == [t + DEEPSEEK_V4.eos for t in targets]
    assert mask[ids == tokenizer.token_id("<｜Assistant｜>")].sum() == 0


def test_custom_template_from_config(tokenizer):
    config = get_config(template="custom")
    template = get_template(config.template, config.custom_template)
    text = render_text(template, CONVERSATION[:3])
    assert text == (
        "<｜begin▁of▁sentence｜>System: Reply with the answer only.\nUser: add 1 2\nAssistant: 3<｜end▁of▁sentence｜>"
    )
    ((ids, mask),) = _encoder(tokenizer, template=template).pieces_to_ids([render(template, CONVERSATION[:3])])
    assert tokenizer.decode(np.array(ids)[np.array(mask) == 1]) == "3<｜end▁of▁sentence｜>"


def test_template_errors(tokenizer):
    with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
        get_template("chatml")
    config = get_config(template="custom")
    config.custom_template.special_tokens = ("<|im_start|>",)
    with pytest.raises(DataError, match=r"'<\|im_start\|>' is not in the vocabulary.*\[template_mismatch\]"):
        _encoder(tokenizer, template=get_template("custom", config.custom_template))
    with pytest.raises(ValueError, match="loss_mask mode 'every_token'"):
        _encoder(tokenizer, mode="every_token")


def test_preference_and_prompt_encoding(tokenizer):
    encoder = _encoder(tokenizer)
    pair = encode_preference(PreferencePair((Message("user", "add 1 2"),), "3", "4"), encoder)
    assert tokenizer.decode(pair["prompt"]).endswith("<｜User｜>add 1 2<｜Assistant｜></think>")
    assert tokenizer.decode(pair["chosen"]) == "3<｜end▁of▁sentence｜>"
    assert tokenizer.decode(pair["rejected"]) == "4<｜end▁of▁sentence｜>"
    chosen = preference_sequences(pair)["chosen"]
    assert tokenizer.decode(chosen["tokens"][chosen["loss_mask"] == 1]) == "3<｜end▁of▁sentence｜>"
    prompt = encode_prompt(PromptRecord((Message("user", "add 1 2"),), "3", {"task": "add"}), encoder)
    np.testing.assert_array_equal(prompt["prompt"], pair["prompt"])
    assert (prompt["answer"], prompt["extra"]) == ("3", {"task": "add"})


def test_deepseek_v4_thinking_format(tokenizer):
    messages = (
        Message("user", "add 1 2"),
        Message("assistant", "3", reasoning="dropped later"),
        Message("user", "upper ab"),
        Message("assistant", "AB", reasoning="a to A, b to B"),
    )
    template = get_template("deepseek_v4_thinking")
    assert render_text(template, messages) == (
        "<｜begin▁of▁sentence｜><｜User｜>add 1 2<｜Assistant｜></think>3<｜end▁of▁sentence｜>"
        "<｜User｜>upper ab<｜Assistant｜><think>a to A, b to B</think>AB<｜end▁of▁sentence｜>"
    )
    assert render_text(template, messages[:3], generation_prompt=True).endswith("upper ab<｜Assistant｜><think>")
    ((ids, mask),) = _encoder(tokenizer, "last_assistant_turn", template).pieces_to_ids([render(template, messages)])
    assert tokenizer.decode(np.array(ids)[np.array(mask) == 1]) == "a to A, b to B</think>AB<｜end▁of▁sentence｜>"
    record = parse_sft(
        {
            "messages": [
                {"role": "user", "content": "upper ab"},
                {"role": "assistant", "content": "AB", "reasoning_content": "a to A, b to B"},
            ]
        }
    )
    assert record.messages == messages[2:]


THINKING_PROMPT = (
    Message("system", "Reply with the answer only."),
    Message("user", "add 1 2"),
    Message("assistant", "3", reasoning="one and two"),
    Message("user", "add 2 2"),
)
# The release encoder's output for THINKING_PROMPT + each reply (encoding/encoding_dsv4.py of
# deepseek-ai/DeepSeek-V4-Flash: encode_messages(messages, thinking_mode="thinking")), the reply given
# as {"content", "reasoning_content"}: chosen ("4", "2 plus 2 is 4."), rejected ("5", "").
RELEASE_THINKING = {
    "chosen": "<｜begin▁of▁sentence｜>Reply with the answer only.<｜User｜>add 1 2<｜Assistant｜></think>3"
    "<｜end▁of▁sentence｜><｜User｜>add 2 2<｜Assistant｜><think>2 plus 2 is 4.</think>4<｜end▁of▁sentence｜>",
    "rejected": "<｜begin▁of▁sentence｜>Reply with the answer only.<｜User｜>add 1 2<｜Assistant｜></think>3"
    "<｜end▁of▁sentence｜><｜User｜>add 2 2<｜Assistant｜><think></think>5<｜end▁of▁sentence｜>",
}


def test_thinking_preference_pair_encodes_as_the_release(tokenizer):
    """Replies written `{reasoning}</think>{answer}` encode to the release's tokens, with the mask
    SFT gives the same conversation's last reply."""
    template = get_template("deepseek_v4_thinking")
    pair = encode_preference(
        PreferencePair(THINKING_PROMPT, "2 plus 2 is 4.</think>4", "</think>5"), _encoder(tokenizer, template=template)
    )
    sequences = preference_sequences(pair)
    sft = _encoder(tokenizer, "last_assistant_turn", template)
    for side, reply in (
        ("chosen", Message("assistant", "4", "2 plus 2 is 4.")),
        ("rejected", Message("assistant", "5", "")),
    ):
        assert sequences[side]["tokens"].tolist() == tokenizer.encode(RELEASE_THINKING[side])
        assert tokenizer.token_id("</think>") in pair[side]
        ((ids, mask),) = sft.pieces_to_ids([render(template, THINKING_PROMPT + (reply,))])
        assert (sequences[side]["tokens"].tolist(), sequences[side]["loss_mask"].tolist()) == (ids, mask)


def test_think_end_is_accepted_only_as_the_reasoning_terminator(tokenizer, tmp_path):
    thinking = _encoder(tokenizer, template=get_template("deepseek_v4_thinking"))
    prompt = (Message("user", "add 2 2"),)
    for encoder, chosen in ((_encoder(tokenizer), "2 plus 2</think>4"), (thinking, "2 plus 2</think>4</think>")):
        with pytest.raises(InvalidRecord, match="template marker '</think>'"):
            encode_preference(PreferencePair(prompt, chosen, "</think>5"), encoder)
    lines = [
        {"prompt": "add 2 2", "chosen": "2 plus 2</think>4", "rejected": "</think>5"},
        {"prompt": "add 2 2", "chosen": "2 plus 2</think>4", "rejected": "5"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    detail = "in thinking mode a reply is '{reasoning}</think>{answer}'; this one has no '</think>'"
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: {re.escape(detail)} \[missing_think_end\]$"):
        load_preferences(str(path), thinking)
