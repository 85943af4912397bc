"""``prfaas bench wan --breaker-rounds N``: the router's link breaker on a default lab, its link cut and restored N times.

Two streams run against the lab's router: requests whose prompt is above the lab's threshold, one
every ``--breaker-interval-s`` (open loop: requests held by the cut link do not hold the next ones
back), and the decision a request would get, asked every ``_EXPLAIN_S`` of ``/v1/route/explain``
(the same ``decide`` without running it: the router's state sampled finely without loading the one
local prefill instance, which has to carry every request while the link is open). Each round: traffic
until a request is prefilled remotely, then the link is cut (``prfaas lab link dc-a dc-b --down``:
the relay holds every byte, NATS gateway traffic included) until a decision keeps a prompt local
naming the open link, and ``_OPEN_WATCH_S`` more; then it is restored (``--up``) until a decision
sends one remote again. Figures (``breaker.*``):

- ``cut_to_local_s``: from the cut (its control call returned) to the first decision that keeps a
  prompt local because the link is open (median of the rounds; a round starts once the router's
  ``/metrics`` shows the breaker closed, the last round's probe back);
- ``failed_attempts_after_cut``: requests first decided from that decision up to the first remote one
  after the restore (the probe included) that paid a failed remote attempt: one that was decided
  again after it (all rounds; target 0); ``failed_after_cut_reasons``: what those attempts failed on;
- ``restore_to_remote_s``: from the restore to the first remote decision (median);
- ``failed_before_open``: requests decided between the cut and that first avoiding decision that paid
  a failed remote attempt (sent into the cut link before the router could know); ``lost_requests``
  and ``lost_reasons``: requests that failed, and why (a partition loses none; while the link is open
  the one local prefill instance carries everything, and on a loaded machine its queue may refuse);
  ``requests``; ``open_reasons``: the first avoiding decision's reason per round (which breaker
  condition opened the link).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import msgspec
import nats
import openai

from libs.common import subjects
from libs.common.bus import settle
from libs.common.errors import ConfigError
from libs.lab.runstate import router_site, stop_lab
from libs.lab.up import start_detached
from libs.lab.wan_server import change_link

LinkChange = Callable[[bool], Awaitable[None]]  # await change(False) cuts the link, change(True) restores it
Round = tuple[float, float, float, float, str]  # cut, first avoiding decision, restore, first remote one; its reason
_PROMPT = "A cut link is routed around at once and used again once it works. " * 20  # ~1,400 tokens (t: 1,212)
_EXPLAIN_S = 0.05  # between two explained decisions
_OPEN_WATCH_S = 2.0  # traffic while the link is open, after the first decision avoiding it
_PHASE_TIMEOUT_S = 30.0  # the longest wait for a remote decision, or for the first avoiding one
_DRAIN_TIMEOUT_S = 90.0  # requests held by the cut link fall back when their lease (10 s) runs out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The breaker's flags."""
    parser.add_argument(
        "--breaker-rounds",
        type=int,
        default=0,
        help="cut and restore a default lab's link this many times to time the router's link breaker (default 0: not)",
    )
    parser.add_argument(
        "--breaker-interval-s",
        type=float,
        default=1.0,
        help="between the breaker rounds' requests (default %(default)s)",
    )


def figures(args: argparse.Namespace) -> dict:
    """``{"breaker": ...}`` measured on a lab started for it, or nothing without ``--breaker-rounds``."""
    if args.breaker_rounds <= 0:
        return {}
    if args.breaker_interval_s <= 0:
        raise ConfigError("--breaker-interval-s must be > 0")
    with tempfile.TemporaryDirectory(prefix="prfaas-breaker-") as tmp:
        run_dir = Path(tmp)
        print("breaker: starting a default lab ...", file=sys.stderr, flush=True)
        status = start_detached(run_dir, "default", log_level="WARNING", ready_timeout_s=60.0)
        try:
            control_url = status["links"][0]["control_url"]

            async def change(up: bool) -> None:
                await asyncio.to_thread(change_link, control_url, {"up": up})

            return {"breaker": asyncio.run(measure(status, change, args.breaker_rounds, args.breaker_interval_s))}
        finally:
            stop_lab(run_dir)


