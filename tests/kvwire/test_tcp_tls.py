"""Direct TCP over mutual TLS: a transfer restores the same bytes on warm connections; peers without a valid
certificate are refused (and counted by the receiver), and a sender refuses a receiver it cannot verify."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from libs.bench import kv as kv_bench
from libs.cli import main
from libs.common.errors import BadRequest, ConfigError, TransferFailed
from libs.common.messages import KvBegin, encode
from libs.common.pki import CertFiles, CertificateAuthority, client_context, server_context
from libs.engine.build import build_backend
from libs.kvwire.format import frame
from libs.kvwire.linkstats import KvLinks
from libs.kvwire.receiver import KvReceiver, ReceiverConfig
from libs.kvwire.sender import KvSender, SenderConfig
from libs.kvwire.tcp_recv import TcpReceiverServer, TcpServerConfig
from libs.kvwire.tcp_send import TcpConfig, TcpTransport
from services.decode_gateway.config import DecodeGatewayConfig
from services.decode_gateway.service import DecodeGatewayService
from services.prefill_gateway.config import PrefillGatewayConfig
from services.prefill_gateway.senders import Senders
from tests.kvwire.support import (
    CHUNK,
    DST,
    SRC,
    Proxy,
    assert_restored,
    eventually,
    hybrid_parts,
    specs_of,
    tcp_dest,
)

HOST = "127.0.0.1"


class _Pki:
    """The lab's CA with a certificate per service, and a stranger's CA."""

    def __init__(self, directory: Path) -> None:
        ca = CertificateAuthority(directory / "lab")
        self.decode = ca.issue("decode", [HOST, "localhost"])
        self.prefill = ca.issue("prefill", [HOST])
        self.elsewhere = ca.issue("decode-elsewhere", ["decode.example"])  # the lab's CA, another host
        stranger = CertificateAuthority(directory / "stranger", common_name="another CA")
        self.rogue = stranger.issue("rogue", [HOST])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> _Pki:
    return _Pki(tmp_path_factory.mktemp("pki"))


@contextlib.asynccontextmanager
async def _tls_receiver(
    files: CertFiles, header_timeout_s: float = 2.0
) -> AsyncIterator[tuple[KvReceiver, TcpReceiverServer]]:
    receiver = KvReceiver(ReceiverConfig(max_total_bytes=64 << 20, transfer_timeout_s=30.0))
    config = TcpServerConfig(tls=server_context(files), header_timeout_s=header_timeout_s)
    async with receiver, TcpReceiverServer(receiver, config) as server:
        yield receiver, server


def _sender(links: KvLinks, files: CertFiles, attempts: int = 4, **tcp_settings) -> KvSender:
    tcp = TcpConfig(connections=2, chunk_bytes=CHUNK, tls=client_context(files), connect_timeout_s=3.0, **tcp_settings)
    return KvSender(TcpTransport(tcp), links, SenderConfig(max_attempts=attempts, retry_backoff_s=0.01))


def _manifest(sender: KvSender, tid: str, parts):
    return sender.manifest(
        transfer_id=tid, dst_site=DST, model="ref", block_size=64, num_tokens=512, specs=specs_of(parts)
    )


def _attempt(address: tuple[str, int], context: ssl.SSLContext | None, manifest) -> str:
    """Connect (over TLS when ``context`` is given), send a begin and read: how the receiver answered."""
    with socket.create_connection(address, timeout=5.0) as raw:
        try:
            sock = context.wrap_socket(raw, server_hostname=HOST) if context is not None else raw
            sock.sendall(frame(encode(KvBegin(manifest=manifest))))
            return "answered" if sock.recv(1 << 16) else "closed"
        except ssl.SSLError as e:
            return f"refused: {e.reason}"
        except OSError as e:
            return f"refused: {e!r}"


def _context_with(cert: CertFiles | None, ca: Path) -> ssl.SSLContext:
    """A client context trusting ``ca`` and presenting ``cert`` (None: no certificate)."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    return context


