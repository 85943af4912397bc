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
from urllib.parse import quote, quote_from_bytes

import aiohttp
import msgspec
import pytest
import yarl
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from libs.common.errors import ConfigError
from libs.lab.servers import NatsServer
from services.router.config import RouterConfig
from services.router.schemas import ChatCompletionRequest, CompletionRequest, RequestLimits
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
    max_connections=256,  # above the slow-client test's 200 idle connections
    request_limits=LIMITS,
    reserve_timeout_s=10.0,  # generous deadlines downstream: on a loaded machine a late gateway must not be a 5xx
    accept_timeout_s=10.0,
    first_token_timeout_s=20.0,
    token_timeout_s=20.0,
)
CLIENT_ERRORS = {400, 401, 404, 405, 408, 413, 414, 422, 429, 431}
CHAT = {"model": "reference", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TEXT = {"model": "reference", "prompt": "hi", "max_tokens": 2}
ENDPOINTS = {"/v1/chat/completions": CHAT, "/v1/completions": TEXT, "/v1/route/explain": CHAT}
FIELDS = (
    "model max_tokens max_completion_tokens temperature top_p stop seed n stream stream_options user logprobs "
    "top_logprobs echo suffix prompt messages ignore_eos best_of logit_bias response_format tools bootstrap_port "
    "role content type text include_usage"
).split()
HUGE = st.sampled_from([2**70, -(2**70), 2**63, 2**64, -1, 0, 1e308, -1e308, 1.5, 10**30])
SCALARS = st.none() | st.booleans() | st.integers() | HUGE | st.floats(allow_nan=False) | st.text(max_size=40)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner),
    max_leaves=20,
)
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure is reported at once, with its example
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def test_limits_are_read_from_the_environment():
    """Every HTTP and request-field limit has its ROUTER_* setting; a value under its floor names the setting."""
    env = {
        "ROUTER_THRESHOLD_TOKENS": "0",
        "ROUTER_MAX_BODY_BYTES": "65536",
        "ROUTER_MAX_LINE_BYTES": "2048",
        "ROUTER_MAX_HEADER_BYTES": "4096",
        "ROUTER_MAX_HEADERS": "64",
        "ROUTER_IDLE_TIMEOUT_S": "5",
        "ROUTER_READ_TIMEOUT_S": "7",
        "ROUTER_MAX_STOP_SEQUENCES": "4",
        "ROUTER_MAX_STOP_CHARS": "100",
        "ROUTER_MAX_TOKENS_LIMIT": "4096",
    }
    config = RouterConfig.from_env(env)
    assert (config.max_body_bytes, config.max_line_bytes, config.max_header_bytes, config.max_headers) == (
        65536,
        2048,
        4096,
        64,
    )
    assert (config.idle_timeout_s, config.read_timeout_s) == (5.0, 7.0)
    assert config.request_limits == RequestLimits(max_stop_sequences=4, max_stop_chars=100, max_tokens=4096)
    with pytest.raises(ConfigError, match="ROUTER_MAX_HEADER_BYTES"):
        RouterConfig.from_env(env | {"ROUTER_MAX_HEADER_BYTES": "10"})


class OneSite:
    """One nats-server as the only site's (``fleet`` asks a cluster for a site's URL)."""

    def __init__(self, server: NatsServer) -> None:
        self.server = server

    def url(self, site: str) -> str:
        """The server's URL, whatever the site."""
        return self.server.url


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A nats-server for this module's gateways and routers (a supercluster takes seconds to form)."""
    server = NatsServer(workdir=tmp_path_factory.mktemp("fuzz-nats")).start()
    try:
        yield OneSite(server)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gateways(site, tmp_path_factory):
    """Reference gateways at dc-pd: one local prefill, one decode."""
    specs = [("prefill_gateway", PD, LOCAL, {"cluster": "fz-pd"}), ("decode_gateway", PD, DECODE, {})]
    yield from fleet(site, tmp_path_factory.mktemp("router-fuzz"), specs)


@pytest.fixture
async def router(gateways, site, redis_url):
    """The router with small limits, once both gateways are in its view."""
    _, close = await start_index(index_config(site.url(PD), redis_url))
    try:
        async with router_starter(site.url(PD)) as start:
            svc = await start(**ROUTER)
            await until(lambda: {LOCAL, DECODE} <= {ld.instance for ld in svc.view.alive()}, 15, "heartbeats")
            yield svc
            await assert_no_server_errors(svc)
    finally:
        await close()


async def assert_no_server_errors(svc) -> None:
    """The router's request counter holds no 5xx status."""
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http, http.get(svc.url + "/metrics") as r:
        text = await r.text()
    counted = [line for line in text.splitlines() if line.startswith("prfaas_router_requests_total{")]
    assert counted and not [line for line in counted if 'status="5' in line], counted


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


SMALL = st.integers(-2, 12) | HUGE
WORDS = st.characters(exclude_categories=("Cs",))  # no lone surrogates: those make a body undecodable at once


