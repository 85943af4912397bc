"""A stand-in for an engine's KV event publisher, run as its own process as a real engine is.

The process follows vLLM's ``ZmqEventPublisher``: a bound PUB socket; batches numbered from 0
as soon as it runs, whoever listens; each batch kept in a replay buffer of ``--buffer-steps``
batches; with ``--replay-port``, a ROUTER socket answers ``[b"", start_seq]`` with every buffered
batch from ``start_seq`` on, then a message whose seq is -1 (with the topic frame in current
releases, without it in older ones and SGLang).

Commands arrive as JSON lines on stdin, one batch each: ``{"events": [...], "drop": false}``
(``drop``: number and buffer the batch but do not send it, as a PUB socket drops under load); each
is answered with ``{"seq": n, "hashes": [...]}`` on stdout.
``EnginePublisher`` drives the process (tests and `prfaas bench bridge` use it to stand in for an engine).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from libs.lab.vllm_wire import FAMILIES, Family, Hash

REPO_ROOT = Path(__file__).resolve().parents[2]
END_SEQ = (-1).to_bytes(8, "big", signed=True)
TOPIC = b"kv-events"


def _to_json(h: Hash) -> Any:
    return h.hex() if isinstance(h, bytes) else h


def _from_json(h: Any) -> Hash:
    return bytes.fromhex(h) if isinstance(h, str) else h


def _event(family: Family, spec: dict) -> tuple[Any, list[Hash]]:
    """The wire event for one command entry, and the engine hashes it names."""
    op = spec["op"]
    if op == "store":
        parent = None if spec.get("parent") is None else _from_json(spec["parent"])
        hashes = family.chain(spec["tokens"], spec["block_size"], parent, salt=spec.get("salt", "").encode())
        opts = {k: v for k, v in spec.items() if k not in ("op", "tokens", "block_size", "parent", "salt")}
        return family.stored(hashes, parent, spec["tokens"], spec["block_size"], **opts), hashes
    if op == "remove":
        hashes = [_from_json(h) for h in spec["hashes"]]
        opts = {k: v for k, v in spec.items() if k not in ("op", "hashes")}
        return family.removed(hashes, **opts), hashes
    if op == "future":
        hashes = [_from_json(h) for h in spec["hashes"]]
        return family.future_event(hashes), hashes
    return family.cleared(), []


def _batch(family: Family, specs: list[dict]) -> tuple[bytes, list[list[Any]]]:
    """The payload of one commanded batch, and the hashes each of its events names."""
    events, named = [], []
    for spec in specs:
        event, hashes = _event(family, spec)
        events.append(event)
        named.append([_to_json(h) for h in hashes])
    return family.batch(time.time(), events), named


def serve(family: Family, pub_port: int, replay_port: int | None, buffer_steps: int) -> None:
    """Publish batches commanded on stdin, answer replay requests, until stdin closes."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.set_hwm(100_000)  # vLLM's default
    pub.bind(f"tcp://127.0.0.1:{pub_port}")
    replay = None
    if replay_port is not None:
        replay = ctx.socket(zmq.ROUTER)
        replay.setsockopt(zmq.LINGER, 0)
        replay.bind(f"tcp://127.0.0.1:{replay_port}")
    buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=buffer_steps)
    next_seq = 0
    stdin, pending = sys.stdin.fileno(), b""
    poller = zmq.Poller()
    poller.register(stdin, zmq.POLLIN)
    if replay is not None:
        poller.register(replay, zmq.POLLIN)
    print(json.dumps({"ready": True}), flush=True)
    while True:
        ready = dict(poller.poll())
        if replay is not None and replay in ready:
            client, _, start = replay.recv_multipart()
            start_seq = int.from_bytes(start, "big")
            head = [client, b""] + ([TOPIC] if family.replay_has_topic else [])
            end_head = [client, b""] + ([b""] if family.replay_has_topic else [])
            for seq, payload in buffer:
                if seq >= start_seq:
                    replay.send_multipart([*head, seq.to_bytes(8, "big"), payload])
            replay.send_multipart([*end_head, END_SEQ, b""])
        if stdin in ready:
            chunk = os.read(stdin, 1 << 16)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                command = json.loads(line)
                payload, named = _batch(family, command["events"])
                seq, next_seq = next_seq, next_seq + 1
                if not command.get("drop"):
                    pub.send_multipart([TOPIC, seq.to_bytes(8, "big"), payload])
                buffer.append((seq, payload))
                print(json.dumps({"seq": seq, "hashes": named}), flush=True)
    pub.close()
    if replay is not None:
        replay.close()
    ctx.term()