async def test_a_transfer_over_mutual_tls_restores_the_same_bytes_and_reuses_its_warm_connections(pki):
    """Both ends verify each other; the parts arrive byte for byte; a second transfer pays no new handshake."""
    async with _tls_receiver(pki.decode) as (receiver, server), KvLinks(SRC) as links:
        sender = _sender(links, pki.prefill)
        for i in range(2):
            parts = hybrid_parts(seed=70 + i)
            manifest = _manifest(sender, f"t-tls-{i}", parts)
            waiter = asyncio.create_task(receiver.wait(manifest.transfer_id, timeout_s=10))
            report = await sender.send(manifest, parts, tcp_dest(server))
            with await waiter as done:
                assert_restored(parts, done.parts, [s.codec for s in manifest.parts])
            assert report.attempts == 1 and report.chunks_resent == 0
        assert server.accepted_total == 2  # the two stripes of the first transfer, kept warm for the second
        await sender.transport.close()
        await eventually(lambda: server.open_connections == 0)
        assert server.refused("tls") == 0  # a sender closing its kept connections is no refusal


async def test_peers_without_a_certificate_of_the_lab_ca_are_refused_before_any_frame_and_counted(pki):
    """No certificate, one from another CA, plain TCP: each connection is refused at the handshake, none begins."""
    parts = hybrid_parts(seed=75)
    async with _tls_receiver(pki.decode) as (receiver, server), KvLinks(SRC) as links:
        manifest = _manifest(_sender(links, pki.prefill), "t-intruder", parts)
        intruders = {
            "no certificate": _context_with(None, pki.decode.ca),
            "another CA's certificate": _context_with(pki.rogue, pki.decode.ca),
            "plain TCP": None,
        }
        for name, context in intruders.items():
            answer = await asyncio.to_thread(_attempt, server.address, context, manifest)
            assert answer != "answered", name
        await eventually(lambda: server.refused("tls") == len(intruders) and server.open_connections == 0)
        assert receiver.totals.transfers_refused == 0 and receiver.active_transfers == 0  # none got to the receiver
        assert receiver.used_bytes == 0


