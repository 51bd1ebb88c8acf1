"""The parameters one rank holds: names, shapes on this rank, in megatron-core's order.

The tensors come from the model family's weight table (`ModelFamily.weight_mappings` and
`megatron_shape`), so a family's own tensors (Qwen2's QKV bias, Qwen3's QK norms) are counted
without naming the family here. `PLACEMENTS` says, for each tensor of a table, where
megatron-core registers it in a layer (the order decides the distributed optimizer's padding)
and which dimension tensor parallelism splits. A family with a new kind of tensor adds its
row there; `chunk_parameters` refuses a tensor it has no row for. An MoE layer's experts
tensors ([experts, ...]) become one parameter per expert of this expert-parallel rank, split
over ETP.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import math
from dataclasses import dataclass

from megasft.errors import ConfigError
from megasft.megatron import families
from megasft.megatron.architecture import ModelArchitecture
from megasft.megatron.families.weight_mapping import EMBEDDING, MEGATRON_LAYER, OUTPUT_LAYER
from megasft.megatron.peft import method_named
from megasft.megatron.peft.registry import ADAPTER_MODULE
from megasft.plan.layout import Layout

FINAL_NORM = "decoder.final_layernorm.weight"
LAYER_PREFIX = MEGATRON_LAYER.removesuffix("{layer}")  # "decoder.layers."


@dataclass(frozen=True)
class Placement:
    """Where megatron-core keeps one tensor of a layer."""

    local_order: int
    """Position among the layer's parameters with megatron-core's local layers (CPU)."""
    te_order: int
    """Position with Transformer Engine's layers, which fuse the norms into the next linear."""
    split_dim: int | None
    """The dimension divided over tensor-parallel ranks; None: every rank has all of it."""
    local_name: str | None = None
    """The parameter's name with the local layers, where it differs from the checkpoint key."""
    linear_weight: bool = False
    """The weight of a linear layer (Transformer Engine keeps FP8 copies of it with --fp8)."""
    experts: str | None = None
    """For an MoE layer's experts tensor, the linear's name in each expert ("linear_fc1")."""


PLACEMENTS: dict[str, Placement] = {
    "self_attention.linear_qkv.layer_norm_weight": Placement(0, 1, None, "input_layernorm.weight"),
    "self_attention.linear_proj.weight": Placement(1, 0, 1, linear_weight=True),
    "self_attention.linear_qkv.weight": Placement(2, 2, 0, linear_weight=True),
    "self_attention.linear_qkv.bias": Placement(3, 3, 0),
    "self_attention.q_layernorm.weight": Placement(4, 4, None),
    "self_attention.k_layernorm.weight": Placement(5, 5, None),
    "mlp.linear_fc1.layer_norm_weight": Placement(6, 6, None, "pre_mlp_layernorm.weight"),
    "mlp.linear_fc1.weight": Placement(7, 7, 0, linear_weight=True),
    "mlp.linear_fc2.weight": Placement(8, 8, 1, linear_weight=True),
    "pre_mlp_layernorm.weight": Placement(6, 6, None),
    "mlp.router.weight": Placement(7, 7, None),
    "mlp.experts.experts.linear_fc1.weight": Placement(
        8, 8, 0, linear_weight=True, experts="linear_fc1"
    ),
    "mlp.experts.experts.linear_fc2.weight": Placement(
        9, 9, 1, linear_weight=True, experts="linear_fc2"
    ),
}
"""Every per-layer tensor of the supported families' weight tables (by its key after
`decoder.layers.{layer}.`). The embedding and output layer split their vocabulary rows
(dimension 0); the final norm is replicated. An experts tensor's split dimension is that of
each expert's matrix, split over ETP; with the local layers each expert's fc1 and fc2 follow
each other (`SequentialMLP`), with Transformer Engine every fc1 comes first (`TEGroupedMLP`)."""


