"""NATS access control: one user per role at every site, each allowed its own subjects and refused the rest."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import yaml
from nats.js import api

from libs.cli import main
from libs.common import subjects
from libs.common.bus import connect, ensure_stream, settle
from libs.common.config import EnvReader
from libs.common.errors import ConfigError, UpstreamTimeout
from libs.lab import nats_auth
from libs.lab.compose import COMPOSE_FILE, render
from libs.lab.plan import LabSettings, plan
from libs.lab.servers import Supercluster
from libs.lab.supervisor import NativeAddresses
from libs.lab.topology import load_topology

DEADLINE_S = 5.0  # a violation is reported within one round trip; 5 s is far beyond a loaded machine's


@pytest.fixture
def cluster(secure_cluster: Supercluster) -> Supercluster:
    """Two sites with the lab's users (fresh passwords) and TLS between them (tests/lab/conftest.py)."""
    return secure_cluster


class Client:
    """A connection as one user that records the errors (permission violations) the server reports."""

    def __init__(self) -> None:
        self.nc: nats.NATS | None = None
        self.errors: list[Exception] = []
        self._error = asyncio.Event()

    async def on_error(self, e: Exception) -> None:
        self.errors.append(e)
        self._error.set()

    async def denied(self, what: str, subject: str) -> bool:
        """True once the server reports a violation for ``what`` (publish/subscription) to ``subject``."""
        wanted = f'permissions violation for {what} to "{subject}"'.lower()  # nats-py lowercases the server's -ERR
        async with asyncio.timeout(DEADLINE_S):
            while not any(wanted in str(e).lower() for e in self.errors):
                self._error.clear()
                await self._error.wait()
        return True


@pytest.fixture
async def login(cluster: Supercluster) -> AsyncIterator:
    """``await login(user, site)``: a connected Client; every connection is closed at teardown."""
    opened: list[nats.NATS] = []

    async def _login(user: str, site: str = "dc-a") -> Client:
        client = Client()
        client.nc = await nats.connect(cluster.user_url(site, user), error_cb=client.on_error, max_reconnect_attempts=0)
        opened.append(client.nc)
        return client

    yield _login
    for nc in opened:
        await nc.close()


DENIED_PUBLISH = [
    ("prefill_gateway", subjects.decisions("dc-a")),  # a gateway cannot publish decisions
    ("decode_gateway", subjects.decisions("dc-b")),
    ("decode_gateway", subjects.outcomes("dc-b")),
    ("prefill_gateway", subjects.decode_jobs("dc-b", "d0")),  # nor send jobs
    ("decode_gateway", subjects.prefill_jobs("dc-a", "prfaas")),
    ("analytics", subjects.decisions("dc-a")),  # analytics publishes nothing
    ("analytics", subjects.load("dc-a", "p0")),
    ("analytics", subjects.JOB_CANCEL),
    ("analytics", f"$JS.API.STREAM.PURGE.{subjects.DECISIONS_STREAM}"),  # and cannot empty the stream
    ("analytics", f"$JS.API.STREAM.DELETE.{subjects.DECISIONS_STREAM}"),
    ("router", subjects.load("dc-b", "d0")),  # the router cannot fake a heartbeat
    ("router", subjects.kv_events("dc-a", "p0")),
    ("kv_index", subjects.decisions("dc-a")),
    ("kv_index", subjects.decode_jobs("dc-b", "d0")),
]
DENIED_SUBSCRIBE = [
    ("analytics", subjects.LOAD_ALL),  # analytics reads decisions and outcomes only
    ("analytics", subjects.decode_jobs("dc-b", "d0")),
    ("analytics", f"{subjects.PREFIX}.>"),
    ("router", subjects.KV_EVENTS_ALL),
    ("router", f"{subjects.PREFIX}.prefill.>"),
    ("prefill_gateway", subjects.DECISIONS_ALL),
    ("prefill_gateway", f"{subjects.PREFIX}.decode.>"),
    ("decode_gateway", f"{subjects.PREFIX}.prefill.>"),
    ("kv_index", subjects.KV_EVENTS_ALL),  # the index reads events through its JetStream consumer only
    ("kv_index", subjects.DECISIONS_ALL),
]


