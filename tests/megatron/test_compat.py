"""The megatron-core differences between the tested versions, checked on the installed one.

`make test` runs these on megatron-core 0.16.1 and `make test-compat` on 0.19.2, so each
difference is seen from both sides.
"""

from __future__ import annotations

import json
import warnings

import pytest

from megasft.errors import ConfigError
from megasft.megatron import compat

# What each tested version does; a new tested version adds its row here.
READS_COMMON_STATE_FROM_DCP_FILES = {"0.16.1": False, "0.19.2": True}
CUDA_GRAPH_FIELD = {"0.16.1": "cuda_graph_scope", "0.19.2": "cuda_graph_modules"}
TINY_LLAMA = json.dumps(
    dict(
        family="llama",
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=192,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=16,
        vocab_size=400,
        padded_vocab_size=512,
        max_position_embeddings=256,
        norm_epsilon=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        qkv_bias=False,
        qk_layernorm=False,
        tied_embeddings=False,
        sliding_window=None,
    )
)


def test_the_installed_megatron_core_is_a_tested_version():
    assert compat.TESTED_MEGATRON_CORE_VERSIONS == ("0.16.1", "0.19.2")
    assert compat.installed_megatron_core_version() in compat.TESTED_MEGATRON_CORE_VERSIONS
    assert set(READS_COMMON_STATE_FROM_DCP_FILES) == set(compat.TESTED_MEGATRON_CORE_VERSIONS)


def test_an_untested_version_is_named_once_on_the_gpu_path(monkeypatch, capsys):
    monkeypatch.setattr(compat, "_warned_untested", set())
    assert compat.warn_if_untested("0.17.0") is True
    assert compat.warn_if_untested("0.17.0") is False  # once per process
    assert compat.warn_if_untested("0.19.2") is False
    assert capsys.readouterr().err == (
        "megasft: warning: megatron-core 0.17.0 is installed, but megasft was checked against "
        "0.16.1, 0.19.2 only. Install one of those (megatron-core==0.19.2 needs Python 3.12), "
        "or read megasft/megatron/cpu.py (its CUDA redirects) and compat.py (the API "
        "differences) against the new version and add it to TESTED_MEGATRON_CORE_VERSIONS.\n"
    )


def test_the_cuda_graph_field_has_the_installed_name_and_silences_the_full_scope_warning():
    from megasft.megatron.architecture import ModelArchitecture
    from megasft.megatron.builder import transformer_config

    version = compat.installed_megatron_core_version()
    assert compat.version_specific_config_fields() == {CUDA_GRAPH_FIELD[version]: []}
    architecture = ModelArchitecture.from_json(TINY_LLAMA)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transformer_config(architecture)
    assert not [w for w in caught if "scope is deprecated" in str(w.message)]


def test_common_state_probe_matches_the_installed_version():
    version = compat.installed_megatron_core_version()
    assert compat._reads_common_state_from_dcp_files() is READS_COMMON_STATE_FROM_DCP_FILES[version]


def _dcp_checkpoint(path, common_state: bool):
    path.mkdir()
    (path / ".metadata").write_bytes(b"")
    if common_state:
        (path / "common.pt").write_bytes(b"")
    return path


def test_a_checkpoint_without_common_state_is_refused_where_it_cannot_be_read(
    tmp_path, monkeypatch
):
    checkpoint = _dcp_checkpoint(tmp_path / "iter_0000004", common_state=False)
    monkeypatch.setattr(compat, "_reads_common_state_from_dcp_files", lambda: False)
    monkeypatch.setattr(compat, "installed_megatron_core_version", lambda: "0.16.1")
    with pytest.raises(
        ConfigError,
        match=r"iter_0000004 was written by megatron-core 0\.19 or newer .* megatron-core "
        r"0\.16\.1 cannot read; load it with megatron-core 0\.19\.2 \(Python 3\.12\)",
    ):
        compat.check_checkpoint_readable(checkpoint)
    monkeypatch.setattr(compat, "_reads_common_state_from_dcp_files", lambda: True)
    compat.check_checkpoint_readable(checkpoint)


def test_checkpoints_with_common_state_or_no_dcp_files_pass_on_any_version(tmp_path, monkeypatch):
    monkeypatch.setattr(compat, "_reads_common_state_from_dcp_files", lambda: False)
    compat.check_checkpoint_readable(_dcp_checkpoint(tmp_path / "converted", common_state=True))
    compat.check_checkpoint_readable(tmp_path / "missing")  # dist_checkpointing says why