@dataclass(frozen=True)
class PlannedParameter:
    """One parameter of one model chunk on one rank."""

    name: str
    """Its name in the chunk (`named_parameters()`), layers numbered within the chunk."""
    shape: tuple[int, ...]
    """Its shape on this tensor-parallel rank."""
    shared_embedding: bool = False
    """The embedding or its tied copy in the output layer on another pipeline stage:
    megatron-core gives it a gradient bucket of its own under the distributed optimizer."""
    fp8: bool = False
    """A weight of a Transformer Engine linear layer, which keeps FP8 copies with --fp8."""
    trainable: bool = True
    """False for a frozen base weight under PEFT: no gradient, main weight or Adam state."""
    expert_parallel: bool = False
    """An expert's weight with EP > 1: megatron-core keeps it in a buffer of its own, sharded
    by the distributed optimizer over the expert-data-parallel ranks."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def chunk_layers(architecture: ModelArchitecture, layout: Layout, stage: int, chunk: int) -> range:
    """The global layer numbers (from 0) of one model chunk.

    Args:
        architecture: the model.
        layout: the parallel layout.
        stage: the pipeline rank.
        chunk: the virtual stage on that rank (0 without the interleaved schedule).

    Returns:
        The layers, as megatron-core assigns them (chunk-major over all pipeline ranks).
    """
    per_chunk = architecture.num_layers // (
        layout.pipeline_parallel * layout.virtual_pipeline_stages
    )
    first = (chunk * layout.pipeline_parallel + stage) * per_chunk
    return range(first, first + per_chunk)


def chunk_parameters(
    architecture: ModelArchitecture, layout: Layout, stage: int, chunk: int = 0
) -> list[PlannedParameter]:
    """The parameters of one model chunk on one rank, in `named_parameters()` order.

    Args:
        architecture: the model.
        layout: the parallel layout (TP splits, PP and virtual stages, layer spec).
        stage: the pipeline rank.
        chunk: the virtual stage on that rank.

    Returns:
        The parameters with their shapes on this tensor-parallel rank.

    Raises:
        ConfigError: the family's table has a tensor without a row in `PLACEMENTS`.
    """
    family = families.family_named(architecture.family)
    mappings = family.weight_mappings(architecture)
    shapes = {
        mapping.megatron: family.megatron_shape(mapping, architecture) for mapping in mappings
    }
    first = stage == 0 and chunk == 0
    last = stage == layout.pipeline_parallel - 1 and chunk == layout.virtual_pipeline_stages - 1
    tied = architecture.tied_embeddings
    vocab_rows = (
        architecture.padded_vocab_size // layout.tensor_parallel,
        architecture.hidden_size,
    )
    trainable = layout.peft is None  # PEFT freezes every base weight
    parameters = []
    if first:
        shared = tied and not last  # its copy lives on the last stage
        parameters.append(PlannedParameter(EMBEDDING, vocab_rows, shared, trainable=trainable))
    for mapping in mappings:
        tensor = mapping.megatron.removeprefix(MEGATRON_LAYER + ".")
        if mapping.megatron.startswith(MEGATRON_LAYER + ".") and tensor not in PLACEMENTS:
            raise ConfigError(
                f"the plan does not know how megatron-core places {tensor!r} of the "
                f"{architecture.family} weight table; add it to megasft.plan.parameters.PLACEMENTS"
            )
    order = (
        (lambda item: PLACEMENTS[item[0]].te_order)
        if layout.transformer_engine
        else (lambda item: PLACEMENTS[item[0]].local_order)
    )
    for number, global_layer in enumerate(chunk_layers(architecture, layout, stage, chunk)):
        layer_tensors = sorted(
            (
                (mapping.megatron.removeprefix(MEGATRON_LAYER + "."), shapes[mapping.megatron])
                for mapping in mappings
                if mapping.megatron.startswith(MEGATRON_LAYER + ".")
                and (mapping.layers is None or global_layer in mapping.layers)
            ),
            key=order,
        )
        layer = []
        for tensor, shape in layer_tensors:
            placement = PLACEMENTS[tensor]
            if placement.experts is not None:
                layer += _expert_parameters(placement, shape, layout, trainable)
                continue
            name = tensor if layout.transformer_engine else placement.local_name or tensor
            layer.append(
                PlannedParameter(
                    name,
                    _split(shape, placement.split_dim, layout.tensor_parallel),
                    fp8=placement.linear_weight,
                    trainable=trainable,
                )
            )
        if not layout.transformer_engine:  # SequentialMLP: each expert's fc1, then its fc2
            layer.sort(key=_local_expert_order)
        if layout.peft is not None:
            layer = _with_adapters(layer, dict(layer_tensors), layout)
        parameters += [
            dataclasses.replace(p, name=f"{LAYER_PREFIX}{number}.{p.name}") for p in layer
        ]
    if last:
        parameters.append(PlannedParameter(FINAL_NORM, shapes[FINAL_NORM], trainable=trainable))
        if not (tied and first):  # tied on one stage: the output layer uses the embedding
            parameters += _output_layer(vocab_rows, tied, layout, trainable)
    return parameters


OUTPUT_TARGET = OUTPUT_LAYER.removesuffix(".weight")
"""The output layer as PEFT targets name it (`--lora-targets ...,output_layer`)."""


def _output_layer(
    vocab_rows: tuple[int, int], tied: bool, layout: Layout, trainable: bool
) -> list[PlannedParameter]:
    """The output layer's weight; when it is a PEFT target, under `output_layer.base.` and
    followed by its adapter (B split by vocabulary rows like the weight; a tied output layer
    is refused as a target, so it is never shared here)."""
    settings = layout.peft
    if settings is None or OUTPUT_TARGET not in settings.targets:
        return [PlannedParameter(OUTPUT_LAYER, vocab_rows, tied, trainable=trainable)]
    adapter = method_named(settings.method).adapter_shapes(
        settings,
        rows=vocab_rows[0] * layout.tensor_parallel,
        columns=vocab_rows[1],
        split_dim=0,
        parts=layout.tensor_parallel,
    )
    return [
        PlannedParameter(f"{OUTPUT_TARGET}.base.weight", vocab_rows, trainable=False),
        *(
            PlannedParameter(f"{OUTPUT_TARGET}.{ADAPTER_MODULE}.{name}", shape)
            for name, shape in adapter.items()
        ),
    ]


LOCAL_EXPERTS = "mlp.experts.local_experts."


def _expert_parameters(
    placement: Placement, shape: tuple[int, ...], layout: Layout, trainable: bool
) -> list[PlannedParameter]:
    """One experts tensor [experts, rows, columns] as the parameters of this rank's experts:
    `mlp.experts.local_experts.{i}.<linear>.weight` with the local layers (SequentialMLP),
    `mlp.experts.<linear>.weight{i}` with Transformer Engine's grouped linears."""
    experts, *matrix = shape
    local = experts // layout.expert_parallel
    split = _split(tuple(matrix), placement.split_dim, layout.expert_tensor_size)
    names = [
        f"mlp.experts.{placement.experts}.weight{i}"
        if layout.transformer_engine
        else f"{LOCAL_EXPERTS}{i}.{placement.experts}.weight"
        for i in range(local)
    ]
    return [
        PlannedParameter(
            name,
            split,
            fp8=True,
            trainable=trainable,
            expert_parallel=experts_buffered_apart(layout),
        )
        for name in names
    ]


