"""Traffic that measures a link: a counting sink, a blaster, an echo server, a ping-pong, timed transfers (blocking sockets).

Used by ``prfaas bench wan`` (each side in its own process: ``python -m libs.lab.wan_probe sink|blast``)
and by the link tests.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

_CHUNK = 256 * 1024
_TRANSFER_CHUNK = 1024 * 1024
_ZEROS = memoryview(bytes(_TRANSFER_CHUNK))


class CountingSink:
    """Accepts connections and counts what they send; measures the rate over a window after warm-up."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._listener = socket.create_server((host, port))
        self.port = self._listener.getsockname()[1]
        self.bytes = 0
        self.first_byte_at: float | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def rate_gbps(self, warmup_s: float, window_s: float, timeout_s: float) -> float:
        """Gbps received from ``warmup_s`` after the first byte, over ``window_s`` (TimeoutError if none came)."""
        end = time.monotonic() + timeout_s
        while self.first_byte_at is None:
            if time.monotonic() > end:
                raise TimeoutError(f"no byte reached the sink within {timeout_s:g}s")
            time.sleep(0.005)
        time.sleep(max(0.0, self.first_byte_at + warmup_s - time.monotonic()))
        b0, t0 = self.sample()
        time.sleep(window_s)
        b1, t1 = self.sample()
        return (b1 - b0) * 8 / (t1 - t0) / 1e9

    def close(self) -> None:
        """Stop accepting."""
        self._listener.close()

    def sample(self) -> tuple[int, float]:
        """Bytes received so far, and when (time.monotonic)."""
        with self._lock:
            return self.bytes, time.monotonic()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        buf = bytearray(_CHUNK)
        with conn:
            while True:
                try:
                    n = conn.recv_into(buf)
                except OSError:
                    return
                if not n:
                    return
                with self._lock:
                    if self.first_byte_at is None:
                        self.first_byte_at = time.monotonic()
                    self.bytes += n


def blast(address: tuple[str, int], connections: int, duration_s: float) -> int:
    """Send as fast as possible over ``connections`` connections for ``duration_s``; bytes sent."""
    sent = [0] * connections
    data = memoryview(bytearray(_CHUNK))

    def one(i: int) -> None:
        with socket.create_connection(address, timeout=10.0) as s:
            s.settimeout(duration_s + 30.0)
            end = time.monotonic() + duration_s
            while time.monotonic() < end:
                s.sendall(data)
                sent[i] += len(data)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(sent)


class EchoServer:
    """Sends back whatever each connection sends."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop accepting."""
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)


def ping_rtts_ms(address: tuple[str, int], count: int, timeout_s: float = 5.0) -> list[float]:
    """Round-trip times (ms) of ``count`` 64-byte messages sent one at a time over one connection."""
    message = bytes(64)
    rtts = []
    with socket.create_connection(address, timeout=timeout_s) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            t0 = time.perf_counter()
            s.sendall(message)
            got = 0
            while got < len(message):
                chunk = s.recv(len(message) - got)
                if not chunk:
                    raise ConnectionError("echo closed the connection")
                got += len(chunk)
            rtts.append((time.perf_counter() - t0) * 1000)
    return rtts


class LinkedPair:
    """A connection through a link to a listener of ours, and its far end once accepted: times transfers across it."""

    def __init__(self, address: tuple[str, int], listener: socket.socket, timeout_s: float = 30.0) -> None:
        self._listener, self._timeout_s = listener, timeout_s
        self.opened_at = time.monotonic()  # just before the connect
        self.near = socket.create_connection(address, timeout=timeout_s)
        self.near.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.far: socket.socket | None = None

    def transfer_s(self, nbytes: int, since: float | None = None) -> float:
        """Send ``nbytes`` near -> far; seconds from ``since`` (default: the send) until the last of them has arrived."""
        running, outcome = threading.Event(), []
        receiver = threading.Thread(target=self._receive, args=(nbytes, running, outcome), daemon=True)
        receiver.start()
        if not running.wait(self._timeout_s):
            raise TimeoutError(f"the receiving thread did not start within {self._timeout_s:g}s")
        t0 = time.monotonic() if since is None else since  # the thread's start is not part of the transfer
        left = nbytes  # sent from the calling thread
        while left:
            n = min(left, _TRANSFER_CHUNK)
            self.near.sendall(_ZEROS[:n])
            left -= n
        receiver.join(self._timeout_s)
        if not outcome or isinstance(outcome[0], BaseException):
            raise ConnectionError(f"{nbytes} bytes did not arrive: {outcome[0] if outcome else 'timed out'}")
        return outcome[0] - t0

    def _receive(self, nbytes: int, running: threading.Event, outcome: list) -> None:
        running.set()
        try:
            if self.far is None:
                self.far, _ = self._listener.accept()
                self.far.settimeout(self._timeout_s)
            buf = memoryview(bytearray(min(nbytes, _TRANSFER_CHUNK)))
            got = 0
            while got < nbytes:
                n = self.far.recv_into(buf, min(len(buf), nbytes - got))
                if not n:
                    raise ConnectionError(f"the far end closed after {got} of {nbytes} bytes")
                got += n
            outcome.append(time.monotonic())
        except OSError as e:  # ConnectionError is one
            outcome.append(e)

    def close(self) -> None:
        """Close both ends."""
        for s in (self.near, self.far):
            if s is not None:
                s.close()

    def __enter__(self) -> LinkedPair:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    """``sink``: print ``{"port": P}``, then ``{"bytes": B, "t": T}`` per line read; ``blast``: send, print ``{"bytes": N}``."""
    parser = argparse.ArgumentParser(prog="python -m libs.lab.wan_probe")
    sub = parser.add_subparsers(dest="role", required=True)
    sub.add_parser("sink")
    blaster = sub.add_parser("blast")
    blaster.add_argument("--to", required=True, metavar="HOST:PORT")
    blaster.add_argument("--connections", type=int, default=4)
    blaster.add_argument("--duration-s", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.role == "sink":
        s = CountingSink()
        print(json.dumps({"port": s.port}), flush=True)
        for _ in sys.stdin:  # one sample per line until the parent closes our stdin
            received, at = s.sample()
            print(json.dumps({"bytes": received, "t": at}), flush=True)
    else:
        host, _, port = args.to.rpartition(":")
        print(json.dumps({"bytes": blast((host, int(port)), args.connections, args.duration_s)}), flush=True)


if __name__ == "__main__":
    main()
