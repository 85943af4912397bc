"""``prfaas lab``: run the system natively on this machine (real nats-server and redis-server)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from libs.common import subjects
from libs.common.bus import connect
from libs.common.hashing import hash_list
from libs.common.messages import BlocksStored, InstanceLoad, KvEventBatch, encode
from libs.common.telemetry import setup_logging
from libs.engine.tokenizer import ByteTokenizer
from libs.lab.servers import NatsServer, RedisServer, free_port
from services.kv_index.config import KvIndexConfig
from services.kv_index.service import KvIndexService

log = logging.getLogger(__name__)

DEMO_SITE, DEMO_INSTANCE = "dc-pd", "demo-0"
DEMO_PROMPT = (
    "You are prfaas-demo, a helpful assistant. Answer concisely and cite the documents you were given. "
    "Documents follow; each starts with a title line and ends with a blank line."
)


def add_parser(subparsers) -> None:
    """Register ``lab``."""
    lab = subparsers.add_parser("lab", help="run NATS, Redis and the services natively until Ctrl-C")
    lab.add_argument("--nats-port", type=int, help="client port of the NATS server (default: a free port)")
    lab.add_argument("--redis-port", type=int, help="port of the Redis server (default: a free port)")
    lab.add_argument("--workdir", type=Path, help="where servers keep data and logs, kept afterwards "
                     "(default: a temp dir removed at exit unless the lab failed or --keep-logs)")  # fmt: skip
    lab.add_argument("--keep-logs", action="store_true", help="keep the temp work dir (logs) after a clean exit")
    lab.add_argument("--no-demo", action="store_true", help="do not publish the demo instance's cached prefix")
    lab.add_argument("--duration-s", type=float, help="stop after this many seconds (default: run until Ctrl-C)")
    lab.add_argument("--log-level", default="WARNING", help="service log level (default %(default)s)")
    lab.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Start the servers, then the services, print how to use them, run until stopped."""
    setup_logging(args.log_level)
    temporary = args.workdir is None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prfaas-lab-"))
    nats_server = NatsServer(name="dc-pd", workdir=workdir / "nats", port=args.nats_port or free_port())
    redis_server = RedisServer(workdir=workdir / "redis", port=args.redis_port or free_port())
    clean = False
    try:
        with contextlib.ExitStack() as stack:
            print(f"starting nats-server on {nats_server.url} and redis-server on {redis_server.url} "
                  f"(logs in {workdir}) ...", file=sys.stderr)  # fmt: skip
            stack.callback(nats_server.stop)
            nats_server.start()
            stack.callback(redis_server.stop)
            redis_server.start()
            asyncio.run(_serve(args, nats_server.url, redis_server.url))
        clean = True
    finally:
        if temporary and clean and not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"lab logs kept in {workdir}", file=sys.stderr)
    return 0


async def _serve(args: argparse.Namespace, nats_url: str, redis_url: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.duration_s is not None:
        loop.call_later(args.duration_s, stop.set)
    config = KvIndexConfig(nats_url=nats_url, redis_url=redis_url)
    nc = await connect(nats_url, name="prfaas-lab")
    redis_client = aioredis.Redis.from_url(redis_url, socket_timeout=config.redis_timeout_s, retry=None)
    try:
        async with KvIndexService(nc, redis_client, config):
            demo = None if args.no_demo else asyncio.create_task(_demo_instance(nc, stop))
            print(f"kv_index is up (NATS {nats_url}, Redis {redis_url}); Ctrl-C stops the lab.", file=sys.stderr)
            if demo is not None:
                print(f"try: prfaas index lookup --nats {nats_url} --text {shlex.quote(DEMO_PROMPT)}", file=sys.stderr)
            await stop.wait()
            if demo is not None:
                demo.cancel()
                await asyncio.gather(demo, return_exceptions=True)
    finally:
        await nc.drain()
        await redis_client.aclose()


async def _demo_instance(nc, stop: asyncio.Event) -> None:
    """A pretend prefill instance that holds the demo prompt's blocks and heartbeats."""
    hashes = hash_list(ByteTokenizer().encode(DEMO_PROMPT))
    checkpoints = hashes[1::2]
    batch = KvEventBatch(
        site=DEMO_SITE,
        instance=DEMO_INSTANCE,
        seq=1,
        ts=time.time(),
        events=[BlocksStored(block_hashes=hashes), BlocksStored(block_hashes=checkpoints, kind="linear_state")],
    )
    await nc.jetstream().publish(subjects.kv_events(DEMO_SITE, DEMO_INSTANCE), encode(batch), headers={"Nats-Msg-Id": "demo-1"})
    while not stop.is_set():
        load = InstanceLoad(site=DEMO_SITE, instance=DEMO_INSTANCE, role="prefill", ts=time.time())
        await nc.publish(subjects.load(DEMO_SITE, DEMO_INSTANCE), encode(load))
        await asyncio.sleep(2.0)