async def measure(status: dict, change: LinkChange, rounds: int, interval_s: float) -> dict:
    """Cut and restore the lab's link ``rounds`` times under open-loop traffic; the figures."""
    site = router_site(status)
    remote = next(p["site"] for p in status["processes"] if p["role"] == "prefill_gateway" and p["site"] != site)
    async with _Traffic(status, site, interval_s) as traffic:
        marks = [await _round(traffic, change, f"link {remote}->{site}") for _ in range(rounds)]
        await traffic.drain()
    return _figures(traffic, marks)


async def _round(traffic: _Traffic, change: LinkChange, link: str) -> Round:
    """One cut and restore, on the wall clock (the routers' decisions are stamped with it)."""
    await traffic.closed(link)  # the last round's probe has come back
    await traffic.first(lambda d: d["route"] == "remote", time.time(), traffic.requests)  # the link carries KV
    await change(False)
    cut = time.time()  # the change is in force once its control call returned
    opened = f"{link} open since"
    avoiding = await traffic.first(lambda d: d["route"] == "local" and opened in d["decision"]["reason"], cut)
    await asyncio.sleep(_OPEN_WATCH_S)  # a window of traffic while the link is open, not a precondition
    await change(True)
    restored = time.time()
    back = (await traffic.first(lambda d: d["route"] == "remote", restored))["ts"]
    avoided = avoiding["ts"]
    print(
        f"breaker: avoided {avoided - cut:.2f}s after the cut, remote {back - restored:.2f}s after the restore",
        file=sys.stderr,
        flush=True,
    )
    return cut, avoided, restored, back, avoiding["decision"]["reason"]


def _figures(traffic: _Traffic, marks: list[Round]) -> dict:
    def paid(start: float, end: float) -> list[str]:
        return [
            events[-1]["decision"]["fallback_of"]
            for events in traffic.requests.values()
            if start <= events[0]["ts"] <= end and _paid(events)
        ]

    cut_to_local = [avoided - cut for cut, avoided, *_ in marks]
    restore_to_remote = [back - restored for _, _, restored, back, _ in marks]
    after_cut = [reason for _, avoided, _, back, _ in marks for reason in paid(avoided, back)]
    return {
        "cut_to_local_s": statistics.median(cut_to_local),
        "cut_to_local_range_s": [min(cut_to_local), max(cut_to_local)],
        "failed_attempts_after_cut": len(after_cut),
        "failed_after_cut_reasons": after_cut,
        "restore_to_remote_s": statistics.median(restore_to_remote),
        "restore_to_remote_range_s": [min(restore_to_remote), max(restore_to_remote)],
        "failed_before_open": sum(len(paid(cut, avoided - 1e-6)) for cut, avoided, *_ in marks),
        "open_reasons": [reason for *_, reason in marks],
        "lost_requests": len(traffic.errors),
        "lost_reasons": traffic.errors,
        "requests": len(traffic.requests),
        "rounds": len(marks),
    }


def _paid(events: list[dict]) -> bool:
    """A remote attempt of this request failed: a decision sending its prefill to another site was not its last."""
    return any(e["decision"]["prefill_site"] != e["site"] for e in events[:-1])


