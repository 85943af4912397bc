"""An exact prefix cache of tokenizations: a prompt's ids are the cached ids of its longest cached prefix ending at a
safe cut, then the ids of the rest.

A *safe cut* is the position of a single space that follows a non-space character and precedes a letter, with no
added or special token's text within reach (so no added token, nor the whitespace it strips, spans it). Pre-tokenizer
splits of the GPT-2 / Llama 3 kind (``\\s*[\\r\\n]+`` and ``\\s+(?!\\S)`` included), whitespace runs, Metaspace with
``split`` and BERT's never join the characters on both sides of such a space into one piece, and the space opens the next word's
piece wherever it stands, so the ids of a text are the ids of its pieces between cuts, concatenated, between the
specials the post-processor adds (BOS first, e.g. [SEP] last). Whether a tokenizer keeps that promise is checked when
the cache is built (the self-test: sample texts split at every safe cut against whole; a failure turns the cache off,
logged) and on a sampled fraction of requests (tokenized whole on a worker thread; a mismatch turns it off, counted
and logged).

A text is cut into segments of at least ``chunk_chars`` characters; each segment's ids are kept under the key
(previous segment's node, segment text), so a lookup walks a prompt's segments from its start, hashing each once,
and the dictionary's own equality check compares the text: a hit is exact, not probable. Least recently used
segments go first once the cache holds more than ``max_bytes``; each use refreshes a prompt's segments deepest
first, its start last, so a prefix's deepest segments go before its shared start.

Threading: ``plan`` and ``finish`` may run on any thread (the dictionary is guarded by a lock); verification runs on
one worker thread of its own, at most one text at a time (a sample drawn while it is busy is skipped).
"""

from __future__ import annotations

import itertools
import logging
import random
import re
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from services.router.tokenization import PromptTokenizer

log = logging.getLogger(__name__)

_CUT = re.compile(r"(?<=\S) (?=[^\W\d_])")  # a space after a non-space, before a letter (or a letter-like numeral)
_ENTRY_OVERHEAD_BYTES = 300  # key tuple, dictionary slot, segment object, list and array headers
_INT_BYTES = 32  # an int object a cached list points to
_LAST_SHARED_INT = 256  # CPython keeps one object for each int up to this
_SAMPLE_WORDS = (
    "the",
    "Quick",
    "naïve",
    "Straße",
    "日本語",
    "текст",
    "λόγος",
    "don't",
    "it's",
    "I'M",
    "x2",
    "42",
    "3.14",
    "(a)",
    "[b]",
    "#c",
    "e\u0301",
    "😀",
    "▁",
    "’s",
    "\u00a0",
    "_x",
    "...",
    "`code`",
)
_SAMPLE_SEPARATORS = (
    " ",
    " ",
    " ",
    " ",
    "  ",
    "   ",
    "\n",
    "\n\n",
    "\r\n",
    "\t",
    " \n",
    "\n ",
    ", ",
    ". ",
    "",
    "\u3000",
)


@dataclass(frozen=True, slots=True)
class _Segment:
    node: int  # names this segment in its children's keys
    ids: list[int]
    array: np.ndarray  # the same ids, int32
    size_bytes: int


@dataclass
class Plan:
    """How one text becomes ids: the cached segments it starts with, then the pieces still to tokenize."""

    text: str
    add_special: bool
    pieces: list[str]  # the text between its cuts; the last (to the text's end) is never cached
    hits: list[_Segment]  # cached ids of the first ``len(hits)`` pieces

    @property
    def todo_chars(self) -> int:
        """Characters still to tokenize."""
        return len(self.text) - self.reused_chars

    @property
    def reused_chars(self) -> int:
        """Characters whose ids come from the cache."""
        return sum(map(len, self.pieces[: len(self.hits)]))


