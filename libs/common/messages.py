"""Every message on the bus: msgspec Structs, tagged and versioned, with shared codecs.

Schemas evolve only by adding fields with defaults at the end; a changed meaning is a new ``v2``
Struct. Hot-path messages travel as msgpack; events for people and analytics as JSON.
"""

from __future__ import annotations

from typing import Literal, get_args

import msgspec

from libs.common.errors import BadRequest

StateKind = Literal["attn_kv", "linear_state"]
Tier = Literal["device", "host", "disk"]
Role = Literal["prefill", "decode"]


class _Msg(msgspec.Struct, kw_only=True, frozen=True, tag_field="type"):
    """Base of all bus messages (tagged by the ``type`` field)."""


class ErrorReply(_Msg, tag="error.v1"):
    """A typed error answered instead of a reply (``code`` from ``libs.common.errors``)."""

    code: str
    message: str
    lease_s: float = 0.0  # transfer_failed by a lease run out inside a begun transfer: its no-progress limit (s)


# --- KV events (producers: gateways and engine adapters; consumer: kv_index) -------------


class BlocksStored(_Msg, tag="kv.stored.v1"):
    """Blocks now held by the instance, in prefix order, for one state kind and tier."""

    block_hashes: list[int]
    kind: StateKind = "attn_kv"
    tier: Tier = "device"
    parent_hash: int | None = None


class BlocksEvicted(_Msg, tag="kv.evicted.v1"):
    """Blocks no longer held by the instance in that kind and tier."""

    block_hashes: list[int]
    kind: StateKind = "attn_kv"
    tier: Tier = "device"


class AllBlocksCleared(_Msg, tag="kv.cleared.v1"):
    """The instance dropped its whole cache (a known-empty state: clears staleness)."""


class KvSnapshot(_Msg, tag="kv.snapshot.v1"):
    """Everything the instance holds; replaces what the index knew and clears staleness."""

    stored: list[BlocksStored]


KvEvent = BlocksStored | BlocksEvicted | AllBlocksCleared | KvSnapshot


# The index applies a batch in one Redis script (about 16 us a stored hash, which blocks Redis meanwhile):
# a batch over these limits is refused, so publishers split theirs (``libs.engine.events``).
MAX_BATCH_HASHES = 1 << 14  # block hashes in one batch
MAX_BATCH_EVENTS = 1 << 12  # events in one batch, each chain of a snapshot counted


class KvEventBatch(_Msg, tag="kv.batch.v1"):
    """Events of one instance, numbered by a per-instance sequence (gaps mark it stale)."""

    site: str
    instance: str
    seq: int
    ts: float
    events: list[KvEvent]


def batch_size(events: list[KvEvent]) -> tuple[int, int]:
    """What ``events`` weigh against the batch limits: events (a snapshot's chains counted too), block hashes."""
    count = hashes = 0
    for event in events:
        if isinstance(event, KvSnapshot):
            count += 1 + len(event.stored)
            hashes += sum(len(chain.block_hashes) for chain in event.stored)
        else:
            count += 1
            hashes += len(event.block_hashes) if isinstance(event, BlocksStored | BlocksEvicted) else 0
    return count, hashes


class KvSnapshotRequest(_Msg, tag="kv.snapshot_request.v1"):
    """The index asks an instance for a snapshot because it saw a sequence gap."""

    site: str
    instance: str
    expected_seq: int
    received_seq: int


# --- KV lookup (request/reply on ``subjects.KV_LOOKUP``) -----------------------------------


class KvLookupRequest(_Msg, tag="kv.lookup.v1"):
    """Where does the prefix named by these block hashes (in prompt order) live?"""

    block_hashes: list[int]
    hybrid: bool = True
    sites: list[str] | None = None


class InstancePrefix(msgspec.Struct, kw_only=True, frozen=True):
    """Prefix held by one instance, counted in blocks from the start of the prompt."""

    site: str
    instance: str
    attn_kv_blocks: int
    linear_state_blocks: int
    usable_blocks: int


class SitePrefix(msgspec.Struct, kw_only=True, frozen=True):
    """Best prefix among a site's instances (``instance`` is the one that holds it)."""

    site: str
    instance: str
    usable_blocks: int
    attn_kv_blocks: int
    linear_state_blocks: int


class KvLookupReply(_Msg, tag="kv.lookup_reply.v1"):
    """Usable prefix per instance and per site; instances holding nothing are left out."""

    blocks_total: int
    instances: list[InstancePrefix]
    sites: list[SitePrefix]


