"""A lab topology: sites, their clusters and instances, where the services run, the links between sites.

One TOML file describes a lab (shipped ones: ``libs/lab/topologies/<name>.toml``). Sites and
clusters are tables keyed by name (``[sites.dc-a.clusters.prfaas]``); errors name the file, the
key (``sites.dc-b.clusters.pd.instances[1].count``) and what is wrong.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from libs.common import subjects
from libs.common.errors import ConfigError
from libs.engine.profiles import HARDWARE, MODELS
from libs.policy import POLICIES

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]

_SHIPPED = "libs.lab.topologies"
_ROLE_LETTER = {"prefill": "p", "decode": "d"}


class InstanceGroup(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``count`` instances of one role and backend, ``per_process`` of them per gateway process."""

    role: Literal["prefill", "decode"]
    count: Count = 1
    backend: Literal["reference", "simulated"] = "reference"
    hardware: str | None = None  # hardware profile of a simulated backend (libs.engine.profiles)
    time_scale: Positive = 1.0  # simulated: every modelled duration is multiplied by this
    byte_scale: Positive = 1.0  # simulated: every modelled size is multiplied by this
    per_process: Count = 1  # simulated prefill instances served by one gateway process
    decode_chunk: Count = 1  # simulated decode: steps per wake-up (fewer token messages, same modelled times)