class _Traffic:
    """Requests sent open loop and decisions explained, against the lab's router; what its site published of them."""

    def __init__(self, status: dict, site: str, interval_s: float) -> None:
        self.status, self.site, self.interval_s = status, site, interval_s
        self.requests: dict[str, list[dict]] = {}  # request id -> its decision events (attempt 0 first)
        self.explained: dict[str, list[dict]] = {}  # the same shape, for the explained decisions
        self.outcomes: dict[str, dict] = {}
        self.errors: list[str] = []  # why requests failed (the client got an error): lost
        self._arrived = asyncio.Condition()
        self._inflight: set[asyncio.Task] = set()

    async def __aenter__(self) -> _Traffic:
        self.nc = await nats.connect(self.status["sites"][self.site]["nats_url"], connect_timeout=5)
        await self.nc.subscribe(subjects.decisions(self.site), cb=self._on_decision)
        await self.nc.subscribe(subjects.outcomes(self.site), cb=self._on_outcome)
        await settle(self.nc)
        key = self.status["api_key"] or "unused"
        base = self.status["router_url"] + "/v1"
        self.client = openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0, timeout=_DRAIN_TIMEOUT_S)
        self.http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"})
        self._loops = [asyncio.create_task(self._send()), asyncio.create_task(self._explain(base))]
        return self

    async def __aexit__(self, *exc) -> None:
        for task in [*self._loops, *self._inflight]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._inflight, return_exceptions=True)
        await self.http.close()
        await self.client.close()
        await self.nc.close()

    async def _on_decision(self, msg) -> None:
        event = msgspec.json.decode(msg.data)
        async with self._arrived:
            self.requests.setdefault(event["request_id"], []).append(event)
            self._arrived.notify_all()

    async def _on_outcome(self, msg) -> None:
        event = msgspec.json.decode(msg.data)
        async with self._arrived:
            self.outcomes[event["request_id"]] = event
            self._arrived.notify_all()

    async def _send(self) -> None:
        for i in itertools.count():
            task = asyncio.create_task(self._one(i))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            await asyncio.sleep(self.interval_s)

    async def _one(self, i: int) -> None:
        try:
            await self.client.completions.create(model=self.status["model"], prompt=f"{i} {_PROMPT}", max_tokens=2)
        except openai.APIError as e:
            self.errors.append(str(e))
            print(f"breaker: request {i} failed: {e}", file=sys.stderr, flush=True)

    async def _explain(self, base: str) -> None:
        """The decision a fresh prompt (no cached prefix anywhere) would get, every ``_EXPLAIN_S``."""
        for i in itertools.count():
            body = {"model": self.status["model"], "prompt": f"explain {i} {_PROMPT}", "max_tokens": 2}
            async with self.http.post(base + "/route/explain", json=body) as resp:
                event = await resp.json() if resp.status == 200 else None
            if event is not None:
                async with self._arrived:
                    self.explained[event["request_id"]] = [event]
                    self._arrived.notify_all()
            await asyncio.sleep(_EXPLAIN_S)

    async def first(self, found: Callable[[dict], bool], since: float, source: dict | None = None) -> dict:
        """The first decision (explained, or of ``source``) stamped at or after ``since`` for which ``found`` holds."""
        source = self.explained if source is None else source
        async with asyncio.timeout(_PHASE_TIMEOUT_S), self._arrived:
            while True:
                hits = [e[0] for e in source.values() if e[0]["ts"] >= since and found(e[0])]
                if hits:
                    return min(hits, key=lambda d: d["ts"])
                await self._arrived.wait()

    async def closed(self, link: str) -> None:
        """Until the router's ``/metrics`` shows ``link``'s breaker closed (polled: a scrape is its only report)."""
        src, dst = link.removeprefix("link ").split("->")
        labels = (f'src_site="{src}"', f'dst_site="{dst}"')
        async with asyncio.timeout(_PHASE_TIMEOUT_S):
            while True:
                async with self.http.get(self.status["router_url"] + "/metrics") as resp:
                    lines = (await resp.text()).splitlines()
                gauge = [
                    ln for ln in lines if ln.startswith("prfaas_router_link_breaker{") and all(x in ln for x in labels)
                ]
                if gauge and float(gauge[0].split()[-1]) == 0:
                    return
                await asyncio.sleep(_EXPLAIN_S)

    async def drain(self) -> None:
        """Stop sending; wait for every request to end and its outcome to arrive."""
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        async with asyncio.timeout(_DRAIN_TIMEOUT_S):
            await asyncio.gather(*self._inflight)
            async with self._arrived:  # an outcome leaves at most 50 ms after its response
                await self._arrived.wait_for(lambda: not set(self.requests) - set(self.outcomes))
