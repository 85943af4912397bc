"""The HTTP front end under hostile input: every answer is a 4xx (or a closed connection), never a 5xx or a crash,
and a normal request is served meanwhile.

One router with small limits over real reference gateways (local prefill and decode at dc-pd). Bodies come from
hypothesis (random JSON shapes, wrong types per field, huge numbers); the transport cases (oversized bodies and
headers, malformed framing, slow and idle clients) are written out.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.router.schemas import RequestLimits
from tests.kv_index.conftest import index_config, start_index
from tests.router.conftest import HTTP_TIMEOUT, router_starter, until
from tests.router.deployment import PD, fleet

LOCAL, DECODE = "fz-l0", "fz-d0"
MAX_BODY = 16 << 10
MAX_PROMPT = 256
LIMITS = RequestLimits(max_stop_sequences=8, max_stop_chars=32, max_tokens=8)
ROUTER = dict(
    policy="static-threshold",
    threshold_tokens=131072,  # every prefill local: the fleet has no PrfaaS site
    max_prompt_tokens=MAX_PROMPT,
    default_max_tokens=4,
    max_body_bytes=MAX_BODY,
    max_line_bytes=1024,
    max_header_bytes=1024,
    max_headers=32,
    idle_timeout_s=1.0,
    read_timeout_s=1.0,
    request_limits=LIMITS,
    token_timeout_s=10.0,
)
CLIENT_ERRORS = {400, 401, 404, 405, 408, 413, 414, 422, 429, 431}
CHAT = {"model": "reference", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TEXT = {"model": "reference", "prompt": "hi", "max_tokens": 2}
ENDPOINTS = {"/v1/chat/completions": CHAT, "/v1/completions": TEXT, "/v1/route/explain": CHAT}
FIELDS = (
    "model max_tokens max_completion_tokens temperature top_p stop seed n stream stream_options user logprobs "
    "top_logprobs echo suffix prompt messages ignore_eos best_of logit_bias response_format tools bootstrap_port"
).split()
HUGE = st.sampled_from([2**70, -(2**70), 2**63, 2**64, -1, 0, 1e308, -1e308, 1.5, 10**30])
SCALARS = st.none() | st.booleans() | st.integers() | HUGE | st.floats(allow_nan=False) | st.text(max_size=40)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner),
    max_leaves=20,
)
SETTINGS = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def gateways(supercluster, tmp_path_factory):
    """Reference gateways at dc-pd: one local prefill, one decode."""
    specs = [("prefill_gateway", PD, LOCAL, {"cluster": "fz-pd"}), ("decode_gateway", PD, DECODE, {})]
    yield from fleet(supercluster, tmp_path_factory.mktemp("router-fuzz"), specs)


@pytest.fixture
async def router(gateways, supercluster, redis_url):
    """The router with small limits, once both gateways are in its view."""
    _, close = await start_index(index_config(supercluster.url(PD), redis_url))
    try:
        async with router_starter(supercluster.url(PD)) as start:
            svc = await start(**ROUTER)
            await until(lambda: {LOCAL, DECODE} <= {ld.instance for ld in svc.view.alive()}, 15, "heartbeats")
            yield svc
    finally:
        await close()


@pytest.fixture
async def http():
    """One client session for a test."""
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        yield session


async def post(http: aiohttp.ClientSession, svc, path: str, data: bytes, **headers: str) -> tuple[int, bytes]:
    """POST raw bytes; the status and the whole body (a stream is read to its end)."""
    async with http.post(svc.url + path, data=data, headers={"Content-Type": "application/json", **headers}) as r:
        return r.status, await r.read()


def assert_client_error_or_served(status: int, body: bytes, what: object) -> None:
    """A 4xx in OpenAI's error shape, or a 200."""
    assert status == 200 or status in CLIENT_ERRORS, (status, body[:300], what)
    if status != 200:
        assert set(json.loads(body)["error"]) >= {"message", "type", "code"}, body


