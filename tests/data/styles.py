"""Chat template styles for the masking tests, each with the special tokens it needs.

Written for these tests in the shape of the real families' templates: ChatML with an injected
default system prompt (Qwen2.5), Llama 3 headers with the BOS in the template and in the
tokenizer's post-processor, Mistral's [INST] with `add_bos_token`, and a template that drops
the reasoning of earlier answers (Qwen3).
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
}
