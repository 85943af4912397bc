"""The HTTP API without gateways: models, health, readiness, errors in OpenAI's shape, explain."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from tests.router.conftest import HTTP_TIMEOUT, PRFAAS, heartbeat, load, ready_router, until

LOADS = (load("d0"), load("p-local", role="prefill"), load("p-remote", role="prefill", site=PRFAAS))


def client(svc, api_key: str = "none") -> openai.AsyncOpenAI:
    """The official client pointed at the router, without retries."""
    return openai.AsyncOpenAI(base_url=svc.url + "/v1", api_key=api_key, max_retries=0, timeout=10.0)


async def test_models_lists_heartbeat_and_configured_models(start_router, nc):
    """GET /v1/models serves the models instances heartbeat plus the configured ones."""
    svc = await ready_router(start_router, nc, *LOADS, models=("extra-model",))
    models = await client(svc).models.list()
    assert sorted(m.id for m in models.data) == ["extra-model", "reference"]
    assert all(m.object == "model" and m.owned_by == "prfaas" for m in models.data)
    assert (await client(svc).models.retrieve("reference")).id == "reference"
    with pytest.raises(openai.NotFoundError) as err:
        await client(svc).models.retrieve("gpt-17")
    assert err.value.body["code"] == "model_not_found" and err.value.body["type"] == "invalid_request_error"


async def test_an_unknown_path_is_a_404_in_openai_shape(start_router):
    """A path the router does not serve: 404, OpenAI's error JSON, a client error type."""
    svc = await start_router()
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http, http.get(svc.url + "/v1/embeddings") as r:
        body = await r.json()
    assert r.status == 404
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "not_found"


async def test_health_and_readiness(start_router, nc, kv_index, redis_server):
    """/healthz is always up; /readyz needs the index, a live decode instance and a live prefill instance."""
    svc = await start_router(instance_ttl_s=0.5)
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        async with http.get(svc.url + "/healthz") as r:
            assert r.status == 200
        async with http.get(svc.url + "/readyz") as r:
            body = await r.json()
            assert r.status == 503 and body["checks"] == {
                "bus": True,
                "index": True,
                "decode_instances": False,
                "prefill_instances": False,
            }
        await heartbeat(nc, load("d0"))
        await until(lambda: svc.view.alive(), what="decode heartbeat")
        async with http.get(svc.url + "/readyz") as r:  # nothing could prefill a request yet
            body = await r.json()
            assert r.status == 503 and body["checks"]["decode_instances"] and not body["checks"]["prefill_instances"]
        await heartbeat(nc, load("d0"), load("p-remote", role="prefill", site=PRFAAS))
        await until(lambda: len(svc.view.alive()) == 2, what="prefill heartbeat")
        async with http.get(svc.url + "/readyz") as r:
            assert r.status == 200, await r.text()
        redis_server.stop()
        async with http.get(svc.url + "/readyz") as r:
            body = await r.json()
            assert r.status == 503 and body["checks"]["index"] is False