class TokenCache:
    """Token ids of prompts, reusing those of the longest cached prefix that ends at a safe cut."""

    def __init__(
        self,
        tokenizer: PromptTokenizer,
        *,
        max_bytes: int,
        chunk_chars: int,
        verify_fraction: float,
        registry: CollectorRegistry,
    ) -> None:
        self._tok = tokenizer
        self.max_bytes = max_bytes
        self.chunk_chars = chunk_chars
        self.verify_fraction = verify_fraction
        self.mismatches = Counter(
            "prfaas_router_token_cache_mismatches",
            "Sampled prompts whose ids from the cache differed from tokenizing them whole (the cache is then off)",
            registry=registry,
        )
        chars = Counter(
            "prfaas_router_token_cache_chars",
            "Prompt characters by where their ids came from: the cache or the tokenizer",
            ["source"],
            registry=registry,
        )
        self._from_cache, self._from_tokenizer = chars.labels("cache"), chars.labels("tokenizer")
        self.size_bytes = 0
        self._entries: OrderedDict[tuple[int, str], _Segment] = OrderedDict()
        self._lock = threading.Lock()
        self._nodes = itertools.count(1)  # node 0 is a text's start
        self._rng = random.Random()
        self._verify_slot = threading.Lock()
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="token-cache-verify") if verify_fraction > 0 else None
        added = [t for t in tokenizer.added_texts() if t]
        self._added = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None
        self._reach = 2 * max(map(len, added), default=0)  # twice: normalizing may drop characters (accents)
        self._normalized_added = bool(added) and tokenizer.normalize("") is not None
        self._head: list[int] = []
        self._tail: list[int] = []
        self.disabled_reason = "no memory for it (0 bytes)" if max_bytes == 0 else self._self_test()
        self.enabled = not self.disabled_reason
        if max_bytes and not self.enabled:
            log.warning("token cache disabled: %s", self.disabled_reason, extra={"reason": self.disabled_reason})

    # --- cuts ---------------------------------------------------------------------------

    def safe_cuts(self, text: str, min_gap_chars: int) -> list[int]:
        """Safe cuts of ``text``, each at least ``min_gap_chars`` after the one before (the first after its start)."""
        zones = self._added_zones(text)
        cuts, z = [], 0
        match = _CUT.search(text, min_gap_chars)
        while match is not None:
            i = match.start()
            while z < len(zones) and zones[z][1] < i:
                z += 1
            if z < len(zones) and zones[z][0] <= i:
                match = _CUT.search(text, zones[z][1] + 1)
            elif self._normalized_added and self._near_normalized_added(text, i):
                match = _CUT.search(text, i + 1)
            else:
                cuts.append(i)
                match = _CUT.search(text, i + min_gap_chars)
        return cuts

    def _added_zones(self, text: str) -> list[tuple[int, int]]:
        """Spans within reach of an added token's text, in order. An occurrence the scan skips overlaps one it found,
        so the reach around those found covers it."""
        if self._added is None:
            return []
        return [(m.start() - self._reach, m.end() + self._reach) for m in self._added.finditer(text)]

    def _near_normalized_added(self, text: str, i: int) -> bool:
        """Whether an added token matched in normalized text occurs there within reach of position ``i``."""
        lo, hi = max(0, i - self._reach), i + self._reach + 1
        return self._added.search(self._tok.normalize(text[lo:hi])) is not None

    # --- ids ----------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool) -> tuple[list[int], np.ndarray]:
        """The ids of ``text`` as a list and an int64 array, exactly those of tokenizing it whole."""
        return self.finish(self.plan(text, add_special))

    def plan(self, text: str, add_special: bool) -> Plan:
        """Cut ``text`` and find its longest cached prefix (the whole text is one piece while the cache is off)."""
        if not self.enabled:
            return Plan(text, add_special, [text], [])
        bounds = [0, *self.safe_cuts(text, self.chunk_chars), len(text)]
        pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
        hits, parent = [], 0
        with self._lock:
            for piece in pieces[:-1]:
                segment = self._entries.get((parent, piece))
                if segment is None:
                    break
                hits.append(segment)
                parent = segment.node
        return Plan(text, add_special, pieces, hits)

    def finish(self, plan: Plan) -> tuple[list[int], np.ndarray]:
        """Tokenize what ``plan`` did not find, keep its segments, and join the ids (maybe verified in the background)."""
        if len(plan.pieces) == 1:
            self._from_tokenizer.inc(len(plan.text))
            return self._tok.encode_with_array(plan.text, add_special=plan.add_special)
        todo = plan.pieces[len(plan.hits) :]
        *fresh, last = self._tok.encode_batch(todo, add_special=False)
        head, tail = (self._head, self._tail) if plan.add_special else ([], [])
        ids = list(head)
        for segment in plan.hits:
            ids += segment.ids
        start = len(ids)
        for piece_ids in fresh:
            ids += piece_ids
        ids += last
        ids += tail
        rest = np.asarray(ids[start:], dtype=np.int64)  # one conversion: the worker holds the GIL as briefly as it can
        bounds = itertools.accumulate(map(len, fresh), initial=0)
        segments = [
            self._segment(piece, piece_ids, rest[a:b])
            for piece, piece_ids, (a, b) in zip(todo, fresh, itertools.pairwise(bounds), strict=False)
        ]
        self._keep(plan.pieces, plan.hits + segments)
        self._from_cache.inc(plan.reused_chars)
        self._from_tokenizer.inc(plan.todo_chars)
        self._maybe_verify(plan, ids)
        return ids, np.concatenate(
            [np.asarray(head, dtype=np.int64), *(s.array for s in plan.hits), rest], dtype=np.int64
        )

    def _segment(self, piece: str, ids: list[int], array: np.ndarray) -> _Segment:
        kept = array.astype(np.int32)
        ints = int(np.count_nonzero(kept > _LAST_SHARED_INT))  # ids up to 256 are ints Python shares
        size = sys.getsizeof(piece) + sys.getsizeof(ids) + _INT_BYTES * ints + kept.nbytes + _ENTRY_OVERHEAD_BYTES
        return _Segment(next(self._nodes), ids, kept, size)

    def _keep(self, pieces: list[str], segments: list[_Segment]) -> None:
        """Store the segments from the text's start (those already held stay), the start most recent; evict past the bound."""
        keys, parent = [], 0
        with self._lock:
            if not self.enabled:
                return
            for piece, segment in zip(pieces, segments, strict=False):
                key = (parent, piece)
                kept = self._entries.get(key)
                if kept is None:
                    self._entries[key] = kept = segment
                    self.size_bytes += segment.size_bytes
                keys.append(key)
                parent = kept.node
            for key in reversed(keys):
                self._entries.move_to_end(key)
            while self.size_bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.size_bytes -= old.size_bytes

    def clear(self) -> None:
        """Forget every segment."""
        with self._lock:
            self._entries.clear()
            self.size_bytes = 0

    # --- exactness ----------------------------------------------------------------------

    def _self_test(self) -> str:
        """Why this tokenizer's ids may change when its texts are split at safe cuts ("": the samples split exactly)."""
        tok = self._tok
        if reason := tok.split_refusal():
            return reason
        samples = _samples(tok)
        wholes = tok.encode_batch(samples, add_special=False)
        specials = tok.encode_batch(samples, add_special=True)
        wrapping = _wrapping(specials[0], wholes[0])
        if wrapping is None:
            return "the specials it adds around a text are not a fixed head and tail"
        head, tail = wrapping
        for k, (text, whole, special) in enumerate(zip(samples, wholes, specials, strict=True)):
            bounds = [0, *self.safe_cuts(text, 1), len(text)]
            pieces = tok.encode_batch([text[a:b] for a, b in itertools.pairwise(bounds)], add_special=False)
            if [t for p in pieces for t in p] != whole:
                return f"splitting at a safe cut changes the ids (self-test sample {k}: {text[:80]!r}...)"
            if special != head + whole + tail:
                return "the specials it adds around a text are not a fixed head and tail"
        if tok.encode_batch(samples, add_special=False) != wholes:
            return "the same text got different ids twice"
        self._head, self._tail = head, tail
        return ""

    def _maybe_verify(self, plan: Plan, ids: list[int]) -> None:
        """With probability ``verify_fraction``, tokenize the text whole on the worker thread and compare."""
        if (
            self._verifier is None
            or self._rng.random() >= self.verify_fraction
            or not self._verify_slot.acquire(blocking=False)
        ):
            return
        self._verifier.submit(self._verify, plan.text, plan.add_special, ids)

    def _verify(self, text: str, add_special: bool, ids: list[int]) -> None:
        try:
            whole = self._tok.encode(text, add_special=add_special)
            if whole != ids and self.enabled:
                self.mismatches.inc()
                at = next(
                    (i for i, (a, b) in enumerate(zip(whole, ids, strict=False)) if a != b), min(len(whole), len(ids))
                )
                self._disable(
                    f"runtime verification: a {len(text)}-character prompt's ids differ from tokenizing it "
                    f"whole at token {at} of {len(whole)}"
                )
        except Exception:  # a verification that fails must not end the worker silently
            log.exception("token cache verification failed")
        finally:
            self._verify_slot.release()

    def _disable(self, reason: str) -> None:
        with self._lock:
            self.enabled = False
            self.disabled_reason = reason
            self._entries.clear()
            self.size_bytes = 0
        log.error("token cache disabled: %s", reason, extra={"reason": reason})

    def close(self) -> None:
        """Wait for a verification in progress and stop the worker thread."""
        if self._verifier is not None:
            self._verifier.shutdown(wait=True)


def _samples(tok: PromptTokenizer, count: int = 48) -> list[str]:
    """Fixed sample texts for the self-test: words, scripts, digits, whitespace runs, the tokenizer's own pieces and
    added tokens, joined by single spaces mostly (safe cuts) and by the separators that could fool a cut."""
    rng = random.Random(0)
    vocabulary = tuple(tok.decode([i]) for i in rng.sample(range(tok.vocab_size), min(200, tok.vocab_size)))
    words = _SAMPLE_WORDS + vocabulary + tok.added_texts()
    out = []
    for k in range(count):
        text = "".join(rng.choice(words) + rng.choice(_SAMPLE_SEPARATORS) for _ in range(rng.randint(10, 60)))
        out.append(text.upper() if k % 4 == 3 else text)
    return out


def _wrapping(special: list[int], plain: list[int]) -> tuple[list[int], list[int]] | None:
    """The ids before and after ``plain`` in ``special`` (None: not found)."""
    for k in range(len(special) - len(plain) + 1):
        if special[k : k + len(plain)] == plain:
            return special[:k], special[k + len(plain) :]
    return None
