"""The prefix tokenization cache: exact ids (split at safe cuts, reused prefixes, joined starts), block hashes, the
self-test, verification, bounds."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from libs.common.hashing import hash_list
from services.router.token_cache import TokenCache
from services.router.tokenization import BytePromptTokenizer, PromptTokenizer, load_tokenizer
from tests.router import tokenizers_trained as trained

EXACT = (
    "byte",
    "gpt2",
    "llama3",
    "whitespace",
    "bert",
    "metaspace",
)  # tokenizers the self-test must keep the cache for
PIECES = (
    trained.WORDS + trained.SPECIALS + trained.WORDLIKE + ("MAGIC WORD", "magic word", "▁", "'s", "’", "\u00a0", "😀")
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, PromptTokenizer]:
    """Each kind of tokenizer the tests use, loaded as the router loads them."""
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {
        "gpt2": trained.gpt2_like(root / "gpt2"),
        "llama3": trained.llama3_like(root / "llama3"),
        "whitespace": trained.whitespace_runs(root / "ws"),
        "bert": trained.bert_like(root / "bert"),
        "metaspace": trained.metaspace(root / "ms", split=True),
        "metaspace_whole": trained.metaspace(root / "msw", split=False),
    }
    return {"byte": load_tokenizer("byte")} | {name: load_tokenizer(str(d)) for name, d in dirs.items()}


def cache_of(tok: PromptTokenizer, **overrides) -> TokenCache:
    """A cache with small chunks (many cuts per text) and its own registry."""
    options = dict(max_bytes=64 << 20, chunk_chars=8, verify_fraction=0.0, registry=CollectorRegistry())
    return TokenCache(tok, **(options | overrides))


texts = st.lists(
    st.one_of(st.sampled_from(PIECES), st.sampled_from(trained.SEPARATORS), st.text(max_size=4)), max_size=80
).map("".join)


@pytest.mark.parametrize("name", EXACT)
@SETTINGS
@given(text=texts)
def test_pieces_between_safe_cuts_tokenize_as_the_whole(tokenizers, name, text):
    """Tokenizing the pieces between every safe cut gives the ids of the whole text (no self-test in the way)."""
    tok = tokenizers[name]
    cache = cache_of(tok)
    cuts = cache.safe_cuts(text, 1)
    bounds = [0, *cuts, len(text)]
    pieces = tok.encode_batch([text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)], add_special=False)
    assert [t for p in pieces for t in p] == tok.encode(text, add_special=False)


def test_every_exact_kind_passes_its_self_test(tokenizers):
    """The self-test keeps the cache on for tokenizers that split exactly, and cuts happen in ordinary prose."""
    for name in EXACT:
        cache = cache_of(tokenizers[name])
        assert cache.enabled, (name, cache.disabled_reason)
        assert len(cache.safe_cuts("the quick brown fox jumps over the lazy dog " * 4, 8)) >= 10


@pytest.mark.parametrize("name", EXACT)
@SETTINGS
@given(base=texts, edits=st.lists(st.tuples(st.floats(0, 1), texts, st.booleans()), min_size=1, max_size=6))
def test_prompts_sharing_prefixes_get_the_ids_of_the_whole(tokenizers, name, base, edits):
    """A sequence of prompts that share prefixes of every length (cut, then continued) gets exactly the whole ids."""
    tok = tokenizers[name]
    cache = cache_of(tok)
    text = base
    for where, more, special in [(1.0, "", True), *edits]:
        text = text[: int(where * len(text))] + more
        encoded = cache.encode(text, add_special=special)
        expected, expected_array = tok.encode_with_array(text, add_special=special)
        assert encoded.ids == expected
        assert encoded.array.dtype == np.int64 and np.array_equal(encoded.array, expected_array)


@pytest.mark.parametrize("name", EXACT)
@SETTINGS
@given(
    base=texts,
    edits=st.lists(st.tuples(st.floats(0, 1), texts, st.booleans()), min_size=1, max_size=6),
    block_size=st.sampled_from([1, 2, 5, 16]),
)
def test_block_hashes_of_a_prompt_are_those_of_its_ids(tokenizers, name, base, edits, block_size):
    """Prompts sharing starts, each twice (the second reuses the first's joined start): a prompt's block hashes, at
    each block size, are hash_list of its ids."""
    tok = tokenizers[name]
    cache = cache_of(tok)
    text = base
    for where, more, special in [(1.0, "", True), *edits]:
        text = text[: int(where * len(text))] + more
        for _ in range(2):
            encoded = cache.encode(text, add_special=special)
            assert encoded.ids == tok.encode(text, add_special=special)
            for size in (block_size, 2 * block_size + 1):  # several models' block sizes: each its own hashes
                assert cache.block_hashes(encoded, size) == hash_list(encoded.ids, size)


@pytest.mark.parametrize("name", EXACT)
def test_a_prompt_continuing_a_seen_start_joins_it_in_one_step(tokenizers, name):
    """Once a prompt was seen, the next ones sharing its long start take that start's joined ids and hashes (through
    the last cut before they differ) in one step, without walking its segments, exactly; clearing forgets it."""
    tok = tokenizers[name]
    cache = cache_of(tok, chunk_chars=64)
    document = " ".join(trained.WORDS * 12)
    prompts = [f"{document} Question {i}: where is it?" for i in range(5)]
    cache.encode(prompts[0], add_special=True)
    plan = cache.plan(prompts[1], add_special=True)
    assert plan.prefix is not None and not plan.hits and plan.reused_chars > len(document) - 200
    for prompt in prompts[1:4]:
        encoded = cache.encode(prompt, add_special=True)
        assert encoded.prefix is plan.prefix and encoded.ids == tok.encode(prompt, add_special=True)
        assert cache.block_hashes(encoded, 4) == hash_list(encoded.ids, 4)
    cache.clear()
    assert cache.size_bytes == 0 and cache.plan(prompts[4], add_special=True).reused_chars == 0


@pytest.mark.parametrize("name", [n for n in EXACT if n != "byte"])
def test_a_joined_start_is_not_reused_where_the_word_it_ends_with_goes_on(tokenizers, name):
    """A joined start is not reused through the cut after "pre" in a prompt in which "pre" goes on as "prefill": the
    ids stay those of the whole word, and the hashes those of the ids."""
    tok = tokenizers[name]
    cache = cache_of(tok, chunk_chars=1)
    stem = " ".join(trained.WORDS[:12]) + " pre"
    cache.encode(stem + " of the fox", add_special=True)
    assert cache.plan(stem + " off a fox", add_special=True).start == len(stem)  # " of" goes on: not past the stem
    longer = stem + "fill the fox"
    assert cache.plan(longer, add_special=True).reused_chars < len(stem)
    encoded = cache.encode(longer, add_special=True)  # the joined start taken partway: so are its hashes
    assert encoded.ids == tok.encode(longer, add_special=True) and 0 < encoded.prefix_ids < len(encoded.prefix.ids)
    assert cache.block_hashes(encoded, 1) == hash_list(encoded.ids, 1)


def test_a_joined_start_is_not_reused_where_its_end_is_no_safe_cut(tokenizers):
    """A joined start is not reused through a cut before " of" in a prompt in which that space is inside the added
    token <|end of turn|>: its cuts near where it is left are judged again in each prompt, and the ids stay exact."""
    tok = tokenizers["llama3"]
    cache = cache_of(tok, chunk_chars=1)
    stem = " ".join(trained.WORDS[:12]) + " <|end"
    cache.encode(stem + " of the fox", add_special=True)
    assert cache.plan(stem + " off a fox", add_special=True).start == len(stem)  # " of" goes on: not past the stem
    trap = stem + " of turn|> the fox"
    assert cache.plan(trap, add_special=True).reused_chars < len(stem)
    assert cache.encode(trap, add_special=True).ids == tok.encode(trap, add_special=True)


@pytest.mark.parametrize("name", EXACT)
def test_prompts_differing_only_just_before_a_cut_keep_their_own_ids(tokenizers, name):
    """A prompt that differs from a cached one only in the character before a cut, or in one character more, is not
    given the cached segment's ids."""
    tok = tokenizers[name]
    cache = cache_of(tok)
    text = " ".join(trained.WORDS[:20])
    for cut in cache.safe_cuts(text, 8):
        for variant in (text[: cut - 1] + "Z" + text[cut:], text[:cut] + "s" + text[cut:]):
            for prompt in (text, variant):
                assert cache.encode(prompt, add_special=True).ids == tok.encode(prompt, add_special=True)


