"""Text to token ids and back behind one interface: the reference model's bytes, or a Hugging Face tokenizer.json.

``load_tokenizer("byte")`` gives the reference model's byte tokenizer. ``load_tokenizer(path)`` reads a
``tokenizer.json`` (the file, or the directory holding it); a ``tokenizer_config.json`` beside it, as
Hugging Face models ship one, supplies the BOS/EOS tokens and the chat template.

Threading: a Hugging Face tokenizer encodes through ``encode_batch_fast`` (``encode_batch`` before tokenizers
0.20), which releases the GIL while it runs; ``Tokenizer.encode`` holds it throughout (a 195K-character text
stalled every other thread for its whole 80 ms), so a worker thread running it would not free the event loop.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from libs.common.errors import ConfigError
from libs.engine.tokenizer import ByteTokenizer


class PromptTokenizer(ABC):
    """What the router needs from a tokenizer."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]  # ids that end generation (passed to the decode side)
    bos_token: str = ""  # text of the BOS token, for chat templates
    eos_token: str = ""
    chat_template: str = ""  # the template the tokenizer ships ("": none)
    template_has_bos: bool = False  # rendered chat text already carries BOS (so encode it without specials)

    @abstractmethod
    def encode(self, text: str, *, add_special: bool) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds what the tokenizer adds around a sequence (BOS)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens dropped; an incomplete character becomes U+FFFD)."""

    @abstractmethod
    def token_piece(self, token_id: int) -> tuple[str, list[int] | None]:
        """One token as OpenAI's log probabilities show it: its text and its UTF-8 bytes (None: a special token)."""

    def encode_with_array(self, text: str, *, add_special: bool) -> tuple[list[int], np.ndarray]:
        """The ids as a list (for messages) and as an int64 array (for hashing)."""
        ids = self.encode(text, add_special=add_special)
        return ids, np.asarray(ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str], *, add_special: bool) -> list[list[int]]:
        """Token ids of each text, as ``encode`` gives them."""
        return [self.encode(text, add_special=add_special) for text in texts]

    def added_texts(self) -> tuple[str, ...]:
        """Texts the tokenizer matches whole before splitting words (added and special tokens; normalized too)."""
        return ()

    def normalize(self, text: str) -> str | None:
        """``text`` as the added tokens that match normalized text see it (None: no such tokens)."""
        return None

    def split_refusal(self) -> str:
        """Why the ids of a text can never be those of its pieces ("": nothing known against it)."""
        return ""


class BytePromptTokenizer(PromptTokenizer):
    """The reference model's tokenizer: UTF-8 bytes, BOS first."""

    def __init__(self) -> None:
        self._tok = ByteTokenizer()
        self.vocab_size = self._tok.vocab_size
        self.eos_token_ids = (self._tok.eos_id,)

    def encode(self, text: str, *, add_special: bool) -> list[int]:
        """UTF-8 bytes of ``text``, after BOS when ``add_special``."""
        return self._tok.encode(text, bos=add_special)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids (BOS/EOS dropped)."""
        return self._tok.decode(ids)

    def token_piece(self, token_id: int) -> tuple[str, list[int] | None]:
        """A byte's character, or ``bytes:\\xNN`` for a byte that is part of a longer character; BOS/EOS by name."""
        if token_id >= 256:
            return ("<|bos|>" if token_id == self._tok.bos_id else "<|eos|>"), None
        return (chr(token_id) if token_id < 128 else f"bytes:\\x{token_id:02x}"), [token_id]

    def encode_with_array(self, text: str, *, add_special: bool) -> tuple[list[int], np.ndarray]:
        """Both forms straight from the UTF-8 bytes (no per-token conversion)."""
        data = text.encode("utf-8")
        head = [self._tok.bos_id] if add_special else []
        arr = np.empty(len(head) + len(data), dtype=np.int64)
        arr[: len(head)] = head
        arr[len(head) :] = np.frombuffer(data, dtype=np.uint8)
        return head + list(data), arr


def _token_text(value) -> str:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


class HfPromptTokenizer(PromptTokenizer):
    """A Hugging Face ``tokenizers`` tokenizer loaded from a local tokenizer.json."""

    def __init__(self, path: Path, config: dict) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exceptions for unreadable files
            raise ConfigError(f"ROUTER_TOKENIZER={str(path)!r}: cannot load tokenizer.json ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        template = config.get("chat_template", "")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t.get("template", "") for t in template if t.get("name") == "default"), "")
        self.chat_template = template if isinstance(template, str) else ""
        self.template_has_bos = bool(self.bos_token) and "bos_token" in self.chat_template
        eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_token_ids = (eos_id,) if eos_id is not None else ()
        self._encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # both release the GIL
        added = self._tok.get_added_tokens_decoder().values()
        self._normalizer = self._tok.normalizer if any(t.normalized for t in added) else None
        normalized = (
            {self._normalizer.normalize_str(t.content) for t in added if t.normalized} if self._normalizer else set()
        )
        self._added = tuple(sorted({t.content for t in added} | normalized))

    def encode(self, text: str, *, add_special: bool) -> list[int]:
        """Token ids from the tokenizer's model (and its post-processor's specials when ``add_special``)."""
        return self._encode_batch([text], add_special_tokens=add_special)[0].ids

    def encode_batch(self, texts: Sequence[str], *, add_special: bool) -> list[list[int]]:
        """Token ids of each text, the texts in parallel, without the GIL."""
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=add_special)]

    def added_texts(self) -> tuple[str, ...]:
        """The added tokens' contents, and the normalized contents of those matched in normalized text."""
        return self._added

    def normalize(self, text: str) -> str | None:
        """``text`` through the normalizer, when some added token matches normalized text."""
        return None if self._normalizer is None else self._normalizer.normalize_str(text)

    def split_refusal(self) -> str:
        """Truncation or padding (they act on the whole text) and BPE dropout (random ids) rule splitting out."""
        if self._tok.truncation or self._tok.padding:
            return "the tokenizer truncates or pads"
        return "the tokenizer's BPE dropout is random" if getattr(self._tok.model, "dropout", None) else ""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_piece(self, token_id: int) -> tuple[str, list[int] | None]:
        """The token decoded alone (special tokens by name) and its UTF-8 bytes."""
        text = self._tok.decode([token_id], skip_special_tokens=False)
        return text, list(text.encode("utf-8"))


def load_tokenizer(spec: str) -> PromptTokenizer:
    """``"byte"``, or a tokenizer.json file, or a directory with tokenizer.json (and tokenizer_config.json)."""
    if spec == "byte":
        return BytePromptTokenizer()
    path = Path(spec)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"ROUTER_TOKENIZER={spec!r}: expected 'byte', a tokenizer.json or a directory holding one")
    config_file = file.parent / "tokenizer_config.json"
    config = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"ROUTER_TOKENIZER={spec!r}: unreadable {config_file.name} ({e})") from None
    return HfPromptTokenizer(file, config if isinstance(config, dict) else {})


class IncrementalDecoder:
    """Text deltas of a growing token sequence; holds back an incomplete character until it completes.

    Each step decodes the tokens since the previous step together with the step before them, so a
    tokenizer whose pieces depend on their neighbours (leading spaces, byte fallback) decodes right.
    """

    def __init__(self, tokenizer: PromptTokenizer, context: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(context)  # the prompt's last tokens give the first output its context
        self._prefix = 0  # start of the window re-decoded for context
        self._read = len(self._ids)  # end of what was emitted

    def push(self, ids: Sequence[int]) -> str:
        """Add tokens; return the text that is now certain."""
        self._ids.extend(ids)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text) :] if len(text) > len(prefix_text) else ""
