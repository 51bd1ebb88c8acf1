"""LoRA (Hu et al., 2021): y = W x + (alpha / r) B A x, with W frozen and A, B trained.

One adapter per megatron-core linear, on the fused linears as megatron has them: `linear_qkv`
(q, k and v in one matrix) and `linear_fc1` (gate and up) each get one A and one B. Why the
fused form and how it becomes Hugging Face PEFT's separate q/k/v and gate/up adapters without
loss: docs/peft.md. `output_layer` (HF `lm_head`) is a target too, not a default one. The
parallel layer itself is in `lora_layers`.
"""

from __future__ import annotations

from typing import Any

from megasft.megatron.peft.registry import PeftMethod, PeftSettings, register

# The linears of a megatron-core transformer layer, by where they live in the layer.
TARGET_PATHS = {
    "linear_qkv": ("self_attention", "linear_qkv"),
    "linear_proj": ("self_attention", "linear_proj"),
    "linear_fc1": ("mlp", "linear_fc1"),
    "linear_fc2": ("mlp", "linear_fc2"),
}
DEFAULT_TARGETS = tuple(TARGET_PATHS)
OUTPUT_LAYER = "output_layer"
"""The model's vocabulary-parallel output layer (on the last pipeline stage), outside the
layers. A pretrained base's is well scaled and left alone by default; a random base's is not
(docs/peft.md, "The output layer")."""
TARGETS = (*DEFAULT_TARGETS, OUTPUT_LAYER)


def weight_name(target: str) -> str:
    """The megatron-core weight a target adapts, as the weight-mapping tables name it
    (`{layer}` standing for the layer number)."""
    if target == OUTPUT_LAYER:
        return "output_layer.weight"
    parent, linear = TARGET_PATHS[target]
    return f"decoder.layers.{{layer}}.{parent}.{linear}.weight"


@register
class Lora(PeftMethod):
    name = "lora"
    targets = TARGETS

    def problems(self, settings: PeftSettings) -> list[str]:
        found = super().problems(settings)
        if not 0 <= settings.dropout < 1:
            found.append(f"--lora-dropout must be in [0, 1), got {settings.dropout}")
        return found

    def model_problems(self, settings: PeftSettings, architecture: Any) -> list[str]:
        if OUTPUT_LAYER in settings.targets and architecture.tied_embeddings:
            # The output layer's weight is the embedding's: merged, W + B A would change the
            # input embedding too (or untie them, which Hugging Face's tied model cannot hold).
            return [
                f"--lora-targets {OUTPUT_LAYER}: the model ties its output layer to the "
                "input embedding (tie_word_embeddings), so the adapter cannot be merged into "
                f"it alone; leave {OUTPUT_LAYER} out of --lora-targets"
            ]
        return []

    def apply(self, chunk: Any, settings: PeftSettings, *, seed: int) -> None:
        """Freeze `chunk` (a GPTModel, unwrapped) and wrap its targets with LoRA, in place.

        A is initialised from `seed` and the layer's global number, so that every TP/PP
        layout starts from the same adapters; B starts at zero, so the model's output is
        unchanged at step 0. The output layer is wrapped on the chunk that has it (the last
        pipeline stage's last chunk).

        Args:
            chunk: this rank's GPTModel (one pipeline chunk), before DDP wraps it.
            settings: rank, alpha, dropout and targets.
            seed: the run's --seed.
        """
        from megasft.megatron.peft.lora_layers import LoraLinear

        for parameter in chunk.parameters():
            parameter.requires_grad = False
        for layer in chunk.decoder.layers:
            for target in settings.targets:
                if target not in TARGET_PATHS:
                    continue
                parent_name, linear_name = TARGET_PATHS[target]
                parent = getattr(layer, parent_name)
                base = getattr(parent, linear_name)
                wrapped = LoraLinear(
                    base,
                    settings,
                    config=layer.config,
                    init_seed=_adapter_seed(seed, layer.layer_number, target),
                    gated_rows=target == "linear_fc1" and layer.config.gated_linear_unit,
                )
                setattr(parent, linear_name, wrapped)
        if OUTPUT_LAYER in settings.targets and getattr(chunk, "post_process", False):
            chunk.output_layer = LoraLinear(
                chunk.output_layer,
                settings,
                config=chunk.config,
                init_seed=_adapter_seed(seed, 0, OUTPUT_LAYER),  # layers count from 1
            )

    def adapter_shapes(
        self, settings: PeftSettings, *, rows: int, columns: int, split_dim: int, parts: int
    ) -> dict[str, tuple[int, ...]]:
        """A [r, in] and B [out, r], split like the weight (`lora_layers`): B's rows for a
        column-parallel linear, A's columns for a row-parallel one."""
        r = settings.rank
        if split_dim == 0:
            return {"lora_a": (r, columns), "lora_b": (rows // parts, r)}
        return {"lora_a": (r, columns // parts), "lora_b": (rows, r)}

    def adapter_kept(self, settings: PeftSettings, *, inputs: float) -> tuple[float, bool]:
        """A x (r elements, for B's gradient) and the input x (for A's); with dropout, the
        dropped input and its mask instead of x."""
        if settings.dropout:
            return settings.rank + 2 * inputs, False
        return settings.rank, True


def _adapter_seed(seed: int, layer_number: int, target: str) -> int:
    """A seed per adapter that does not depend on the process layout (nor on Python's
    randomised string hashing)."""
    return (seed * 1_000_003 + layer_number * 97 + TARGETS.index(target)) % 2**63
