"""Small tokenizer.json files trained here for the token cache tests, each of a kind deployments ship."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Llama 3's pre-tokenizer split: ``\s*[\r\n]+`` makes a run of newlines one piece
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "prefill",
    "service",
    "decode",
    "cache",
    "token",
    "hybrid",
    "attention",
    "naïve",
    "Straße",
    "héllo",
    "wörld",
    "ça",
    "日本語",
    "текст",
    "λόγος",
    "don't",
    "it's",
    "I'm",
    "x2",
    "42",
    "3.14",
    "(a)",
    "[b]",
    "#c",
    "e\u0301t\u00e9",
)
SEPARATORS = (" ", " ", " ", " ", "  ", "\n", "\n\n", "\r\n", "\t", ", ", ". ", ".\n\n", " \n", "\n ", "")
# Added tokens with the traps a cut must avoid: a space inside one, whitespace absorbed on either side.
SPECIALS = ("<|begin_of_text|>", "<|im_start|>", "<|im_end|>", "<|eot|>", "<|end of turn|>")
ABSORBING = ("<|eot|>",)  # rstrip: eats the whitespace after it
WORDLIKE = ("Magic Word",)  # a normalized added token of the BERT-like tokenizer


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """Generated text with every word, separator and added token of the tests."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(5, 30)):
            parts.append(rng.choice(WORDS + SPECIALS) if rng.random() < 0.1 else rng.choice(WORDS))
            parts.append(rng.choice(SEPARATORS))
        out.append("".join(parts))
    return out


def _save(tok: Tokenizer, directory: Path, config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def llama3_like(directory: Path) -> Path:
    """Byte-level BPE behind Llama 3's split regex; BOS by the post-processor; added tokens with rstrip and a space."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|begin_of_text|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens(
        [AddedToken("<|eot|>", rstrip=True, special=True), AddedToken("<|end of turn|>", special=True)]
    )
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return _save(tok, directory, {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>"})


def gpt2_like(directory: Path) -> Path:
    """Byte-level BPE with GPT-2's regex (as libs/bench/hf_tokenizer.py builds), ChatML specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return _save(tok, directory, {"bos_token": "<s>", "eos_token": "</s>"})


def whitespace_runs(directory: Path) -> Path:
    """Byte-level BPE behind a split that keeps each whitespace run one piece (a cut inside a run would break it)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    return _save(tok, directory)


def bert_like(directory: Path) -> Path:
    """WordPiece behind a lowercasing normalizer; [CLS] before and [SEP] after; a normalized added token with a space."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=500, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.add_tokens([AddedToken(w, normalized=True) for w in WORDLIKE])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return _save(tok, directory)


def metaspace(directory: Path, *, split: bool) -> Path:
    """SentencePiece-style BPE behind a Metaspace pre-tokenizer (``split=False``: the whole text is one piece)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=split)
    tok.decoder = decoders.Metaspace(prepend_scheme="always", split=split)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return _save(tok, directory, {"bos_token": "<s>", "eos_token": "</s>"})
