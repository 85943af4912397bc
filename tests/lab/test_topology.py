"""Topology files: the shipped ones load, and every mistake is named by file, key and problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.common.errors import ConfigError
from libs.lab.topology import instance_names, load_topology, parse_topology, shipped_topologies, topology_path

DEFAULT = topology_path("default").read_text()


def test_shipped_topologies_describe_the_two_labs() -> None:
    """default: PrfaaS at dc-a, PD + services at dc-b, 10 Gbps / 20 ms; case-study: the paper's 4 / 3 / 5 instances."""
    assert {"default", "case-study"} <= set(shipped_topologies())
    default = load_topology("default")
    assert [s.name for s in default.sites] == ["dc-a", "dc-b"]
    assert [(c.name, c.kind) for c in default.site("dc-a").clusters] == [("prfaas", "prfaas")]
    assert (default.services.redis, default.services.kv_index, default.services.routers) == ("dc-b", "dc-b", ["dc-b"])
    link = default.link("dc-b", "dc-a")
    assert (link.gbps, link.rtt_ms, link.loss_pct) == (10.0, 20.0, 0.0)
    assert 1_000 < default.router.threshold_tokens < 2_000  # a few thousand tokens go remote, hundreds stay local
    case = load_topology("case-study")
    counts = {(c.name, g.role, g.hardware): g.count for s in case.sites for c in s.clusters for g in c.instances}
    assert counts == {("prfaas", "prefill", "h200"): 4, ("pd", "prefill", "h20"): 3, ("pd", "decode", "h20"): 5}
    assert case.router.threshold_tokens == 19_392


def test_a_topology_file_is_loaded_by_path(tmp_path: Path) -> None:
    """A path loads the file; its errors carry the path."""
    path = tmp_path / "mine.toml"
    path.write_text(DEFAULT.replace("gbps = 10.0", "gbps = 2.5"))
    assert load_topology(str(path)).links[0].gbps == 2.5
    path.write_text(DEFAULT.replace("gbps = 10.0", "gbps = -1"))
    with pytest.raises(ConfigError, match=rf"topology {path}: links\[0\]\.gbps: expected `float` > 0"):
        load_topology(str(path))


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'count = 1, backend = "reference" },\n]',
            'count = 0, backend = "reference" },\n]',
            r"sites\.dc-a\.clusters\.prfaas\.instances\[0\]\.count: expected `int` >= 1",
        ),
        ("gbps = 10.0", 'gbps = "fast"', r"links\[0\]\.gbps: expected `float`, got `str`"),
        ("gbps = 10.0", "gpbs = 10.0", r"links\[0\]: object contains unknown field `gpbs`"),
        ('routers = ["dc-b"]', 'routers = ["dc-c"]', r"services\.routers\[0\]: unknown site 'dc-c'"),
        (
            '{ role = "decode", count = 1, backend = "reference" }',
            '{ role = "decode", count = 1, backend = "simulated", hardware = "h900" }',
            r"sites\.dc-b\.clusters\.pd\.instances\[1\]\.hardware: 'h900': a simulated backend needs one of",
        ),
        (
            '{ role = "prefill", count = 1, backend = "reference" },\n]\n\n[sites.dc-b',
            '{ role = "decode", count = 1, backend = "reference" },\n]\n\n[sites.dc-b',
            r"sites\.dc-a\.clusters\.prfaas\.instances\[0\]\.role: a prfaas cluster only prefills",
        ),
        ('kind = "prfaas"', 'kind = "prfas"', r"sites\.dc-a\.clusters\.prfaas\.kind: invalid enum value 'prfas'"),
        ('policy = "adaptive"', 'policy = "best"', r"router\.policy: unknown policy 'best'"),
        (
            'sites = ["dc-a", "dc-b"]',
            'sites = ["dc-a", "dc-a"]',
            r"links\[0\]\.sites: a link joins two different sites",
        ),
        ("[[links]]", "[[linkz]]", r"\(top level\): object contains unknown field `linkz`"),
        ('model = "reference"', 'model = "gpt-9"', r"model: unknown model profile 'gpt-9'"),
        ("[sites.dc-a.clusters.prfaas]", '[sites."dc.a".clusters.prfaas]', r"sites\.dc\.a: name 'dc\.a' must match"),
        ('name = "default"', 'name = "default', r"not valid TOML: .*line \d+"),
    ],
)
def test_a_bad_topology_names_the_key_and_the_problem(old: str, new: str, message: str) -> None:
    """Each broken topology is refused with the file, the key and what is wrong."""
    assert old in DEFAULT
    with pytest.raises(ConfigError, match=rf"^config: topology lab\.toml: {message}"):
        parse_topology(DEFAULT.replace(old, new, 1), source="lab.toml")


def test_every_pair_of_sites_needs_a_link() -> None:
    """A third site without links is refused, naming the missing pair."""
    text = DEFAULT + '\n[sites.dc-c.clusters.edge]\nkind = "prfaas"\ninstances = [{ role = "prefill" }]\n'
    with pytest.raises(ConfigError, match=r"links: no link between dc-a and dc-c"):
        parse_topology(text, source="lab.toml")


def test_an_unknown_topology_name_lists_the_shipped_ones() -> None:
    """A name that is neither shipped nor a file is refused with the choices."""
    with pytest.raises(ConfigError, match=r"topology 'nope': not a shipped topology \(.*default.*\)"):
        load_topology("nope")


def test_instance_names_are_numbered_per_cluster_and_role() -> None:
    """Two groups of one role continue the numbering; roles number separately."""
    t = parse_topology(
        DEFAULT.replace(
            '{ role = "decode", count = 1, backend = "reference" },',
            '{ role = "decode", count = 1, backend = "reference" },\n    { role = "decode", count = 2 },',
        ),
        source="lab.toml",
    )
    (pd,) = t.site("dc-b").clusters
    assert [instance_names(pd, i) for i in range(3)] == [["pd-p0"], ["pd-d0"], ["pd-d1", "pd-d2"]]


def test_a_link_that_keeps_its_window_when_idle_reaches_its_relay() -> None:
    """`slow_start_after_idle = false` on a topology link is passed to that link's relay process."""
    from libs.lab.compose import ComposeAddresses
    from libs.lab.plan import plan

    tuned = load_topology(str(_write(DEFAULT.replace("rtt_ms = 20.0", "rtt_ms = 20.0\nslow_start_after_idle = false"))))
    [relay] = [spec for spec in plan(tuned, ComposeAddresses()) if spec.role == "wan"]
    assert "--no-slow-start-after-idle" in relay.argv
    [default_relay] = [spec for spec in plan(load_topology("default"), ComposeAddresses()) if spec.role == "wan"]
    assert "--no-slow-start-after-idle" not in default_relay.argv


def _write(text: str) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "tuned.toml"
    path.write_text(text)
    return path
