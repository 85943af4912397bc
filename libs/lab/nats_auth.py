"""NATS users of a lab, one per role, each allowed only its own subjects, and the TLS of the gateways between sites.

Every site's server gets the same users (a client may connect at any site, and a server enforces the
permissions of the clients connected to it, so a message crossing a gateway was already checked at its
origin). Passwords never appear in a config file: the block names ``$PRFAAS_NATS_<USER>_PASSWORD``, which
nats-server resolves from its environment (the native lab sets it from the run's generated passwords; the
compose project from the variables of the same name). Services read theirs from ``<PREFIX>NATS_USER`` and
``<PREFIX>NATS_PASSWORD_FILE`` (or ``<PREFIX>NATS_PASSWORD``): ``libs.common.config.EnvReader.nats_url``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from libs.common import subjects

P = subjects.PREFIX
_JS = "$JS.API"
INBOX = "_INBOX.>"  # replies to the requests a client makes, and the router's job mailboxes


@dataclass(frozen=True)
class Permissions:
    """What one user may publish and subscribe to; ``responses``: it may answer the requests it receives."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responses: bool = False


def _stream_admin(stream: str) -> tuple[str, ...]:
    """JetStream API subjects to create, update and look up ``stream``."""
    return tuple(f"{_JS}.STREAM.{op}.{stream}" for op in ("INFO", "CREATE", "UPDATE"))


def _consumers(stream: str) -> tuple[str, ...]:
    """JetStream API subjects to create, look up, pull from and delete consumers of ``stream``."""
    return (
        f"{_JS}.CONSUMER.CREATE.{stream}",
        f"{_JS}.CONSUMER.CREATE.{stream}.>",
        f"{_JS}.CONSUMER.DURABLE.CREATE.{stream}.*",
        f"{_JS}.CONSUMER.INFO.{stream}.*",
        f"{_JS}.CONSUMER.DELETE.{stream}.*",
        f"{_JS}.CONSUMER.MSG.NEXT.{stream}.*",
    )


def role_permissions(sites: list[str]) -> dict[str, Permissions]:
    """User name -> permissions, for a lab of ``sites`` (the KV transfer streams are one per site)."""
    kv_streams = [subjects.kv_transfer_stream(site) for site in sites]
    return {
        "router": Permissions(
            publish=(
                f"{P}.decode.>",
                f"{P}.prefill.>",
                subjects.JOB_CANCEL,
                subjects.KV_LOOKUP,
                f"{P}.decisions.*",
                f"{P}.outcomes.*",
                f"{P}.plans.*",
                *_stream_admin(subjects.DECISIONS_STREAM),
            ),
            subscribe=(subjects.LOAD_ALL, subjects.LINK_ALL, INBOX),
        ),
        "prefill_gateway": Permissions(
            publish=(
                subjects.LOAD_ALL,
                subjects.LINK_ALL,
                f"{P}.linkshare.>",
                subjects.KV_EVENTS_ALL,
                f"{P}.kvx.>",
                f"{P}.kvctl.>",
                INBOX,
            ),
            subscribe=(f"{P}.prefill.>", subjects.JOB_CANCEL, f"{P}.linkshare.>", f"{P}.kv.snapshot_request.>", INBOX),
        ),
        "decode_gateway": Permissions(
            publish=(
                subjects.LOAD_ALL,
                subjects.KV_EVENTS_ALL,
                subjects.JOB_CANCEL,
                INBOX,
                *(s for stream in kv_streams for s in (*_stream_admin(stream), f"{_JS}.STREAM.PURGE.{stream}")),
                *(s for stream in kv_streams for s in _consumers(stream)),
            ),
            subscribe=(f"{P}.decode.>", subjects.JOB_CANCEL, f"{P}.kv.snapshot_request.>", f"{P}.kvctl.>", INBOX),
        ),
        "kv_index": Permissions(
            publish=(
                f"{P}.kv.snapshot_request.>",
                subjects.KV_EVENTS_ALL,  # the vLLM/SGLang bridge's batches
                subjects.LOAD_ALL,  # and its heartbeats for the instances it bridges
                *_stream_admin(subjects.KV_EVENTS_STREAM),
                *_consumers(subjects.KV_EVENTS_STREAM),
                f"$JS.ACK.{subjects.KV_EVENTS_STREAM}.>",
            ),
            subscribe=(subjects.KV_LOOKUP, subjects.LOAD_ALL, f"{P}.kv.snapshot_request.>", INBOX),  # + the bridge's
            responses=True,
        ),
        "analytics": Permissions(
            publish=(f"{_JS}.STREAM.INFO.{subjects.DECISIONS_STREAM}", *_consumers(subjects.DECISIONS_STREAM)),
            subscribe=(subjects.DECISIONS_ALL, subjects.OUTCOMES_ALL, subjects.PLANS_ALL, INBOX),
            responses=True,  # an ordered consumer's flow-control replies
        ),
        # The lab's own tools: readiness probes, `prfaas lab demo`, `prfaas index`, `prfaas decisions`, benchmarks.
        "lab": Permissions(publish=(">",), subscribe=(">",)),
    }