KvLookupResult = KvLookupReply | ErrorReply


# --- Load heartbeats (liveness for the index; queue depths for the router) ----------------


class InstanceLoad(_Msg, tag="load.v1"):
    """Periodic heartbeat of one instance with its load and what a router needs to reach it."""

    site: str
    instance: str
    role: Role
    cluster: str = ""
    queue_depth: int = 0  # prefill: jobs running or queued; decode: requests reserved, receiving or decoding
    expected_wait_s: float = 0.0  # prefill: until a new job would start; decode: until a slot frees
    free_decode_slots: int = 0  # decode: slots a new job could reserve now (reservations counted)
    ts: float = 0.0
    hardware: str = ""  # hardware profile name ("reference" for the reference model)
    model: str = ""
    max_batch: int = 0  # decode batch limit
    reserved: int = 0  # decode: reservations whose KV has not fully arrived
    decode_active: int = 0
    tcp_host: str = ""  # decode: where the direct-TCP KV receiver listens
    tcp_port: int = 0
    block_size: int = 0
    max_prompt_tokens: int = 0
    free_kv_bytes: int = 0  # decode: receiver memory not held by transfers or reservations


# --- Routing decisions (libs/policy) --------------------------------------------------------


class RouteCandidate(msgspec.Struct, kw_only=True, frozen=True):
    """One option the policy scored: where prefill would run and its predicted timings."""

    option: str  # "local", "remote" or "local-remote-prefix" (ship a prefix cached at another site)
    site: str
    instance: str
    cached_tokens: int
    queue_s: float
    prefill_s: float
    transfer_s: float  # transfer time left exposed after layer-wise overlap (incl. RTT)
    ttft_s: float
    score: float  # what the policy minimised (predicted TTFT plus penalties); lower is better
    feasible: bool = True
    note: str = ""


class RouteSignals(msgspec.Struct, kw_only=True, frozen=True):
    """The live signals a decision read."""

    prompt_tokens: int
    incremental_tokens: int  # uncached length the offload rule compared with the threshold
    cached_local_tokens: int  # best usable prefix at the decode (PD) site
    cached_remote_tokens: int  # best usable prefix at a PrfaaS site
    threshold_tokens: int
    effective_threshold_tokens: int  # after the adaptive raise (== threshold otherwise)
    kv_bytes: int  # KV/state of the whole prompt
    link_capacity_gbps: float
    link_effective_gbps: float  # what the policy counted on: the measured rate of a degraded link, else the capacity
    link_utilization: float
    link_rtt_s: float
    prfaas_wait_s: float  # least expected wait among PrfaaS prefill instances
    local_wait_s: float  # least expected wait among local prefill instances
    decode_free_slots: int
    bandwidth: str  # "plentiful" or "scarce"


class RouteDecision(_Msg, tag="route.decision.v2"):
    """Where one request is prefilled and decoded, why, the signals it read and the predicted timings (JSON event).

    v2 (v1 readers: update): ``signals`` is always present, its ``link_goodput_gbps`` is named for what
    it holds (``link_effective_gbps``), and ``transport`` names the transport the KV takes also when
    prefill and decode share a site (v1 said "none" there while the KV still moved).
    """

    request_id: str
    policy: str
    ts: float
    choice: str  # "local" or "remote"
    prefill_site: str
    prefill_instance: str
    decode_site: str
    decode_instance: str
    transport: str  # how the KV moves from the prefill instance to the decode instance ("tcp" or "jetstream")
    reason: str
    predicted_queue_s: float
    predicted_prefill_s: float
    predicted_transfer_s: float
    predicted_ttft_s: float
    transfer_bytes: int  # KV bytes sent between sites for this request
    signals: RouteSignals
    reused_prefix_tokens: int = 0
    prefix_source_site: str = ""
    shipped_prefix_bytes: int = 0  # cached prefix shipped between sites before prefill
    candidates: list[RouteCandidate] = []
    fallback_of: str = ""  # set when this decision replaces a failed one (names the failure)


