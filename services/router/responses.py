"""OpenAI response bodies: completions, streamed chunks, usage, models, and errors with their HTTP status."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from libs.common.errors import (
    BadRequest,
    IndexUnavailable,
    NoCapacity,
    NotFound,
    PrfaasError,
    TransferFailed,
    Unauthorized,
    UpstreamTimeout,
)
from libs.common.messages import TokenLogprob, json_encoder

_OBJECT = {"chat": "chat.completion", "text": "text_completion"}
_CHUNK_OBJECT = {"chat": "chat.completion.chunk", "text": "text_completion"}
_ID_PREFIX = {"chat": "chatcmpl-", "text": "cmpl-"}


def completion_id(kind: str, request_id: str) -> str:
    """``chatcmpl-<request id>`` or ``cmpl-<request id>``."""
    return _ID_PREFIX[kind] + request_id


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """The ``usage`` object (cached prompt tokens under ``prompt_tokens_details``)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class LogprobsRenderer:
    """Log probabilities in OpenAI's shapes: chat ``{"content": [...]}``, completions' ``tokens``/``token_logprobs``/….

    ``piece(token_id)`` gives a token's text and bytes; completions' ``text_offset`` runs on across
    the chunks of one stream.
    """

    def __init__(self, kind: str, piece: Callable[[int], tuple[str, list[int] | None]]) -> None:
        self.kind = kind
        self.piece = piece
        self._offset = 0

    def render(self, entries: Sequence[TokenLogprob]) -> dict:
        """The ``logprobs`` object of a choice holding these tokens."""
        return self._chat(entries) if self.kind == "chat" else self._text(entries)

    def _chat(self, entries: Sequence[TokenLogprob]) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            text, raw = self.piece(token_id)
            return {"token": text, "logprob": logprob, "bytes": raw}

        content = [
            item(e.token_id, e.logprob)
            | {"top_logprobs": [item(i, lp) for i, lp in zip(e.top_ids, e.top_logprobs, strict=True)]}
            for e in entries
        ]
        return {"content": content, "refusal": None}

    def _text(self, entries: Sequence[TokenLogprob]) -> dict:
        tokens, offsets, top = [], [], []
        for e in entries:
            text = self.piece(e.token_id)[0]
            tokens.append(text)
            offsets.append(self._offset)
            self._offset += len(text)
            alternatives = {self.piece(i)[0]: lp for i, lp in zip(e.top_ids, e.top_logprobs, strict=True)}
            top.append(alternatives | {text: e.logprob})  # the chosen token too, as vLLM returns it
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": top,
            "text_offset": offsets,
        }


def _choice(kind: str, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    if kind == "chat":
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
    return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(
    kind: str,
    cid: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    use: dict,
    logprobs: dict | None = None,
) -> dict:
    """A whole (non-streamed) response."""
    return {
        "id": cid,
        "object": _OBJECT[kind],
        "created": created,
        "model": model,
        "choices": [_choice(kind, text, finish_reason, logprobs)],
        "usage": use,
        "system_fingerprint": None,
    }


def chunk(
    kind: str,
    cid: str,
    created: int,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    *,
    first: bool = False,
    with_usage: bool = False,
    logprobs: dict | None = None,
) -> dict:
    """One streamed chunk: a text delta (with its tokens' log probabilities), or the final one carrying ``finish_reason``."""
    if kind == "chat":
        delta: dict = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    body = {"id": cid, "object": _CHUNK_OBJECT[kind], "created": created, "model": model, "choices": [choice]}
    if with_usage:
        body["usage"] = None
    return body


_MARK = "\x00delta\x00"


class DeltaEncoder:
    """The text-delta chunks of one stream as SSE events: the chunk's fixed parts are encoded once, not per token."""

    def __init__(self, kind: str, cid: str, created: int, model: str, *, with_usage: bool) -> None:
        body = json_encoder.encode(chunk(kind, cid, created, model, _MARK, with_usage=with_usage))
        head, _, tail = body.partition(json_encoder.encode(_MARK))
        self._head, self._tail = b"data: " + head, tail + b"\n\n"

    def event(self, text: str) -> bytes:
        """The SSE event of one non-empty text delta."""
        return self._head + json_encoder.encode(text) + self._tail


def usage_chunk(kind: str, cid: str, created: int, model: str, use: dict) -> dict:
    """The last chunk when ``stream_options.include_usage``: usage and no choices."""
    return {"id": cid, "object": _CHUNK_OBJECT[kind], "created": created, "model": model, "choices": [], "usage": use}


def model(name: str, created: int) -> dict:
    """One model object, as ``GET /v1/models/{model}`` returns it."""
    return {"id": name, "object": "model", "created": created, "owned_by": "prfaas"}


def models(names: list[str], created: int) -> dict:
    """``GET /v1/models``."""
    return {"object": "list", "data": [model(n, created) for n in names]}


_STATUS: tuple[tuple[type[PrfaasError], int], ...] = (
    (BadRequest, 400),
    (Unauthorized, 401),
    (NotFound, 404),
    (NoCapacity, 503),
    (IndexUnavailable, 503),
    (UpstreamTimeout, 504),
    (TransferFailed, 502),
)
_BY_CODE = {"payload_too_large": 413, "request_timeout": 408, "decode_failed": 502}


def status_of(error: PrfaasError) -> int:
    """The HTTP status an error is answered with."""
    if error.code in _BY_CODE:
        return _BY_CODE[error.code]
    return next((status for cls, status in _STATUS if isinstance(error, cls)), 500)


def error_body(error: PrfaasError, status: int) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {
        "error": {"message": error.message, "type": kind, "param": getattr(error, "param", None), "code": error.code}
    }
