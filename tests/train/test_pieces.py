"""The training stage's pieces, in this process and without megatron-core's parallel state:
batch layouts, FLOPs and peaks, stability tracking, the metrics log, checkpoint directories,
MLflow failure handling, and the checks that run before anything heavy."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from megasft.cli import main as megasft_main
from megasft.data.store import SplitWriter
from megasft.errors import ConfigError, InputError
from megasft.megatron.architecture import ModelArchitecture, padded_vocab_size
from megasft.settings import flag_of, help_of
from megasft.tracking import MetricsTracker
from megasft.train.checkpointing import (
    LATEST_FILE,
    TRAIN_STATE_FILE,
    complete_checkpoints,
    iteration_name,
    latest_checkpoint,
    remove_partial_checkpoints,
)
from megasft.train.checks import plan_run
from megasft.train.config import TrainConfig
from megasft.train.data import MicroBatch
from megasft.train.loss import masked_token_loss
from megasft.train.metrics import (
    MetricsLog,
    StabilityMonitor,
    model_flops,
    peak_tflops,
)
from megasft.train.step import context_parallel_indices, shifted_targets, thd_inputs
from tests.train.records import read_metrics


def _micro_batch(seq_lengths: list[list[int]], seq_len: int, seed: int = 0) -> MicroBatch:
    from megasft.train.batch import block_causal_mask, packed_position_ids

    generator = torch.Generator().manual_seed(seed)
    rows = len(seq_lengths)
    tokens = torch.randint(1, 50, (rows, seq_len), generator=generator)
    loss_mask = torch.randint(0, 2, (rows, seq_len), generator=generator).float()
    for row, lengths in enumerate(seq_lengths):
        tokens[row, sum(lengths) :] = 0
        loss_mask[row, sum(lengths) :] = 0
        start = 0
        for length in lengths:
            loss_mask[row, start] = 0  # nothing predicts a document's first token
            start += length
    return MicroBatch(
        tokens=tokens,
        loss_mask=loss_mask,
        position_ids=packed_position_ids(seq_lengths, seq_len),
        attention_mask=block_causal_mask(seq_lengths, seq_len),
        seq_lengths=seq_lengths,
    )


# --- the loss's alignment --------------------------------------------------------------------


def test_shifted_targets_give_masked_token_loss():
    batch = _micro_batch([[3, 2], [6]], seq_len=6)
    logits = torch.randn(2, 6, 50)
    labels, loss_weights = shifted_targets(batch)  # [b, s] each
    token_losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 50), labels.reshape(-1), reduction="none"
    ).reshape(2, 6)
    expected_sum, expected_count = masked_token_loss(logits, batch.tokens, batch.loss_mask)
    assert (token_losses * loss_weights).sum().item() == pytest.approx(expected_sum.item())
    assert loss_weights.sum().item() == expected_count.item()
    assert loss_weights[:, -1].sum() == 0  # the last position predicts nothing


def test_no_target_crosses_a_document_boundary_even_where_the_mask_marks_one():
    batch = _micro_batch([[3, 2], [4]], seq_len=6)
    batch.loss_mask[0, 3] = 1  # the second document's first token, marked by mistake
    batch.loss_mask[1, 4] = 1  # the padding after row 1's only document
    batch.loss_mask[0, 1] = batch.loss_mask[0, 4] = 1  # real targets inside documents
    labels, loss_weights = shifted_targets(batch)
    # position 2 ends document 1 (it would predict token 3); position 3 of row 1 ends its
    # document; positions 0 and 3 of row 0 predict tokens 1 and 4 of their own documents
    assert loss_weights[0, 2] == 0 and loss_weights[1, 3] == 0
    assert loss_weights[0, 0] == 1 and loss_weights[0, 3] == 1
    assert labels[0, 0] == batch.tokens[0, 1]


# --- the packed (Transformer Engine) layout --------------------------------------------------------


def test_thd_layout_concatenates_rows_with_document_boundaries():
    batch = _micro_batch([[3, 2], [4]], seq_len=6)
    inputs = thd_inputs(batch, torch.device("cpu"))
    labels, loss_weights = shifted_targets(batch)
    assert inputs.tokens.tolist() == [batch.tokens.reshape(-1).tolist()]
    assert inputs.labels.tolist() == [labels.reshape(-1).tolist()]
    assert inputs.loss_weights.tolist() == [loss_weights.reshape(-1).tolist()]
    params = inputs.packed_seq_params
    # documents 3, 2 and 1 padding of row 0, then 4 and 2 padding of row 1
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 6, 10, 12]
    assert params.max_seqlen_q == 4 and params.cu_seqlens_q_padded is None
    assert inputs.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1, 2, 3, 0, 1]]
    assert inputs.attention_mask is None


def test_thd_layout_pads_the_total_for_sequence_parallelism():
    batch = _micro_batch([[5]], seq_len=5)
    inputs = thd_inputs(batch, torch.device("cpu"), total_multiple=4)
    assert inputs.tokens.shape == (1, 8)
    assert inputs.packed_seq_params.cu_seqlens_q.tolist() == [0, 5, 8]
    assert inputs.loss_weights[0, 5:].sum() == 0


def test_context_parallel_split_keeps_every_position_once_and_balances_causal_work():
    batch = _micro_batch([[5, 3], [7]], seq_len=8)
    whole = thd_inputs(batch, torch.device("cpu"), context_parallel=2, context_rank=0)
    padded = whole.packed_seq_params.cu_seqlens_q_padded.diff().tolist()
    assert all(length % 4 == 0 for length in padded)  # every document a multiple of 2 x CP
    assert whole.packed_seq_params.cu_seqlens_q.diff().tolist() == [5, 3, 7, 1]
    kept = [context_parallel_indices(padded, 2, rank) for rank in (0, 1)]
    assert sorted(torch.cat(kept).tolist()) == list(range(sum(padded)))
    # rank 0 keeps the first and last quarter of each document, rank 1 the middle two
    assert kept[0][:4].tolist() == [0, 1, 6, 7] and kept[1][:4].tolist() == [2, 3, 4, 5]
    shares = [
        thd_inputs(batch, torch.device("cpu"), context_parallel=2, context_rank=rank)
        for rank in (0, 1)
    ]
    targets = sum(share.loss_weights.sum() for share in shares)
    assert targets == shifted_targets(batch)[1].sum()  # no target lost or doubled


# --- FLOPs, peaks, stability, the log ------------------------------------------------------------


def _architecture(**changes) -> ModelArchitecture:
    fields = dict(
        family="llama",
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=11008,
        num_attention_heads=32,
        num_query_groups=32,
        head_dim=128,
        vocab_size=32000,
        padded_vocab_size=padded_vocab_size(32000),
        max_position_embeddings=4096,
        norm_epsilon=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        qkv_bias=False,
        qk_layernorm=False,
        tied_embeddings=False,
        sliding_window=None,
    )
    return ModelArchitecture(**{**fields, **changes})


def test_model_flops_of_llama2_7b():
    llama = _architecture()
    # 3 passes x 2 FLOPs x the 6.6e9 parameters of the matrix multiplications, per token
    dense = 6 * (32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32000)
    # attention of a causal document of n tokens: 3 x (2 x 2 n^2 d_q) / 2 per layer
    causal = lambda n: 6 * n * n * 4096 * 32  # noqa: E731
    assert model_flops(llama, [1]) == pytest.approx(dense + causal(1))
    assert model_flops(llama, [4096]) == pytest.approx(4096 * dense + causal(4096))
    assert model_flops(llama, [2048, 2048]) == pytest.approx(4096 * dense + 2 * causal(2048))
    assert dense == pytest.approx(6 * 6.6e9, rel=0.02)


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("AMD Instinct MI300X", "bf16", 1307.4),
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100-SXM4-80GB", "fp32", None),
        ("Some New Accelerator", "bf16", None),
        (None, "bf16", None),
    ],
)
def test_peak_table(name, precision, peak):
    assert peak_tflops(name, precision) == peak


def test_stability_monitor_counts_skips_and_spikes_and_round_trips():
    monitor = StabilityMonitor(spike_factor=3.0, min_history=3)
    verdicts = [monitor.observe(loss, 1.0) for loss in (2.0, 2.0, 2.0, 7.0, 2.0)]
    assert verdicts == [(False, False)] * 3 + [(False, True), (False, False)]
    assert monitor.observe(float("nan"), 1.0) == (True, False)
    assert monitor.observe(2.0, float("inf")) == (True, False)
    assert (monitor.skipped_steps, monitor.consecutive_skipped, monitor.spikes) == (2, 2, 1)
    restored = StabilityMonitor(spike_factor=3.0)
    restored.restore(json.loads(json.dumps(monitor.state())))
    assert restored.state() == monitor.state()
    assert monitor.observe(2.0, 1.0) == (False, False) and monitor.consecutive_skipped == 0


def test_metrics_log_drops_lines_of_an_interrupted_run_on_resume(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0, "grad_norm": float("inf") if step == 2 else 1.0})
    log.event("skipped", 4, loss=float("nan"))
    log.resume_at(3, "iter_0000003")
    log.write({"step": 4, "loss": 0.5, "grad_norm": 1.0})
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(log.metrics)] == [
        (1, 1.0, 1.0),
        (2, 1.0, None),  # JSON has no infinity: null
        (3, 1.0, 1.0),
        (4, 0.5, 1.0),
    ]
    assert read_metrics(log.events) == [
        {"event": "resume", "step": 3, "checkpoint": "iter_0000003"}
    ]
    log.event("skipped", 5, loss=float("nan"))
    assert read_metrics(log.events)[-1] == {"event": "skipped", "step": 5, "loss": "nan"}
    log.start_fresh()
    assert not log.metrics.exists() and not log.events.exists()


def test_tracking_failures_never_stop_the_run(capsys):
    tracker = MetricsTracker("http://127.0.0.1:9", "megasft-test", "run")  # nothing listens
    tracker.log_params({"lr": 1e-5})
    tracker.log_metrics({"loss": 1.0, "lr": 1e-5, "mfu": None}, step=1)
    tracker.log_metrics({"loss": 0.9}, step=2)
    tracker.finish("completed")
    summary = tracker.summary()
    assert summary["unsent_metrics"] == 3 and summary["error"]
    assert capsys.readouterr().err.count("MLflow tracking failed") == 1
    disabled = MetricsTracker(None, "megasft-test", "run")
    disabled.log_metrics({"loss": 1.0}, step=1)
    assert disabled.summary()["unsent_metrics"] == 0


# --- checkpoint directories -------------------------------------------------------------------------


def test_only_complete_checkpoints_count(tmp_path):
    for step in (2, 4, 10):
        (tmp_path / iteration_name(step)).mkdir()
        (tmp_path / iteration_name(step) / TRAIN_STATE_FILE).write_text("{}")
    (tmp_path / iteration_name(12)).mkdir()  # no train state: not complete
    (tmp_path / ".iter_0000014.partial").mkdir()
    (tmp_path / LATEST_FILE).write_text("4\n")  # a pointer one save behind
    assert [path.name for path in complete_checkpoints(tmp_path)] == [
        "iter_0000002",
        "iter_0000004",
        "iter_0000010",
    ]
    assert latest_checkpoint(tmp_path).name == "iter_0000010"
    remove_partial_checkpoints(tmp_path)
    assert not (tmp_path / ".iter_0000014.partial").exists()
    assert latest_checkpoint(tmp_path / "missing") is None


# --- checks before any heavy work ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small prepared dataset (packed, seq_length 64) with a val split."""
    from megasft.data.prepare import PrepareConfig, prepare
    from megasft.demo.problems import write_problems
    from megasft.demo.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("checks")
    source = write_problems(root / "problems.jsonl", 40, seed=1)
    prepare(
        PrepareConfig(
            inputs=(str(source),),
            tokenizer=str(build_tokenizer(root / "tokenizer")),
            output=str(root / "data"),
            column_map=(("prompt", "question"), ("response", "answer")),
            seq_length=192,
            val_fraction=0.2,
            workers=1,
            progress=False,
        )
    )
    return root / "data"