async def test_decode_instance_silence_makes_router_unready(start_router, nc, kv_index):
    """A decode instance that stops heartbeating leaves the view after the instance TTL."""
    svc = await ready_router(start_router, nc, load("d0"), instance_ttl_s=0.3)
    await until(lambda: not svc.view.alive(), timeout_s=2.0, what="decode instance expired")
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http, http.get(svc.url + "/readyz") as r:
        assert r.status == 503


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "reference", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, "max_tokens"),
        ({"model": "reference"}, "messages"),
        ({"model": "reference", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        ({"model": "reference", "messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
        (
            {"model": "reference", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
            "tools",
        ),
        (
            {"model": "reference", "messages": [{"role": "user", "content": "hi"}], "kv_transfer_params": {"x": 1}},
            "kv_transfer_params",
        ),
        (
            {
                "model": "reference",
                "messages": [{"role": "user", "content": "hi"}],
                "stream_options": {"include_usage": True},
            },
            "stream_options",
        ),
        ({"model": "reference", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
        ({"model": "reference", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        (
            {"model": "reference", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5},
            "presence_penalty",
        ),
    ],
)
async def test_bad_chat_fields_are_400_naming_the_field(start_router, nc, kv_index, body, param):
    """A wrong type, a missing field, an unserved feature or a router-only field is a 400 naming it."""
    svc = await ready_router(start_router, nc, *LOADS)
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        async with http.post(svc.url + "/v1/chat/completions", json=body) as r:
            error = (await r.json())["error"]
            assert r.status == 400, error
            assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
            assert r.headers["x-prfaas-request-id"]


async def test_bad_completion_prompts_are_400(start_router, nc, kv_index):
    """Batches, empty or out-of-vocabulary token prompts are refused with param 'prompt'."""
    svc = await ready_router(start_router, nc, *LOADS)
    api = client(svc)
    for prompt in (["a", "b"], [], [[1, 2], [3]], [1, 2, 99999], 5):
        with pytest.raises(openai.BadRequestError) as e:
            await api.completions.create(model="reference", prompt=prompt, max_tokens=2)
        assert e.value.body["param"] == "prompt", prompt


async def test_malformed_json_is_400(start_router, nc, kv_index):
    """A body that is not JSON is a 400 in OpenAI's error shape."""
    svc = await ready_router(start_router, nc, *LOADS)
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        async with http.post(svc.url + "/v1/completions", data=b"{not json") as r:
            assert r.status == 400
            assert set((await r.json())["error"]) == {"message", "type", "param", "code"}


async def test_unknown_model_is_404(start_router, nc, kv_index):
    """A model no instance serves and the config does not name is a 404."""
    svc = await ready_router(start_router, nc, *LOADS)
    with pytest.raises(openai.NotFoundError) as e:
        await client(svc).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"


async def test_prompt_over_the_limit_is_400(start_router, nc, kv_index):
    """A prompt longer than the instances' max_prompt_tokens is a 400 before any work."""
    svc = await ready_router(start_router, nc, load("d0", max_prompt_tokens=100), load("p-local", role="prefill"))
    with pytest.raises(openai.BadRequestError) as e:
        await client(svc).completions.create(model="reference", prompt="x" * 200, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"


async def test_max_tokens_past_what_the_context_leaves_is_400(start_router, nc, kv_index):
    """Prompt plus max_tokens over the context is a 400 context_length_exceeded naming max_tokens, as OpenAI answers."""
    svc = await ready_router(start_router, nc, load("d0", max_prompt_tokens=100), load("p-local", role="prefill"))
    api = client(svc)
    with pytest.raises(openai.BadRequestError) as e:
        await api.completions.create(model="reference", prompt="x" * 50, max_tokens=50)  # 51 prompt tokens with BOS
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    assert (
        "maximum context length is 100 tokens" in e.value.body["message"]
        and "51 in the prompt" in e.value.body["message"]
    )
    with pytest.raises(openai.BadRequestError) as e:
        await api.chat.completions.create(
            model="reference", messages=[{"role": "user", "content": "x" * 120}], max_tokens=1
        )
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"


async def test_log_probability_requests_are_checked(start_router, nc, kv_index):
    """top_logprobs over 20, top_logprobs without logprobs, completions logprobs over 20: 400s naming the field."""
    svc = await ready_router(start_router, nc, *LOADS)
    api, messages = client(svc), [{"role": "user", "content": "hi"}]
    for kwargs, param in (
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            await api.chat.completions.create(model="reference", messages=messages, max_tokens=2, **kwargs)
        assert e.value.body["param"] == param, kwargs
    with pytest.raises(openai.BadRequestError) as e:
        await api.completions.create(model="reference", prompt="hi", max_tokens=2, logprobs=21)
    assert e.value.body["param"] == "logprobs"


async def test_body_over_the_limit_is_413(start_router, nc, kv_index):
    """A body larger than the configured limit is a 413 in OpenAI's error shape."""
    svc = await ready_router(start_router, nc, *LOADS, max_body_bytes=4096)
    with pytest.raises(openai.APIStatusError) as e:
        await client(svc).completions.create(model="reference", prompt="x" * 10_000, max_tokens=2)
    assert e.value.status_code == 413 and e.value.body["type"] == "invalid_request_error"


async def test_no_capacity_is_503_with_retry_after(start_router, nc, kv_index):
    """A served model without a live decode instance is a 503 with Retry-After."""
    svc = await start_router(models=("reference",), retry_after_s=3)
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        body = {"model": "reference", "prompt": "hello", "max_tokens": 2}
        async with http.post(svc.url + "/v1/completions", json=body) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "3"
            assert (await r.json())["error"]["code"] == "no_capacity"


async def test_metrics_count_requests(start_router, nc, kv_index):
    """/metrics exposes request counters by endpoint and status."""
    svc = await ready_router(start_router, nc, *LOADS)
    await client(svc).models.list()
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http, http.get(svc.url + "/metrics") as r:
        text = await r.text()
    assert 'prfaas_router_requests_total{endpoint="/v1/models",status="200"} 1.0' in text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "reference", "prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
        ({"model": "reference", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"model": "reference", "prompt": "hi", "kv_transfer_params": {}}, "kv_transfer_params"),
        ({"model": "reference"}, "messages"),
    ],
)
async def test_explain_checks_the_body_as_its_endpoint_would(start_router, nc, body, param):
    """/v1/route/explain refuses what the completion endpoints refuse, naming the field."""
    svc = await ready_router(start_router, nc, *LOADS)
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        async with http.post(svc.url + "/v1/route/explain", json=body) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == param
