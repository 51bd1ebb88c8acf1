"""What a resumed run may and may not change (megasft.train.resume), from train_state.json."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from megasft.errors import ConfigError
from megasft.train.config import TrainConfig
from megasft.train.resume import check_resume, resume_problems

BASE = TrainConfig(data="d", load="m", save="s", train_iters=100, warmup_iters=10, nproc=4)


def _saved(config: TrainConfig = BASE, distributed_optimizer: bool | None = False) -> dict:
    state = {"step": 50, "config": asdict(config)}
    if distributed_optimizer is not None:
        state["layout"] = {"distributed_optimizer": distributed_optimizer}
    return state


def _problems(saved: dict, distributed_optimizer: bool = False, **changes) -> list[str]:
    config = TrainConfig(**{**asdict(BASE), **changes})
    return resume_problems(saved, config, distributed_optimizer=distributed_optimizer)


def test_the_same_settings_resume():
    assert _problems(_saved()) == []
    assert _problems(_saved(distributed_optimizer=True), distributed_optimizer=True) == []


def test_data_parallel_size_and_model_parallel_sizes_may_change_without_the_distributed_optimizer():
    assert _problems(_saved(), tensor_parallel=2) == []
    assert _problems(_saved(), pipeline_parallel=2) == []
    assert _problems(_saved(), nproc=8) == []
    assert _problems(_saved(distributed_optimizer=True), distributed_optimizer=True, nproc=8) == []


def test_recompute_dropout_and_fp8_may_change():
    # none is in the optimizer state's form: recompute changes memory, not the numbers
    assert _problems(_saved(), recompute="full", recompute_layers=1) == []
    assert _problems(_saved(), recompute="selective") == []
    assert _problems(_saved(), hidden_dropout=0.1, attention_dropout=0.05) == []
    assert _problems(_saved(), fp8="hybrid") == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train_iters": 200}, "--train-iters was 100, now 200: the learning-rate schedule"),
        ({"warmup_iters": 5}, "--warmup-iters was 10, now 5"),
        ({"lr": 2e-5}, "--lr was 1e-05, now 2e-05"),
        ({"min_lr": 1e-6}, "--min-lr was 0.0, now 1e-06"),
        ({"precision": "fp32"}, "--precision was bf16, now fp32: the optimizer state"),
        (
            {"pipeline_parallel": 2, "virtual_pipeline_stages": 2},
            "--virtual-pipeline-stages was None, now 2",
        ),
    ],
)
def test_a_setting_the_run_depends_on_is_named(changes, message):
    problems = _problems(_saved(), **changes)
    assert len(problems) == 1 and message in problems[0]


def test_the_distributed_optimizer_keeps_its_model_parallel_layout_and_itself():
    saved = _saved(distributed_optimizer=True)
    (problem,) = _problems(saved, distributed_optimizer=True, tensor_parallel=2)
    assert problem.startswith("--tp was 1, now 2: the distributed optimizer's state")
    (problem,) = _problems(saved, distributed_optimizer=False)
    assert "saved with the distributed optimizer, this run is without it" in problem
    # a checkpoint from before the layout was recorded: --distributed-optimizer as given
    older = _saved(TrainConfig(**{**asdict(BASE), "distributed_optimizer": True}), None)
    assert _problems(older, distributed_optimizer=False)
    assert _problems(_saved(distributed_optimizer=None), distributed_optimizer=True) == []


def test_expert_parallel_sizes_may_change_within_the_optimizer_states_form():
    ep2 = TrainConfig(**{**asdict(BASE), "expert_parallel": 2})
    # the regular optimizer: EP and ETP reshard, as long as the experts keep (or keep not
    # having) an optimizer of their own
    assert _problems(_saved(ep2), expert_parallel=4) == []
    assert _problems(_saved(ep2), expert_parallel=2, tensor_parallel=2,
                     expert_tensor_parallel=1) == []  # fmt: skip
    assert _problems(_saved(), tensor_parallel=2) == []  # ETP follows TP
    (problem,) = _problems(_saved(), expert_parallel=2)
    assert problem.startswith(
        "--ep / --etp: the checkpoint was saved at EP=1, ETP=1, TP=1, this run is at EP=2, "
        "ETP=1, TP=1: megatron-core keeps the experts' optimizer state apart"
    )
    (problem,) = _problems(_saved(), tensor_parallel=2, expert_tensor_parallel=1)
    assert "this run is at EP=1, ETP=1, TP=2" in problem
    # the token dispatcher and the load-balancing coefficient may change
    assert _problems(_saved(ep2), expert_parallel=2, moe_token_dispatcher="allgather",
                     moe_aux_loss_coeff=0.01) == []  # fmt: skip
    # the distributed optimizer: neither EP nor ETP
    saved = _saved(ep2, distributed_optimizer=True)
    assert _problems(saved, expert_parallel=2, distributed_optimizer=True) == []
    (problem,) = _problems(saved, expert_parallel=4, distributed_optimizer=True)
    assert problem.startswith("--ep was 2, now 4: the distributed optimizer's state")
    (problem,) = _problems(saved, expert_parallel=2, expert_tensor_parallel=2,
                           distributed_optimizer=True)  # fmt: skip
    assert problem.startswith("--etp was 1, now 2: the distributed optimizer's state")


def test_an_unset_expert_tensor_size_follows_the_tensor_parallel_size():
    saved = _saved(distributed_optimizer=True)  # --tp 1, --etp unset
    (problem,) = _problems(saved, distributed_optimizer=True, tensor_parallel=2)
    assert problem.startswith("--tp was 1, now 2")  # not also --etp
    assert _problems(saved, distributed_optimizer=True, expert_tensor_parallel=1) == []
    (problem,) = _problems(saved, distributed_optimizer=True, tensor_parallel=2,
                           expert_tensor_parallel=1)  # fmt: skip
    assert problem.startswith("--tp was 1, now 2")


def test_check_resume_names_every_problem_and_the_ways_on(tmp_path):
    (tmp_path / "train_state.json").write_text(json.dumps(_saved()))
    config = TrainConfig(**{**asdict(BASE), "train_iters": 200, "precision": "fp32"})
    with pytest.raises(ConfigError) as raised:
        check_resume(tmp_path, config, distributed_optimizer=False)
    message = str(raised.value)
    assert "--train-iters was 100" in message and "--precision was bf16" in message
    assert f"--load {tmp_path}" in message