def experts_buffered_apart(layout: Layout) -> bool:
    """Whether megatron-core keeps the experts' weights in buffers of their own (reduced over
    the expert-data-parallel ranks): with EP > 1, and from megatron-core 0.19 on also where
    ETP differs from TP (0.16 reduces them with the other weights then).

    Args:
        layout: the parallel layout.

    Returns:
        True for buffers of their own.
    """
    if layout.expert_parallel > 1:
        return True
    return layout.expert_tensor_size != layout.tensor_parallel and _megatron_core() >= (0, 19)


@functools.cache
def _megatron_core() -> tuple[int, int]:
    """The installed megatron-core's (major, minor), read from its metadata without importing
    it; the newest behaviour where it is not installed (a laptop planning a cluster run)."""
    try:
        major, minor = importlib.metadata.version("megatron-core").split(".")[:2]
    except importlib.metadata.PackageNotFoundError:
        return (999, 0)
    return int(major), int(minor)


def _local_expert_order(parameter: PlannedParameter) -> int:
    """A stable sort on this puts a layer's parameters in SequentialMLP's order: every other
    parameter first (as they were), then expert by expert."""
    if not parameter.name.startswith(LOCAL_EXPERTS):
        return -1
    return int(parameter.name.removeprefix(LOCAL_EXPERTS).split(".")[0])


def _with_adapters(
    layer: list[PlannedParameter], shapes: dict[str, tuple[int, ...]], layout: Layout
) -> list[PlannedParameter]:
    """A layer's parameters with PEFT's adapters: each target linear's own parameters under
    `<linear>.base.`, then its adapter's under `<linear>.adapter.` (as the PEFT method wraps
    the linear in place, keeping the layer's order)."""
    settings = layout.peft
    method = method_named(settings.method)
    adapted = []
    for index, parameter in enumerate(layer):
        path = parameter.name.split(".")
        target = next((t for t in settings.targets if t in path[:-1]), None)
        if target is None:
            adapted.append(parameter)
            continue
        module = ".".join(path[: path.index(target) + 1])
        adapted.append(dataclasses.replace(parameter, name=f"{module}.base.{path[-1]}"))
        following = layer[index + 1].name if index + 1 < len(layer) else ""
        if following.startswith(module + "."):
            continue  # the adapter comes after the linear's last parameter
        weight = f"{module}.weight"
        rows, columns = shapes[weight]
        adapter = method.adapter_shapes(
            settings,
            rows=rows,
            columns=columns,
            split_dim=PLACEMENTS[weight].split_dim,
            parts=layout.tensor_parallel,
        )
        adapted += [
            PlannedParameter(f"{module}.{ADAPTER_MODULE}.{name}", shape)
            for name, shape in adapter.items()
        ]
    return adapted


def model_parameter_count(architecture: ModelArchitecture) -> int:
    """Parameters of the whole model as megatron-core holds it (vocabulary padded), counting a
    tied embedding once."""
    family = families.family_named(architecture.family)
    total = 0
    for mapping in family.weight_mappings(architecture):
        count = math.prod(family.megatron_shape(mapping, architecture))
        if MEGATRON_LAYER in mapping.megatron:
            layers = architecture.num_layers if mapping.layers is None else len(mapping.layers)
            count *= layers
        total += count
    return total


def _split(shape: tuple[int, ...], dim: int | None, parts: int) -> tuple[int, ...]:
    if dim is None:
        return shape
    return tuple(size // parts if index == dim else size for index, size in enumerate(shape))
