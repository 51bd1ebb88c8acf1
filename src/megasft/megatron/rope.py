"""RoPE frequencies that megatron-core does not compute the way Hugging Face does."""

from __future__ import annotations

import math

import torch

from megasft.megatron.architecture import Llama3RopeScaling


def llama3_inverse_frequencies(
    head_dim: int, theta: float, scaling: Llama3RopeScaling
) -> torch.Tensor:
    """[head_dim / 2] RoPE inverse frequencies with Llama 3.1 scaling, as Hugging Face computes
    them: long wavelengths are divided by `factor`, short ones kept, and those in between
    interpolated smoothly."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inverse_frequencies = 1.0 / (theta**exponents)
    context = scaling.original_max_position_embeddings
    wavelengths = 2 * math.pi / inverse_frequencies
    long_wavelength = context / scaling.low_freq_factor
    short_wavelength = context / scaling.high_freq_factor

    slowed = torch.where(
        wavelengths > long_wavelength, inverse_frequencies / scaling.factor, inverse_frequencies
    )
    # 0 at the long-wavelength bound, 1 at the short one
    smoothness = (context / wavelengths - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smoothness) * slowed / scaling.factor + smoothness * slowed
    in_between = (wavelengths >= short_wavelength) & (wavelengths <= long_wavelength)
    return torch.where(in_between, interpolated, slowed)