class DecisionEvent(_Msg, tag="route.decision_event.v2"):
    """What a router decided for one request attempt, with what it knew (JSON on ``decisions.<site>``).

    v2 (v1 readers: update): the decision's own fields are no longer repeated here (v1 carried
    ``prompt_tokens``, ``incremental_tokens``, ``policy`` and ``threshold_tokens`` twice); read them
    from ``decision`` (the properties below do). ``prfaas decisions`` skips v1 events and says how many.
    """

    request_id: str
    ts: float
    site: str  # the router's (decode) site
    router: str  # which router process decided
    model: str
    cached_tokens: dict[str, int]  # best usable cached prefix per site (tokens)
    route: str  # "remote", "local" or "fallback" (a replacement for a failed attempt)
    attempt: int  # 0 for the first decision of the request
    index: str  # "ok", or why the KV index could not be used (routed without cache knowledge)
    decision: RouteDecision
    ttft_slo_s: float | None = None  # the client's TTFT target, if any
    slo_met: bool | None = None  # whether the predicted TTFT meets it

    @property
    def prompt_tokens(self) -> int:
        """The prompt's length in tokens."""
        return self.decision.signals.prompt_tokens

    @property
    def incremental_tokens(self) -> int:
        """The uncached length the offload rule compared with the threshold."""
        return self.decision.signals.incremental_tokens

    @property
    def threshold_tokens(self) -> int:
        """The threshold t the policy held."""
        return self.decision.signals.threshold_tokens

    @property
    def policy(self) -> str:
        """The policy that decided."""
        return self.decision.policy


class OutcomeEvent(_Msg, tag="route.outcome.v1"):
    """How a request ended, observed by its router (JSON on ``outcomes.<site>``); times in seconds."""

    request_id: str
    ts: float
    site: str
    router: str
    model: str
    route: str  # route of the last attempt ("remote", "local" or "fallback")
    attempts: int
    status: str  # "ok", "cancelled" (client gone) or "error"
    error: str = ""  # "<code>: <message>" when status is "error"
    finish_reason: str = ""
    prefill_site: str = ""
    prefill_instance: str = ""
    decode_instance: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens not recomputed (prefill cache) or not sent (decode-held)
    queue_s: float | None = None  # prefill queue (prefill gateway's clock)
    prefill_s: float | None = None
    transfer_s: float | None = None  # transfer time left exposed after the prefill
    first_step_s: float | None = None  # decode side: a complete state to the first token (the batch's next step)
    ttft_s: float | None = None  # request arrival at the router to the first token there
    tpot_s: float | None = None  # mean time per output token after the first
    bytes_moved: int = 0  # KV bytes sent to the decode instance
    predicted_ttft_s: float | None = None  # the last decision's prediction, for prediction error


class ThresholdChanged(_Msg, tag="route.threshold.v1"):
    """The slow timescale re-planned the offload threshold t (JSON on ``plans.<site>``)."""

    site: str
    router: str
    ts: float
    policy: str
    old_threshold_tokens: int
    threshold_tokens: int
    link_gbps: float  # deliverable bandwidth the plan used
    observed_requests: int  # lengths the plan's workload was built from
    n_p: int  # local prefill instances now
    proposed_n_p: int  # local prefill instances the plan would use (role changes are the operator's)


AnalyticsEvent = DecisionEvent | OutcomeEvent | ThresholdChanged


# --- Jobs: router -> decode gateway (reservation) -> prefill gateway -> KV -> tokens --------


MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