@pytest.mark.parametrize("name", EXACT)
def test_a_conversation_reuses_its_earlier_turns(tokenizers, name):
    """Each turn of a growing chat transcript (specials between turns) is exact and reuses the turns before it."""
    tok = tokenizers[name]
    cache = cache_of(tok, chunk_chars=64)
    rng = random.Random(1)
    transcript = "<|begin_of_text|>"
    for turn in range(8):
        role = "user" if turn % 2 == 0 else "assistant"
        content = " ".join(rng.choice(trained.WORDS) for _ in range(rng.randint(20, 80)))
        transcript += f"<|im_start|>{role}\n{content}<|im_end|>\n"
        prompt = transcript + "<|im_start|>assistant\n"
        plan = cache.plan(prompt, add_special=False)
        if turn:
            assert plan.reused_chars >= len(transcript) - len(content) - 200  # all but the last turn and a chunk or so
        assert cache.finish(plan).ids == tok.encode(prompt, add_special=False)


def test_metaspace_without_split_is_caught_by_the_self_test(tokenizers, caplog):
    """A tokenizer whose ids change when its text is split (one SentencePiece piece) has the cache off, logged."""
    tok = tokenizers["metaspace_whole"]
    with caplog.at_level(logging.WARNING, logger="services.router.token_cache"):
        cache = cache_of(tok)
    assert not cache.enabled and "changes the ids" in cache.disabled_reason
    assert any("token cache disabled" in r.getMessage() for r in caplog.records)
    text = "the quick brown fox <|eot|> jumps over the lazy dog " * 20
    for _ in range(2):
        plan = cache.plan(text, add_special=True)
        assert plan.reused_chars == 0 and cache.finish(plan).ids == tok.encode(text, add_special=True)
    assert cache.size_bytes == 0