async def assert_normal_request_served(http: aiohttp.ClientSession, svc) -> None:
    """A plain chat completion is answered 200 with tokens."""
    status, body = await post(http, svc, "/v1/chat/completions", json.dumps(CHAT).encode())
    assert status == 200, body
    answer = json.loads(body)
    assert answer["usage"]["completion_tokens"] >= 1 and answer["choices"][0]["message"]["content"]


def _with_field(base: dict, name: str, value: object) -> dict:
    return {**base, name: value}


BODIES = st.one_of(
    JSON,
    st.builds(_with_field, st.sampled_from([CHAT, TEXT]), st.sampled_from(FIELDS), JSON),
    st.builds(
        _with_field,
        st.sampled_from([CHAT, TEXT]),
        st.sampled_from(["messages", "prompt"]),
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "x"]), "content": JSON}), max_size=3),
    ),
)


@SETTINGS
@given(path=st.sampled_from(sorted(ENDPOINTS)), body=BODIES)
async def test_random_json_bodies_get_client_errors(router, http, path, body):
    """Random JSON shapes and wrong types per field, huge numbers included: a 4xx or a 200, never a 5xx."""
    status, answer = await post(http, router, path, json.dumps(body).encode())
    assert_client_error_or_served(status, answer, body)


RAW = [
    b"",
    b"NaN",
    b'{"model": "reference", "prompt": "hi", "max_tokens": Infinity}',
    b'{"model": "reference", "prompt": "hi", "temperature": NaN}',
    b'{"model": "reference", "prompt": "hi", "max_tokens": 1e999}',
    b'{"model": "reference", "prompt": "\xff\xfe\xc3\x28"}',
    b"\xff\xfe\x00\x01" * 64,
    b'{"model": "reference", "prompt": "hi"' + b"," * 10_000,
    b"[" * 5_000 + b"]" * 5_000,
    b'{"model": "reference", "prompt": [' + b",".join([b"1"] * 3000) + b"]}",
]


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
async def test_malformed_bytes_and_costly_fields_are_400(router, http, path):
    """Invalid UTF-8, non-JSON literals, deep nesting, thousands of stop strings, max_tokens and seeds out of range,
    a prompt over the model's limit: 4xx; a prompt at the limit is served."""
    for data in RAW:
        status, answer = await post(http, router, path, data)
        assert status in CLIENT_ERRORS, (status, answer[:200], data[:60])
    base = ENDPOINTS[path]
    for field, value in (
        ("stop", ["x"] * 3000),
        ("stop", ["y" * 200]),
        ("max_tokens", 2**70),
        ("max_tokens", LIMITS.max_tokens + 1),
        ("seed", 2**64),
        ("seed", -1),
    ):
        status, answer = await post(http, router, path, json.dumps(base | {field: value}).encode())
        assert status == 400 and json.loads(answer)["error"]["param"] == field, (field, answer[:200])
    at_limit = TEXT | {"prompt": [65] * (MAX_PROMPT - 2), "max_tokens": 2}
    over = at_limit | {"prompt": [65] * (MAX_PROMPT - 1)}
    status, answer = await post(http, router, "/v1/completions", json.dumps(at_limit).encode())
    assert status == 200 and json.loads(answer)["usage"]["completion_tokens"] == 2, answer[:300]
    status, answer = await post(http, router, "/v1/completions", json.dumps(over).encode())
    assert status == 400 and json.loads(answer)["error"]["code"] == "context_length_exceeded", answer[:300]