@pytest.mark.parametrize(("user", "subject"), DENIED_PUBLISH)
async def test_a_role_cannot_publish_outside_its_subjects(login, user: str, subject: str) -> None:
    """The server refuses the publish and says so; a subscriber with every right never sees the message."""
    spy = await login(nats_auth.LAB_USER, "dc-b")
    seen = await spy.nc.subscribe(subject)
    await settle(spy.nc)
    client = await login(user, "dc-a")
    await client.nc.publish(subject, b"forbidden")
    await client.nc.flush()
    assert await client.denied("publish", subject)
    await settle(client.nc)
    assert seen.pending_msgs == 0


@pytest.mark.parametrize(("user", "subject"), DENIED_SUBSCRIBE)
async def test_a_role_cannot_subscribe_outside_its_subjects(login, user: str, subject: str) -> None:
    """The server refuses the subscription and says so."""
    client = await login(user)
    await client.nc.subscribe(subject)
    await client.nc.flush()
    assert await client.denied("subscription", subject)


async def test_each_role_reaches_its_peers_at_the_other_site(login) -> None:
    """Allowed paths work across the gateway: heartbeats to the router, a lookup answered, a job and its reply."""
    router = await login("router", "dc-b")
    beats = await router.nc.subscribe(subjects.LOAD_ALL)
    index = await login("kv_index", "dc-a")

    async def answer(msg) -> None:
        await msg.respond(b"blocks")

    await index.nc.subscribe(subjects.KV_LOOKUP, cb=answer)
    prefill = await login("prefill_gateway", "dc-a")

    async def accept(msg) -> None:
        await msg.respond(b"accepted")
        await prefill.nc.publish(msg.reply + ".status", b"finished")  # a job's status goes to the router's inbox

    await prefill.nc.subscribe(subjects.prefill_jobs("dc-a", "prfaas"), cb=accept)
    decode = await login("decode_gateway", "dc-b")
    cancels = await decode.nc.subscribe(subjects.JOB_CANCEL)
    for c in (router, index, prefill, decode):
        await settle(c.nc)

    await prefill.nc.publish(subjects.load("dc-a", "p0"), b"load")
    assert (await beats.next_msg(timeout=DEADLINE_S)).data == b"load"
    assert (await router.nc.request(subjects.KV_LOOKUP, b"hashes", timeout=DEADLINE_S)).data == b"blocks"
    inbox = router.nc.new_inbox()
    status = await router.nc.subscribe(inbox + ".status")
    await settle(router.nc)
    await router.nc.publish(subjects.prefill_jobs("dc-a", "prfaas"), b"job", reply=inbox)
    assert (await status.next_msg(timeout=DEADLINE_S)).data == b"finished"
    await router.nc.publish(subjects.JOB_CANCEL, b"cancel")
    assert (await cancels.next_msg(timeout=DEADLINE_S)).data == b"cancel"
    assert not [e for c in (router, index, prefill, decode) for e in c.errors]


async def test_the_jetstream_paths_of_kv_transfers_and_kv_events_work_as_their_roles(login) -> None:
    """Decode gateway: its site's KV stream, a consumer, a pull, a purge; prefill gateway: chunks into it; index: events."""
    decode = await login("decode_gateway", "dc-b")
    djs = decode.nc.jetstream()
    stream = subjects.kv_transfer_stream("dc-b")
    await ensure_stream(
        djs, api.StreamConfig(name=stream, subjects=[subjects.kv_transfer_all("dc-b")], storage=api.StorageType.MEMORY)
    )
    chunk = subjects.kv_transfer("dc-b", "d0", "t1")
    await djs.add_consumer(stream, api.ConsumerConfig(durable_name="kv-t1", filter_subject=chunk))
    prefill = await login("prefill_gateway", "dc-a")
    await prefill.nc.jetstream().publish(chunk, b"chunk", timeout=DEADLINE_S)
    pull = await djs.pull_subscribe_bind(durable="kv-t1", stream=stream)
    assert [m.data for m in await pull.fetch(1, timeout=DEADLINE_S)] == [b"chunk"]
    await djs.purge_stream(stream, subject=chunk)
    await djs.delete_consumer(stream, "kv-t1")

    index = await login("kv_index", "dc-b")
    ijs = index.nc.jetstream()
    await ensure_stream(
        ijs,
        api.StreamConfig(
            name=subjects.KV_EVENTS_STREAM, subjects=[subjects.KV_EVENTS_ALL], storage=api.StorageType.MEMORY
        ),
    )
    consumer = api.ConsumerConfig(durable_name="kv-index", ack_policy=api.AckPolicy.EXPLICIT)
    await ijs.add_consumer(subjects.KV_EVENTS_STREAM, config=consumer)
    await prefill.nc.jetstream().publish(subjects.kv_events("dc-a", "p0"), b"batch", timeout=DEADLINE_S)
    events = await ijs.pull_subscribe_bind(durable="kv-index", stream=subjects.KV_EVENTS_STREAM)
    [event] = await events.fetch(1, timeout=DEADLINE_S)
    await event.ack_sync(timeout=DEADLINE_S)
    await index.nc.subscribe(subjects.kv_snapshot_request("dc-a", "p0"))  # the vLLM bridge's, for its instances
    await settle(index.nc)
    assert event.data == b"batch" and not decode.errors + prefill.errors + index.errors