class Cluster(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A pool of instances at a site: ``prfaas`` (prefill only) or ``pd`` (prefill and decode)."""

    name: str
    kind: Literal["prfaas", "pd"]
    instances: list[InstanceGroup]


class Site(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One datacenter: its own NATS server and its clusters."""

    name: str
    clusters: list[Cluster] = []


class Link(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The WAN link between two sites: bandwidth per direction, round-trip time, loss, TCP's restart after idle."""

    sites: tuple[str, str]
    gbps: Positive
    rtt_ms: NonNegative
    loss_pct: Annotated[float, msgspec.Meta(ge=0, lt=100)] = 0.0
    slow_start_after_idle: bool = True  # false: connections keep their window when idle (a tuned host)


class Placement(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Which site runs Redis, the KV index and the routers (``router_replicas`` processes at each router site)."""

    redis: str
    kv_index: str
    routers: list[str]
    router_replicas: Count = 1  # routers per site, as behind a load balancer (a replica may die while one serves)


class RouterSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The routers' policy and its offload threshold (uncached prompt tokens)."""

    policy: str = "adaptive"
    threshold_tokens: Annotated[int, msgspec.Meta(ge=0)]
    transport: Literal["tcp", "jetstream"] = "tcp"  # how KV crosses sites: direct TCP or JetStream over NATS
    api_key: bool = False  # the lab makes a random key per run and the routers require it


class Topology(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A whole lab, validated; ``source`` is the file it came from."""

    name: str
    description: str = ""
    model: str  # model profile every instance serves (libs.engine.profiles)
    block_size: Count = 64
    sites: list[Site]
    services: Placement
    router: RouterSettings
    links: list[Link]
    source: str = ""

    def site(self, name: str) -> Site:
        """The site called ``name``."""
        return next(s for s in self.sites if s.name == name)

    def link(self, a: str, b: str) -> Link:
        """The link between sites ``a`` and ``b`` (either order)."""
        return next(link for link in self.links if set(link.sites) == {a, b})


def shipped_topologies() -> list[str]:
    """Names of the topologies shipped with the package."""
    folder = resources.files(_SHIPPED)
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def topology_path(name_or_file: str) -> Path:
    """The file of a shipped topology ``name``, or ``name_or_file`` itself if it is a path."""
    if name_or_file.endswith(".toml") or "/" in name_or_file:
        path = Path(name_or_file)
        if not path.is_file():
            raise ConfigError(f"topology {name_or_file}: no such file")
        return path
    if name_or_file not in shipped_topologies():
        raise ConfigError(
            f"topology {name_or_file!r}: not a shipped topology ({', '.join(shipped_topologies())}) nor a .toml file"
        )
    return Path(str(resources.files(_SHIPPED) / f"{name_or_file}.toml"))


def load_topology(name_or_file: str) -> Topology:
    """Read and validate a topology by shipped name or file path."""
    path = topology_path(name_or_file)
    return parse_topology(path.read_text(), source=path.name if _is_shipped(path) else str(path))


def parse_topology(text: str, *, source: str) -> Topology:
    """Validate a topology's TOML text; errors start with ``source`` and name the key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"topology {source}: not valid TOML: {e}") from None
    return topology_from_dict(raw, source=source)


def topology_from_dict(raw: dict[str, Any], *, source: str) -> Topology:
    """Validate a topology given as the dict its TOML file would parse to (a topology built in code)."""
    listed = _named_lists(raw, source)
    try:
        topology = msgspec.convert(listed, Topology)
    except msgspec.ValidationError as e:
        raise ConfigError(f"topology {source}: {_explain(str(e), listed)}") from None
    _check(topology, source)
    return msgspec.structs.replace(topology, source=source)


def instance_names(cluster: Cluster, group_index: int) -> list[str]:
    """Names of the instances of ``cluster.instances[group_index]``: ``<cluster>-<p|d><n>``, n counted per role."""
    group = cluster.instances[group_index]
    first = sum(g.count for g in cluster.instances[:group_index] if g.role == group.role)
    return [f"{cluster.name}-{_ROLE_LETTER[group.role]}{first + i}" for i in range(group.count)]


def _is_shipped(path: Path) -> bool:
    return path.parent == Path(str(resources.files(_SHIPPED)))


def _named_lists(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Turn the ``sites`` and ``clusters`` tables keyed by name into lists whose items carry their name."""

    def listed(table: Any, key: str, inner: str | None) -> Any:
        if not isinstance(table, dict):
            return table  # msgspec reports the wrong type
        items = []
        for name, value in table.items():
            if isinstance(value, dict):
                if "name" in value:
                    raise ConfigError(
                        f"topology {source}: {key}.{name}.name: not allowed (the table's key is the name)"
                    )
                value = {"name": name, **value}
                if inner is not None and inner in value:
                    value[inner] = listed(value[inner], f"{key}.{name}.{inner}", None)
            items.append(value)
        return items

    out = dict(raw)
    if "sites" in out:
        out["sites"] = listed(out["sites"], "sites", "clusters")
    if "source" in out:
        raise ConfigError(f"topology {source}: source: not a topology key")
    return out


_INDEX = re.compile(r"\[(\d+)\]")


def _explain(message: str, listed: dict[str, Any]) -> str:
    """``Expected int - at `$.sites[1].clusters[0].x``` as ``sites.dc-b.clusters.pd.x: expected int``."""
    what, _, at = message.partition(" - at `")
    path = at.rstrip("`").removeprefix("$").lstrip(".")
    node: Any = listed
    parts = []
    for step in re.split(r"\.(?![^\[]*\])", path) if path else []:
        key, indexes = step.split("[", 1)[0], [int(i) for i in _INDEX.findall(step)]
        node = node.get(key) if isinstance(node, dict) else None
        label = key
        for i in indexes:
            item = node[i] if isinstance(node, list) and i < len(node) else None
            named = key in ("sites", "clusters") and isinstance(item, dict) and "name" in item
            label += f".{item['name']}" if named else f"[{i}]"
            node = item
        parts.append(label)
    where = ".".join(parts) or "(top level)"
    return f"{where}: {what[0].lower()}{what[1:]}"


def _check(t: Topology, source: str) -> None:
    """Cross-key rules msgspec cannot express."""

    def bad(key: str, problem: str) -> ConfigError:
        return ConfigError(f"topology {source}: {key}: {problem}")

    if t.model not in MODELS:
        raise bad("model", f"unknown model profile {t.model!r} (known: {', '.join(sorted(MODELS))})")
    if not t.sites:
        raise bad("sites", "at least one site is needed")
    site_names = [s.name for s in t.sites]
    for site in t.sites:
        for name, key in [(site.name, f"sites.{site.name}")] + [
            (c.name, f"sites.{site.name}.clusters.{c.name}") for c in site.clusters
        ]:
            try:
                subjects.token(name, "name")
            except ValueError as e:
                raise bad(key, f"{e} (names are NATS subject tokens)") from None
        for cluster in site.clusters:
            key = f"sites.{site.name}.clusters.{cluster.name}"
            if not cluster.instances:
                raise bad(f"{key}.instances", "a cluster needs at least one instance group")
            for i, group in enumerate(cluster.instances):
                gkey = f"{key}.instances[{i}]"
                if cluster.kind == "prfaas" and group.role == "decode":
                    raise bad(f"{gkey}.role", "a prfaas cluster only prefills (decode belongs in a pd cluster)")
                if group.backend == "simulated" and group.hardware not in HARDWARE:
                    raise bad(
                        f"{gkey}.hardware",
                        f"{group.hardware!r}: a simulated backend needs one of {', '.join(sorted(HARDWARE))}",
                    )
                if group.decode_chunk > 1 and (group.role != "decode" or group.backend != "simulated"):
                    raise bad(f"{gkey}.decode_chunk", "only a simulated decode instance steps in chunks")
                if group.per_process > 1 and (group.role == "decode" or group.backend == "reference"):
                    raise bad(
                        f"{gkey}.per_process",
                        "only simulated prefill instances share a gateway process "
                        "(a decode gateway and a reference-model instance are one process each)",
                    )
                if group.backend == "reference":
                    if t.model != "reference":
                        raise bad(
                            f"{gkey}.backend", f"the reference backend serves only model 'reference', not {t.model!r}"
                        )
                    for scale in ("hardware", "time_scale", "byte_scale"):
                        if getattr(group, scale) != getattr(InstanceGroup(role=group.role), scale):
                            raise bad(f"{gkey}.{scale}", "only a simulated backend takes a hardware profile and scales")
    clusters = [c.name for s in t.sites for c in s.clusters]
    if len(set(clusters)) != len(clusters):
        raise bad("sites", f"cluster names must be unique across sites, got {clusters}")
    if not any(g.role == "decode" for s in t.sites for c in s.clusters for g in c.instances):
        raise bad("sites", "no decode instance: a pd cluster with a decode group is needed")
    for key, site in [("services.redis", t.services.redis), ("services.kv_index", t.services.kv_index)] + [
        (f"services.routers[{i}]", r) for i, r in enumerate(t.services.routers)
    ]:
        if site not in site_names:
            raise bad(key, f"unknown site {site!r} (sites: {', '.join(site_names)})")
    if not t.services.routers:
        raise bad("services.routers", "at least one router site is needed")
    if len(set(t.services.routers)) != len(t.services.routers):
        raise bad("services.routers", f"one router per site, got {t.services.routers}")
    if t.router.policy not in POLICIES:
        raise bad("router.policy", f"unknown policy {t.router.policy!r} (known: {', '.join(POLICIES)})")
    pairs = set()
    for i, link in enumerate(t.links):
        for site in link.sites:
            if site not in site_names:
                raise bad(f"links[{i}].sites", f"unknown site {site!r} (sites: {', '.join(site_names)})")
        pair = frozenset(link.sites)
        if len(pair) != 2:
            raise bad(f"links[{i}].sites", f"a link joins two different sites, got {list(link.sites)}")
        if pair in pairs:
            raise bad(f"links[{i}].sites", f"a second link between {' and '.join(sorted(pair))}")
        pairs.add(pair)
    for a, b in itertools.combinations(site_names, 2):
        if frozenset((a, b)) not in pairs:
            raise bad(
                "links", f"no link between {a} and {b} (every pair of sites needs one: NATS gateways form a mesh)"
            )
