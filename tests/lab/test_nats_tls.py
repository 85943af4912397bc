"""TLS between sites: the gateways of a supercluster present certificates of one CA and refuse a peer without one."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import nats
import pytest

from libs.common.bus import settle
from libs.common.pki import CertFiles, CertificateAuthority
from libs.lab.servers import NatsServer, Supercluster

DEADLINE_S = 15.0  # the site's TLS handshake timeout is 3 s (a silent peer is refused after it); 5x that


@pytest.fixture
def cluster(secure_cluster: Supercluster) -> Supercluster:
    """Two sites whose gateways speak mutually authenticated TLS (certificates of the cluster's CA), with users."""
    return secure_cluster


def _varz(server: NatsServer) -> dict:
    with urllib.request.urlopen(server.monitor_url + "/varz", timeout=2.0) as resp:
        return json.loads(resp.read())


def _gatewayz(server: NatsServer) -> dict:
    with urllib.request.urlopen(server.monitor_url + "/gatewayz", timeout=2.0) as resp:
        return json.loads(resp.read())


async def test_sites_join_over_verified_tls_and_messages_cross(cluster: Supercluster) -> None:
    """Each site requires and verifies TLS on its gateway; a message published at dc-a reaches dc-b."""
    for server in cluster.servers.values():
        gateway = _varz(server)["gateway"]
        assert gateway["tls_required"] and gateway["tls_verify"], gateway
    receiver = await nats.connect(cluster.url("dc-b"))
    sender = await nats.connect(cluster.url("dc-a"))
    try:
        sub = await receiver.subscribe("prfaas.v1.load.dc-a.p0")
        await settle(receiver)
        async with asyncio.timeout(DEADLINE_S):  # until dc-a has heard of the subscription at dc-b
            while not sub.pending_msgs:
                await sender.publish("prfaas.v1.load.dc-a.p0", b"over tls")
                await asyncio.sleep(0.05)
        assert (await sub.next_msg()).data == b"over tls"
    finally:
        await sender.close()
        await receiver.close()


def test_a_gateway_without_a_certificate_of_the_lab_ca_is_refused(cluster: Supercluster) -> None:
    """A server trusting the lab CA but holding another CA's certificate, and one without TLS, never join dc-a."""
    site = cluster.servers["dc-a"]
    foreign = CertificateAuthority(cluster.workdir / "foreign", "another CA").issue("intruder", ["127.0.0.1"])
    intruders = [
        NatsServer(
            name="intruder",
            workdir=cluster.workdir / "intruder",
            gateways={"dc-a": site.gateway_port},
            gateway_tls=CertFiles(foreign.cert, foreign.key, cluster.ca.ca_path),
        ),
        NatsServer(name="plain", workdir=cluster.workdir / "plain", gateways={"dc-a": site.gateway_port}),
    ]
    log = site.workdir / f"{site.name}.log"
    before = log.read_text()
    try:
        for intruder in intruders:
            intruder.launch()  # never healthy: its JetStream waits for a supercluster it cannot join
        reasons = ("client didn't provide a certificate", "TLS handshake timeout")  # foreign cert, no TLS
        end = time.monotonic() + DEADLINE_S
        while not all(reason in log.read_text().removeprefix(before) for reason in reasons):
            assert time.monotonic() < end, f"dc-a never refused both intruders:\n{log.read_text()[len(before) :]}"
            time.sleep(0.1)
        gateways = _gatewayz(site)
        assert set(gateways.get("inbound_gateways") or {}) == {"dc-b"}, gateways
        assert set(gateways.get("outbound_gateways") or {}) == {"dc-b"}, gateways
    finally:
        for intruder in intruders:
            intruder.stop()
