"""The CPU emulation layer: pinned megatron-core versions, refusals, and what it redirects.

The refusals are checked in this process (they raise before anything is patched); the
redirects themselves are observed in the worker process (see conftest.py), since switching the
emulation on is process-wide.
"""

from __future__ import annotations

import json

import pytest

from megasft.errors import ConfigError
from megasft.megatron import cpu


def test_installed_megatron_core_is_a_checked_version():
    assert cpu.CHECKED_MEGATRON_CORE_VERSIONS == ("0.16.1", "0.19.2")
    assert cpu.installed_megatron_core_version() in cpu.CHECKED_MEGATRON_CORE_VERSIONS


def test_unknown_megatron_core_version_is_refused_loudly(monkeypatch):
    monkeypatch.setattr(cpu, "installed_megatron_core_version", lambda: "0.17.0")
    monkeypatch.setattr(cpu, "accelerator_present", lambda: False)
    with pytest.raises(
        ConfigError,
        match=r"megatron-core 0\.17\.0 is installed.*checked against 0\.16\.1, 0\.19\.2",
    ):
        cpu.enable_cpu_emulation()
    assert not cpu.cpu_emulation_enabled()


def test_refused_when_an_accelerator_is_present(monkeypatch):
    monkeypatch.setattr(cpu, "accelerator_present", lambda: True)
    with pytest.raises(ConfigError, match="an accelerator is present"):
        cpu.enable_cpu_emulation()
    assert not cpu.cpu_emulation_enabled()


@pytest.mark.slow
def test_redirects_seen_in_a_megatron_process(worker_runs):
    checks = json.loads((worker_runs / "emulation_checks.json").read_text())
    assert checks == {
        "cuda_literal_device": "cpu",
        "current_device_tensor": "cpu",
        "dot_cuda_device": "cpu",
        "to_cuda_device": "cpu",
        "float_type_name": "torch.cuda.FloatTensor",
        "bf16_type_name": "torch.cuda.BFloat16Tensor",
        "fork_restores_outside_state": True,
        "fork_stream_advances": True,
        "world_size": 1,
    }
