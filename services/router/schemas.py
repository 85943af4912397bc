"""OpenAI request bodies, decoded once per endpoint with msgspec, and checked into one GenerationRequest.

A field of the wrong type, a value out of range, a feature the router does not serve (``n > 1``,
``echo``, tools, penalties, …) or a field only the router may set (engine transfer parameters,
routing hints) is a 400 that names the field. Log probabilities are served (chat ``logprobs`` with
``top_logprobs`` up to 20; completions ``logprobs`` up to 20, as vLLM allows), and so is vLLM's
``ignore_eos``. Fields that cost work past a cap (stop sequences, ``max_tokens``) are bounded by
:class:`RequestLimits`; ``seed`` must fit the engines' unsigned 64-bit generators.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from libs.common.errors import BadRequest
from libs.common.messages import MAX_TOP_LOGPROBS, Sampling

_SEED_END = 1 << 64  # seeds are unsigned 64-bit


@dataclass(frozen=True)
class RequestLimits:
    """Caps on request fields that cost work; past one, a 400 naming the field."""

    max_stop_sequences: int = 16  # stop strings per request (each is matched against every generated token)
    max_stop_chars: int = 256  # characters of one stop string
    max_tokens: int = 1 << 20  # the most tokens one request may ask for (the model's context bounds it too)


def invalid(param: str | None, message: str) -> BadRequest:
    """A 400 about one request field (``param`` is rendered in the OpenAI error body)."""
    return BadRequest(message, param=param)


class StreamOptions(msgspec.Struct, kw_only=True):
    """``stream_options``: only ``include_usage`` is served."""

    include_usage: bool = False


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of a message's content; only ``text`` parts are served."""

    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    """One chat message."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


_U = msgspec.UNSET
# Fields only the router (or an engine behind it) may set: refused when a client sends them.
_INTERNAL_FIELDS = (
    "kv_transfer_params",
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
    "disagg_spec",
    "prefill_site",
    "prefill_instance",
    "decode_site",
    "decode_instance",
    "transfer_id",
    "skip_blocks",
    "data_parallel_rank",
)


class _Body(msgspec.Struct, kw_only=True):
    """Fields shared by both generation endpoints."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    ignore_eos: bool | None = None  # vLLM's extension: generate past the end-of-sequence token
    # Refused when present (router-only fields).
    kv_transfer_params: Any = _U
    bootstrap_host: Any = _U
    bootstrap_port: Any = _U
    bootstrap_room: Any = _U
    disagg_spec: Any = _U
    prefill_site: Any = _U
    prefill_instance: Any = _U
    decode_site: Any = _U
    decode_instance: Any = _U
    transfer_id: Any = _U
    skip_blocks: Any = _U
    data_parallel_rank: Any = _U


class ChatCompletionRequest(_Body, kw_only=True):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None


class CompletionRequest(_Body, kw_only=True):
    """Body of ``POST /v1/completions`` (``prompt``: text, token ids, or a one-element list of either)."""

    prompt: Any
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None


_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")


def _invalid_body(error: msgspec.ValidationError) -> BadRequest:
    text = str(error)
    found = _PATH.search(text) or _MISSING.search(text)
    return invalid(found.group(1) if found and found.group(1) else None, f"invalid request body: {text}")


def _decode(decoder: msgspec.json.Decoder, body: bytes):
    """Decode a body; a malformed or mistyped one is a 400 naming the field."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        raise _invalid_body(e) from None
    except msgspec.DecodeError as e:
        raise invalid(None, f"request body is not valid JSON: {e}") from None


def _convert(obj: dict, kind: type):
    """An already decoded body as ``kind`` (a 400 naming the field if it does not fit)."""
    try:
        return msgspec.convert(obj, kind)
    except msgspec.ValidationError as e:
        raise _invalid_body(e) from None


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request, checked: prompt (text or token ids), limits, sampling, streaming."""

    kind: Literal["chat", "text"]
    model: str
    prompt_text: str | None  # text to tokenize (None: ``prompt_ids`` given)
    prompt_ids: list[int] | None
    messages: list[dict[str, str]] | None  # chat: role and text content, for the template
    max_tokens: int | None  # None: the router's default, within what the context leaves
    sampling: Sampling  # ``logprobs``: top alternatives per token to return (None: no log probabilities)
    stream: bool
    include_usage: bool


def _refuse_internal(body: _Body) -> None:
    for name in _INTERNAL_FIELDS:
        if getattr(body, name) is not _U:
            raise invalid(name, f"'{name}' is set by the router; clients must not send it")


def _refuse(param: str, what: str) -> BadRequest:
    return invalid(param, f"'{param}' is not supported by this server: {what}")


def _top_logprobs(param: str, value: int | None) -> int | None:
    """The number of alternatives asked for, checked (None: no log probabilities)."""
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise invalid(param, f"{param} must be in [0, {MAX_TOP_LOGPROBS}], got {value}")
    return value


def _check_limits(body: _Body, max_tokens: int | None, stop: tuple[str, ...], limits: RequestLimits) -> None:
    """400 for a field past its cap: stop sequences, max_tokens, an out-of-range seed."""
    if len(stop) > limits.max_stop_sequences:
        raise invalid("stop", f"at most {limits.max_stop_sequences} stop sequences, got {len(stop)}")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise invalid("stop", f"a stop sequence may have at most {limits.max_stop_chars} characters")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise invalid("max_tokens", f"max_tokens must be at most {limits.max_tokens}, got {max_tokens}")
    if body.seed is not None and not 0 <= body.seed < _SEED_END:
        raise invalid("seed", f"seed must be in [0, 2**64), got {body.seed}")


