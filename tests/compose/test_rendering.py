"""compose/ is the rendering of the default topology, valid for docker compose, wired like the native lab."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from libs.lab.compose import COMPOSE_FILE, IMAGE, OTLP_ENDPOINT, render
from libs.lab.plan import plan
from libs.lab.supervisor import NativeAddresses
from libs.lab.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
LOOPBACK = "${PRFAAS_PUBLISH_HOST:-127.0.0.1}"  # compose fills it in: loopback unless the variable is set


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    """The default topology rendered as a compose project."""
    return render(load_topology("default"), topology_arg="default")


def test_the_checked_in_compose_project_is_the_rendering_of_the_default_topology(rendered: dict[str, str]) -> None:
    """Every rendered file is checked in unchanged (`prfaas lab compose --out compose/` regenerates them)."""
    for name, text in rendered.items():
        assert (COMPOSE_DIR / name).read_text() == text, (
            f"compose/{name} differs: run `prfaas lab compose --out compose/`"
        )
    stale = {p.name for p in COMPOSE_DIR.glob("nats-*.conf")} - set(rendered)
    assert not stale, f"compose/ has configs no topology renders: {sorted(stale)}"


def test_every_native_process_is_a_service_and_every_service_traces_to_jaeger(rendered: dict[str, str]) -> None:
    """Same process names as the native plan, plus Jaeger; Python services export OTLP to it; health gates the order."""
    services = yaml.safe_load(rendered[COMPOSE_FILE])["services"]
    native = [s.name for s in plan(load_topology("default"), NativeAddresses(Path("/run")))]
    assert list(services) == [*native, "jaeger"]
    for name, service in services.items():
        if (
            service.get("image") == IMAGE
            and service["command"][0] == "python"
            and name.startswith(("kv", "prefill", "decode", "router"))
        ):
            assert service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == OTLP_ENDPOINT, name
        for dep in service.get("depends_on", {}):
            assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
    assert services["router-dc-b"]["ports"] == [f"{LOOPBACK}:8000:8000"]


def test_inter_site_traffic_goes_through_the_relay_service(rendered: dict[str, str]) -> None:
    """NATS gateways dial the relay, advertise the relay; the decode gateway advertises the relay to dc-a senders."""
    services = yaml.safe_load(rendered[COMPOSE_FILE])["services"]
    relay = services["wan-dc-a-dc-b"]["command"]
    forwards = [relay[i + 1] for i, arg in enumerate(relay) if arg == "--forward"]
    assert forwards == [
        "dc-a@0.0.0.0:7301=nats-dc-b:7222",
        "dc-a@0.0.0.0:7302=decode-pd-d0:9400",
        "dc-b@0.0.0.0:7303=nats-dc-a:7222",
    ]
    assert "urls: [nats://wan-dc-a-dc-b:7301]" in rendered["nats-dc-a.conf"]
    assert 'advertise: "wan-dc-a-dc-b:7303"' in rendered["nats-dc-a.conf"]
    assert "urls: [nats://wan-dc-a-dc-b:7303]" in rendered["nats-dc-b.conf"]
    decode_env = services["decode-pd-d0"]["environment"]
    assert decode_env["DECODE_GATEWAY_ADVERTISE_BY_SITE"] == "dc-a=wan-dc-a-dc-b:7302"
    assert relay[relay.index("--gbps") + 1] == "10" and relay[relay.index("--rtt-ms") + 1] == "20"


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose is not installed (apt-get install docker-compose)"
)
def test_docker_compose_accepts_the_file() -> None:
    """`docker-compose config` validates the checked-in file and publishes every port on 127.0.0.1 by default."""
    env = {k: v for k, v in os.environ.items() if k != "PRFAAS_PUBLISH_HOST"}
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_DIR / COMPOSE_FILE), "config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    ports = [p for s in yaml.safe_load(result.stdout)["services"].values() for p in s.get("ports", [])]
    assert ports and all(str(p).startswith("127.0.0.1:") for p in ports), ports


def test_an_api_key_topology_asks_compose_for_the_key(tmp_path: Path) -> None:
    """With `api_key = true` the router's key comes from $PRFAAS_API_KEY, which compose requires."""
    source = (Path(__file__).resolve().parents[2] / "libs/lab/topologies/default.toml").read_text()
    path = tmp_path / "keyed.toml"
    path.write_text(source.replace("api_key = false", "api_key = true"))
    services = yaml.safe_load(render(load_topology(str(path)), topology_arg=str(path))[COMPOSE_FILE])["services"]
    assert services["router-dc-b"]["environment"]["ROUTER_API_KEYS"].startswith("${PRFAAS_API_KEY:?")