class Sampling(msgspec.Struct, kw_only=True, frozen=True):
    """How to pick tokens: greedy when ``temperature`` is 0, else temperature and top-p from ``seed``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop sequences (text); the matched text is not returned
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the request (not returned), like EOS
    ignore_eos: bool = False
    logprobs: int | None = None  # return each token's log probability with this many top alternatives

    def __post_init__(self) -> None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"sampling.logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if not self.temperature >= 0:
            raise BadRequest(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BadRequest(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if any(s == "" for s in self.stop):
            raise BadRequest("sampling.stop must not contain an empty string")


Transport = Literal["tcp", "jetstream"]
TRANSPORTS: tuple[str, ...] = get_args(Transport)


class KvDestination(msgspec.Struct, kw_only=True, frozen=True):
    """Where a decode instance receives KV: its site and name (JetStream), host and port (TCP)."""

    site: str
    instance: str
    transport: Transport = "tcp"
    host: str = ""
    port: int = 0


class DecodeJob(_Msg, tag="decode.job.v1"):
    """Decode one request on this instance once its KV arrives; answered with a reservation at once."""

    request_id: str
    transfer_id: str
    model: str
    prompt_tokens: list[int]
    max_tokens: int
    reply_subject: str  # TokenChunk messages, then DecodeFinished or ErrorReply
    prefill_site: str  # where the KV comes from
    transport: Transport = "tcp"
    sampling: Sampling = Sampling()
    timeout_s: float = 120.0  # from receipt to the last token; the gateway's clock
    lease_s: float = 0.0  # how long the reservation waits for KV progress (0: the gateway's default)


class DecodeReservation(_Msg, tag="decode.reservation.v1"):
    """A batch slot and receiver memory held for a job, under a lease renewed by transfer progress."""

    request_id: str
    transfer_id: str
    destination: KvDestination
    held_blocks: int  # leading attn_kv blocks this instance already holds (pinned): not to be sent
    reserved_bytes: int
    lease_s: float


class PrefillJob(_Msg, tag="prefill.job.v1"):
    """Prefill one request and stream its KV to ``destination`` (whose reservation is already held)."""

    request_id: str
    transfer_id: str
    model: str
    prompt_tokens: list[int]
    destination: KvDestination
    skip_blocks: int = 0  # leading attn_kv blocks the destination holds: not sent
    status_subject: str = ""  # PrefillFinished or ErrorReply when the job ends ("": none)
    codec: Codec | None = None  # attn_kv codec (None: the gateway's default)
    timeout_s: float = 120.0  # from receipt to the transfer's end; the gateway's clock


class PrefillAccepted(_Msg, tag="prefill.accepted.v1"):
    """A prefill gateway took the job (a refusal is an ErrorReply: no_capacity, bad_request)."""

    request_id: str
    site: str
    instance: str
    queue_position: int  # jobs ahead of it on the instance
    expected_wait_s: float
    cached_blocks: int  # leading blocks the instance reuses from its own prefix cache


class PrefillFinished(_Msg, tag="prefill.finished.v1"):
    """A prefill job's KV was delivered and verified: where the time went and how many bytes moved."""

    request_id: str
    transfer_id: str
    site: str
    instance: str
    queue_s: float  # receipt to start of compute
    prefill_s: float  # compute, first layer to last
    transfer_s: float  # manifest to verified end (overlaps the prefill)
    transfer_exposed_s: float  # end of compute to verified end
    cached_tokens: int  # prompt tokens not recomputed (the instance's own prefix cache)
    payload_bytes: int
    sent_bytes: int
    goodput_gbps: float = 0.0  # KV wire bytes delivered (each once) over transfer_s: within the pair's budget


class TokenLogprob(msgspec.Struct, kw_only=True, frozen=True):
    """A generated token's log probability under the model's raw logits, and the most likely alternatives."""

    token_id: int
    logprob: float
    top_ids: tuple[int, ...] = ()  # most likely first
    top_logprobs: tuple[float, ...] = ()


class TokenChunk(_Msg, tag="decode.tokens.v1"):
    """Tokens released by one decode step (``index`` counts chunks of the request from 0)."""

    request_id: str
    index: int
    token_ids: list[int]
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token when the job's sampling asks for them


class DecodeTimings(msgspec.Struct, kw_only=True, frozen=True):
    """Where a decode job's time went, on the decode gateway's clock, from the reservation."""

    kv_wait_s: float  # reservation to the transfer's first byte (prefill queue and first layer)
    transfer_s: float  # first byte to a complete, verified state
    queue_s: float  # complete state to a decode slot
    first_token_s: float  # reservation to the first token
    total_s: float

    @property
    def first_step_s(self) -> float:
        """A decode slot to the first token: the wait for the batch's next step, and that step."""
        return self.first_token_s - self.kv_wait_s - self.transfer_s - self.queue_s


class DecodeFinished(_Msg, tag="decode.finished.v1"):
    """The last message of a request's token stream: why it ended, usage, timings."""

    request_id: str
    site: str
    instance: str
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    held_tokens: int  # prompt tokens whose KV the instance already held (not transferred)
    received_bytes: int
    timings: DecodeTimings


class JobCancel(_Msg, tag="job.cancel.v1"):
    """Stop a request wherever it runs (prefill, transfer, decode) and free what it holds."""

    request_id: str
    reason: str = ""


class ResendTokens(_Msg, tag="decode.resend.v1"):
    """Ask a decode instance for a request's token chunks again, from ``from_index`` (some were lost on the way)."""

    request_id: str
    from_index: int