def _common(
    body: _Body, max_tokens: int | None, logprobs: int | None, limits: RequestLimits
) -> tuple[Sampling, int | None, bool, bool]:
    """Sampling, max_tokens, stream and include_usage from the shared fields (400 naming a bad one)."""
    _refuse_internal(body)
    if body.n not in (None, 1):
        raise _refuse("n", f"only one choice per request (n=1), got n={body.n}")
    if body.best_of not in (None, 1):
        raise _refuse("best_of", f"only best_of=1, got {body.best_of}")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise _refuse(name, "penalties are not applied")
    if body.logit_bias:
        raise _refuse("logit_bias", "token biases are not applied")
    if max_tokens is not None and max_tokens < 1:
        raise invalid("max_tokens", f"max_tokens must be at least 1, got {max_tokens}")
    temperature = 1.0 if body.temperature is None else body.temperature
    if not 0 <= temperature <= 2:
        raise invalid("temperature", f"temperature must be in [0, 2], got {temperature}")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0 < top_p <= 1:
        raise invalid("top_p", f"top_p must be in (0, 1], got {top_p}")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(s == "" for s in stop):
        raise invalid("stop", "stop sequences must not be empty strings")
    _check_limits(body, max_tokens, stop, limits)
    stream = bool(body.stream)
    if body.stream_options is not None and not stream:
        raise invalid("stream_options", "stream_options is only allowed when stream is true")
    include_usage = stream and body.stream_options is not None and body.stream_options.include_usage
    sampling = Sampling(
        temperature=temperature,
        top_p=top_p,
        seed=body.seed,
        stop=stop,
        ignore_eos=bool(body.ignore_eos),
        logprobs=logprobs,
    )
    return sampling, max_tokens, stream, include_usage


def _message_text(index: int, message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise invalid(f"messages[{index}].content[{j}]", f"only text content is served, got a '{part.type}' part")
        parts.append(part.text)
    return "".join(parts)


_ROLES = ("system", "developer", "user", "assistant")


def parse_chat(body: bytes, limits: RequestLimits = RequestLimits()) -> GenerationRequest:
    """Check a chat completion body."""
    return _check_chat(_decode(_chat_decoder, body), limits)


def _check_chat(req: ChatCompletionRequest, limits: RequestLimits) -> GenerationRequest:
    if not req.messages:
        raise invalid("messages", "messages must contain at least one message")
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs", "top_logprobs needs logprobs set to true")
    logprobs = (_top_logprobs("top_logprobs", req.top_logprobs) or 0) if req.logprobs else None
    if req.tools or req.functions:
        raise _refuse("tools" if req.tools else "functions", "tool calls are not served")
    if req.tool_choice not in (None, "none") or req.function_call not in (None, "none"):
        raise _refuse(
            "tool_choice" if req.tool_choice not in (None, "none") else "function_call", "tool calls are not served"
        )
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise _refuse("response_format", "only text responses are served")
    if req.audio is not None or (req.modalities is not None and req.modalities != ["text"]):
        raise _refuse("audio" if req.audio is not None else "modalities", "only text output is served")
    messages = []
    for i, m in enumerate(req.messages):
        if m.role not in _ROLES:
            raise invalid(f"messages[{i}].role", f"role must be one of {', '.join(_ROLES)}, got '{m.role}'")
        messages.append({"role": m.role, "content": _message_text(i, m)})
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    sampling, max_tokens, stream, include_usage = _common(req, max_tokens, logprobs, limits)
    if req.max_completion_tokens is not None and req.max_completion_tokens < 1:
        raise invalid("max_completion_tokens", f"max_completion_tokens must be at least 1, got {max_tokens}")
    return GenerationRequest("chat", req.model, None, None, messages, max_tokens, sampling, stream, include_usage)


def _prompt(value: Any) -> tuple[str | None, list[int] | None]:
    """Text or token ids from ``prompt`` (a one-element batch is accepted; larger batches are not)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]
    if isinstance(value, str):
        return value, None
    if isinstance(value, list) and value and set(map(type, value)) == {int}:  # every item an int (no bools)
        return None, value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, str | list) for p in value):
        raise _refuse("prompt", f"one prompt per request, got a batch of {len(value)}")
    raise invalid("prompt", "prompt must be a string, a non-empty list of token ids, or a one-element list of either")


def parse_completion(body: bytes, limits: RequestLimits = RequestLimits()) -> GenerationRequest:
    """Check a text completion body."""
    return _check_completion(_decode(_completion_decoder, body), limits)


def _check_completion(req: CompletionRequest, limits: RequestLimits) -> GenerationRequest:
    if req.echo:
        raise _refuse("echo", "the prompt is not echoed")
    if req.suffix:
        raise _refuse("suffix", "insertion after a suffix is not served")
    text, ids = _prompt(req.prompt)
    logprobs = _top_logprobs("logprobs", req.logprobs)
    sampling, max_tokens, stream, include_usage = _common(req, req.max_tokens, logprobs, limits)
    return GenerationRequest("text", req.model, text, ids, None, max_tokens, sampling, stream, include_usage)


def parse_explain(body: bytes, limits: RequestLimits = RequestLimits()) -> GenerationRequest:
    """An explain body is a chat body (has ``messages``) or a completion body (has ``prompt``); decoded once."""
    try:
        obj = msgspec.json.decode(body, type=dict[str, Any])
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise invalid(None, f"request body must be a JSON object: {e}") from None
    if "messages" in obj:
        return _check_chat(_convert(obj, ChatCompletionRequest), limits)
    if "prompt" in obj:
        return _check_completion(_convert(obj, CompletionRequest), limits)
    raise invalid("messages", "give 'messages' (as for chat completions) or 'prompt' (as for completions)")
