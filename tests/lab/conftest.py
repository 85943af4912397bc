"""A supercluster as `lab up` runs it (NATS users per role, TLS between sites), shared by the access-control tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from libs.lab.servers import Supercluster

SECURE_SITES = ["dc-a", "dc-b"]


@pytest.fixture(scope="session")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supercluster]:
    """Two sites with the lab's users (fresh passwords) whose gateways speak mutually authenticated TLS."""
    sc = Supercluster(SECURE_SITES, workdir=tmp_path_factory.mktemp("secure"), auth=True, tls=True).start()
    try:
        yield sc
    finally:
        sc.stop()
