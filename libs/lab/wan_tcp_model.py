"""How long TCP takes to deliver a transfer over a path: handshake, slow-start rounds, then size over bandwidth.

The ideal fluid model the link relay is judged against (``prfaas bench wan``, the link tests): each
round the sender sends its window back to back and waits one RTT for its acknowledgements, which
double the window (slow start from 10 segments); once the window covers the bandwidth-delay product
the link stays busy and the rest goes at line rate; a receive window caps the window. The last byte
arrives one way (half the RTT) after it was sent. No loss, no competing connections.
"""

from __future__ import annotations

from libs.lab.wan_cwnd import DEFAULT_WINDOW_BYTES, INITIAL_WINDOW_BYTES


def delivery_time_s(
    size_bytes: int,
    *,
    gbps: float,
    rtt_s: float,
    handshake: bool = True,
    cwnd_bytes: int = INITIAL_WINDOW_BYTES,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
) -> float:
    """Seconds from connect (``handshake``) or the first send until the last of ``size_bytes`` has arrived."""
    rate = gbps * 1e9 / 8  # bytes per second
    t = rtt_s if handshake else 0.0
    sent, cwnd = 0, min(cwnd_bytes, window_bytes)
    while cwnd < rate * rtt_s and sent + cwnd < size_bytes:  # a window-limited round that is not the last
        sent += cwnd
        t += rtt_s
        cwnd = min(2 * cwnd, window_bytes)
    return t + (size_bytes - sent) / rate + rtt_s / 2
