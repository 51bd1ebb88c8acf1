"""Loading a model to evaluate: a Hugging Face directory, or a megatron checkpoint converted to
one in-process, together with its tokenizer, chat template and end-of-turn tokens.

A directory with `config.json` is a Hugging Face model; one with `architecture.json` (or
dist_checkpointing's `metadata.json`) is a megasft megatron-core checkpoint, converted in a
scratch directory by the convert stage and loaded from there. A tokenizer without a chat
template is refused unless the ChatML fallback is asked for. See docs/evaluate.md, "Inputs".
"""

from __future__ import annotations

import contextlib
import gc
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from packaging.version import Version

from megasft.checkpoint.layout import ARCHITECTURE_FILE, HF_FILES_DIR
from megasft.data.conversation import Message
from megasft.data.template import TemplateError
from megasft.data.tokenizer import ChatTokenizer, load_chat_tokenizer
from megasft.errors import ConfigError, InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ANSWER_SENTINEL = "megasft-answer-sentinel"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    """A transformers causal LM in eval mode, on its device."""
    chat_tokenizer: ChatTokenizer
    stop_token_ids: tuple[int, ...]
    """The chat template's end-of-turn token(s) and the tokenizer's EOS: generation stops at
    the first of them."""
    pad_token_id: int
    description: dict
    """Where it came from, for metrics.json: path, kind (hf or megatron), tokenizer, dtype."""
    hf_path: Path | None = None
    """The Hugging Face directory the weights were loaded from (a megatron checkpoint's
    converted copy): what an engine that loads the model itself (vLLM) reads."""

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on."""
        return next(self.model.parameters()).device


def resolve_device(device: str) -> torch.device:
    """The device `--device` names.

    Args:
        device: "auto" (the first CUDA or ROCm device when there is one, else the CPU), or a
            torch device name.

    Returns:
        The device.

    Raises:
        ConfigError: a CUDA device was asked for and none is available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA/ROCm device is available here")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype `--dtype` names.

    Args:
        dtype: "auto" (bfloat16 on an accelerator that supports it, else float32: CPU matmuls
            in bf16 are slow and make batched and one-by-one generation disagree), or a name
            in DTYPES.
        device: the device the model goes to.

    Returns:
        The dtype.
    """
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[dtype]


def is_hf_model(path: Path) -> bool:
    """Whether `path` is a Hugging Face model directory (it holds config.json).

    Args:
        path: a directory.

    Returns:
        True for a Hugging Face model.
    """
    return (path / "config.json").is_file()


def is_peft_adapter(path: Path) -> bool:
    """A Hugging Face PEFT adapter (`megasft convert --adapter-only` writes one)."""
    return (path / "adapter_config.json").is_file() and not is_hf_model(path)


def is_megatron_checkpoint(path: Path) -> bool:
    """Whether `path` is a megasft megatron-core checkpoint (`megasft.checkpoint.layout`): a
    `dist_checkpointing` checkpoint with the model's `architecture.json` beside it.

    Args:
        path: a directory.

    Returns:
        True for a megatron checkpoint (and not an HF model).
    """
    if not path.is_dir() or is_hf_model(path):
        return False
    if (path / ARCHITECTURE_FILE).is_file():
        return True
    metadata = path / "metadata.json"
    if metadata.is_file():
        with contextlib.suppress(OSError, ValueError):
            return "sharded_backend" in json.loads(metadata.read_text(encoding="utf-8"))
    return False


def _is_training_output(path: Path) -> bool:
    """Megatron's training output layout: one checkpoint per `iter_NNNNNNN/` directory."""
    return (path / "latest_checkpointed_iteration.txt").is_file() or any(
        child.is_dir() and child.name.startswith("iter_") for child in path.iterdir()
    )


def convert_megatron_to_hf(source: Path, destination: Path, base: Path | None) -> Path:
    """Convert a megatron checkpoint to a Hugging Face directory with the convert stage
    (`megasft.checkpoint.convert`), in this process.

    Args:
        source: the megatron checkpoint.
        destination: the HF directory to write.
        base: the HF model whose config and tokenizer go with the weights; without it, those
            stored in the checkpoint (its `hf/` directory).

    Returns:
        `destination`.

    Raises:
        CheckpointError: the checkpoint cannot be converted.
    """
    from megasft.checkpoint.convert import convert

    convert("megatron", "hf", source, destination, base=base)
    return destination


