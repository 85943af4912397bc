"""Which CPUs a benchmark's processes may use: the router side (router, clients) and the services side.

``split`` is a deployment's placement: the first half of this process's CPUs take the router and
this process (the clients), the other half nats-server, Redis, the KV index, the gateways and the
link relay (``os.sched_setaffinity``, inherited by the processes started within ``services()``).
``shared`` lets every process run on every CPU. Where affinity cannot be set or fewer than two CPUs
are available, ``split`` falls back to ``shared`` and says why.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class Placement:
    """Which CPUs the router side (router, clients) and the services side (NATS, Redis, index, gateways) may use."""

    def __init__(self, requested: str) -> None:
        self.requested = requested
        self.name, self.note = "shared", ""
        self.front: set[int] | None = None
        self.back: set[int] | None = None
        self._original: set[int] | None = None
        if requested == "split":
            self._split()

    def _split(self) -> None:
        if not hasattr(os, "sched_setaffinity"):
            self.note = "split placement needs os.sched_setaffinity (Linux); ran shared"
            return
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            self.note = f"split placement needs two CPUs, this process may use {len(cpus)}; ran shared"
            return
        front, back = set(cpus[: len(cpus) // 2]), set(cpus[len(cpus) // 2 :])
        try:
            os.sched_setaffinity(0, back)
            os.sched_setaffinity(0, set(cpus))
        except OSError as e:
            self.note = f"cannot set CPU affinity ({e}); ran shared"
            return
        self.name, self.front, self.back = "split", front, back

    def __enter__(self) -> Placement:
        """Move this process onto the router side's CPUs (every thread it has)."""
        if self.front is not None:
            self._original = os.sched_getaffinity(0)
            _pin_process(os.getpid(), self.front)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._original is not None:
            _pin_process(os.getpid(), self._original)

    @contextlib.contextmanager
    def services(self):
        """Within: processes started from this thread inherit the services side's CPUs."""
        if self.back is None:
            yield
            return
        os.sched_setaffinity(0, self.back)
        try:
            yield
        finally:
            os.sched_setaffinity(0, self.front)

    def describe(self) -> dict:
        """What ran, and the CPUs each process was allowed (from ``/proc``)."""
        return {
            "name": self.name,
            "requested": self.requested,
            "note": self.note,
            "router_side_cpus": sorted(self.front or []),
            "services_side_cpus": sorted(self.back or []),
            "processes": {name: _allowed_cpus(pid) for name, pid in processes().items()},
        }


def _pin_process(pid: int, cpus: set[int]) -> None:
    """Set the affinity of every thread of ``pid``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


def _allowed_cpus(pid: int) -> str:
    """The CPUs a process's threads may use, as ``/proc`` lists them (the union, if they differ)."""
    lists = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            status = (task / "status").read_text()
            lists.add(next((ln.split()[1] for ln in status.splitlines() if ln.startswith("Cpus_allowed_list")), "?"))
    return " | ".join(sorted(lists))


def processes() -> dict[str, int]:
    """This process (``bench``) and its children, by module (``router``) or program (``nats-server``): pids.

    A second process of one kind is ``<kind>#2``, in the order the children were started.
    """
    out = {"bench": os.getpid()}
    with contextlib.suppress(OSError):
        tasks = Path("/proc/self/task").iterdir()
        for pid in sorted({int(c) for task in tasks for c in (task / "children").read_text().split()}):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                name = argv[argv.index("-m") + 1] if "-m" in argv else Path(argv[0].split()[0]).name
                name = name.removeprefix("services.").removeprefix("libs.lab.")
                out[name if name not in out else f"{name}#{sum(k.split('#')[0] == name for k in out) + 1}"] = pid
    return out
