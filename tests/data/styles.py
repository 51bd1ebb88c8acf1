"""Chat template styles for the masking tests, each with the special tokens it needs.

Written for these tests in the shape of the real families' templates: ChatML with an injected
default system prompt (Qwen2.5), Llama 3 headers with the BOS in the template and in the
tokenizer's post-processor, Mistral's [INST] with `add_bos_token`, and a template that drops
the reasoning of earlier answers (REASONING, and QWEN3 with `reasoning_content`); and two tool-calling ones: Llama 3.1's (tools in the
first user message, one JSON call per turn, `ipython` results) and Mistral's ([AVAILABLE_TOOLS],
[TOOL_CALLS], [TOOL_RESULTS]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megasft.demo.tokenizer import CHATML_SPECIAL_TOKENS, CHATML_WITH_DEFAULT_SYSTEM

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set rest = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in rest %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first %}{{ '[INST] ' + system + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Answers may carry "<think>...</think>"; only answers after the last user message keep it.
REASONING = (
    "{% set last_user = namespace(index=-1) %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% set last_user.index = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and loop.index0 < last_user.index and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3.1's tool layout: "Environment: ipython" in the system turn, the tool schemas in the
# first user message, one call per assistant turn as {"name", "parameters"}, results as ipython.
LLAMA31_TOOLS = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim %}{% set rest = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
    "{% if tools is not none or system %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{% if tools is not none %}{{ 'Environment: ipython\n\n' }}{% endif %}"
    "{{ system + '<|eot_id|>' }}"
    "{% endif %}"
    "{% for message in rest %}"
    "{% if message['role'] == 'user' and loop.first and tools is not none %}"
    "{{ '<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, reply with a JSON function call.\n\n' }}"
    "{% for tool in tools %}{{ tool | tojson + '\n\n' }}{% endfor %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] is defined %}"
    "{% if message['tool_calls'] | length != 1 %}"
    "{{ raise_exception('This model only supports single tool-calls at once!') }}{% endif %}"
    "{% set call = message['tool_calls'][0]['function'] %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"' + call['name'] + '\", \"parameters\": ' + call['arguments'] | tojson + '}<|eot_id|>' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|start_header_id|>ipython<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% else %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral's tool layout: the schemas in [AVAILABLE_TOOLS] before the first [INST], every call
# of a turn in one [TOOL_CALLS] list, results in [TOOL_RESULTS].
MISTRAL_TOOLS = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set rest = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in rest %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and tools is not none %}"
    "{{ '[AVAILABLE_TOOLS]' + tools | tojson + '[/AVAILABLE_TOOLS]' }}{% endif %}"
    "{% if loop.first %}{{ '[INST] ' + system + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '[TOOL_RESULTS]' + message['content'] + '[/TOOL_RESULTS]' }}"
    "{% elif message['tool_calls'] is defined %}"
    "{{ '[TOOL_CALLS][' }}"
    "{% for call in message['tool_calls'] %}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{% if not loop.last %}{{ ', ' }}{% endif %}{% endfor %}"
    "{{ ']' + eos_token }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Qwen3's reasoning layout: reasoning from `reasoning_content`, else from a "<think>...</think>"
# at the start of the content, rendered only for answers after the last user message.
QWEN3 = (
    "{% set ns = namespace(last_query=-1) %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}{% set reasoning = '' %}"
    "{% if message['reasoning_content'] is string %}{% set reasoning = message['reasoning_content'] %}"
    "{% elif '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{% if loop.index0 > ns.last_query and reasoning %}"
    "{{ '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

MISTRAL_TOOL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_CALLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)


@dataclass(frozen=True)
class Style:
    name: str
    template: str
    special_tokens: tuple[str, ...]
    config: dict = field(default_factory=dict)
    post_processor_bos: str | None = None
    end_of_turn: str = "<|im_end|>"


STYLES = {
    "chatml": Style("chatml", CHATML_WITH_DEFAULT_SYSTEM, CHATML_SPECIAL_TOKENS),
    "llama3": Style(
        "llama3",
        LLAMA3,
        (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        post_processor_bos="<|begin_of_text|>",
        end_of_turn="<|eot_id|>",
    ),
    "mistral": Style(
        "mistral",
        MISTRAL,
        ("<unk>", "<s>", "</s>"),
        config={"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True},
        end_of_turn="</s>",
    ),
    "reasoning": Style("reasoning", REASONING, CHATML_SPECIAL_TOKENS),
    "qwen3": Style("qwen3", QWEN3, CHATML_SPECIAL_TOKENS),
    "llama31-tools": Style(
        "llama31-tools",
        LLAMA31_TOOLS,
        LLAMA3_SPECIAL_TOKENS,
        config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        post_processor_bos="<|begin_of_text|>",
        end_of_turn="<|eot_id|>",
    ),
    "mistral-tools": Style(
        "mistral-tools",
        MISTRAL_TOOLS,
        MISTRAL_TOOL_TOKENS,
        config={"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True},
        end_of_turn="</s>",
    ),
}
TOOL_STYLES = ("llama31-tools", "mistral-tools")
"""The styles whose templates render tools and tool calls."""
