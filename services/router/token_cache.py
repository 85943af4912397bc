"""An exact prefix cache of tokenizations: a prompt's ids are the cached ids of its longest cached prefix ending at a
safe cut, then the ids of the rest.

A *safe cut* is the position of a single space that follows a non-space character and precedes a letter, with no
added or special token's text within reach (so no added token, nor the whitespace it strips, spans it): whether a
position is one depends only on the characters within ``context_chars`` of it. Pre-tokenizer splits of the GPT-2 /
Llama 3 kind (``\\s*[\\r\\n]+`` and ``\\s+(?!\\S)`` included), whitespace runs, Metaspace with ``split`` and
BERT's never join the characters on both sides of such a space into one piece, and the space opens the next word's
piece wherever it stands, so the ids of a text are the ids of its pieces between cuts, concatenated, between the
specials the post-processor adds (BOS first, e.g. [SEP] last). Whether a tokenizer keeps that promise is checked when
the cache is built (the self-test: sample texts split at every safe cut against whole; a failure turns the cache off,
logged) and on a sampled fraction of requests (tokenized whole on a worker thread; a mismatch turns it off, counted
and logged).

A text is cut into segments of at least ``chunk_chars`` characters; each segment's ids are kept under the key
(previous segment's node, segment text), so a lookup walks a prompt's segments from its start, hashing each once,
and the dictionary's own equality check compares the text: a hit is exact, not probable. A text's cached segments are
also kept joined, as a *joined prefix* (their texts and where each ends, the ids as one list and one int64 array, and
the hashes of their whole blocks once asked for), when the text has none or reaches a quarter further than the one it
went on from. A later text is compared with the joined prefixes piece by piece (``str.startswith`` at an offset: no
cutting, slicing or hashing); through the furthest piece it starts with whose end is still a safe cut in it (ends
within ``context_chars`` of it are judged again: what follows may differ), it takes the prefix's ids in one copy,
is cut and walked only after it, and hashes only the blocks after the prefix's whole ones it reuses. Least recently
used segments and joined prefixes go first once the cache holds more than ``max_bytes`` (at most ``_MAX_PREFIXES``
joined prefixes, each at most a quarter of it); each use refreshes a prompt's segments deepest first, its start
last, so a prefix's deepest segments go before its shared start.

Threading: ``plan``, ``finish`` and ``block_hashes`` may run on any thread (the dictionaries are guarded by a lock);
verification runs on one worker thread of its own, at most one text at a time (a sample drawn while it is busy is
skipped).
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
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from libs.common.hashing import extend_hash_list, hash_list
from services.router.tokenization import PromptTokenizer

log = logging.getLogger(__name__)

_CUT = re.compile(r"(?<=\S) (?=[^\W\d_])")  # a space after a non-space, before a letter (or a letter-like numeral)
_ENTRY_OVERHEAD_BYTES = 300  # key tuple, dictionary slot, segment object, list and array headers
_INT_BYTES = 32  # an int object a cached list points to
_LAST_SHARED_INT = 256  # CPython keeps one object for each int up to this
_HASH_BYTES = 40  # a block hash in a list: its pointer and its int object
_MAX_PREFIXES = 64  # joined prefixes kept (a text's first characters are compared with each)
_MAX_WALKS = 8  # joined prefixes a text is compared with piece by piece (the most recent that share its first piece)
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


@dataclass(eq=False, slots=True)
class _Prefix:
    """A text's start through its cached segments, joined: their texts, where each ends, the ids and, once asked for,
    the hashes of their whole blocks."""

    add_special: bool
    pieces: tuple[str, ...]  # the segments' texts (the objects their keys hold)
    ends: tuple[int, ...]  # characters through each piece
    counts: tuple[int, ...]  # ids through each piece, the head the tokenizer adds (when ``add_special``) included
    nodes: tuple[int, ...]  # each piece's segment node: a walk goes on from there
    ids: list[int]
    array: np.ndarray  # the same ids, int64
    size_bytes: int
    hashes: dict[int, list[int]] = field(default_factory=dict)  # block size -> hashes of its whole blocks


@dataclass(frozen=True, slots=True)
class Encoded:
    """A prompt's ids as a list (for messages) and an int64 array (for hashing); the joined prefix they start with."""

    ids: list[int]
    array: np.ndarray
    prefix: _Prefix | None = None
    prefix_ids: int = 0  # how many of the ids are the prefix's