async def exchange(svc, raw: bytes) -> bytes:
    """Send raw bytes on a new connection; the router's answer (head and body), or b"" if it closes without one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(10):  # the router's deadlines are 1 s: ten is far past them on a loaded machine
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(v) for k, _, v in _fields(head) if k == b"content-length"), 0)
            return head + await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return b""
    finally:
        writer.close()


def _fields(head: bytes) -> list[tuple[bytes, bytes, bytes]]:
    return [(k.strip().lower(), s, v.strip()) for k, s, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])]


def status_of(answer: bytes) -> int | None:
    """The status of a raw HTTP answer (None when there is none)."""
    return int(answer.split(b" ", 2)[1]) if answer.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) else None


def request(head: str, body: bytes = b"", path: str = "/v1/completions") -> bytes:
    """A raw request closing its connection."""
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{head}\r\n".encode() + body


async def test_oversized_and_malformed_requests_are_4xx_or_closed(router, http):
    """Bodies over the limit (declared or chunked), long and many headers, a long path, bad framing, a bad gzip
    body, garbage request lines, odd SLO headers: an answer (a 4xx, or a 200 for what may be served), never a 5xx;
    the router serves a normal request after."""
    body = json.dumps(TEXT).encode()
    cases = {
        "declared body over the limit": request(f"Content-Length: {MAX_BODY * 4}\r\n", b"x" * 1000),
        "chunked body over the limit": request(
            "Transfer-Encoding: chunked\r\n", b"".join(b"1000\r\n" + b"x" * 4096 + b"\r\n" for _ in range(8))
        ),
        "header line too long": request(f"X-Big: {'h' * 5000}\r\nContent-Length: {len(body)}\r\n", body),
        "too many headers": request("".join(f"X-{i}: v\r\n" for i in range(100)), body),
        "long path": request(f"Content-Length: {len(body)}\r\n", body, path="/v1/" + "p" * 5000),
        "bad chunk size": request("Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n"),
        "bad gzip": request(f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n", body),
        "bad content length": request("Content-Length: -5\r\n", body),
        "garbage request line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
        "no version": b"GET /v1/models\r\n\r\n",
        "unknown method": b"BREW /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "bad slo header": request(f"x-prfaas-ttft-slo-ms: nan\r\nContent-Length: {len(body)}\r\n", body),
        "endless slo header": request(f"x-prfaas-ttft-slo-ms: 1e400\r\nContent-Length: {len(body)}\r\n", body),
    }
    for what, raw in cases.items():
        answer = await exchange(router, raw)
        status = status_of(answer)
        assert status is None or status in CLIENT_ERRORS | {200}, (what, answer[:300])
        assert (status is not None) or what == "no version", (what, answer[:300])  # HTTP/0.9 has no status line
    await assert_normal_request_served(http, router)


async def slowloris(svc, head: bytes, period_s: float) -> bytes:
    """Send ``head`` one byte per ``period_s`` until the router answers or closes; what it answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
    answer = asyncio.ensure_future(reader.read())
    try:
        for byte in head:
            if answer.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(period_s)
        async with asyncio.timeout(10):  # the router's deadlines are 1 s: ten is far past them on a loaded machine
            return await answer
    except ConnectionResetError:
        return b""
    finally:
        answer.cancel()
        writer.close()


async def test_slow_and_idle_clients_are_cut_off_while_a_request_is_served(router, http):
    """Many idle connections, a client sending its headers byte by byte and one sending its body slowly: the slow
    body gets a 408, the others are closed within the idle timeout's reach, and a normal request is served meanwhile."""
    idle = [await asyncio.open_connection("127.0.0.1", router.port) for _ in range(200)]
    slow_head = asyncio.ensure_future(slowloris(router, request("Content-Length: 2\r\n") + b"{}", 0.05))
    body = json.dumps(TEXT).encode()
    slow_body = asyncio.ensure_future(slowloris(router, body, 0.05))
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    writer.write(request(f"Content-Length: {len(body)}\r\n", body[:5]))
    started = time.monotonic()
    await assert_normal_request_served(http, router)
    async with asyncio.timeout(10):
        answer = await reader.read()
    assert status_of(answer) == 408 and b"request_timeout" in answer, answer[:300]
    # the body deadline is 1 s; on a loaded machine the answer may come later, never before it
    assert time.monotonic() - started >= 0.9
    writer.close()
    assert status_of(await slow_head) is None  # closed, unanswered: its head never completed in time
    assert status_of(await slow_body) in (None, 400)  # the JSON trickled in as the request line: refused or cut
    async with asyncio.timeout(10):
        closed = await asyncio.gather(*(r.read() for r, _ in idle))
    assert closed == [b""] * len(idle)
    for _, w in idle:
        w.close()
    await assert_normal_request_served(http, router)