def test_published_ports_are_on_loopback_and_the_header_says_which_reaches_what(rendered: dict[str, str]) -> None:
    """Every host port is bound to 127.0.0.1 (unless $PRFAAS_PUBLISH_HOST); the header maps each to its service."""
    text = rendered[COMPOSE_FILE]
    services = yaml.safe_load(text)["services"]
    published = {name: [p.rsplit(":", 2) for p in s["ports"]] for name, s in services.items() if "ports" in s}
    assert all(host_ip == LOOPBACK for ports in published.values() for host_ip, _, _ in ports), published
    header = [line for line in text.splitlines() if line.startswith("#")]
    for site in ("dc-a", "dc-b"):
        [[_, host_port, container_port]] = published[f"nats-{site}"]
        assert container_port == "4222" and any(
            line.split()[1:4] == ["NATS", site, f"nats://localhost:{host_port}"] for line in header
        ), header
    assert published["nats-dc-a"] != published["nats-dc-b"]
    assert any("http://localhost:8000/v1" in line and "router-dc-b" in line for line in header), header


def test_jaeger_is_the_v2_image_receiving_otlp_on_all_interfaces(rendered: dict[str, str]) -> None:
    """jaegertracing/jaeger 2.x (v1's all-in-one and its COLLECTOR_OTLP_ENABLED are gone): OTLP 4317/4318, UI 16686."""
    jaeger = yaml.safe_load(rendered[COMPOSE_FILE])["services"]["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/jaeger:2.")
    assert jaeger["environment"] == {"JAEGER_LISTEN_HOST": "0.0.0.0"}  # the OTLP receivers' default is localhost
    assert sorted(jaeger["ports"]) == sorted(f"{LOOPBACK}:{p}:{p}" for p in (16686, 4317, 4318))
    assert OTLP_ENDPOINT == "http://jaeger:4318"


def test_the_build_context_leaves_out_the_virtualenv_and_git_and_keeps_what_the_image_copies() -> None:
    """.dockerignore: no .venv, .git, tests or bytecode in the context; everything the Dockerfile COPYs is there."""
    from docker.utils.build import exclude_paths

    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sent = exclude_paths(str(ROOT), patterns, dockerfile="Dockerfile")
    assert not [p for p in sent if p.split("/")[0] in (".venv", ".git", "tests") or "__pycache__" in p]
    copied = [
        arg
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
        for arg in line.split()[1:-1]
    ]
    assert copied and all(source in sent for source in copied), copied
    assert "libs/cli/__init__.py" in sent and "services/router/service.py" in sent


def _ci_copy(tmp_path: Path, apt_get: str) -> tuple[Path, dict[str, str]]:
    """.ci/run beside a README whose commands only report that they ran; a PATH of the few tools it uses, with
    ``apt-get`` being the given script (``$BIN`` names the PATH's one directory) and no docker-compose."""
    (tmp_path / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci/run", tmp_path / ".ci/run")
    (tmp_path / "README.md").write_text(
        "<!-- ci:run-command -->\n```bash\necho RUN-COMMAND-RAN\n```\n\n<!-- ci:test-command -->\n```bash\n"
        "mkdir -p .venv/bin && touch .venv/bin/activate && echo TEST-COMMAND-RAN\n```\n"
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "awk", "dirname", "uname", "mkdir", "touch", "timeout", "chmod"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for name, script in (("apt-get", apt_get), ("ruff", "exit 0")):
        (bin_dir / name).write_text(f"#!{shutil.which('bash')}\nBIN={bin_dir}\n{script}\n")
        (bin_dir / name).chmod(0o755)
    return tmp_path / ".ci/run", {"PATH": str(bin_dir)}


def test_ci_fails_when_docker_compose_cannot_be_installed(tmp_path: Path) -> None:
    """A failed or ineffective docker-compose install ends CI before the tests (which would skip the validation)."""
    installs = (
        'if [ "$1" = install ]; then printf "#!/bin/sh\\nexit 0\\n" > "$BIN/docker-compose"; '
        'chmod +x "$BIN/docker-compose"; fi'
    )
    for case, apt_get, expected in (("failing", "exit 100", 1), ("ineffective", "exit 0", 1), ("working", installs, 0)):
        run, env = _ci_copy(tmp_path / case, apt_get)
        done = subprocess.run([shutil.which("bash"), str(run)], env=env, capture_output=True, text=True, timeout=60)
        assert (done.returncode != 0) == bool(expected), f"{case}: {done.returncode}\n{done.stdout}{done.stderr}"
        assert ("TEST-COMMAND-RAN" in done.stdout) == (not expected), f"{case}: {done.stdout}"
        assert not expected or "docker-compose" in done.stderr, f"{case}: {done.stderr}"