async def test_analytics_reads_decisions_live_and_from_the_stream_but_cannot_change_it(login) -> None:
    """The router keeps decisions in PRFAAS_DECISIONS; analytics at the other site reads them both ways."""
    router = await login("router", "dc-b")
    await ensure_stream(
        router.nc.jetstream(),
        api.StreamConfig(
            name=subjects.DECISIONS_STREAM,
            subjects=[subjects.DECISIONS_ALL, subjects.OUTCOMES_ALL, subjects.PLANS_ALL],
            storage=api.StorageType.MEMORY,
        ),
    )
    analytics = await login("analytics", "dc-a")
    live = await analytics.nc.subscribe(subjects.DECISIONS_ALL)
    await settle(analytics.nc)
    async with asyncio.timeout(DEADLINE_S):  # until dc-b has heard of the subscription at dc-a
        while not live.pending_msgs:
            await router.nc.publish(subjects.decisions("dc-b"), b'{"decision": 1}')
            await asyncio.sleep(0.05)
    assert (await live.next_msg()).data == b'{"decision": 1}'
    kept_before = (await router.nc.jetstream().stream_info(subjects.DECISIONS_STREAM)).state.messages
    js = analytics.nc.jetstream()
    kept = await js.subscribe(
        subjects.decisions("dc-b"), stream=subjects.DECISIONS_STREAM, ordered_consumer=True
    )  # what `prfaas decisions summary` does
    assert (await kept.next_msg(timeout=DEADLINE_S)).data == b'{"decision": 1}'
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await js.purge_stream(subjects.DECISIONS_STREAM)
    assert await analytics.denied("publish", f"$JS.API.STREAM.PURGE.{subjects.DECISIONS_STREAM}")
    assert (await js.stream_info(subjects.DECISIONS_STREAM)).state.messages >= kept_before >= 1  # nothing purged


async def test_a_wrong_or_missing_password_is_refused_at_connect(cluster: Supercluster) -> None:
    """A wrong password, or none, is an authorization violation: connect fails and says why, password redacted."""
    good = cluster.user_url("dc-a", "router")
    for url in (good.replace("router:", "router:x"), cluster.servers["dc-a"].url):
        with pytest.raises(UpstreamTimeout) as refused:
            await connect(url, name="intruder", connect_timeout_s=1.0)
        assert "Authorization Violation" in refused.value.message
        assert cluster.servers["dc-a"].passwords["router"] not in refused.value.message