async def test_cut_tls_connections_resume_without_resending_acknowledged_chunks(pki):
    """Every TLS connection reset mid-transfer: new handshakes, and only what the receiver lacks is sent again."""
    parts = hybrid_parts(seed=74, tokens=2048)
    async with _tls_receiver(pki.decode) as (receiver, server), KvLinks(SRC) as links:
        proxy = Proxy(server.address, cut_after=sum(p.nbytes for p in parts) // 2)  # forwards the TLS bytes as they are
        try:
            sender = _sender(links, pki.prefill, window_bytes=8 * CHUNK)
            manifest = _manifest(sender, "t-tls-cut", parts)
            waiter = asyncio.create_task(receiver.wait(manifest.transfer_id, timeout_s=20))
            report = await sender.send(manifest, parts, tcp_dest(proxy))
            with await waiter as done:
                assert_restored(parts, done.parts, ["raw"] * len(parts))
            await sender.transport.close()
        finally:
            proxy.close()
        assert proxy.cuts == 1 and report.attempts == 2 and receiver.totals.duplicate_chunks == 0
        total_chunks = sum(-(-p.nbytes // CHUNK) for p in parts)
        assert total_chunks <= report.chunks_sent <= total_chunks + 8  # at most the window goes twice


async def test_an_abort_over_tls_frees_the_receivers_memory(pki):
    """The sender's abort dials its own TLS connection: the transfer is dropped and its memory freed."""
    parts = hybrid_parts(seed=73)
    async with _tls_receiver(pki.decode) as (receiver, server), KvLinks(SRC) as links:
        sender = _sender(links, pki.prefill)
        manifest = _manifest(sender, "t-tls-abort", parts)
        waiter = asyncio.create_task(receiver.wait(manifest.transfer_id, timeout_s=10))
        stalled = asyncio.Event()  # never set: the parts after the first wait for it

        async def first_part_then_wait():
            yield parts[0]
            await stalled.wait()

        task = asyncio.create_task(sender.send(manifest, first_part_then_wait(), tcp_dest(server)))
        await eventually(lambda: receiver.active_transfers == 1)
        await sender.abort(manifest.transfer_id, tcp_dest(server), "router chose local prefill")
        assert receiver.used_bytes == 0 and receiver.active_transfers == 0
        with pytest.raises(TransferFailed, match="local prefill"):
            await waiter
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sender.transport.close()
        await eventually(lambda: server.open_connections == 0)
        assert server.refused("tls") == 0


async def test_a_peer_that_never_finishes_its_handshake_is_cut_at_the_header_deadline(pki):
    """A connection that sends half a ClientHello, or nothing, is cut after header_timeout_s and counted."""
    timeout_s = 0.3
    async with _tls_receiver(pki.decode, header_timeout_s=timeout_s) as (receiver, server):

        def stall(data: bytes) -> float:
            with socket.create_connection(server.address, timeout=10.0) as sock:
                started = time.monotonic()
                sock.sendall(data)
                while sock.recv(1 << 16):
                    pass
                return time.monotonic() - started

        hello_start = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01])  # a handshake record of 512 bytes, 1 of them sent
        elapsed = await asyncio.gather(*(asyncio.to_thread(stall, data) for data in (hello_start, b"")))
        # Lower bound: the deadline; upper: plus the selector's wake-up and a descheduled thread on a loaded machine.
        assert all(timeout_s <= s < timeout_s + 1.5 for s in elapsed), elapsed
        await eventually(lambda: server.refused("tls") == 2 and server.open_connections == 0)
        assert receiver.active_transfers == 0


@pytest.mark.parametrize("holder", ["rogue", "elsewhere"])
async def test_a_sender_refuses_a_receiver_whose_certificate_it_cannot_verify(pki, holder):
    """A receiver certificate from another CA, or from the lab's CA for another host: no transfer, no bytes held."""
    parts = hybrid_parts(seed=76)
    async with _tls_receiver(getattr(pki, holder)) as (receiver, server), KvLinks(SRC) as links:
        sender = _sender(links, pki.prefill, attempts=1)
        with pytest.raises(TransferFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await sender.send(_manifest(sender, f"t-untrusted-{holder}", parts), parts, tcp_dest(server))
        await sender.transport.close()
        assert receiver.active_transfers == 0 and receiver.used_bytes == 0


def kv_bench_args(argv: list[str]) -> argparse.Namespace:
    """``prfaas bench kv`` flags parsed as the command line does."""
    parser = argparse.ArgumentParser()
    kv_bench.add_arguments(parser)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def _tls_env(prefix: str, files: CertFiles) -> dict[str, str]:
    return {
        f"{prefix}KV_TLS_CERT": str(files.cert),
        f"{prefix}KV_TLS_KEY": str(files.key),
        f"{prefix}KV_TLS_CA": str(files.ca),
    }


@pytest.mark.parametrize("config", [PrefillGatewayConfig, DecodeGatewayConfig])
def test_a_gateway_takes_all_three_kv_tls_files_or_none(pki, config, tmp_path):
    """<PREFIX>KV_TLS_CERT, _KEY and _CA: all three turn TLS on, none leaves it off, a partial set or a missing file
    is a ConfigError naming the key."""
    prefix = "PREFILL_GATEWAY_" if config is PrefillGatewayConfig else "DECODE_GATEWAY_"
    env = _tls_env(prefix, pki.decode)
    assert config.from_env(env).kv_tls == pki.decode
    assert config.from_env({}).kv_tls is None
    partial = {k: v for k, v in env.items() if not k.endswith("_KEY")}
    with pytest.raises(ConfigError, match=f"{prefix}KV_TLS_KEY=''.*TLS needs all of"):
        config.from_env(partial)
    with pytest.raises(ConfigError, match=f"{prefix}KV_TLS_CA=.*no such file"):
        config.from_env({**env, f"{prefix}KV_TLS_CA": str(tmp_path / "missing.pem")})


async def test_the_gateways_kv_tls_settings_reach_the_decode_listener_and_the_prefill_pool(pki):
    """The decode gateway listens with mutual TLS and counts refusals in its registry; the prefill gateway's senders
    dial it over TLS (the decode side's typed refusal of an unreserved transfer comes back through the tunnel)."""
    decode_env = {
        **_tls_env("DECODE_GATEWAY_", pki.decode),
        "DECODE_GATEWAY_BACKEND": "simulated:h20",
        "DECODE_GATEWAY_MODEL": "kimi-linear-1t",
        "DECODE_GATEWAY_BYTE_SCALE": "0.001",
        "DECODE_GATEWAY_TRANSPORTS": "tcp",
    }
    decode_config = DecodeGatewayConfig.from_env(decode_env)
    nc = NatsClient()  # never connected: only the KV listener runs here
    service = DecodeGatewayService(nc, build_backend(decode_config.backend), decode_config)
    prefill_config = PrefillGatewayConfig.from_env(_tls_env("PREFILL_GATEWAY_", pki.prefill))
    parts = hybrid_parts(seed=77)
    async with service.receiver, service.tcp, KvLinks(SRC) as links:
        senders = Senders(nc, links, prefill_config)
        sender = senders.pick("tcp", 0)
        assert sender.transport.config.tls is not None and sender.transport.config.tls.check_hostname
        with pytest.raises(BadRequest, match="t-unreserved has no reservation"):
            await sender.send(_manifest(sender, "t-unreserved", parts), parts, tcp_dest(service.tcp))
        await senders.close()
        answer = await asyncio.to_thread(_attempt, service.tcp.address, None, _manifest(sender, "t-plain", parts))
        assert answer != "answered"
        refused = "prfaas_kv_tcp_refused_total"
        await eventually(lambda: service.registry.get_sample_value(refused, {"reason": "tls"}) == 1)
        assert service.registry.get_sample_value(refused, {"reason": "transfer_refused"}) == 1


def test_the_kv_bench_reports_tls_goodput_and_its_ratio_to_the_plain_transfer_of_each_round(capsys):
    """``prfaas bench kv --tls`` needs unpaced direct TCP; its figures are the TLS goodput and the per-round ratio to
    the plain transfer, median and range, printed beside the plain figure (a run takes ~15 s: measured by hand)."""
    assert main(["bench", "kv", "--tls", "--transport", "jetstream"]) == 2
    assert "--tls needs --transport tcp" in capsys.readouterr().err
    opts = kv_bench.options(kv_bench_args(["--tls", "--json"]))
    rounds = [
        {
            "baseline_gbps": 10.0,
            "goodput_gbps": g,
            "ratio": g / 10.0,
            "chunks_resent": 0,
            "tls_goodput_gbps": t,
            "tls_vs_plain": t / g,
        }
        for g, t in ((8.0, 2.0), (6.0, 3.0), (9.0, 2.7))
    ]
    figures = kv_bench._figures(opts, 4 << 20, rounds)
    assert figures["tls_goodput_gbps"] == {"median": 2.7, "min": 2.0, "max": 3.0}
    assert figures["tls_vs_plain"] == pytest.approx({"median": 0.3, "min": 0.25, "max": 0.5})
    text = kv_bench._text(figures)
    assert "kvwire tcp + TLS   median 2.70 (range 2.00-3.00) Gbps" in text
    assert "tls_vs_plain       median 0.30 (range 0.25-0.50)" in text and "kvwire tcp         median 8.00" in text
