"""Tiny byte-level BPE tokenizers, trained in-process, for the demo and the tests.

Nothing can be downloaded from a model hub here, so the demo and the tests make their own
tokenizer directories in the same on-disk form as a Hugging Face one (tokenizer.json plus
tokenizer_config.json with a chat template), and every code path reads them as it would a real
one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# ChatML, with a default system prompt injected when the conversation has none (as Qwen2.5's).
CHATML_WITH_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

DEFAULT_CORPUS = (
    "The quick brown fox jumps over the lazy dog. How many apples does Tom have? "
    "Tom has 3 apples and buys 5 more, so he has 3 + 5 = 8 apples. #### 8 "
    "What is the answer? It is 42. Please think step by step. Sure, here is the answer. "
    "system user assistant tool question answer reasoning think hello world numbers "
    "0 1 2 3 4 5 6 7 8 9 10 11 12 20 30 40 50 100 plus minus times each total left more less "
)


def train_bpe(
    corpus: Iterable[str],
    special_tokens: Sequence[str],
    vocab_size: int = 600,
    bos_token: str | None = None,
    split_words: bool = True,
) -> Tokenizer:
    """A byte-level BPE trained on `corpus`; with `bos_token`, the post-processor adds it
    in front of every text (as Llama 3's tokenizer does). `split_words=False` lets merges
    cross word and punctuation boundaries (the tests use it to make boundary-straddling tokens).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=split_words
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    if bos_token is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, tokenizer.token_to_id(bos_token))],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def build_tokenizer(
    directory: str | Path,
    chat_template: str | None = CHATML_WITH_DEFAULT_SYSTEM,
    special_tokens: Sequence[str] = CHATML_SPECIAL_TOKENS,
    corpus: Iterable[str] = (DEFAULT_CORPUS,),
    vocab_size: int = 600,
    config: dict | None = None,
    post_processor_bos: str | None = None,
    split_words: bool = True,
) -> Path:
    """Writes a Hugging Face tokenizer directory; returns its path.

    `config` adds or overrides tokenizer_config.json fields (bos_token, eos_token,
    add_bos_token, ...). `chat_template=None` writes no template (the ChatML fallback case).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe(
        corpus, special_tokens, vocab_size, bos_token=post_processor_bos, split_words=split_words
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>" if "<|im_end|>" in special_tokens else special_tokens[-1],
        "pad_token": special_tokens[0],
        "bos_token": None,
        "add_bos_token": False,
        "model_max_length": 4096,
    }
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    tokenizer_config.update(config or {})
    (directory / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2), encoding="utf-8"
    )
    return directory
