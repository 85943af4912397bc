"""Byte-level tokenizer of the reference model: UTF-8 bytes are ids 0..255, then BOS and EOS."""

from __future__ import annotations

from collections.abc import Iterable

BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258


class ByteTokenizer:
    """Text to token ids and back; every string round-trips exactly (no merges, no unknowns)."""

    bos_id = BOS_ID
    eos_id = EOS_ID
    vocab_size = VOCAB_SIZE

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        """Token ids of ``text`` (UTF-8 bytes), preceded by BOS unless ``bos`` is false."""
        ids = list(text.encode("utf-8"))
        return [BOS_ID, *ids] if bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; BOS/EOS are dropped and invalid UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
