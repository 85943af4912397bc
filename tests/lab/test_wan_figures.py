"""The relay's live figures: each direction's goodput over the last second, its use of the bandwidth, open connections."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from libs.lab.servers import free_port
from libs.lab.wan import Forward, LinkRelay
from libs.lab.wan_probe import CountingSink, blast

LOCAL = "127.0.0.1"


@pytest.fixture
def sink() -> Iterator[CountingSink]:
    """A counting sink at dc-b."""
    s = CountingSink()
    yield s
    s.close()


def _until(check, what: str, timeout_s: float = 5.0) -> None:
    """Poll ``check`` (the relay's counters move in its threads: no event to await); fail naming ``what``."""
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, f"{what}: not within {timeout_s}s"
        time.sleep(0.02)


def _directions(relay: LinkRelay) -> dict[str, dict]:
    """The relay's live figures per direction, by source site."""
    return {d["src"]: d for d in relay.figures()["directions"]}


def test_live_figures_show_each_directions_goodput_use_and_connections(sink: CountingSink) -> None:
    """Two connections filling a 0.2 Gbps direction: ~0.2 Gbps live, ~100% used, 2 open; nothing back; then idle."""
    port = free_port()
    relay = LinkRelay(
        ("dc-a", "dc-b"), gbps=0.2, rtt_ms=4.0, forwards=[Forward("dc-a", (LOCAL, port), (LOCAL, sink.port))]
    ).start()
    try:
        sender = threading.Thread(target=blast, args=((LOCAL, port), 2, 2.0), daemon=True)
        sender.start()
        _until(
            lambda: sink.first_byte_at is not None and time.monotonic() - sink.first_byte_at >= 1.2, "1.2 s of bytes"
        )
        live = _directions(relay)
        out, back = live["dc-a"], live["dc-b"]
        # The live goodput is over the last second, all of it full: the link's rate within the bounds the
        # sink itself is held to (test_wan: +5% for the link's 5 ms credit, -10% for a loaded machine), and
        # one 0.1 s sampling step of slack either way.
        assert 0.16 <= out["goodput_gbps"] <= 0.23, out
        assert out["utilization"] == pytest.approx(out["goodput_gbps"] / 0.2)
        assert out["connections"] == 2 and back["connections"] == 0
        assert back["goodput_gbps"] == 0.0 and back["utilization"] == 0.0  # the sink sends nothing back
        sender.join()
        _until(lambda: _directions(relay)["dc-a"]["connections"] == 0, "connections closed")
        # Once a whole window has passed without bytes (1 s plus a sampling step), the link reads idle.
        _until(lambda: _directions(relay)["dc-a"]["goodput_gbps"] == 0.0, "idle", timeout_s=3.0)
    finally:
        relay.stop()


def test_an_unlimited_link_has_goodput_but_no_utilisation(sink: CountingSink) -> None:
    """Without a bandwidth there is nothing to use up: utilisation is null, goodput still counts."""
    port = free_port()
    relay = LinkRelay(
        ("dc-a", "dc-b"), gbps=float("inf"), rtt_ms=0.0, forwards=[Forward("dc-a", (LOCAL, port), (LOCAL, sink.port))]
    ).start()
    try:
        blast((LOCAL, port), 1, 0.3)
        out = _directions(relay)["dc-a"]
        assert out["goodput_gbps"] > 0 and out["utilization"] is None
    finally:
        relay.stop()