LAB_USER = "lab"  # the lab's tools; each service connects as the user named after its role


def client_url(host: str, port: int, passwords: Mapping[str, str]) -> str:
    """A NATS client URL for the lab's own tools: as the ``lab`` user when the lab has ``passwords``."""
    password = passwords.get(LAB_USER)
    return f"nats://{LAB_USER}:{password}@{host}:{port}" if password else f"nats://{host}:{port}"


def password_variable(user: str) -> str:
    """The environment variable holding ``user``'s password for nats-server (and for compose)."""
    return f"PRFAAS_NATS_{user.upper()}_PASSWORD"


def server_env(passwords: Mapping[str, str]) -> dict[str, str]:
    """nats-server's environment for ``authorization_block``: each password quoted, so the server reads a string
    (it parses a variable's value as config: unquoted, ``-x...`` or ``3x...`` would be a malformed number)."""
    return {password_variable(user): json.dumps(password) for user, password in passwords.items()}


def new_passwords(users: list[str]) -> dict[str, str]:
    """A fresh random password per user (URL-safe, so it may sit in a ``nats://user:password@`` URL)."""
    return {user: secrets.token_urlsafe(24) for user in users}


def write_password_files(directory: Path, passwords: dict[str, str]) -> None:
    """Each password in ``<directory>/<user>.password``, readable by its owner only."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    for user, password in passwords.items():
        path = password_file(directory, user)
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(password)


def password_file(directory: Path | str, user: str) -> Path:
    """Where ``user``'s password file is in ``directory``."""
    return Path(directory) / f"{user}.password"


def authorization_block(permissions: dict[str, Permissions]) -> list[str]:
    """The ``authorization`` lines of a server config: every user, its password by variable, its permissions."""
    lines = ["authorization {", "  users = ["]
    for user, perms in permissions.items():
        entry = [
            f"user: {user}",
            f"password: ${password_variable(user)}",
            "permissions: { "
            f"publish: {{ allow: {json.dumps(list(perms.publish))} }}, "
            f"subscribe: {{ allow: {json.dumps(list(perms.subscribe))} }}"
            + (", allow_responses: true" if perms.responses else "")
            + " }",
        ]
        lines.append("    { " + ", ".join(entry) + " }")
    lines += ["  ]", "}"]
    return lines


def gateway_tls_lines(cert: str, key: str, ca: str) -> list[str]:
    """A ``gateway`` block's ``tls``: present ``cert``, accept only peers whose certificate ``ca`` signed.

    ``timeout``: a handshake (a few round trips of the slowest lab link) must end within 3 s.
    """
    return [f'  tls {{ cert_file: "{cert}", key_file: "{key}", ca_file: "{ca}", verify: true, timeout: 3 }}']
