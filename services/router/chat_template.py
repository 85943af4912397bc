"""Chat messages to prompt text: a plain default, or a Jinja template as Hugging Face models ship them."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from libs.common.errors import BadRequest, ConfigError

Message = dict[str, str]  # {"role": ..., "content": ...} with text content


class ChatTemplate:
    """Renders messages; ``add_generation_prompt`` opens the assistant's turn."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", name: str = "template") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"chat template {name}: syntax error at line {e.lineno}: {e.message}") from None
        self.source = source
        self._specials = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: list[Message], *, add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` (BadRequest if the template refuses them)."""
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self._specials
            )
        except BadRequest:
            raise
        except jinja2.TemplateError as e:
            raise BadRequest(f"the chat template cannot render these messages: {e}") from None


def _raise_exception(message: str) -> None:
    """What templates call to refuse a conversation (e.g. roles out of order)."""
    raise BadRequest(f"the chat template refused the messages: {message}")


# Each message as "<|role|>" on its own line then its content; the assistant's turn is opened last.
PLAIN_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def load_chat_template(path: str, tokenizer_template: str, *, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    """The template from ``path`` if given, else the tokenizer's own, else the plain default."""
    if path:
        try:
            source = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"ROUTER_CHAT_TEMPLATE={path!r}: cannot read it ({e.strerror})") from None
        return ChatTemplate(source, bos_token=bos_token, eos_token=eos_token, name=path)
    if tokenizer_template:
        return ChatTemplate(tokenizer_template, bos_token=bos_token, eos_token=eos_token, name="of the tokenizer")
    return ChatTemplate(PLAIN_TEMPLATE, name="plain")