def model_kind(path: str | Path) -> str:
    """What kind of model the directory at `path` holds.

    Args:
        path: the model's directory.

    Returns:
        "hf", "adapter" (a Hugging Face PEFT adapter) or "megatron".

    Raises:
        InputError: a missing path, a file, a training run's output directory, or anything
            else.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"model {path} does not exist")
    if not path.is_dir():
        raise InputError(f"model {path} is not a directory: pass a Hugging Face model directory")
    if is_hf_model(path):
        return "hf"
    if is_peft_adapter(path):
        return "adapter"
    if is_megatron_checkpoint(path):
        return "megatron"
    if _is_training_output(path):
        raise InputError(
            f"{path} holds a training run's checkpoints (iter_* directories); pass one of "
            "them as --model"
        )
    raise InputError(
        f"{path} is neither a Hugging Face model (no config.json) nor a megatron "
        f"checkpoint (no {ARCHITECTURE_FILE} or dist_checkpointing metadata.json)"
    )


def check_model(
    path: str | Path,
    tokenizer: str | Path | None,
    chatml_fallback: bool,
    fallback_tokenizer: str | Path | None = None,
    convert_base: str | Path | None = None,
) -> None:
    """What `load_model` would refuse, found without loading weights: run for every model
    before the first one is loaded, so a bad baseline does not fail after the tuned model's
    generation.

    Args:
        path: the model's directory.
        tokenizer: `--tokenizer`, if given.
        chatml_fallback: whether a tokenizer without a chat template may use ChatML.
        fallback_tokenizer: the tokenizer to borrow when the model has none.
        convert_base: the HF model a megatron checkpoint came from, if given.

    Raises:
        InputError: the model or its tokenizer is missing or of an unknown kind.
        ConfigError: the tokenizer has no chat template and no fallback was asked for.
    """
    path = Path(path)
    kind = model_kind(path)
    if kind == "adapter" and not convert_base:
        raise ConfigError(f"model {path} is a LoRA adapter: pass its base model as --base DIR")
    if kind in ("megatron", "adapter") and convert_base:
        home = Path(convert_base)
    elif kind == "megatron":
        home = path / HF_FILES_DIR  # what conversion copies next to the weights
    else:
        home = path
    load_tokenizer(path, home, tokenizer, fallback_tokenizer, chatml_fallback)


def load_tokenizer(
    path: Path,
    hf_path: Path,
    tokenizer: str | Path | None,
    fallback_tokenizer: str | Path | None,
    chatml_fallback: bool,
) -> ChatTokenizer:
    """The model's tokenizer: `tokenizer` when given, else the one in `hf_path`, else
    `fallback_tokenizer`.

    Args:
        path: the model's directory (named in errors).
        hf_path: the HF directory whose tokenizer files the model carries.
        tokenizer: `--tokenizer`, if given.
        fallback_tokenizer: the tokenizer to borrow when `hf_path` has none.
        chatml_fallback: whether a tokenizer without a chat template may use ChatML.

    Returns:
        The tokenizer with its chat template.

    Raises:
        InputError: no tokenizer.json where the tokenizer was looked for.
        ConfigError: no chat template, and `chatml_fallback` is not set.
    """
    if tokenizer:
        tokenizer_dir = Path(tokenizer)
    elif not (hf_path / "tokenizer.json").is_file() and fallback_tokenizer:
        tokenizer_dir = Path(fallback_tokenizer)
    else:
        tokenizer_dir = hf_path
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise InputError(
            f"model {path} comes without a tokenizer: {tokenizer_dir} has no tokenizer.json. "
            "Pass the tokenizer the model was trained with as --tokenizer DIR"
        )
    chat_tokenizer = load_chat_tokenizer(tokenizer_dir)
    if chat_tokenizer.template.origin == "chatml-fallback" and not chatml_fallback:
        raise ConfigError(
            f"the tokenizer in {tokenizer_dir} has no chat template, so there is no way to know "
            "how this model expects prompts. Pass --tokenizer with the tokenizer used for "
            "training, or --chatml-fallback to use ChatML (what `megasft prepare` falls back to)"
        )
    return chat_tokenizer


def load_model(
    path: str | Path,
    tokenizer: str | Path | None,
    device: torch.device,
    dtype: torch.dtype,
    chatml_fallback: bool,
    scratch: Path,
    convert_base: str | Path | None = None,
    fallback_tokenizer: str | Path | None = None,
) -> LoadedModel:
    """Load the model at `path` (HF or megatron) with its tokenizer.

    The tokenizer is `tokenizer` when given, else the model's own, else `fallback_tokenizer`
    (a baseline without tokenizer files borrows the tuned model's). A megatron checkpoint is
    converted under `scratch`, with `convert_base` as the Hugging Face model it came from.

    Args:
        path: the model's directory.
        tokenizer: `--tokenizer`, if given.
        device: where the weights go.
        dtype: the weights' dtype.
        chatml_fallback: whether a tokenizer without a chat template may use ChatML.
        scratch: where a megatron checkpoint is converted.
        convert_base: the HF model a megatron checkpoint came from, if given.
        fallback_tokenizer: the tokenizer to borrow when the model has none.

    Returns:
        The model, its tokenizer, stop tokens and description.

    Raises:
        InputError: the model, its tokenizer or their vocabularies cannot be used (the message
            says what to do).
        ConfigError: the tokenizer has no chat template and no fallback was asked for, or no
            end-of-answer token can be found.
    """
    path = Path(path)
    kind = model_kind(path)
    hf_path = path
    if kind == "megatron":
        scratch.mkdir(parents=True, exist_ok=True)
        base = Path(convert_base) if convert_base else None
        hf_path = convert_megatron_to_hf(path, scratch / f"hf-{path.name}", base)
    elif kind == "adapter":
        hf_path = Path(convert_base)  # the adapter's base: its tokenizer, then its weights
    chat_tokenizer = load_tokenizer(path, hf_path, tokenizer, fallback_tokenizer, chatml_fallback)
    tokenizer_dir = Path(chat_tokenizer.path)

    model = _load_hf(hf_path, dtype)
    if kind == "adapter":
        from peft import PeftModel

        # merged into the base's weights, so that generation runs at the plain model's speed
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    model = model.to(device).eval()
    vocab = chat_tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab > rows:
        raise InputError(
            f"the tokenizer in {tokenizer_dir} has {vocab} tokens but model {path} embeds only "
            f"{rows}: they do not belong together; pass the right --tokenizer"
        )
    stop_ids = stop_token_ids(chat_tokenizer)
    pad = chat_tokenizer.special_tokens.get("pad_token")
    pad_id = chat_tokenizer.tokenizer.token_to_id(pad) if pad else None
    return LoadedModel(
        model=model,
        chat_tokenizer=chat_tokenizer,
        stop_token_ids=stop_ids,
        # Which id pads does not matter (the attention mask hides it); any valid one will do.
        pad_token_id=pad_id if pad_id is not None else stop_ids[0],
        description={
            "path": str(path),
            "kind": kind,
            "tokenizer": str(tokenizer_dir),
            "chat_template": chat_tokenizer.template.origin,
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
            "max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
        },
        hf_path=hf_path,
    )


def _load_hf(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    import transformers
    from transformers import AutoModelForCausalLM

    # transformers renamed `torch_dtype` to `dtype` in 4.56; both are supported here.
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), **{dtype_key: dtype})
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"cannot load the Hugging Face model in {path}: {error}") from error


def stop_token_ids(chat_tokenizer: ChatTokenizer) -> tuple[int, ...]:
    """The ids that end an answer: the template's end-of-turn token, then the tokenizer's EOS.

    The end-of-turn token is found by rendering a one-turn conversation and taking the first
    special token after the answer (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3,
    `</s>` for Llama 2 and Mistral), so no template needs to be known by name.

    Args:
        chat_tokenizer: the tokenizer with its chat template.

    Returns:
        The stop ids, end-of-turn first.

    Raises:
        ConfigError: the template cannot render a user/assistant exchange, or neither an
            end-of-turn token nor an EOS can be found.
    """
    tokenizer = chat_tokenizer.tokenizer
    stop: list[int] = []
    messages = [Message("user", "Hi"), Message("assistant", _ANSWER_SENTINEL)]
    try:
        rendered = chat_tokenizer.template.render(messages)
    except TemplateError as error:
        raise ConfigError(
            f"the chat template of {chat_tokenizer.path} cannot render a user/assistant "
            f"exchange: {error}"
        ) from error
    if _ANSWER_SENTINEL in rendered:
        after = rendered[rendered.index(_ANSWER_SENTINEL) + len(_ANSWER_SENTINEL) :]
        for token_id in tokenizer.encode(after, add_special_tokens=False).ids:
            if token_id in chat_tokenizer.special_token_ids:
                stop.append(token_id)
                break
    eos = chat_tokenizer.eos_token
    eos_id = tokenizer.token_to_id(eos) if eos else None
    if eos_id is not None and eos_id not in stop:
        stop.append(eos_id)
    if not stop:
        raise ConfigError(
            f"cannot tell where an answer ends with the tokenizer in {chat_tokenizer.path}: its "
            "chat template puts no special token after an answer and it has no eos_token. "
            "Set eos_token in tokenizer_config.json"
        )
    return tuple(stop)


def free(loaded: LoadedModel) -> None:
    """Drop the model's weights before the next model is loaded.

    Args:
        loaded: the model to drop (its `model` becomes None).
    """
    loaded.model = None
    gc.collect()  # transformers models hold reference cycles; free the weights now
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
