"""The one place that turns a topology into the processes of a lab: name, argv, env, site, readiness, order.

The native lab (``prfaas lab up``) and the docker compose rendering (``prfaas lab compose``) both
read this plan; they differ only in their :class:`Addresses`: native processes all listen on
127.0.0.1 on free ports, compose services reach each other by service name on fixed ports.

Every byte between two sites crosses a link relay (``wan-<a>-<b>``): the NATS gateways of the
supercluster connect to each other through it (and advertise the relay's address, so a
reconnect also goes through it), and prefill gateways reach a remote decode instance's KV port
through it (the decode gateway advertises the relay's address to senders of that site).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from libs.common import subjects
from libs.lab import nats_auth
from libs.lab.topology import Cluster, InstanceGroup, Topology, instance_names
from services.router.auth import digest

Role = Literal["nats", "redis", "wan", "kv_index", "prefill_gateway", "decode_gateway", "router"]
PYTHON = "python"  # argv[0] of every Python process; the launcher substitutes the interpreter
DRAIN_TIMEOUT_S = 5.0  # a stopping gateway lets requests in flight finish this long (a lab stops quickly)


@dataclass(frozen=True)
class Ready:
    """How to know a process serves: ``kind`` and what to probe.

    ``nats``: ``url`` is the monitoring base; healthy, and gateways to ``names`` connected both ways.
    ``redis``: ``url`` answers PING. ``http``: ``url`` answers 200. ``reply``: a request on
    ``names[0]`` at NATS ``url`` gets an answer. ``heartbeats``: one message on each subject in
    ``names`` at NATS ``url``.
    """

    kind: Literal["nats", "redis", "http", "reply", "heartbeats"]
    url: str
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProcessSpec:
    """One process of the lab."""

    name: str
    role: Role
    argv: tuple[str, ...]  # argv[0]: "nats-server", "redis-server" or PYTHON
    env: Mapping[str, str]
    site: str | None  # the site it runs at (None: the link relays, between two sites)
    nats_site: str | None  # whose NATS server it connects to
    ready: Ready
    after: tuple[str, ...] = ()  # processes that must be ready before it starts
    files: Mapping[str, str] = field(default_factory=dict)  # config files it reads: path -> text
    ports: Mapping[str, int] = field(default_factory=dict)  # what it listens on, by name


class Addresses(Protocol):
    """Where processes listen and how others reach them."""

    def host(self, process: str) -> str:
        """The host others use to reach ``process``."""

    def bind(self, process: str) -> str:
        """The interface ``process`` listens on."""

    def port(self, process: str, what: str) -> int:
        """The port ``process`` listens on for ``what`` (stable per pair)."""

    def path(self, process: str, what: str) -> str:
        """A file or directory of ``process`` (``conf``, ``data``)."""


@dataclass(frozen=True)
class Gateway:
    """One gateway process: its role, cluster, instances and backend."""

    name: str
    role: Literal["prefill", "decode"]
    site: str
    cluster: Cluster
    instances: tuple[str, ...]
    group: InstanceGroup


@dataclass(frozen=True)
class LabSettings:
    """What a run adds to a topology: the API key (None: off), log level, trace endpoint."""

    api_key: str | None = None
    log_level: str = "INFO"
    otlp_endpoint: str = ""  # OTEL_EXPORTER_OTLP_ENDPOINT for every service ("": inherited / none)
    nats_passwords: Mapping[str, str] = field(default_factory=dict)  # NATS user -> password (empty: no authorization)
    secrets_dir: str | None = None  # services read `<user>.password` there (None: the password itself is in env)
    tls_dir: str | None = None  # the lab CA and a certificate per NATS server and gateway (None: no TLS between sites)


def cert_files(tls_dir: str, holder: str) -> tuple[str, str, str]:
    """Certificate, key and CA paths of ``holder`` in ``tls_dir`` (``libs.common.pki.CertificateAuthority.issue``'s)."""
    return f"{tls_dir}/{holder}.pem", f"{tls_dir}/{holder}-key.pem", f"{tls_dir}/ca.pem"


def nats_name(site: str) -> str:
    """Process name of a site's NATS server."""
    return f"nats-{site}"


def wan_name(a: str, b: str) -> str:
    """Process name of the relay of the link between ``a`` and ``b`` (as the topology lists them)."""
    return f"wan-{a}-{b}"


def router_name(site: str, replica: int = 0) -> str:
    """Process name of a site's router (``router-<site>``; further replicas ``router-<site>-<n>``)."""
    return f"router-{site}" if replica == 0 else f"router-{site}-{replica}"


def gateways(topology: Topology) -> list[Gateway]:
    """Every gateway process: prefill instances grouped ``per_process``, one decode instance each."""
    out = []
    for site in topology.sites:
        for cluster in site.clusters:
            n_prefill = 0
            for i, group in enumerate(cluster.instances):
                names = instance_names(cluster, i)
                if group.role == "decode":
                    out += [Gateway(f"decode-{n}", "decode", site.name, cluster, (n,), group) for n in names]
                    continue
                for k in range(0, len(names), group.per_process):
                    out.append(
                        Gateway(
                            f"prefill-{cluster.name}-{n_prefill}",
                            "prefill",
                            site.name,
                            cluster,
                            tuple(names[k : k + group.per_process]),
                            group,
                        )
                    )
                    n_prefill += 1
    return out


def plan(topology: Topology, addresses: Addresses, settings: LabSettings = LabSettings()) -> list[ProcessSpec]:
    """Every process of the lab, in an order where each one's ``after`` comes before it."""
    p = _Planner(topology, addresses, settings)
    relays = [p.relay(link.sites) for link in topology.links]
    servers = [p.nats(site.name) for site in topology.sites]
    stores = [p.redis(), p.kv_index()]
    gws = [p.gateway(g) for g in gateways(topology)]
    replicas = range(topology.services.router_replicas)
    routers = [p.router(site, n) for site in topology.services.routers for n in replicas]
    return relays + servers + stores + gws + routers


class _Planner:
    def __init__(self, topology: Topology, addresses: Addresses, settings: LabSettings) -> None:
        self.t, self.a, self.s = topology, addresses, settings
        self.site_names = [s.name for s in topology.sites]
        self.decoders = [g for g in gateways(topology) if g.role == "decode"]

    # --- addresses -------------------------------------------------------------------------

    def nats_url(self, site: str) -> str:
        name = nats_name(site)
        return f"nats://{self.a.host(name)}:{self.a.port(name, 'client')}"

    def probe_url(self, site: str) -> str:
        """``site``'s NATS URL for the lab's readiness probes (as the ``lab`` user)."""
        name = nats_name(site)
        return nats_auth.client_url(self.a.host(name), self.a.port(name, "client"), self.s.nats_passwords)

    def nats_login(self, user: str) -> dict[str, str]:
        """The env (unprefixed) a service needs to log in as ``user``: none without authorization."""
        if not self.s.nats_passwords:
            return {}
        if self.s.secrets_dir is None:
            return {"NATS_USER": user, "NATS_PASSWORD": self.s.nats_passwords[user]}
        return {"NATS_USER": user, "NATS_PASSWORD_FILE": str(nats_auth.password_file(self.s.secrets_dir, user))}

    def _relay_of(self, a: str, b: str) -> str:
        link = self.t.link(a, b)
        return wan_name(*link.sites)

    def via(self, src: str, target: str, what: str) -> tuple[str, int]:
        """Host and port a process at ``src`` uses to reach ``target``'s ``what`` port at another site."""
        relay = self._relay_of(src, self._site_of(target))
        return self.a.host(relay), self.a.port(relay, f"{src}>{target}:{what}")

    def _site_of(self, process: str) -> str:
        if process.startswith("nats-"):
            return process.removeprefix("nats-")
        return next(g.site for g in self.decoders if g.name == process)

    def _common_env(self) -> dict[str, str]:
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.s.otlp_endpoint} if self.s.otlp_endpoint else {}

    # --- processes -------------------------------------------------------------------------

    def relay(self, sites: tuple[str, str]) -> ProcessSpec:
        name = wan_name(*sites)
        link = self.t.link(*sites)
        forwards, ports = [], {"control": self.a.port(name, "control")}
        for src in sites:
            dst = sites[1] if src == sites[0] else sites[0]
            targets = [nats_name(dst)] + [g.name for g in self.decoders if g.site == dst]
            for target in targets:
                what = "gateway" if target.startswith("nats-") else "kv"
                key = f"{src}>{target}:{what}"
                ports[key] = self.a.port(name, key)
                forwards.append(
                    f"{src}@{self.a.bind(name)}:{ports[key]}={self.a.host(target)}:{self.a.port(target, what)}"
                )
        argv = [
            PYTHON,
            "-m",
            "libs.lab.wan_server",
            "--sites",
            *sites,
            "--gbps",
            _num(link.gbps),
            "--rtt-ms",
            _num(link.rtt_ms),
            "--loss-pct",
            _num(link.loss_pct),
            "--control",
            f"{self.a.bind(name)}:{ports['control']}",
            "--log-level",
            self.s.log_level,
        ]
        for f in forwards:
            argv += ["--forward", f]
        if not link.slow_start_after_idle:
            argv.append("--no-slow-start-after-idle")
        control = f"http://{self.a.host(name)}:{ports['control']}"
        return ProcessSpec(name, "wan", tuple(argv), {}, None, None, Ready("http", control + "/health"), ports=ports)

    def nats(self, site: str) -> ProcessSpec:
        name = nats_name(site)
        others = [s for s in self.site_names if s != site]
        ports = {what: self.a.port(name, what) for what in ("client", "monitor", "cluster", "gateway")}
        conf = self.a.path(name, "conf")
        lines = [
            f"server_name: {site}",
            f"listen: {self.a.bind(name)}:{ports['client']}",
            f"http: {self.a.bind(name)}:{ports['monitor']}",
            "max_payload: 8MB",
            "# Ping every second, give up after two missed: a cut link is noticed within ~3 s.",
            'ping_interval: "1s"',
            "ping_max: 2",
            f'jetstream {{ store_dir: "{self.a.path(name, "data")}", max_memory_store: 1GB, max_file_store: 20GB }}',
            "# JetStream in a supercluster needs a cluster; a one-node cluster named after the site.",
            f"cluster {{ name: {site}, listen: {self.a.bind(name)}:{ports['cluster']}, "
            f"routes: [nats-route://{self.a.host(name)}:{ports['cluster']}] }}",
        ]
        env = {}
        if self.s.nats_passwords:
            permissions = nats_auth.role_permissions(self.site_names)
            lines += ["# One user per role, each limited to its subjects; passwords come from the environment."]
            lines += nats_auth.authorization_block({user: permissions[user] for user in self.s.nats_passwords})
            env = nats_auth.server_env(self.s.nats_passwords)
        if others:
            remotes = []
            for other in others:
                host, port = self.via(site, nats_name(other), "gateway")
                remotes.append(f"    {{ name: {other}, urls: [nats://{host}:{port}] }}")
            # Peers learn this address from our INFO and may reconnect to it: it must be the relay's
            # (with more than two sites, the relay of the first other site).
            adv_host, adv_port = self.via(others[0], name, "gateway")
            lines += [
                "# Gateways to the other sites go through the link relays.",
                "gateway {",
                f"  name: {site}",
                f"  listen: {self.a.bind(name)}:{ports['gateway']}",
                f'  advertise: "{adv_host}:{adv_port}"',
                *(nats_auth.gateway_tls_lines(*cert_files(self.s.tls_dir, name)) if self.s.tls_dir else []),
                "  gateways: [",
                *remotes,
                "  ]",
                "}",
            ]
        monitor = f"http://{self.a.host(name)}:{ports['monitor']}"
        after = tuple(wan_name(*link.sites) for link in self.t.links if site in link.sites)
        return ProcessSpec(
            name,
            "nats",
            ("nats-server", "-c", conf),
            env,
            site,
            site,
            Ready("nats", monitor, tuple(others)),
            after=after,
            files={conf: "\n".join(lines) + "\n"},
            ports=ports,
        )

    def redis(self) -> ProcessSpec:
        name, site = "redis", self.t.services.redis
        port = self.a.port(name, "redis")
        argv = (
            "redis-server",
            "--port",
            str(port),
            "--bind",
            self.a.bind(name),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.a.path(name, "data"),
            "--protected-mode",
            "no",
        )
        return ProcessSpec(
            name,
            "redis",
            argv,
            {},
            site,
            None,
            Ready("redis", f"redis://{self.a.host(name)}:{port}/0"),
            ports={"redis": port},
        )

    def kv_index(self) -> ProcessSpec:
        site = self.t.services.kv_index
        env = self._common_env() | {
            "KV_INDEX_NATS_URL": self.nats_url(site),
            "KV_INDEX_REDIS_URL": f"redis://{self.a.host('redis')}:{self.a.port('redis', 'redis')}/0",
            "KV_INDEX_BLOCK_SIZE": str(self.t.block_size),
            "KV_INDEX_LOG_LEVEL": self.s.log_level,
        }
        env |= {f"KV_INDEX_{k}": v for k, v in self.nats_login("kv_index").items()}
        return ProcessSpec(
            "kv-index",
            "kv_index",
            (PYTHON, "-m", "services.kv_index"),
            env,
            site,
            site,
            Ready("reply", self.probe_url(site), (subjects.KV_LOOKUP,)),
            after=(*map(nats_name, self.site_names), "redis"),
        )

    def gateway(self, g: Gateway) -> ProcessSpec:
        prefix = "PREFILL_GATEWAY_" if g.role == "prefill" else "DECODE_GATEWAY_"
        backend = "reference" if g.group.backend == "reference" else f"simulated:{g.group.hardware}"
        env = self._common_env() | {
            "SITE": g.site,
            "CLUSTER": g.cluster.name,
            "NATS_URL": self.nats_url(g.site),
            "BACKEND": backend,
            "MODEL": self.t.model,
            "TIME_SCALE": _num(g.group.time_scale),
            "BYTE_SCALE": _num(g.group.byte_scale),
            "DRAIN_TIMEOUT_S": _num(DRAIN_TIMEOUT_S),
            "LOG_LEVEL": self.s.log_level,
        }
        env |= self.nats_login(f"{g.role}_gateway")
        if self.s.tls_dir:  # direct-TCP KV between sites: this gateway's certificate, trusting the lab CA
            env |= dict(
                zip(("KV_TLS_CERT", "KV_TLS_KEY", "KV_TLS_CA"), cert_files(self.s.tls_dir, g.name), strict=True)
            )
        ports: dict[str, int] = {}
        if g.role == "prefill":
            env["INSTANCES"] = ",".join(g.instances)
            budgets = [f"{o}={_num(self.t.link(g.site, o).gbps)}" for o in self.site_names if o != g.site]
            env["BUDGETS"] = ",".join(budgets)
        else:
            ports["kv"] = self.a.port(g.name, "kv")
            advertised = [
                f"{o}={':'.join(map(str, self.via(o, g.name, 'kv')))}" for o in self.site_names if o != g.site
            ]
            env |= {
                "INSTANCE": g.instances[0],
                "TCP_HOST": self.a.bind(g.name),
                "TCP_PORT": str(ports["kv"]),
                "ADVERTISE_HOST": self.a.host(g.name),
                "ADVERTISE_BY_SITE": ",".join(advertised),
            }
            if g.group.decode_chunk > 1:  # the backend's own default otherwise (rendered files stay as they were)
                env["DECODE_CHUNK"] = str(g.group.decode_chunk)
        env = {k if k.startswith("OTEL_") else prefix + k: v for k, v in env.items()}
        module = "services.prefill_gateway" if g.role == "prefill" else "services.decode_gateway"
        heartbeats = tuple(subjects.load(g.site, i) for i in g.instances)
        return ProcessSpec(
            g.name,
            f"{g.role}_gateway",
            (PYTHON, "-m", module),
            env,
            g.site,
            g.site,
            Ready("heartbeats", self.probe_url(g.site), heartbeats),
            after=(*map(nats_name, self.site_names), "kv-index"),
            ports=ports,
        )

    def router(self, site: str, replica: int = 0) -> ProcessSpec:
        name = router_name(site, replica)
        port = self.a.port(name, "http")
        r = self.t.router
        capacities = [f"{a}>{b}={_num(link.gbps)}" for link in self.t.links for a, b in (link.sites, link.sites[::-1])]
        env = self._common_env() | {
            "ROUTER_NATS_URL": self.nats_url(site),
            "ROUTER_SITE": site,
            "ROUTER_ID": name,
            "ROUTER_HOST": self.a.bind(name),
            "ROUTER_PORT": str(port),
            "ROUTER_MODELS": self.t.model,
            "ROUTER_POLICY": r.policy,
            "ROUTER_THRESHOLD_TOKENS": str(r.threshold_tokens),
            "ROUTER_TRANSPORT": r.transport,
            "ROUTER_BLOCK_SIZE": str(self.t.block_size),
            "ROUTER_LINK_CAPACITIES": ",".join(capacities),
            "ROUTER_LOG_LEVEL": self.s.log_level,
        }
        env |= {f"ROUTER_{k}": v for k, v in self.nats_login("router").items()}
        if self.s.api_key:  # the router is given the key's digest; the plain key stays in the lab's status
            env["ROUTER_API_KEY_HASHES"] = digest(self.s.api_key)
        gws = tuple(g.name for g in gateways(self.t))
        return ProcessSpec(
            name,
            "router",
            (PYTHON, "-m", "services.router"),
            env,
            site,
            site,
            Ready("http", f"http://{self.a.host(name)}:{port}/readyz"),
            after=("kv-index", *gws),
            ports={"http": port},
        )


def _num(x: float) -> str:
    """A number as config text: ``10`` not ``10.0``."""
    return f"{x:g}"
