"""Tokenizers behind one interface, chat templates, and incremental detokenization."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from libs.common.errors import BadRequest, ConfigError
from libs.engine.tokenizer import BOS_ID, EOS_ID
from services.router.chat_template import PLAIN_TEMPLATE, load_chat_template
from services.router.tokenization import IncrementalDecoder, load_tokenizer

CHATML = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "héllo wörld, ça va? 日本語のテキスト",
    "prefill as a service",
] * 50


@pytest.fixture
def hf_dir(tmp_path):
    """A byte-level BPE tokenizer trained here, saved as Hugging Face models ship it (with a chat template)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": CHATML}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_byte_tokenizer_round_trips_with_bos():
    """The reference model's tokenizer: BOS then UTF-8 bytes; EOS ends generation."""
    tok = load_tokenizer("byte")
    ids = tok.encode("héllo", add_special=True)
    assert ids[0] == BOS_ID and ids[1:] == list("héllo".encode())
    assert tok.decode(ids) == "héllo" and tok.eos_token_ids == (EOS_ID,)


def test_hf_tokenizer_from_directory(hf_dir):
    """tokenizer.json with its tokenizer_config.json: ids, specials, EOS id and the shipped template."""
    tok = load_tokenizer(str(hf_dir))
    text = "the quick brown fox"
    ids = tok.encode(text, add_special=False)
    assert len(ids) < len(text) and tok.decode(ids) == text
    assert tok.eos_token_ids == (Tokenizer.from_file(str(hf_dir / "tokenizer.json")).token_to_id("</s>"),)
    template = load_chat_template("", tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    rendered = template.render([{"role": "user", "content": "hi"}])
    assert rendered == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.template_has_bos
    ids = tok.encode(rendered, add_special=False)
    assert ids[0] == tok.encode("<s>", add_special=False)[0] and tok.decode(ids).endswith("assistant\n")


def test_template_file_overrides_and_refusals(hf_dir, tmp_path):
    """A template file from config wins over the tokenizer's; raise_exception in it is a 400."""
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    template = load_chat_template(str(path), CHATML)
    assert template.render([{"role": "user", "content": "x"}]) == "[user]x"
    with pytest.raises(BadRequest):
        load_chat_template("", CHATML).render([{"role": "tool", "content": "x"}])
    with pytest.raises(ConfigError, match="ROUTER_CHAT_TEMPLATE"):
        load_chat_template(str(tmp_path / "missing.jinja"), "")
    with pytest.raises(ConfigError):
        load_chat_template(str(_write(tmp_path / "bad.jinja", "{% for %}")), "")


def _write(path, text):
    path.write_text(text)
    return path


def test_plain_default_template():
    """Without any template, each message is a role line and its content; the assistant turn is opened."""
    template = load_chat_template("", "")
    assert template.source == PLAIN_TEMPLATE
    assert template.render([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]) == (
        "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    )


def test_unloadable_tokenizer_names_the_key(tmp_path):
    """A missing or broken tokenizer.json is a ConfigError naming ROUTER_TOKENIZER."""
    with pytest.raises(ConfigError, match="ROUTER_TOKENIZER"):
        load_tokenizer(str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="ROUTER_TOKENIZER"):
        load_tokenizer(str(_write(tmp_path / "tokenizer.json", "{}")))


@pytest.mark.parametrize("spec", ["byte", "hf"])
def test_incremental_decoding_equals_whole_decoding(spec, hf_dir):
    """Text streamed token by token equals the decode of all tokens; no broken character is ever emitted."""
    tok = load_tokenizer("byte" if spec == "byte" else str(hf_dir))
    text = "héllo wörld, ça va? 日本語のテキスト the quick brown fox"
    ids = tok.encode(text, add_special=False)
    decoder = IncrementalDecoder(tok, tok.encode("prefill as a", add_special=False)[-6:])
    pieces = [decoder.push([i]) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    if spec == "byte":  # a 3-byte character is held back until its last byte
        assert pieces[text.encode().index("日".encode()) : text.encode().index("日".encode()) + 3] == ["", "", "日"]
