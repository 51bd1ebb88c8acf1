"""Whether a chat template renders tool definitions and tool calls at all.

A template that ignores `tools` or `tool_calls` renders a row with tools as if it had none: the
model would learn replies to calls it never saw made. So the first row with tools or calls
probes the template once, and a template that drops them stops the run with an error naming it
(docs/prepare.md, "Tools and tool calls").
"""

from __future__ import annotations

from megasft.data.conversation import Message
from megasft.data.mask_types import TemplateLayoutError
from megasft.data.template import TemplateError
from megasft.data.tokenizer import ChatTokenizer

_PROBE = "megasft_probe_function"


class ToolSupport:
    """The probe results of one template, worked out the first time they are asked for."""

    def __init__(self, chat_tokenizer: ChatTokenizer):
        self.chat_tokenizer = chat_tokenizer
        self._renders: dict[str, bool] = {}

    def check(self, has_tools: bool, has_calls: bool) -> None:
        """Passes when the template renders what the row holds.

        Args:
            has_tools: the row has tool definitions.
            has_calls: the row has assistant tool calls.

        Raises:
            TemplateLayoutError: naming the template and what it drops.
        """
        for needed, what in ((has_tools, "tools"), (has_calls, "tool_calls")):
            if needed and not self._probe(what):
                template = self.chat_tokenizer.template
                raise TemplateLayoutError(
                    f"the chat template of {self.chat_tokenizer.path} (from {template.origin}) "
                    f"does not render {what}: rows with "
                    f"{'tool definitions' if what == 'tools' else 'tool calls'} would be trained "
                    "without them. Use the model's tool-calling template (its tokenizer's "
                    "chat_template), or leave such rows out."
                )

    def _probe(self, what: str) -> bool:
        if what not in self._renders:
            self._renders[what] = self._renders_probe(what)
        return self._renders[what]

    def _renders_probe(self, what: str) -> bool:
        function = {"name": _PROBE, "description": "probe", "parameters": {"type": "object"}}
        template = self.chat_tokenizer.template
        try:
            if what == "tools":
                messages = [Message("user", "hi")]
                text = template.render(messages, True, [{"type": "function", "function": function}])
            else:
                call = {"type": "function", "function": {"name": _PROBE, "arguments": {}}}
                messages = [Message("user", "hi"), Message("assistant", "", True, (call,))]
                text = template.render(messages, False)
        except TemplateError:
            return False
        return _PROBE in text