def text(max_size: int) -> st.SearchStrategy[str]:
    """Decodable text of up to ``max_size`` characters."""
    return st.text(WORDS, max_size=max_size)


PART = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "text", "image_url"])}, optional={"text": text(20) | st.none()}
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "developer", "tool"]),
        "content": text(30) | st.lists(PART, max_size=3) | st.none(),
    },
    optional={"name": text(5)},
)
SHARED = {  # well-typed values, in and out of range
    "max_tokens": SMALL,
    "temperature": st.floats(-1, 3) | HUGE,
    "top_p": st.floats(-0.5, 1.5) | HUGE,
    "stop": text(4) | st.lists(text(4), max_size=10),
    "seed": st.integers() | HUGE,
    "n": st.integers(0, 3),
    "best_of": st.integers(0, 2),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "user": text(5),
    "presence_penalty": st.floats(-1, 1),
    "logit_bias": st.dictionaries(text(3), st.floats(-1, 1), max_size=2),
}
VALID_CHAT = st.fixed_dictionaries(
    {"model": st.just("reference") | text(5), "messages": st.lists(MESSAGE, min_size=1, max_size=3)},
    optional=SHARED
    | {
        "max_completion_tokens": SMALL,
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(-1, 25),
        "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
        "tool_choice": st.sampled_from(["none", "auto"]),
        "modalities": st.lists(st.sampled_from(["text", "audio"]), max_size=2),
    },
)
VALID_TEXT = st.fixed_dictionaries(
    {
        "model": st.just("reference") | text(5),
        "prompt": text(30)
        | st.lists(st.integers(-5, 300) | HUGE, max_size=5)
        | st.lists(text(5), max_size=2)
        | st.lists(st.lists(st.integers(0, 300), max_size=3), max_size=2),
    },
    optional=SHARED | {"logprobs": st.integers(-1, 25), "echo": st.booleans(), "suffix": text(3)},
)
ONE_WRONG = st.just({}) | st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=1)  # one field of any shape


def _changed(base: dict, changes: dict) -> dict:
    return base | changes


NEAR_VALID = st.builds(_changed, VALID_CHAT | VALID_TEXT, ONE_WRONG)
BODIES = NEAR_VALID | JSON
BATCH = st.lists(st.tuples(st.sampled_from(sorted(ENDPOINTS)), BODIES), min_size=8, max_size=8)  # sent at once


@SETTINGS
@given(batch=BATCH)
async def test_random_json_bodies_get_client_errors(router, http, batch):
    """Random JSON shapes and wrong types per field, huge numbers included, eight at once: each a 4xx or a 200."""
    answers = await asyncio.gather(*(post(http, router, path, json.dumps(body).encode()) for path, body in batch))
    for (status, answer), sent in zip(answers, batch, strict=True):
        assert_client_error_or_served(status, answer, sent)


@SETTINGS
@given(name=st.text(max_size=40).map(lambda t: quote(t, safe="")) | st.binary(max_size=20).map(quote_from_bytes))
async def test_random_model_names_get_200_or_4xx(router, http, name):
    """GET /v1/models/{any text or bytes, percent-encoded}: the model (200) or a 4xx; a wrong method is a 405."""
    async with http.get(yarl.URL(router.url + "/v1/models/" + name, encoded=True)) as r:
        assert_client_error_or_served(r.status, await r.read(), name)
    async with http.delete(router.url + "/v1/models/reference") as r:
        assert r.status == 405, await r.text()


WRONG = (None, True, -1, 2**70, 1e308, "x", [], {}, ["a", "b"], [1, "a"], [[1], "a"], {"type": None})
CHAT_PARTS = CHAT | {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "n"}]}


def _swept(base: dict, kind: type) -> list[dict]:
    """``base`` with each field ``kind`` declares (and, for chat, each field of its message and of that message's
    content part) set to each of ``WRONG`` in turn."""
    out = [base | {f.name: value} for f in msgspec.structs.fields(kind) for value in WRONG]
    if "messages" in base:
        message = base["messages"][0]
        out += [base | {"messages": [message | {name: v}]} for name in ("role", "content", "name") for v in WRONG]
        part = message["content"][0]
        out += [base | {"messages": [message | {"content": [part | {n: v}]}]} for n in ("type", "text") for v in WRONG]
    return out


async def test_every_field_of_every_type_gets_200_or_4xx(router, http):
    """Each field of the chat and completion bodies (message and content part fields included) set to each of a
    dozen wrong shapes, through /v1/route/explain (the generation endpoints check bodies the same way): a 4xx or a
    200, never a 5xx."""
    cases = _swept(CHAT_PARTS, ChatCompletionRequest) + _swept(TEXT, CompletionRequest)
    for start in range(0, len(cases), 16):
        batch = cases[start : start + 16]
        answers = await asyncio.gather(
            *(post(http, router, "/v1/route/explain", json.dumps(b).encode()) for b in batch)
        )
        for (status, answer), sent in zip(answers, batch, strict=True):
            assert_client_error_or_served(status, answer, sent)


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