class ResentTokens(_Msg, tag="decode.resent.v1"):
    """A request's token chunks from the asked index on, and its stream's last message once the chunks reach it."""

    request_id: str
    chunks: tuple[TokenChunk, ...] = ()
    final: DecodeFinished | ErrorReply | None = None  # the stream's last message, when it was sent and nothing follows
    more: bool = False  # further chunks exist past these (the reply is bounded): ask again from the next index


DecodeJobReply = DecodeReservation | ErrorReply
PrefillJobReply = PrefillAccepted | ErrorReply
DecodeStreamMessage = TokenChunk | DecodeFinished | ErrorReply
PrefillStatus = PrefillFinished | ErrorReply
ResendTokensReply = ResentTokens | ErrorReply


# --- KV transfer (libs/kvwire) --------------------------------------------------------------
# A transfer is a manifest (``KvBegin``), chunks, then an end marker, each acknowledged. On TCP a
# frame is a little-endian u32 header length, the msgpack header, then (chunks only) the raw
# payload; over JetStream a chunk's header travels in a NATS header and its payload as the data.

Codec = Literal["raw", "zstd", "int8"]
ChecksumAlgo = Literal["crc32", "crc32c"]


class KvPartSpec(msgspec.Struct, kw_only=True, frozen=True):
    """One array the decode side needs: which layer and state, its dtype/shape, and its codec."""

    layer: int
    kind: StateKind
    name: str
    dtype: str  # numpy dtype string, e.g. "<f2"
    shape: list[int]
    nbytes: int  # decoded array bytes
    codec: Codec = "raw"


class KvManifest(msgspec.Struct, kw_only=True, frozen=True):
    """Everything a transfer carries, listed before the first chunk (a part is addressed by index)."""

    transfer_id: str
    src_site: str
    dst_site: str
    model: str
    block_size: int
    num_tokens: int
    parts: list[KvPartSpec]
    chunk_bytes: int
    checksum: ChecksumAlgo = "crc32"
    skipped_block_hashes: list[int] = []  # cached prefix blocks the decode site already holds
    request_id: str = ""
    kv_gap_s: float = 0.0  # the sender's predicted longest compute between two of its parts leaving (s; 0: none)


class KvBegin(_Msg, tag="kv.begin.v1"):
    """Open (or resume) a transfer: the receiver reserves memory or refuses with an ErrorReply."""

    manifest: KvManifest
    conn: int = 0


class KvJoin(_Msg, tag="kv.join.v1"):
    """Attach one more TCP connection to a transfer already begun."""

    transfer_id: str
    conn: int


class KvChunk(_Msg, tag="kv.chunk.v1"):
    """Header of one chunk of a part's wire bytes; ``length`` payload bytes follow it."""

    transfer_id: str
    part: int
    offset: int
    length: int
    checksum: int
    part_wire_bytes: int  # encoded length of the whole part
    attempt: int = 0  # > 0 for a resend (distinct JetStream message id)


class KvChunkAck(_Msg, tag="kv.chunk_ack.v1"):
    """The receiver verified (``ok``) or rejected (checksum mismatch: resend it) one chunk."""

    transfer_id: str
    part: int
    offset: int
    ok: bool


class KvEnd(_Msg, tag="kv.end.v1"):
    """Every chunk was sent; ``digests[i]`` is part i's digest over its chunk checksums."""

    transfer_id: str
    digests: list[int]
    round: int = 0


class KvAbort(_Msg, tag="kv.abort.v1"):
    """Give up on a transfer: the receiver frees its buffers and refuses further chunks."""

    transfer_id: str
    reason: str = ""


class KvStatusRequest(_Msg, tag="kv.status.v1"):
    """Ask what the receiver holds; waits up to ``wait_s`` for completion or for end ``round``."""

    transfer_id: str
    round: int = 0
    wait_s: float = 0.0


class KvPartHeld(msgspec.Struct, kw_only=True, frozen=True):
    """Verified chunks of one part as a little-endian bitmap (bit i = chunk i)."""

    part: int
    chunks: bytes


class KvResumeState(_Msg, tag="kv.resume.v1"):
    """What the receiver holds: a resuming sender sends only the rest."""

    transfer_id: str
    complete: bool
    held: list[KvPartHeld] = []
    end_round: int = -1  # last end marker processed (-1: none yet)


