"""Chat templates: the tokenizer's own Jinja template, rendered the way `transformers` renders it.

We render templates ourselves instead of calling `apply_chat_template` because masking needs
many renderings per conversation (prefixes, skeletons) and the transformers wrapper costs more
than the Jinja render itself. The environment below matches the one transformers gives
templates (sandboxed, trim/lstrip blocks, loop controls, `raise_exception`, `strftime_now`,
a non-HTML-escaping `tojson`), so a template renders here exactly as it does there; a test
checks this against `apply_chat_template` on the real Qwen2.5 tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from megasft.data.conversation import Message

# Used when the tokenizer carries no chat template. Plain ChatML, with no injected system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(Exception):
    """The template refused a conversation (`raise_exception`) or failed to render it."""


class _GenerationTags(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` and renders its body unchanged.

    Some templates carry these markers; we never rely on them, but must be able to render them.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


_DICT_ATTRIBUTES = frozenset(dir(dict))
"""What `getattr` finds on a plain dict: dict's own attributes (`items`, `get`, ...)."""


class _ChatEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with a shortcut for `message.role` on the plain dicts messages are.

    For a name that is no attribute of dict, the sandbox's `getattr` tries the attribute,
    catches the AttributeError, and returns the item or undefined; the shortcut returns the
    same without raising (raising was a third of a render). Anything else goes to the sandbox.
    """

    def getattr(self, obj, attribute):
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except (TypeError, LookupError):
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    environment = _ChatEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTags],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(source)


class ChatTemplate:
    """A compiled chat template plus the special-token variables templates expect."""

    def __init__(self, source: str, origin: str, variables: dict[str, str | None]):
        self.source = source
        self.origin = origin
        """Where the template came from: a file name, or "chatml-fallback"."""
        self.variables = dict(variables)
        """`bos_token`, `eos_token`, ... as strings, passed to every render."""
        self.sha256 = hashlib.sha256(source.encode("utf-8")).hexdigest()
        self._template = _compile(source)
        # What `jinja2.Template.render` builds for every render from the template's ChainMap of
        # globals (a third of a render), built once: the globals as a plain dict, and them
        # merged under the variables every render passes.
        self._globals = dict(self._template.globals)
        self._parent = {**self._globals, "tools": None, "documents": None, **self.variables}

    def render(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
    ) -> str:
        message_dicts = [{"role": m.role, "content": m.content} for m in messages]
        for message, as_dict in zip(messages, message_dicts, strict=True):
            if message.tool_calls is not None:
                as_dict["tool_calls"] = list(message.tool_calls)
            if message.reasoning_content is not None:
                as_dict["reasoning_content"] = message.reasoning_content
        return self.render_dicts(message_dicts, add_generation_prompt, tools)

    def render_dicts(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
    ) -> str:
        template = self._template
        environment = template.environment
        # The context `Template.render` makes (jinja2.runtime.new_context), from the same parts.
        context = environment.context_class(
            environment,
            {
                **self._parent,
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
                "tools": tools,
            },
            template.name,
            template.blocks,
            globals=self._globals,
        )
        try:
            # And what `Template.render` does with it.
            return environment.concat(template.root_render_func(context))
        except TemplateError:
            raise
        except jinja2.TemplateError as error:
            raise TemplateError(str(error)) from error
        except (TypeError, KeyError, IndexError, AttributeError, ValueError) as error:
            # A template indexing past the messages it expects, say messages[0] of an empty list.
            raise TemplateError(f"{type(error).__name__}: {error}") from error

    def __reduce__(self):
        return (ChatTemplate, (self.source, self.origin, self.variables))
