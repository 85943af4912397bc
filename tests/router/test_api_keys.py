"""API keys held as SHA-256 digests and per-client rate limits (429 with Retry-After)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib

import aiohttp
import pytest

from libs.common.errors import ConfigError
from services.router.auth import RateLimited, RateLimiter, digest
from services.router.config import RouterConfig
from tests.router.conftest import HTTP_TIMEOUT

BASE_ENV = {"ROUTER_THRESHOLD_TOKENS": "8192"}
KEY_ONE, KEY_TWO = "k-one-9f3a", "k-two-77c1"


def sha(key: str) -> bytes:
    """The raw digest the router keeps for ``key``."""
    return hashlib.sha256(key.encode()).digest()


def test_keys_are_read_as_digests_and_the_plain_text_is_not_kept(tmp_path):
    """Plain keys are hashed at load; hashes and a file of hashes are read; no field holds a key's text."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# router keys\n{digest('from-file')}  # ops\n\n")
    env = BASE_ENV | {
        "ROUTER_API_KEYS": KEY_ONE,
        "ROUTER_API_KEY_HASHES": digest(KEY_TWO),
        "ROUTER_API_KEYS_FILE": str(keys_file),
    }
    config = RouterConfig.from_env(env)
    assert config.api_key_digests == (sha(KEY_ONE), sha(KEY_TWO), sha("from-file"))
    held = repr(config) + repr(dataclasses.astuple(config))
    assert KEY_ONE not in held and KEY_ONE.encode().hex() not in held
    assert digest(KEY_ONE) == "sha256:" + hashlib.sha256(KEY_ONE.encode()).hexdigest()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ROUTER_API_KEY_HASHES": "sha256:abc"}, "ROUTER_API_KEY_HASHES"),
        ({"ROUTER_API_KEY_HASHES": "md5:" + "0" * 64}, "ROUTER_API_KEY_HASHES"),
        ({"ROUTER_API_KEYS_FILE": "/nonexistent/keys"}, "ROUTER_API_KEYS_FILE"),
        ({"ROUTER_RATE_LIMIT_BURST": "0"}, "ROUTER_RATE_LIMIT_BURST"),
    ],
)
def test_bad_key_settings_name_the_key(env, named):
    """A malformed digest, an unreadable keys file or a zero burst is a config error naming the setting."""
    with pytest.raises(ConfigError, match=named):
        RouterConfig.from_env(BASE_ENV | env)


def test_the_bucket_refills_at_its_rate_and_the_table_is_bounded():
    """Burst requests pass, the next waits (1 - tokens) / rate rounded up; the table keeps max_clients buckets."""
    limiter = RateLimiter(rate_per_s=0.4, burst=2, max_clients=3)
    limiter.check("a", now=0.0)
    limiter.check("a", now=0.0)
    with pytest.raises(RateLimited) as refused:
        limiter.check("a", now=0.5)  # 0.2 token: 2 s to a whole one
    assert refused.value.retry_after_s == 2
    limiter.check("b", now=0.5)  # another client's bucket is its own
    limiter.check("a", now=0.5 + 2.0)
    for client in range(10):
        limiter.check(client, now=3.0)
    assert len(limiter) == 3


async def get_models(http: aiohttp.ClientSession, svc, key: str | None) -> aiohttp.ClientResponse:
    """GET /v1/models with ``key`` as bearer (none when None); the body is read."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with http.get(svc.url + "/v1/models", headers=headers) as r:
        await r.read()
        return r


async def metric(http: aiohttp.ClientSession, svc, sample: str) -> float:
    """One sample of the router's /metrics (0 when absent)."""
    async with http.get(svc.url + "/metrics") as r:
        text = await r.text()
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " ")), 0.0)


async def test_a_digest_configured_router_takes_the_right_key_only(start_router):
    """Right key 200; wrong or missing key 401 (counted by reason); health and metrics stay open."""
    svc = await start_router(models=("reference",), api_key_digests=(sha(KEY_ONE), sha(KEY_TWO)))
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        assert (await get_models(http, svc, KEY_TWO)).status == 200
        assert (await get_models(http, svc, KEY_ONE)).status == 200
        for key in ("wrong", KEY_ONE + "x", digest(KEY_ONE), "\u00ff\u00fe", None):
            r = await get_models(http, svc, key)
            assert r.status == 401, key
        async with http.get(svc.url + "/healthz") as r:
            assert r.status == 200
        assert await metric(http, svc, 'prfaas_router_refused_total{reason="wrong_key"}') == 4
        assert await metric(http, svc, 'prfaas_router_refused_total{reason="missing_key"}') == 1


async def test_a_key_of_raw_bytes_is_a_401(start_router):
    """A bearer key of bytes that are not UTF-8 is compared like any other: 401, not a server error."""
    svc = await start_router(models=("reference",), api_key_digests=(sha(KEY_ONE),))
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
    writer.write(
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80\r\nConnection: close\r\n\r\n"
    )
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]


async def test_a_key_past_its_rate_gets_429_with_retry_after(start_router):
    """Past its burst a key is answered 429 in OpenAI's shape with Retry-After; another key is not; after the wait
    the key passes again."""
    svc = await start_router(
        models=("reference",), api_key_digests=(sha(KEY_ONE), sha(KEY_TWO)), rate_limit_rps=1.0, rate_limit_burst=2
    )
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        assert [(await get_models(http, svc, KEY_ONE)).status for _ in range(2)] == [200, 200]
        headers = {"Authorization": f"Bearer {KEY_ONE}"}
        async with http.get(svc.url + "/v1/models", headers=headers) as r:
            body = await r.json()
        # the third request comes well within a second of the first two: one token is at most 1 s away
        assert r.status == 429 and r.headers["Retry-After"] == "1", body
        assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "invalid_request_error"
        assert (await get_models(http, svc, KEY_TWO)).status == 200
        await asyncio.sleep(int(r.headers["Retry-After"]))
        assert (await get_models(http, svc, KEY_ONE)).status == 200
        assert await metric(http, svc, 'prfaas_router_refused_total{reason="rate_limited"}') == 1


async def test_without_keys_the_rate_is_per_client_address(start_router):
    """With no keys configured, the bucket is the client address's."""
    svc = await start_router(models=("reference",), rate_limit_rps=0.1, rate_limit_burst=1)
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        assert (await get_models(http, svc, None)).status == 200
        r = await get_models(http, svc, "any")
        assert r.status == 429 and r.headers["Retry-After"] == "10"
