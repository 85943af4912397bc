"""The decode gateway's token log: a request's chunks from any index, bounded replies, forgotten after keep_s."""

from __future__ import annotations

import pytest

from libs.common.errors import NotFound
from libs.common.messages import ErrorReply, TokenChunk
from services.decode_gateway.token_log import MAX_RESENT_CHUNKS, TokenLog

FINAL = ErrorReply(code="upstream_timeout", message="deadline")


def _log(n_chunks: int, keep_s: float = 30.0, *, ended: bool = True) -> TokenLog:
    log = TokenLog(keep_s)
    log.open("r1")
    for index in range(n_chunks):
        log.add(TokenChunk(request_id="r1", index=index, token_ids=[index]))
    if ended:
        log.end("r1", FINAL)
    return log


def test_chunks_from_an_index_then_the_final_message():
    """From index 2 of 5: chunks 2..4 and the final message, nothing more to ask."""
    got = _log(5).since("r1", 2)
    assert [c.index for c in got.chunks] == [2, 3, 4] and got.final == FINAL and not got.more


def test_a_running_request_has_no_final_yet():
    """Before the request ended: its chunks so far and no final message."""
    got = _log(3, ended=False).since("r1", 0)
    assert [c.index for c in got.chunks] == [0, 1, 2] and got.final is None and not got.more


def test_a_long_stream_is_resent_in_bounded_replies():
    """Past MAX_RESENT_CHUNKS a reply says ``more`` and holds the final back until the reply that reaches the end."""
    log = _log(MAX_RESENT_CHUNKS + 3)
    first = log.since("r1", 0)
    assert len(first.chunks) == MAX_RESENT_CHUNKS and first.more and first.final is None
    rest = log.since("r1", MAX_RESENT_CHUNKS)
    assert [c.index for c in rest.chunks] == [MAX_RESENT_CHUNKS + i for i in range(3)] and rest.final == FINAL


def test_an_ended_request_is_forgotten_after_keep_s_and_an_unknown_one_is_not_found():
    """keep_s 0: gone at the next look; a request never held is ``not_found`` too."""
    log = _log(2, keep_s=0.0)
    with pytest.raises(NotFound):
        log.since("r1", 0)
    assert len(log) == 0
    with pytest.raises(NotFound):
        _log(2).since("other", 0)