class EnginePublisher:
    """Drives a publisher process from a test: start, send batches, stop."""

    def __init__(
        self, proc: asyncio.subprocess.Process, family: Family, pub_port: int, replay_port: int | None
    ) -> None:
        self.proc = proc
        self.family = family
        self.pub_port = pub_port
        self.replay_port = replay_port

    @classmethod
    async def start(
        cls, family: str, pub_port: int, replay_port: int | None = None, buffer_steps: int = 10_000
    ) -> EnginePublisher:
        """Start the process and wait until its sockets are bound."""
        args = ["--family", family, "--pub-port", str(pub_port), "--buffer-steps", str(buffer_steps)]
        if replay_port is not None:
            args += ["--replay-port", str(replay_port)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "libs.lab.vllm_publisher",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO_ROOT,
        )
        publisher = cls(proc, FAMILIES[family], pub_port, replay_port)
        try:
            if await publisher._answer() != {"ready": True}:
                raise RuntimeError("publisher process did not report ready")
        except BaseException:
            await publisher.stop()
            raise
        return publisher

    def endpoint(self, site: str, instance: str) -> str:
        """This publisher as a ``KV_INDEX_ZMQ_ENDPOINTS`` item."""
        replay = f"|tcp://127.0.0.1:{self.replay_port}" if self.replay_port is not None else ""
        return f"tcp://127.0.0.1:{self.pub_port}{replay}={site}/{instance}"

    async def send(self, *events: dict, drop: bool = False) -> tuple[int, list[list[Any]]]:
        """Publish one batch of the given events; returns its seq and the hashes each event names."""
        return await self._command({"events": list(events), "drop": drop})

    async def send_many(self, batches: list[list[dict]], drop: bool = False) -> list[int]:
        """Publish several batches back to back (answers read while writing); returns their seqs."""

        async def read_all() -> list[dict]:
            return [await self._answer() for _ in batches]

        answers = asyncio.ensure_future(read_all())
        try:
            self.proc.stdin.write(
                "".join(json.dumps({"events": events, "drop": drop}) + "\n" for events in batches).encode()
            )
            await self.proc.stdin.drain()
            return [answer["seq"] for answer in await answers]
        finally:
            answers.cancel()

    async def _command(self, command: dict) -> tuple[int, list[list[Any]]]:
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        await self.proc.stdin.drain()
        answer = await self._answer()
        return answer["seq"], answer["hashes"]

    async def _answer(self) -> dict:
        line = await asyncio.wait_for(self.proc.stdout.readline(), 10)
        if not line:
            raise RuntimeError(f"publisher process exited ({await self.proc.wait()})")
        return json.loads(line)

    async def stop(self) -> None:
        """Close its stdin and wait for it to exit (killed after 5 s)."""
        if self.proc.returncode is None:
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def store(tokens: list[int], parent: Any = None, block_size: int = 16, **opt: Any) -> dict:
    """A store command entry (``opt``: medium, lora_name, extra_keys, group_idx, kind, locality, salt)."""
    return {"op": "store", "tokens": tokens, "parent": parent, "block_size": block_size, **opt}


def remove(hashes: list[Any], **opt: Any) -> dict:
    """A remove command entry (``opt``: medium, group_idx, locality)."""
    return {"op": "remove", "hashes": hashes, **opt}


def clear() -> dict:
    """An all-blocks-cleared command entry."""
    return {"op": "clear"}


def main() -> None:
    """Run the publisher process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    parser.add_argument("--pub-port", type=int, required=True)
    parser.add_argument("--replay-port", type=int)
    parser.add_argument("--buffer-steps", type=int, default=10_000)
    args = parser.parse_args()
    serve(FAMILIES[args.family], args.pub_port, args.replay_port, args.buffer_steps)


if __name__ == "__main__":
    main()