def _model(tmp_path: Path, **changes) -> Path:
    """A megatron checkpoint directory with only its architecture.json: all the checks read."""
    directory = tmp_path / "model"
    directory.mkdir(exist_ok=True)
    fields = dict(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=192,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=16,
        vocab_size=600,
        padded_vocab_size=640,
        max_position_embeddings=256,
    )
    _architecture(**{**fields, **changes}).save(directory / "architecture.json")
    return directory


def _config(dataset: Path, tmp_path: Path, **settings) -> TrainConfig:
    model = settings.pop("model", None) or _model(tmp_path)
    values = dict(data=str(dataset), load=str(model), save=str(tmp_path / "out"), train_iters=4)
    return TrainConfig(**{**values, **settings})


def test_plan_resolves_epochs_and_finds_the_checkpoint_to_resume(dataset, tmp_path):
    plan = plan_run(
        _config(dataset, tmp_path, train_iters=None, epochs=2.0, global_batch_size=4),
        on_accelerator=False,
    )
    assert plan.config.train_iters == -(-2 * plan.train_rows // 4) and plan.config.epochs is None
    assert plan.val_rows > 0 and plan.seq_length == 192 and plan.resume_from is None
    checkpoint = tmp_path / "out" / iteration_name(6)
    checkpoint.mkdir(parents=True)
    (checkpoint / TRAIN_STATE_FILE).write_text("{}")
    assert plan_run(_config(dataset, tmp_path), on_accelerator=False).resume_from == checkpoint


@pytest.mark.parametrize(
    ("settings", "model", "message"),
    [
        ({"nproc": 4, "tensor_parallel": 4}, {}, "--tp 4 does not divide the model's 2 query"),
        ({"nproc": 3, "pipeline_parallel": 3}, {}, "4 layers cannot be split into 3"),
        ({}, {"max_position_embeddings": 128}, "sequence length 192 is above"),
        ({}, {"vocab_size": 100, "padded_vocab_size": 128}, r"tokenizer has \d+ tokens"),
        ({"nproc": 2, "context_parallel": 2}, {}, "--cp above 1 needs GPUs"),
        ({"attention": "te"}, {}, "--attention te needs Transformer Engine on a GPU"),
        ({"require_accelerator": True}, {}, "--require-accelerator: this process sees no CUDA"),
        ({"fp8": "hybrid"}, {}, "--fp8 hybrid needs GPUs with Transformer Engine"),
        ({"recompute": "full", "recompute_layers": 5}, {}, "--recompute-layers 5 is more than"),
        ({"warmup_iters": 9, "train_iters": None, "epochs": 0.1}, {}, "--warmup-iters 9"),
    ],
)
def test_bad_settings_fail_before_any_heavy_work(dataset, tmp_path, settings, model, message):
    config = _config(dataset, tmp_path, model=_model(tmp_path, **model), **settings)
    with pytest.raises(ConfigError, match=message):
        plan_run(config, on_accelerator=False)


def test_fp8_on_gpus_without_transformer_engine_is_refused_naming_it(
    dataset, tmp_path, monkeypatch
):
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # as on a GPU node
    config = _config(dataset, tmp_path, fp8="hybrid")
    with pytest.raises(ConfigError, match="--fp8 hybrid needs Transformer Engine, which is not"):
        plan_run(config, on_accelerator=True)


def test_missing_inputs_are_named(dataset, tmp_path):
    with pytest.raises(InputError, match="--data .*no such directory"):
        plan_run(_config(tmp_path / "nowhere", tmp_path), on_accelerator=False)
    with pytest.raises(InputError, match="--load .*architecture.json"):
        plan_run(_config(dataset, tmp_path, model=tmp_path), on_accelerator=False)
    no_val = tmp_path / "no_val"
    shutil.copytree(dataset, no_val)
    SplitWriter(no_val / "val.arrow").close()  # an empty val split
    with pytest.raises(ConfigError, match="--eval-interval 5 needs validation data"):
        plan_run(_config(no_val, tmp_path, eval_interval=5), on_accelerator=False)


def test_cli_reports_a_bad_setting_without_a_traceback_and_quickly(dataset, tmp_path, capsys):
    started = time.monotonic()
    code = megasft_main(
        ["train", "--data", str(dataset), "--load", str(_model(tmp_path)),
         "--save", str(tmp_path / "out"), "--train-iters", "3", "--nproc", "4", "--tp", "4"]
    )  # fmt: skip
    assert code == 2
    assert "megasft train: error: --tp 4 does not divide" in capsys.readouterr().err
    assert time.monotonic() - started < 30  # no process was started, no model built
    assert not (tmp_path / "out").exists()


def test_every_setting_is_documented_and_a_flag(capsys):
    assert all(help_of(field) for field in dataclasses.fields(TrainConfig))
    with pytest.raises(SystemExit):
        megasft_main(["train", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--tp", "--pp", "--cp", "--nproc", "--micro-batch-size", "--epochs",
                 "--min-lr", "--clip-grad", "--save-interval", "--precision",
                 "--no-distributed-optimizer", "--tracking-uri", "--config"):  # fmt: skip
        assert flag in help_text
    assert all(flag_of(TrainConfig, f.name) in help_text for f in dataclasses.fields(TrainConfig))