@dataclass
class Plan:
    """How one text becomes ids: a joined prefix's first pieces, the cached segments after them, then the pieces still
    to tokenize."""

    text: str
    add_special: bool
    prefix: _Prefix | None  # the joined prefix the text goes on from
    depth: int  # how many of its pieces the text starts with (through a safe cut)
    pieces: list[str]  # the text between its cuts after those; the last (to the text's end) is never cached
    hits: list[_Segment]  # cached ids of the first ``len(hits)`` pieces

    @property
    def start(self) -> int:
        """Characters whose ids come from the joined prefix."""
        return self.prefix.ends[self.depth - 1] if self.depth else 0

    @property
    def todo_chars(self) -> int:
        """Characters still to tokenize."""
        return len(self.text) - self.reused_chars

    @property
    def reused_chars(self) -> int:
        """Characters whose ids come from the cache."""
        return self.start + sum(map(len, self.pieces[: len(self.hits)]))


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
        self._entries: OrderedDict[tuple[int, str] | _Prefix, _Segment | _Prefix] = OrderedDict()
        self._prefixes: OrderedDict[_Prefix, None] = OrderedDict()  # the joined ones among them, least recent first
        self._lock = threading.Lock()
        self._nodes = itertools.count(1)  # node 0 is a text's start
        self._rng = random.Random()
        self._verify_slot = threading.Lock()
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="token-cache-verify") if verify_fraction > 0 else None
        added = [t for t in tokenizer.added_texts() if t]
        self._added = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None
        longest = max(map(len, added), default=0)
        self._reach = 2 * longest  # twice: normalizing may drop characters (accents)
        self._window = self._reach + longest  # an added token's text within reach lies within this of a cut
        self.context_chars = self._window + 2  # a cut's safety depends on the characters this close to it, no others
        self._normalized_added = bool(added) and tokenizer.normalize("") is not None
        self._head: list[int] = []
        self._tail: list[int] = []
        self.disabled_reason = "no memory for it (0 bytes)" if max_bytes == 0 else self._self_test()
        self.enabled = not self.disabled_reason
        if max_bytes and not self.enabled:
            log.warning("token cache disabled: %s", self.disabled_reason, extra={"reason": self.disabled_reason})

    # --- cuts ---------------------------------------------------------------------------

    def safe_cuts(self, text: str, min_gap_chars: int, start: int = 0) -> list[int]:
        """Safe cuts of ``text`` after ``start``, each at least ``min_gap_chars`` past the one before (or ``start``)."""
        cuts = []
        match = _CUT.search(text, start + min_gap_chars)
        while match is not None:
            i = match.start()
            if self._clear(text, i):
                cuts.append(i)
                match = _CUT.search(text, i + min_gap_chars)
            else:
                match = _CUT.search(text, i + 1)
        return cuts

    def _is_cut(self, text: str, i: int) -> bool:
        """Whether position ``i`` of ``text`` is a safe cut."""
        return _CUT.match(text, i) is not None and self._clear(text, i)

    def _clear(self, text: str, i: int) -> bool:
        """Whether no added token's text lies within reach of position ``i`` (any within ``_window`` of it counts)."""
        if self._added is None:
            return True
        if self._added.search(text, max(0, i - self._window), i + self._window + 1) is not None:
            return False
        return not (self._normalized_added and self._near_normalized_added(text, i))

    def _near_normalized_added(self, text: str, i: int) -> bool:
        """Whether an added token matched in normalized text occurs there within reach of position ``i``."""
        lo, hi = max(0, i - self._reach), i + self._reach + 1
        return self._added.search(self._tok.normalize(text[lo:hi])) is not None

    # --- ids ----------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool) -> Encoded:
        """The ids of ``text``, exactly those of tokenizing it whole."""
        return self.finish(self.plan(text, add_special))

    def plan(self, text: str, add_special: bool) -> Plan:
        """Find the joined prefix ``text`` goes on from furthest, cut the rest and find its cached segments (the whole
        text is one piece while the cache is off)."""
        if not self.enabled:
            return Plan(text, add_special, None, 0, [text], [])
        with self._lock:
            prefix, depth = self._furthest_prefix(text, add_special)
        plan = Plan(text, add_special, prefix, depth, [], [])
        bounds = [plan.start, *self.safe_cuts(text, self.chunk_chars, plan.start), len(text)]
        plan.pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
        parent = prefix.nodes[depth - 1] if depth else 0
        with self._lock:
            for piece in plan.pieces[:-1]:
                segment = self._entries.get((parent, piece))
                if segment is None:
                    break
                plan.hits.append(segment)
                parent = segment.node
        return plan

    def _furthest_prefix(self, text: str, add_special: bool) -> tuple[_Prefix | None, int]:
        """The joined prefix whose pieces ``text`` starts with furthest (through a safe cut), and how many (the most
        recent ``_MAX_WALKS`` prefixes that share its first piece are compared)."""
        best, best_depth, best_end, walks = None, 0, 0, 0
        for prefix in reversed(self._prefixes):
            if prefix.add_special != add_special or not text.startswith(prefix.pieces[0]):
                continue
            depth = self._depth(prefix, text)
            if depth and prefix.ends[depth - 1] > best_end:
                best, best_depth, best_end = prefix, depth, prefix.ends[depth - 1]
            walks += 1
            if walks == _MAX_WALKS:
                break
        return best, best_depth

    def _depth(self, prefix: _Prefix, text: str) -> int:
        """How many of ``prefix``'s pieces ``text`` starts with, through the last of their ends that is a safe cut in
        ``text``."""
        depth, end = 0, 0
        for piece in prefix.pieces:
            if not text.startswith(piece, end):
                break
            depth, end = depth + 1, end + len(piece)
        while depth and not self._safe_through(prefix, depth, text):
            depth -= 1
        return depth

    def _safe_through(self, prefix: _Prefix, depth: int, text: str) -> bool:
        """Whether ``prefix``'s first ``depth`` pieces end at safe cuts in ``text``: those ends further than
        ``context_chars`` from the last one are, as in the text they were cut from (the characters around them are
        the same); the others are judged again."""
        last = prefix.ends[depth - 1]
        near = itertools.takewhile(lambda end: end > last - self.context_chars, reversed(prefix.ends[:depth]))
        return all(self._is_cut(text, end) for end in near)

    def finish(self, plan: Plan) -> Encoded:
        """Tokenize what ``plan`` did not find, keep its segments (joined too, when they reach well past the prefix it
        went on from), and join the ids (maybe verified in the background)."""
        if plan.prefix is None and len(plan.pieces) == 1:
            self._from_tokenizer.inc(len(plan.text))
            return Encoded(*self._tok.encode_with_array(plan.text, add_special=plan.add_special))
        todo = plan.pieces[len(plan.hits) :]
        *fresh, last = self._tok.encode_batch(todo, add_special=False)
        head, tail = (self._head, self._tail) if plan.add_special else ([], [])
        used = plan.prefix.counts[plan.depth - 1] if plan.depth else len(head)
        ids = plan.prefix.ids[:used] if plan.depth else list(head)
        for segment in plan.hits:
            ids += segment.ids
        found = len(ids)
        ids += itertools.chain(*fresh, last, tail)
        rest = np.asarray(ids[found:], dtype=np.int64)  # one conversion: the worker holds the GIL as briefly as it can
        bounds = itertools.accumulate(map(len, fresh), initial=0)
        segments = [
            self._segment(piece, piece_ids, rest[a:b])
            for piece, piece_ids, (a, b) in zip(todo, fresh, itertools.pairwise(bounds), strict=False)
        ]
        starting = plan.prefix.array[:used] if plan.depth else np.asarray(head, dtype=np.int64)
        array = np.concatenate([starting, *(s.array for s in plan.hits), rest], dtype=np.int64)
        encoded = Encoded(ids, array, plan.prefix, used)
        nodes = self._keep(plan, segments)
        if nodes and len(nodes) >= plan.depth // 4:  # joined once more only a long way past the prefix it went on from
            counts = itertools.accumulate((len(s.ids) for s in plan.hits + segments), initial=used)
            joined = self._join(plan, nodes, list(counts)[1:], ids, array)
            encoded = Encoded(ids, array, joined, joined.counts[-1])
        self._from_cache.inc(plan.reused_chars)
        self._from_tokenizer.inc(plan.todo_chars)
        self._maybe_verify(plan, ids)
        return encoded

    def _segment(self, piece: str, ids: list[int], array: np.ndarray) -> _Segment:
        kept = array.astype(np.int32)
        ints = int(np.count_nonzero(kept > _LAST_SHARED_INT))  # ids up to 256 are ints Python shares
        size = sys.getsizeof(piece) + sys.getsizeof(ids) + _INT_BYTES * ints + kept.nbytes + _ENTRY_OVERHEAD_BYTES
        return _Segment(next(self._nodes), ids, kept, size)

    def _keep(self, plan: Plan, segments: list[_Segment]) -> list[int]:
        """Store the fresh segments after the cached ones (those already held stay); refresh what the text used, its
        deepest segments first, its start last; evict past the bound. The nodes of the text's cached pieces."""
        keys, nodes, parent = [], [], plan.prefix.nodes[plan.depth - 1] if plan.depth else 0
        with self._lock:
            if not self.enabled:
                return []
            for piece, segment in zip(plan.pieces, plan.hits + segments, strict=False):
                key = (parent, piece)
                kept = self._entries.get(key)
                if kept is None:
                    self._entries[key] = kept = segment
                    self.size_bytes += segment.size_bytes
                keys.append(key)
                nodes.append(parent := kept.node)
            for key in reversed(keys):
                self._entries.move_to_end(key)
            self._touch(plan.prefix)
            self._evict()
        return nodes

    def _join(self, plan: Plan, nodes: list[int], counts: list[int], ids: list[int], array: np.ndarray) -> _Prefix:
        """Keep the text's start through its cached pieces joined, unless that takes over a quarter of the cache's memory
        (it replaces the prefix the text went on from, when it went on from all of it)."""
        old, depth = plan.prefix, plan.depth
        before = (old.pieces[:depth], old.ends[:depth], old.counts[:depth], old.nodes[:depth]) if depth else ((),) * 4
        cached = plan.pieces[: len(nodes)]
        ends = itertools.accumulate(map(len, cached), initial=plan.start)
        n = counts[-1]
        joined_ids, joined_array = ids[:n], array[:n].copy()
        pieces = (*before[0], *cached)
        ints = int(np.count_nonzero(joined_array > _LAST_SHARED_INT))  # counted as if it held them alone
        size = (
            sum(map(sys.getsizeof, pieces))
            + sys.getsizeof(joined_ids)
            + _INT_BYTES * ints
            + joined_array.nbytes
            + 4 * sys.getsizeof(pieces)
            + _ENTRY_OVERHEAD_BYTES
        )
        joined = _Prefix(
            plan.add_special,
            pieces,
            (*before[1], *list(ends)[1:]),
            (*before[2], *counts),
            (*before[3], *nodes),
            joined_ids,
            joined_array,
            size,
        )
        with self._lock:
            if self.enabled and size <= self.max_bytes // 4:  # a larger one would evict most of what it was joined from
                self._entries[joined] = joined
                self._prefixes[joined] = None
                self.size_bytes += size
                if old is not None and depth == len(old.pieces) and old in self._prefixes:
                    self._drop(old)
                self._touch(old)  # the shorter start last
                if len(self._prefixes) > _MAX_PREFIXES:
                    self._drop(next(iter(self._prefixes)))
                self._evict()
        return joined

    def _touch(self, prefix: _Prefix | None) -> None:
        if prefix in self._prefixes:
            self._entries.move_to_end(prefix)
            self._prefixes.move_to_end(prefix)

    def _drop(self, prefix: _Prefix) -> None:
        del self._entries[prefix], self._prefixes[prefix]
        self.size_bytes -= prefix.size_bytes

    def _evict(self) -> None:
        while self.size_bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.size_bytes -= old.size_bytes
            if isinstance(old, _Prefix):
                del self._prefixes[old]

    def block_hashes(self, encoded: Encoded, block_size: int) -> list[int]:
        """``hash_list(encoded.array, block_size)``, the whole blocks of its joined prefix hashed once for all the
        texts that go on from it."""
        prefix = encoded.prefix
        if prefix is None:
            return hash_list(encoded.array, block_size)
        known = prefix.hashes.get(block_size)
        if known is None:
            known = hash_list(prefix.array, block_size)
            with self._lock:
                if prefix in self._prefixes and block_size not in prefix.hashes:
                    prefix.hashes[block_size] = known
                    size = sys.getsizeof(known) + _HASH_BYTES * len(known)
                    prefix.size_bytes += size
                    self.size_bytes += size
                    self._evict()
        return extend_hash_list(known[: encoded.prefix_ids // block_size], encoded.array, block_size)

    def clear(self) -> None:
        """Forget every segment and joined prefix."""
        with self._lock:
            self._forget()

    def _forget(self) -> None:
        self._entries.clear()
        self._prefixes.clear()
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
            self._forget()
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
