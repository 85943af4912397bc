"""``prfaas lab up``: start a topology's processes, in the foreground or detached, and say how to use them."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from libs.common.errors import ConfigError, UpstreamTimeout
from libs.common.hashing import DEFAULT_BLOCK_SIZE
from libs.common.pki import CertificateAuthority
from libs.common.telemetry import setup_logging
from libs.engine.profiles import model_profile
from libs.lab import nats_auth
from libs.lab.plan import LabSettings
from libs.lab.runstate import STATUS, SUPERVISOR_LOG, default_run_dir, read_status, running_status
from libs.lab.supervisor import Lab
from libs.lab.topology import Topology, load_topology
from services.router.chat_template import PLAIN_TEMPLATE, ChatTemplate

log = logging.getLogger(__name__)

DEMO_PROMPT = (
    "You are prfaas-demo, a helpful assistant. Answer concisely and cite the documents you were given. "
    "Documents follow; each starts with a title line and ends with a blank line."
)
# What the routers' default chat template makes of the demo's system turn: the prefix a chat with
# that system prompt leaves in the KV index (so `prfaas index lookup` finds it).
DEMO_PREFIX_TEXT = ChatTemplate(PLAIN_TEMPLATE).render(
    [{"role": "system", "content": DEMO_PROMPT}], add_generation_prompt=False
)
_BASH_ESCAPES = {"\n": "\\n", "\t": "\\t", "\\": "\\\\", "'": "\\'"}  # inside bash's $'...'
_DETACH_GRACE_S = 15.0  # a detached supervisor gets this long beyond the readiness deadline
SECRETS = "secrets"  # the run's NATS passwords, one file per user (0600)
TLS = "tls"  # the run's CA and a certificate per NATS server and gateway
_TLS_ROLES = ("nats", "prefill_gateway", "decode_gateway")  # what speaks TLS to another site


def run_up(args: argparse.Namespace) -> int:
    """Start the lab; foreground: run until Ctrl-C/SIGTERM (or ``--duration-s``); ``--detach``: return once ready."""
    run_dir: Path = args.run_dir
    live = running_status(run_dir)
    if live is not None:
        raise ConfigError(
            f"a lab is already running in {run_dir} (supervisor pid {live['supervisor']['pid']}): "
            "stop it with `prfaas lab down` or choose another --run-dir"
        )
    topology = load_topology(args.topology)
    if args.detach:
        started = time.monotonic()
        status = start_detached(run_dir, args.topology, log_level=args.log_level, ready_timeout_s=args.ready_timeout_s)
        print(summary(status, topology, time.monotonic() - started, detached=True), flush=True)
        return 0
    _clear(run_dir, keep=(SUPERVISOR_LOG,))
    setup_logging(args.log_level)
    lab = secured_lab(topology, run_dir, args.log_level)
    lab.prepare()
    print(
        f"starting lab {topology.name!r} ({len(lab.specs)} processes, logs in {run_dir / 'logs'}) ...",
        file=sys.stderr,
        flush=True,
    )
    return asyncio.run(_serve(lab, args))


async def _serve(lab: Lab, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.duration_s is not None:
        loop.call_later(args.duration_s, stop.set)
    started = time.monotonic()
    starting = asyncio.ensure_future(lab.start(args.ready_timeout_s))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            print("stopped before the lab was ready", file=sys.stderr)
            return 130
        starting.result()  # UpstreamTimeout: the CLI prints it, the finally below stops what started
        print(summary(lab.status(), lab.topology, time.monotonic() - started, detached=False), flush=True)
        while not stop.is_set():
            exited = asyncio.ensure_future(lab.wait_exits())
            await asyncio.wait([exited, stopping], return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                child = exited.result()
                print(
                    f"prfaas lab: {child.spec.name} exited with code {child.exit_code} (log: {child.log_path})",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                exited.cancel()
        return 0
    finally:
        stopping.cancel()
        print("stopping the lab ...", file=sys.stderr, flush=True)
        await lab.stop()
        print(f"lab stopped (logs in {lab.run_dir / 'logs'})", file=sys.stderr, flush=True)


def start_detached(run_dir: Path, topology: str, *, log_level: str, ready_timeout_s: float) -> dict:
    """Start a supervisor in its own session and wait until its status says ready; the status."""
    _clear(run_dir, keep=())
    argv = [
        sys.executable,
        "-m",
        "libs.cli",
        "lab",
        "up",
        "--topology",
        topology,
        "--run-dir",
        str(run_dir),
        "--log-level",
        log_level,
        "--ready-timeout-s",
        str(ready_timeout_s),
    ]
    with open(run_dir / SUPERVISOR_LOG, "ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + ready_timeout_s + _DETACH_GRACE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UpstreamTimeout(f"the lab did not start (exit code {proc.returncode}):\n{_log_tail(run_dir)}")
        if (run_dir / STATUS).exists():
            status = read_status(run_dir)
            if status["supervisor"]["pid"] == proc.pid and status["state"] == "ready":
                return status
        time.sleep(0.1)
    proc.terminate()
    proc.wait(timeout=30)
    raise UpstreamTimeout(f"the lab was not ready within {ready_timeout_s:g}s:\n{_log_tail(run_dir)}")


def summary(status: dict, topology: Topology, elapsed_s: float, *, detached: bool) -> str:
    """What runs where, and what to try next: each command on one line of its own, ready to paste into bash."""
    lines = [f"lab {status['topology']!r} is up in {elapsed_s:.1f}s (run dir {status['run_dir']})"]
    router = status["router_url"]
    key = status["api_key"]
    if router:
        lines.append(
            f"  router (OpenAI API)  {router}/v1   model {status['model']!r}" + (f"   API key {key}" if key else "")
        )
    for site in status["sites"].values():
        lines.append(f"  NATS {site['name']:<15} {site['nats_url']}")
    for link in status["links"]:
        a, b = link["sites"]
        lines.append(
            f"  link {a} <-> {b}  {link['gbps']:g} Gbps, {link['rtt_ms']:g} ms RTT, {link['loss_pct']:g}% loss"
        )
    lines.append("try (each command is one line):")
    for what, command in _hints(status, topology, detached):
        lines += [f"  {what}", f"    {command}"] if command else [f"  {what}"]
    return "\n".join(lines)


def _hints(status: dict, topology: Topology, detached: bool) -> list[tuple[str, str]]:
    """(what it shows, the command) pairs for this lab; a pair without a command is advice."""
    run_dir = "" if Path(status["run_dir"]) == default_run_dir() else f" --run-dir {shlex.quote(status['run_dir'])}"
    hints = []
    if status["router_url"]:
        body = {
            "model": status["model"],
            "messages": [{"role": "system", "content": DEMO_PROMPT}, {"role": "user", "content": "Hello!"}],
            "max_tokens": 16,
        }
        auth = f" -H 'Authorization: Bearer {status['api_key']}'" if status["api_key"] else ""
        hints.append(
            (
                "a chat completion through the router:",
                f"curl -s {status['router_url']}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
                f"-d {shlex.quote(json.dumps(body))}",
            )
        )
        lookup = f"prfaas index lookup --nats {next(iter(status['sites'].values()))['nats_url']}"
        if topology.block_size != DEFAULT_BLOCK_SIZE:
            lookup += f" --block-size {topology.block_size}"
        if model_profile(topology.model).n_linear_layers == 0:
            lookup += " --no-hybrid"
        hints.append(
            (
                "after it, where the KV of its system prompt is cached:",
                f"{lookup} --text {_bash_quote(DEMO_PREFIX_TEXT)}",
            )
        )
        hints.append(
            (
                "the routers' decisions so far (`prfaas decisions tail` follows them live):",
                f"prfaas decisions summary{run_dir}",
            )
        )
    if status["links"]:
        link = status["links"][0]
        a, b = link["sites"]
        hints.append(
            (
                f"a slower {a} <-> {b} link (then --down / --up cut and restore it):",
                f"prfaas lab link {a} {b} --gbps {link['gbps'] / 2:g} --rtt-ms {2 * link['rtt_ms'] or 10:g}{run_dir}",
            )
        )
    hints.append(
        (
            "every process and link:" if detached else "every process and link (from another terminal):",
            f"prfaas lab status{run_dir}",
        )
    )
    hints.append(("stop the lab:", f"prfaas lab down{run_dir}") if detached else ("Ctrl-C stops the lab", ""))
    return hints


def _bash_quote(text: str) -> str:
    """``text`` as one bash word on one line: plain quotes, or ``$'...'`` when it holds a newline or control byte."""
    if text.isprintable():
        return shlex.quote(text)
    return "$'" + "".join(_BASH_ESCAPES.get(c, c if c.isprintable() else f"\\U{ord(c):08x}") for c in text) + "'"


def secured_lab(topology: Topology, run_dir: Path, log_level: str) -> Lab:
    """The lab as ``lab up`` runs it: NATS users per role (passwords in ``run_dir/secrets``), TLS between sites."""
    passwords = nats_auth.new_passwords(list(nats_auth.role_permissions([])))
    nats_auth.write_password_files(run_dir / SECRETS, passwords)
    settings = LabSettings(
        api_key=secrets.token_urlsafe(24) if topology.router.api_key else None,
        log_level=log_level,
        nats_passwords=passwords,
        secrets_dir=str(run_dir / SECRETS),
        tls_dir=str(run_dir / TLS),
    )
    lab = Lab(topology, run_dir, settings)
    _issue_certificates(run_dir / TLS, lab)
    return lab


def _issue_certificates(directory: Path, lab: Lab) -> None:
    """A new CA in ``directory`` and a certificate for each process that speaks TLS to another site (all on loopback)."""
    ca = CertificateAuthority(directory)
    for spec in lab.specs:
        if spec.role in _TLS_ROLES:
            ca.issue(spec.name, ["127.0.0.1", "localhost"])


def _clear(run_dir: Path, keep: tuple[str, ...]) -> None:
    """Empty the run directory (create it if needed, readable by its owner only), keeping the names in ``keep``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o700)
    for entry in run_dir.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _log_tail(run_dir: Path, lines: int = 25) -> str:
    try:
        return "\n".join((run_dir / SUPERVISOR_LOG).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no supervisor log)"