def test_a_service_reads_its_user_and_password_file_into_the_url(tmp_path: Path) -> None:
    """NATS_USER + NATS_PASSWORD_FILE (or NATS_PASSWORD) log in; without a user the URL is as given."""
    secret = tmp_path / "router.password"
    secret.write_text("s3cret-Pass_1\n")
    env = {"R_NATS_URL": "nats://h1:4222,nats://h2:4222", "R_NATS_USER": "router", "R_NATS_PASSWORD_FILE": str(secret)}
    assert (
        EnvReader("R_", env).nats_url("") == "nats://router:s3cret-Pass_1@h1:4222,nats://router:s3cret-Pass_1@h2:4222"
    )
    inline = {"R_NATS_USER": "router", "R_NATS_PASSWORD": "p"}
    assert EnvReader("R_", inline).nats_url("nats://h:1") == "nats://router:p@h:1"
    assert EnvReader("R_", {}).nats_url("nats://h:1") == "nats://h:1"
    bad = [
        ({"R_NATS_USER": "router"}, "R_NATS_USER"),
        ({**env, "R_NATS_PASSWORD": "p"}, "choose one"),
        ({"R_NATS_USER": "router", "R_NATS_PASSWORD_FILE": str(tmp_path / "none")}, "cannot read"),
        ({"R_NATS_USER": "router", "R_NATS_PASSWORD": "a@b"}, "(hidden)"),
        ({"R_NATS_USER": "rou:ter", "R_NATS_PASSWORD": "p"}, "R_NATS_USER"),
    ]
    for settings, says in bad:
        with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
            EnvReader("R_", settings).nats_url("nats://h:1")


def test_the_lab_plan_logs_every_service_in_as_its_role_and_writes_no_password(tmp_path: Path) -> None:
    """Services get a user and a password file; configs name passwords by variable; only nats-server's env holds them."""
    passwords = nats_auth.new_passwords(list(nats_auth.role_permissions([])))
    settings = LabSettings(nats_passwords=passwords, secrets_dir=str(tmp_path / "secrets"))
    specs = plan(load_topology("default"), NativeAddresses(tmp_path), settings)
    users = {}
    for spec in specs:
        text = "\n".join([*spec.files.values(), *(v for k, v in spec.env.items() if spec.role != "nats")])
        assert not [pw for pw in passwords.values() if pw in text], spec.name
        user = next((v for k, v in spec.env.items() if k.endswith("NATS_USER")), None)
        users[spec.name] = user
        if user is not None:
            prefix = next(k for k in spec.env if k.endswith("NATS_USER")).removesuffix("NATS_USER")
            assert spec.env[prefix + "NATS_PASSWORD_FILE"] == str(tmp_path / "secrets" / f"{user}.password")
        if spec.role == "nats":
            assert spec.env == {nats_auth.password_variable(u): f'"{pw}"' for u, pw in passwords.items()}
            conf = next(iter(spec.files.values()))
            for user in passwords:
                assert f"user: {user}, password: ${nats_auth.password_variable(user)}," in conf
    assert {spec.role: users[spec.name] for spec in specs if spec.role not in ("nats", "redis", "wan")} == {
        "kv_index": "kv_index",
        "prefill_gateway": "prefill_gateway",
        "decode_gateway": "decode_gateway",
        "router": "router",
    }


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_the_compose_project_with_nats_users_takes_every_password_from_its_variable(tmp_path: Path) -> None:
    """`prfaas lab compose --nats-users`: compose requires PRFAAS_NATS_<USER>_PASSWORD and puts it where the lab would."""
    assert main(["lab", "compose", "--nats-users", "--out", str(tmp_path)]) == 0
    files = {path.name: path.read_text() for path in tmp_path.iterdir() if path.is_file()}
    assert files == render(load_topology("default"), topology_arg="default", nats_users=True)
    passwords = nats_auth.new_passwords(list(nats_auth.role_permissions([])))
    variables = {nats_auth.password_variable(user): pw for user, pw in passwords.items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRFAAS_")} | variables
    command = ["docker-compose", "-f", str(tmp_path / COMPOSE_FILE), "config"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert services["nats-dc-a"]["environment"] == nats_auth.server_env(passwords)
    assert services["router-dc-b"]["environment"]["ROUTER_NATS_PASSWORD"] == passwords["router"]
    assert services["decode-pd-d0"]["environment"]["DECODE_GATEWAY_NATS_USER"] == "decode_gateway"
    assert f"nats://lab:{passwords['lab']}@nats-dc-b:4222" in services["kv-index"]["healthcheck"]["test"]
    assert not [pw for pw in passwords.values() if pw in "".join(files.values())]
    for variable in variables:  # compose refuses to start without any of them
        assert f"${{{variable}:?" in files[COMPOSE_FILE], variable
