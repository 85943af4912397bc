"""The link relay as a process (``python -m libs.lab.wan_server``) with a small HTTP control endpoint.

``GET /health`` answers once every listener is bound; ``GET /link`` returns the link's figures
(per direction its settings, bytes carried, live goodput over the last second, its utilisation of
the bandwidth and the connections open from its source site; partition, connections);
``POST /link`` with a JSON object of
``gbps``, ``rtt_ms``, ``loss_pct``, ``slow_start_after_idle``, ``up`` (with ``reset``), and
optionally ``src`` (change only the direction leaving that site) changes them at once. :func:`link_figures` and
:func:`change_link` are the client side.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from libs.common.errors import BadRequest, UpstreamTimeout
from libs.lab.wan import Forward, LinkRelay
from libs.lab.wan_link import DEFAULT_WINDOW_BYTES

log = logging.getLogger(__name__)

_NUMBERS = {"gbps": (0.0, False), "rtt_ms": (0.0, True), "loss_pct": (0.0, True)}  # key -> (bound, bound allowed)
_FLAGS = ("slow_start_after_idle", "up", "reset")
_KEYS = "gbps, rtt_ms, loss_pct, slow_start_after_idle, up, reset, src"


def parse_changes(body: object, sites: tuple[str, str]) -> dict:
    """Validate a ``POST /link`` body into :meth:`LinkRelay.configure` arguments (BadRequest names the key)."""
    if not isinstance(body, dict) or not body:
        raise BadRequest(f"expected a JSON object with some of {_KEYS}")
    unknown = set(body) - {*_NUMBERS, *_FLAGS, "src"}
    if unknown:
        raise BadRequest(f"unknown keys {sorted(unknown)}: expected {_KEYS}")
    changes: dict = {}
    for key, (bound, inclusive) in _NUMBERS.items():
        if key not in body:
            continue
        value = body[key]
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < bound or (value == bound and not inclusive) or (key == "loss_pct" and value >= 100):
            limit = (
                "a number > 0" if key == "gbps" else "a number in [0, 100)" if key == "loss_pct" else "a number >= 0"
            )
            raise BadRequest(f"{key}={value!r}: expected {limit}")
        changes[key] = float(value)
    for key in _FLAGS:
        if key in body:
            if not isinstance(body[key], bool):
                raise BadRequest(f"{key}={body[key]!r}: expected true or false")
            changes[key] = body[key]
    if changes.get("reset") and changes.get("up", True):
        raise BadRequest("reset=true goes with up=false (a partition that resets connections)")
    if "src" in body:
        if body["src"] not in sites:
            raise BadRequest(f"src={body['src']!r}: expected one of {', '.join(sites)}")
        changes["src"] = body["src"]
    return changes


def serve_control(relay: LinkRelay, host: str, port: int) -> ThreadingHTTPServer:
    """Serve the control endpoint for ``relay`` in a background thread; ``shutdown()`` stops it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                self._reply(200, {"ok": True})
            elif self.path == "/link":
                self._reply(200, relay.figures())
            else:
                self._reply(404, {"error": f"no such path {self.path}: GET /health, GET /link, POST /link"})

        def do_POST(self) -> None:
            if self.path != "/link":
                self._reply(404, {"error": f"no such path {self.path}: POST /link"})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                relay.configure(**parse_changes(body, relay.sites))
            except (BadRequest, ValueError) as e:
                self._reply(400, {"error": getattr(e, "message", str(e))})
                return
            log.info("link %s changed: %s", "-".join(relay.sites), body)
            self._reply(200, relay.figures())

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (BaseHTTPRequestHandler's signature)
            log.debug(format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="wan control", daemon=True).start()
    return server


def link_figures(control_url: str, timeout_s: float = 2.0) -> dict:
    """``GET /link`` of a relay."""
    return _call(urllib.request.Request(control_url + "/link"), timeout_s)


def change_link(control_url: str, changes: dict, timeout_s: float = 2.0) -> dict:
    """``POST /link`` to a relay; its figures afterwards (BadRequest if the relay refused the change)."""
    data = json.dumps(changes).encode()
    req = urllib.request.Request(control_url + "/link", data=data, headers={"Content-Type": "application/json"})
    return _call(req, timeout_s)


def _call(req: urllib.request.Request, timeout_s: float) -> dict:
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise BadRequest(f"relay at {req.full_url}: {json.loads(e.read()).get('error', e.reason)}") from None
    except (OSError, ValueError) as e:
        raise UpstreamTimeout(f"relay at {req.full_url} did not answer within {timeout_s:g}s: {e}") from None


def main(argv: list[str] | None = None) -> None:
    """Run one link's relay until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m libs.lab.wan_server", description=__doc__.splitlines()[0])
    parser.add_argument("--sites", nargs=2, required=True, metavar=("A", "B"), help="the two sites the link joins")
    parser.add_argument("--gbps", type=float, default=math.inf, help="bandwidth per direction (default: unlimited)")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time added by the link")
    parser.add_argument("--loss-pct", type=float, default=0.0, help="segment loss in percent (see libs.lab.wan)")
    parser.add_argument(
        "--window-mib",
        type=float,
        default=DEFAULT_WINDOW_BYTES / 2**20,
        help="each connection's receive window in MiB (default %(default)g)",
    )
    parser.add_argument(
        "--no-slow-start-after-idle",
        dest="slow_start_after_idle",
        action="store_false",
        help="keep a connection's window over idle periods (a host with tcp_slow_start_after_idle=0)",
    )
    parser.add_argument("--control", required=True, metavar="HOST:PORT", help="address of the control endpoint")
    parser.add_argument(
        "--forward",
        action="append",
        default=[],
        metavar="SRC@HOST:PORT=HOST:PORT",
        help="a listener at site SRC carried to a target at the other site (repeatable)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        forwards = [Forward.parse(f) for f in args.forward]
        limited = {} if math.isinf(args.gbps) else {"gbps": args.gbps}
        figures = parse_changes({"rtt_ms": args.rtt_ms, "loss_pct": args.loss_pct} | limited, tuple(args.sites))
        if not args.window_mib * 2**20 >= 1:
            raise ValueError(f"--window-mib {args.window_mib:g}: expected a positive size")
        relay = LinkRelay(
            tuple(args.sites),
            gbps=args.gbps,
            rtt_ms=figures["rtt_ms"],
            loss_pct=figures["loss_pct"],
            forwards=forwards,
            window_bytes=int(args.window_mib * 2**20),
            slow_start_after_idle=args.slow_start_after_idle,
        ).start()
    except (ValueError, BadRequest, OSError) as e:
        parser.error(str(e))
    host, _, port = args.control.rpartition(":")
    server = serve_control(relay, host, int(port))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("link %s ready: %s, control http://%s", "-".join(args.sites), ", ".join(map(str, forwards)), args.control)
    stop.wait()
    server.shutdown()
    relay.stop()


if __name__ == "__main__":
    main()
