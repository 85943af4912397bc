"""KV transfer between sites: manifest and chunks, codecs, direct TCP and JetStream, pacing, resume.

Prefill side (one ``KvLinks`` per process, shared by every transfer)::

    links = KvLinks("dc-prfaas", LinkConfig(budgets_gbps={"dc-pd": 10.0}), nc=nc)
    await links.start()   # publishes LinkStats; shares each pair's budget with the site's other processes
    transport = TcpTransport()                          # or JetStreamTransport(nc)
    sender = KvSender(transport, links)
    manifest = sender.manifest(transfer_id=..., dst_site="dc-pd", model=..., block_size=64,
                               num_tokens=n, specs=backend.plan_parts(n))   # PartSpecs; set codec per part
    report = await sender.send(manifest, engine_parts_async_iterator, Destination("dc-pd", "decode-0", host, port))
    await transport.close()   # a TcpTransport keeps its connections per (host, port) for later transfers

``TcpTransport(TcpConfig(connections=1), pool=other.pool)`` shares another transport's connections
(``ConnectionPool``: warm stripes claimed per transfer, kept alive, closed after ``pool_idle_s``).

Decode side::

    receiver = KvReceiver(ReceiverConfig(max_total_bytes=...))
    async with receiver, TcpReceiverServer(receiver), JetStreamReceiver(nc, receiver, "dc-pd", "decode-0"):
        with await receiver.wait(transfer_id, timeout_s=30) as transfer:   # every part verified
            use(transfer.parts)                                            # then the memory is freed

Routers read ``LinkStats`` on ``subjects.LINK_ALL`` with ``messages.link_stats_decoder``: one per
sending process and pair (``sender`` names the process), to be added up per pair. The processes'
share announcements travel on ``subjects.link_share`` (``prfaas.v1.linkshare.<src>.<dst>``),
outside ``LINK_ALL``.
"""

from libs.common.state_parts import PartSpec
from libs.kvwire.format import build_manifest
from libs.kvwire.js_recv import JetStreamReceiver, JetStreamReceiverConfig
from libs.kvwire.js_send import JetStreamConfig, JetStreamTransport
from libs.kvwire.link import LinkConfig
from libs.kvwire.linkstats import KvLinks
from libs.kvwire.pool import ConnectionPool
from libs.kvwire.receiver import KvReceiver, ReceivedTransfer, ReceiverConfig
from libs.kvwire.sender import Destination, KvSender, SenderConfig, SendReport
from libs.kvwire.tcp_recv import TcpReceiverServer, TcpServerConfig
from libs.kvwire.tcp_send import TcpConfig, TcpTransport

__all__ = [
    "ConnectionPool",
    "Destination",
    "JetStreamConfig",
    "JetStreamReceiver",
    "JetStreamReceiverConfig",
    "JetStreamTransport",
    "KvLinks",
    "KvReceiver",
    "KvSender",
    "LinkConfig",
    "PartSpec",
    "ReceivedTransfer",
    "ReceiverConfig",
    "SendReport",
    "SenderConfig",
    "TcpConfig",
    "TcpReceiverServer",
    "TcpServerConfig",
    "TcpTransport",
    "build_manifest",
]
