"""A Hugging Face ``tokenizer.json`` built here, offline: byte-level BPE trained on generated prose, and that prose.

The router benchmark needs a tokenizer of the kind deployments load (``ROUTER_TOKENIZER``), without
a download: :func:`write_tokenizer` trains one with the ``tokenizers`` library on text from
:class:`Prose` (pseudo-words with a Zipf-like frequency, so common words become single tokens and
rare ones split, about 6 characters per token) and saves it as ``tokenizer.json``.
"""

from __future__ import annotations

import random
from pathlib import Path

_SYLLABLES = (
    "pre",
    "fill",
    "ser",
    "vice",
    "de",
    "code",
    "lay",
    "er",
    "cache",
    "hy",
    "brid",
    "at",
    "ten",
    "tion",
    "link",
    "site",
    "block",
    "hash",
    "to",
    "ken",
    "the",
    "in",
    "of",
    "rou",
    "gate",
    "way",
    "trans",
    "fer",
    "state",
    "qu",
    "ery",
    "mo",
    "del",
    "ba",
    "tch",
    "lin",
    "ear",
    "wan",
    "pa",
    "ce",
)


class Prose:
    """Deterministic generated text: sentences of pseudo-words drawn with a Zipf-like frequency."""

    def __init__(self, seed: int = 0, vocabulary: int = 50_000) -> None:
        rng = random.Random(seed)
        self.words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(vocabulary)]
        self.weights = [1.0 / (rank + 1) for rank in range(vocabulary)]

    def text(self, words: int, seed: int) -> str:
        """``words`` words in sentences of 12, the same for the same ``seed``."""
        rng = random.Random(seed)
        drawn = rng.choices(self.words, weights=self.weights, k=words)
        return " ".join(w + ("." if i % 12 == 11 else "") for i, w in enumerate(drawn))


def write_tokenizer(directory: Path, prose: Prose, vocab_size: int = 2048) -> Path:
    """Train a byte-level BPE tokenizer on ``prose`` and save ``directory/tokenizer.json`` (its path)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator((prose.text(500, seed) for seed in range(400)), trainer)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path