KvSenderFrame = KvBegin | KvJoin | KvChunk | KvEnd | KvAbort
KvReceiverFrame = KvResumeState | KvChunkAck | ErrorReply
KvControlRequest = KvBegin | KvStatusRequest | KvAbort
KvControlReply = KvResumeState | ErrorReply


class LinkStats(_Msg, tag="link.stats.v1"):
    """KV traffic from one site to another over the last interval, published every second."""

    src_site: str
    dst_site: str
    ts: float
    interval_s: float
    budget_gbps: float  # pacing budget (0: unpaced)
    goodput_gbps: float  # acknowledged payload over the interval
    busy_goodput_gbps: float  # acknowledged payload over the time transfers were active
    utilization: float  # goodput / budget (0 when unpaced)
    rtt_s: float  # smoothed ack round trip (0: no sample yet)
    min_rtt_s: float  # least round trip seen in the interval
    bytes_in_flight: int
    active_transfers: int
    acked_bytes_total: int
    retransmitted_bytes_total: int
    retransmitted_chunks_total: int
    transfers_completed_total: int
    transfers_failed_total: int
    sender: str = ""  # the publishing process (samples of one sender replace each other; several may share a pair)
    limited_s: float = 0.0  # time the link, not the sender, set the pace: KV waited on it (kvwire linkstats)
    limited_goodput_gbps: float = 0.0  # acknowledged payload over limited_s


class LinkShareAnnounce(_Msg, tag="link.share.v1"):
    """One process's demand on a site pair's KV budget and what it lets out now (``subjects.link_share``).

    Every process sending on a pair announces about every ``interval_s``; each takes its max-min
    fair share of the budget among the processes with demand, and forgets one silent for a few
    intervals.
    """

    src_site: str
    dst_site: str
    process: str  # unique per process (host, pid, random); LinkStats.sender carries the same
    budget_gbps: float  # the pair's budget as this process is configured
    demand_gbps: float  # what it would use now (0: idle)
    rate_gbps: float  # what its bucket lets out now (its share, or less while waiting for headroom)
    interval_s: float  # its announcement period
    seq: int  # per process, from 1


# --- Codecs, built once ---------------------------------------------------------------------

msgpack_encoder = msgspec.msgpack.Encoder()
json_encoder = msgspec.json.Encoder()

kv_event_batch_decoder = msgspec.msgpack.Decoder(KvEventBatch)
kv_lookup_request_decoder = msgspec.msgpack.Decoder(KvLookupRequest)
kv_lookup_result_decoder = msgspec.msgpack.Decoder(KvLookupResult)
kv_snapshot_request_decoder = msgspec.msgpack.Decoder(KvSnapshotRequest)
instance_load_decoder = msgspec.msgpack.Decoder(InstanceLoad)
kv_sender_frame_decoder = msgspec.msgpack.Decoder(KvSenderFrame)
kv_receiver_frame_decoder = msgspec.msgpack.Decoder(KvReceiverFrame)
kv_control_request_decoder = msgspec.msgpack.Decoder(KvControlRequest)
kv_control_reply_decoder = msgspec.msgpack.Decoder(KvControlReply)
kv_chunk_decoder = msgspec.msgpack.Decoder(KvChunk)
kv_end_decoder = msgspec.msgpack.Decoder(KvEnd)
link_stats_decoder = msgspec.msgpack.Decoder(LinkStats)
link_share_announce_decoder = msgspec.msgpack.Decoder(LinkShareAnnounce)
decode_job_decoder = msgspec.msgpack.Decoder(DecodeJob)
decode_job_reply_decoder = msgspec.msgpack.Decoder(DecodeJobReply)
prefill_job_decoder = msgspec.msgpack.Decoder(PrefillJob)
prefill_job_reply_decoder = msgspec.msgpack.Decoder(PrefillJobReply)
decode_stream_decoder = msgspec.msgpack.Decoder(DecodeStreamMessage)
resend_tokens_decoder = msgspec.msgpack.Decoder(ResendTokens)
resend_tokens_reply_decoder = msgspec.msgpack.Decoder(ResendTokensReply)
prefill_status_decoder = msgspec.msgpack.Decoder(PrefillStatus)
job_cancel_decoder = msgspec.msgpack.Decoder(JobCancel)
analytics_event_decoder = msgspec.json.Decoder(AnalyticsEvent)


def encode(msg: msgspec.Struct) -> bytes:
    """Encode a bus message as msgpack."""
    return msgpack_encoder.encode(msg)
