"""Loading a Hugging Face tokenizer directory: the fast tokenizer and its chat template.

We use the `tokenizers` library directly (not `transformers.AutoTokenizer`): it is what does
the work in either case, and it spares every process transformers' imports. Loading a large
vocabulary still takes a while (Qwen2.5's 151k tokens: about half a second), so `prepare`
forks its workers from a process that has loaded it once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from megasft.data.fast_bpe import FastBPE, fast_bpe_for
from megasft.data.template import CHATML_TEMPLATE, ChatTemplate
from megasft.errors import InputError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass
class ChatTokenizer:
    """A fast tokenizer with the chat template and special tokens of its directory."""

    path: str
    tokenizer: Tokenizer
    template: ChatTemplate
    special_tokens: dict[str, str | None]
    """`bos_token`, `eos_token`, ... as strings (None where the config has none)."""
    special_token_texts: frozenset[str]
    """The text of every added token marked special (`<|im_end|>`, `</s>`, ...)."""
    prefix_ids: tuple[int, ...]
    """Ids the tokenizer itself puts before a text (a BOS), from its post-processor or config."""
    sha256: str
    """Hash of the tokenizer files, recorded in the dataset manifest."""
    special_token_ids: frozenset[int] = field(default_factory=frozenset)
    _fast_bpe: FastBPE | str | None = field(default=None, repr=False, compare=False)

    def fast_bpe(self) -> FastBPE | str:
        """tiktoken's BPE core for this tokenizer, or why it has none (see fast_bpe.py);
        built on first use (a second or so for Qwen2.5), then kept, and never pickled."""
        if self._fast_bpe is None:
            self._fast_bpe = fast_bpe_for(json.loads(self.tokenizer.to_str()))
        return self._fast_bpe

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["tokenizer"] = self.tokenizer.to_str()
        state["_fast_bpe"] = None
        return state

    def __setstate__(self, state):
        state["tokenizer"] = Tokenizer.from_str(state["tokenizer"])
        self.__dict__.update(state)


def _token_text(value) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read {path}: {error}") from error


def _find_template(directory: Path, config: dict) -> tuple[str, str]:
    """Returns (template source, origin). Newer transformers save it beside the config."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), "chat_template.jinja"
    template = config.get("chat_template")
    json_file = directory / "chat_template.json"
    if template is None and json_file.is_file():
        template = _read_json(json_file).get("chat_template")
    if isinstance(template, list):
        # Several named templates (e.g. "default", "tool_use"): the default one is for chat.
        by_name = {entry.get("name"): entry.get("template") for entry in template}
        template = by_name.get("default")
    if isinstance(template, str) and template.strip():
        return template, "tokenizer_config.json"
    return CHATML_TEMPLATE, "chatml-fallback"


def _files_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = directory / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def load_chat_tokenizer(directory: str | Path) -> ChatTokenizer:
    """Loads `tokenizer.json`, `tokenizer_config.json` and the chat template from a directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"tokenizer directory {directory} does not exist")
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise InputError(
            f"{directory} has no tokenizer.json: megasft needs a fast (Rust) tokenizer. "
            "Save one with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
        )
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as error:  # the Rust side raises a plain Exception for a bad file
        raise InputError(f"cannot load {tokenizer_file}: {error}") from error

    config_file = directory / "tokenizer_config.json"
    config = _read_json(config_file) if config_file.is_file() else {}
    special_tokens = {key: _token_text(config.get(key)) for key in SPECIAL_TOKEN_KEYS}
    source, origin = _find_template(directory, config)

    added = tokenizer.get_added_tokens_decoder()
    special_texts = frozenset(token.content for token in added.values() if token.special)
    special_ids = frozenset(index for index, token in added.items() if token.special)

    prefix_ids = _prefix_ids(tokenizer, config, special_tokens.get("bos_token"))
    return ChatTokenizer(
        path=str(directory),
        tokenizer=tokenizer,
        template=ChatTemplate(source, origin, special_tokens),
        special_tokens=special_tokens,
        special_token_texts=special_texts,
        prefix_ids=prefix_ids,
        sha256=_files_sha256(directory),
        special_token_ids=special_ids,
    )


def _prefix_ids(tokenizer: Tokenizer, config: dict, bos_token: str | None) -> tuple[int, ...]:
    """The ids a plain `tokenizer(text)` would put in front of the text.

    The post-processor (Llama 3's TemplateProcessing) or `add_bos_token` (Llama 2, Mistral)
    decide this. We tokenize with `add_special_tokens=False` and add these ourselves, only when
    the rendered template did not already start with them, so a BOS is never doubled.
    """
    with_special = tokenizer.encode("x", add_special_tokens=True).ids
    without = tokenizer.encode("x", add_special_tokens=False).ids
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            prefix = tuple(with_special[:start])
            break
    else:
        prefix = ()
    if not prefix and config.get("add_bos_token") and bos_token is not None:
        bos_id = tokenizer.token_to_id(bos_token)
        if bos_id is not None:
            prefix = (bos_id,)
    return prefix