class _SplitSensitive(BytePromptTokenizer):
    """Bytes, except that "zq zq" is one token: a cut before its space changes the ids (no self-test sample has it)."""

    def encode(self, text: str, *, add_special: bool) -> list[int]:
        """BOS, then the bytes with each "zq zq" as token 257."""
        out = [256] if add_special else []
        for i, part in enumerate(text.split("zq zq")):
            out += ([257] if i else []) + list(part.encode("utf-8"))
        return out

    def encode_with_array(self, text: str, *, add_special: bool) -> tuple[list[int], np.ndarray]:
        """As ``encode``."""
        ids = self.encode(text, add_special=add_special)
        return ids, np.asarray(ids, dtype=np.int64)


def test_runtime_verification_disables_the_cache_on_a_mismatch(caplog):
    """A sampled request is also tokenized whole in the background; a mismatch is counted, logged, and the cache off."""
    tok = _SplitSensitive()
    registry = CollectorRegistry()
    cache = cache_of(tok, chunk_chars=1, verify_fraction=1.0, registry=registry)
    assert cache.enabled, cache.disabled_reason
    text = "a prompt that says zq zq somewhere in it"
    with caplog.at_level(logging.ERROR, logger="services.router.token_cache"):
        first = cache.encode(text, add_special=True).ids  # split before " zq": the pair is lost
        cache.close()  # waits for the verification under way
    assert first != tok.encode(text, add_special=True) and not cache.enabled
    assert registry.get_sample_value("prfaas_router_token_cache_mismatches_total") == 1
    assert any("token cache disabled" in r.getMessage() for r in caplog.records)
    assert cache.encode(text, add_special=True).ids == tok.encode(text, add_special=True) and cache.size_bytes == 0


def test_memory_is_bounded_and_least_recent_goes_first(tokenizers):
    """The cache holds at most its bytes; a prefix used again stays while older ones go (segments and joined starts),
    a text's start outlives its end, a joined start over a quarter of the cache is not kept; 0 bytes caches nothing."""
    tok = tokenizers["gpt2"]
    rng = random.Random(2)
    prompts = [" ".join(rng.choice(trained.WORDS) for _ in range(400)) for _ in range(30)]
    one = cache_of(tok, chunk_chars=64)
    one.encode(prompts[0], add_special=True)
    per_prompt = one.size_bytes
    cache = cache_of(tok, chunk_chars=64, max_bytes=5 * per_prompt)
    for prompt in prompts:
        cache.encode(prompt, add_special=True)
        cache.encode(prompts[0], add_special=True)  # kept warm
        assert 0 < cache.size_bytes <= 5 * per_prompt
        assert cache.plan(prompts[0], add_special=True).reused_chars > len(prompts[0]) - 200
    assert cache.plan(prompts[1], add_special=True).reused_chars == 0  # evicted by the 28 prompts after it
    assert cache.plan(prompts[-1], add_special=True).reused_chars > len(prompts[-1]) - 200
    long_prompt = " ".join(prompts)
    one.encode(long_prompt, add_special=True)
    # about half its segments (the rest of what ``one`` holds is their joined prefix: too big to keep in this cache)
    half = cache_of(tok, chunk_chars=64, max_bytes=one.size_bytes // 4)
    half.encode(long_prompt, add_special=True)  # more than the cache holds: its start stays, its end goes
    plan = half.plan(long_prompt, add_special=True)
    assert len(long_prompt) / 3 < plan.reused_chars < len(long_prompt) * 2 / 3 and plan.prefix is None
    off = cache_of(tok, max_bytes=0)
    for _ in range(2):
        assert off.plan(prompts[0], add_special=True).reused_chars == 0
        assert off.encode(prompts[0], add_special=True).ids == tok.encode(prompts[0], add_special=True)
    assert off.size_bytes == 0
