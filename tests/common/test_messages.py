"""Bus messages: msgpack round trips, tags, and decoders that reject garbage with a typed error."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.common.config import EnvReader
from libs.common.errors import BadRequest, ConfigError, IndexUnavailable, error_from_code
from libs.common.messages import (
    AllBlocksCleared,
    BlocksEvicted,
    BlocksStored,
    DecodeJob,
    ErrorReply,
    InstanceLoad,
    InstancePrefix,
    KvDestination,
    KvEventBatch,
    KvLookupReply,
    KvLookupRequest,
    KvSnapshot,
    PrefillJob,
    Sampling,
    SitePrefix,
    decode_job_decoder,
    encode,
    kv_event_batch_decoder,
    kv_lookup_request_decoder,
    kv_lookup_result_decoder,
    prefill_job_decoder,
)

hashes = st.lists(st.integers(0, 2**64 - 1), max_size=20)
kinds = st.sampled_from(["attn_kv", "linear_state"])
tiers = st.sampled_from(["device", "host", "disk"])
stored = st.builds(BlocksStored, block_hashes=hashes, kind=kinds, tier=tiers)
events = st.one_of(
    stored,
    st.builds(BlocksEvicted, block_hashes=hashes, kind=kinds, tier=tiers),
    st.just(AllBlocksCleared()),
    st.builds(KvSnapshot, stored=st.lists(stored, max_size=3)),
)
names = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)


@given(
    st.builds(
        KvEventBatch,
        site=names,
        instance=names,
        seq=st.integers(1, 2**40),
        ts=st.floats(0, 2e9),
        events=st.lists(events, max_size=5),
    )
)
def test_event_batch_round_trip(batch):
    """Every KV event batch survives msgpack encoding unchanged."""
    assert kv_event_batch_decoder.decode(encode(batch)) == batch


def test_lookup_reply_and_error_share_one_decoder():
    """A lookup caller decodes either a reply or a typed error with one decoder."""
    reply = KvLookupReply(
        blocks_total=3,
        instances=[InstancePrefix(site="a", instance="i", attn_kv_blocks=3, linear_state_blocks=2, usable_blocks=2)],
        sites=[SitePrefix(site="a", instance="i", usable_blocks=2, attn_kv_blocks=3, linear_state_blocks=2)],
    )
    assert kv_lookup_result_decoder.decode(encode(reply)) == reply
    err = kv_lookup_result_decoder.decode(encode(ErrorReply(code="index_unavailable", message="down")))
    assert isinstance(err, ErrorReply)
    assert isinstance(error_from_code(err.code, err.message), IndexUnavailable)


def test_messages_are_tagged_and_versioned():
    """The wire form carries a versioned type tag, so a consumer can tell kinds apart."""
    raw = msgspec.msgpack.decode(encode(KvLookupRequest(block_hashes=[1])))
    assert raw["type"] == "kv.lookup.v1"
    with pytest.raises(msgspec.ValidationError):
        kv_lookup_request_decoder.decode(encode(InstanceLoad(site="a", instance="b", role="decode")))


def test_job_messages_round_trip_with_their_nested_parts():
    """A decode job and a prefill job survive msgpack with sampling and destination intact."""
    sampling = Sampling(temperature=0.7, top_p=0.9, seed=3, stop=("\n\n",))
    job = DecodeJob(
        request_id="r",
        transfer_id="t",
        model="m",
        prompt_tokens=[256, 1, 2],
        max_tokens=8,
        reply_subject="_INBOX.x",
        prefill_site="dc-a",
        sampling=sampling,
    )
    assert decode_job_decoder.decode(encode(job)) == job
    dest = KvDestination(site="dc-b", instance="d0", host="10.0.0.2", port=7000)
    prefill = PrefillJob(request_id="r", transfer_id="t", model="m", prompt_tokens=[1], destination=dest, skip_blocks=2)
    assert prefill_job_decoder.decode(encode(prefill)) == prefill


def test_invalid_sampling_on_the_wire_is_a_bad_request():
    """A job whose sampling is out of range decodes to BadRequest (a typed refusal), not a crash."""
    raw = msgspec.msgpack.decode(
        encode(
            DecodeJob(
                request_id="r",
                transfer_id="t",
                model="m",
                prompt_tokens=[1],
                max_tokens=1,
                reply_subject="x",
                prefill_site="a",
            )
        )
    )
    raw["sampling"]["top_p"] = 0
    with pytest.raises(BadRequest, match="top_p"):
        decode_job_decoder.decode(msgspec.msgpack.encode(raw))


def test_config_errors_name_the_key():
    """A bad value is reported with the full variable name and the value."""
    reader = EnvReader("KV_INDEX_", {"KV_INDEX_LOOKUP_TIMEOUT_S": "soon", "KV_INDEX_FETCH_BATCH": "0"})
    with pytest.raises(ConfigError, match="KV_INDEX_LOOKUP_TIMEOUT_S='soon'"):
        reader.float("LOOKUP_TIMEOUT_S", 1.0)
    with pytest.raises(ConfigError, match="KV_INDEX_FETCH_BATCH='0': expected an integer >= 1"):
        reader.int("FETCH_BATCH", 10, minimum=1)
    assert reader.int("MISSING", 7) == 7