async def test_oversized_and_malformed_requests_are_4xx(router, http):
    """Bodies over the limit (declared or chunked), a long header line, many headers, a long path, bad framing, a bad
    gzip body, garbage request lines and header values: each its 4xx; the router serves a normal request after."""
    body = json.dumps(TEXT).encode()
    sized = f"Content-Length: {len(body)}\r\n"
    cases = {
        "declared body over the limit": (request(f"Content-Length: {MAX_BODY * 4}\r\n", b"x" * 1000), {413}),
        "chunked body over the limit": (
            request("Transfer-Encoding: chunked\r\n", b"".join(b"1000\r\n" + b"x" * 4096 + b"\r\n" for _ in range(8))),
            {413},
        ),
        "header line too long": (request(f"X-Big: {'h' * 5000}\r\n{sized}", body), {400, 431}),
        "too many headers": (request("".join(f"X-{i}: v\r\n" for i in range(100)) + sized, body), {400, 431}),
        "long path": (request(sized, body, path="/v1/" + "p" * 5000), {400, 414}),
        "bad chunk size": (request("Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n"), {400}),
        "bad gzip": (request(f"Content-Encoding: gzip\r\n{sized}", body), {400}),
        "bad content length": (request("Content-Length: -5\r\n", body), {400}),
        "tls on the http port": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, {400}),
        "unknown http version": (b"GET /v1/models HTTP/9.9\r\nHost: x\r\n\r\n", {400, 505}),
        "space in a header name": (b"GET /v1/models HTTP/1.1\r\nBad Header: x\r\nHost: x\r\n\r\n", {400}),
        "unknown method": (b"BREW /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", {400, 405}),
        "NaN SLO header": (request(f"x-prfaas-ttft-slo-ms: nan\r\n{sized}", body), {400}),
    }
    for what, (raw, expected) in cases.items():
        answer = await exchange(router, raw)
        assert status_of(answer) in expected, (what, answer[:300])
    await assert_normal_request_served(http, router)


async def slowloris(svc, head: bytes, period_s: float) -> bytes:
    """Send ``head`` one byte per ``period_s`` until the router answers or closes; what it answered (b"": nothing).

    Fails if the whole head went out: the router was to cut the connection before."""
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
    answer = asyncio.ensure_future(reader.read())
    try:
        for byte in head:
            if answer.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(period_s)
        else:
            raise AssertionError("the whole head was sent before the router cut the connection")
        async with asyncio.timeout(10):  # the router's deadlines are 1 s: ten is far past them on a loaded machine
            return await answer
    except ConnectionResetError:
        return b""
    finally:
        answer.cancel()
        writer.close()


async def test_slow_and_idle_clients_are_cut_off_while_a_request_is_served(router, http):
    """Many idle connections, a client sending its head byte by byte and one stalling in its body: the stalled body
    gets a 408, the others are closed unanswered once idle past the limit, and a normal request is served meanwhile."""
    idle = [await asyncio.open_connection("127.0.0.1", router.port) for _ in range(200)]
    head = request("Content-Length: 2\r\n") + b"{}"  # ~70 bytes at 20 per second: 3.5 s, the idle limit is 1 s
    slow_head = asyncio.ensure_future(slowloris(router, head, 0.05))
    body = json.dumps(TEXT).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    started = time.monotonic()
    writer.write(request(f"Content-Length: {len(body)}\r\n", body[:5]))
    await assert_normal_request_served(http, router)
    async with asyncio.timeout(10):
        answer = await reader.read()
    assert status_of(answer) == 408 and b"request_timeout" in answer, answer[:300]
    assert time.monotonic() - started >= 0.9  # the body deadline is 1 s: a 408 may come later, never before it
    writer.close()
    assert await slow_head == b""
    async with asyncio.timeout(10):
        closed = await asyncio.gather(*(r.read() for r, _ in idle))
    assert closed == [b""] * len(idle)
    for _, w in idle:
        w.close()
    await assert_normal_request_served(http, router)


async def test_connections_past_the_cap_are_closed_at_once(router, http):
    """Past ``ROUTER_MAX_CONNECTIONS`` a new connection is closed unanswered and counted; the open ones still serve."""
    cap = ROUTER["max_connections"]
    held = [await asyncio.open_connection("127.0.0.1", router.port) for _ in range(cap)]
    server = router._runner.server  # the kernel completes a handshake before the router accepts it
    await until(lambda: len(server.connections) >= cap, 10, "every held connection accepted")
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    writer.write(request("Content-Length: 2\r\n") + b"{}")
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    assert router.metrics.refused.labels("too_many_connections")._value.get() >= 1
    held_reader, held_writer = held[0]
    held_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(5):
        assert status_of(await held_reader.read()) == 200
    for _, w in held:
        w.close()
    await until(lambda: len(server.connections) < cap, 10, "held connections closed")
    await assert_normal_request_served(http, router)
