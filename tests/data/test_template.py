"""ChatTemplate renders exactly as a plain Jinja sandbox does, only faster."""

from __future__ import annotations

import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from megasft.data.conversation import Message
from megasft.data.template import ChatTemplate, TemplateError
from tests.data.styles import STYLES

MESSAGES = [
    Message("system", "Be brief."),
    Message("user", "¿Qué tal? <|im_end|>"),
    Message("assistant", "  fine\n"),
]

VARIABLES = {"bos_token": "<s>", "eos_token": "</s>"}

# Attribute access of every kind a template may use on the message dicts.
ATTRIBUTES = (
    "{% for message in messages %}"
    "{{ message.role }}|{{ message['content'] }}|{{ message.tool_calls is defined }}|"
    "{{ message.get('role') }}|{{ message.get('missing', 'default') }}|"
    "{{ message.items() | list | length }}|{{ message.keys() | sort | join(',') }}|"
    "{{ message.missing }}|{{ loop.index }}/{{ loop.length }}|{{ message.values() | list }}\n"
    "{% endfor %}{{ add_generation_prompt }}{{ bos_token }}"
)


def _plain_render(source: str, messages: list[Message], add_generation_prompt: bool) -> str:
    """What jinja2's own `Template.render` in the stock sandbox makes of it."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.globals["raise_exception"] = lambda message: None
    return environment.from_string(source).render(
        messages=[{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=add_generation_prompt,
        tools=None,
        documents=None,
        **VARIABLES,
    )


@pytest.mark.parametrize("source", [ATTRIBUTES, *(style.template for style in STYLES.values())])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_renders_as_the_stock_sandbox(source, add_generation_prompt):
    template = ChatTemplate(source, "test", VARIABLES)
    for messages in (MESSAGES, MESSAGES[1:], MESSAGES[1:2]):
        expected = _plain_render(source, messages, add_generation_prompt)
        assert template.render(messages, add_generation_prompt) == expected


def test_the_sandbox_still_refuses_unsafe_and_mutating_access():
    unsafe = ChatTemplate("{{ messages[0].__class__.__mro__ }}", "test", {})
    with pytest.raises((SecurityError, TemplateError)):
        unsafe.render(MESSAGES)
    mutating = ChatTemplate("{{ messages[0].update({'role': 'x'}) }}", "test", {})
    with pytest.raises((SecurityError, TemplateError)):
        mutating.render(MESSAGES)
