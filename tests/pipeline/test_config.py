"""Run configurations: shape checks on load, input checks before any heavy work."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from megasft.errors import ConfigError, InputError
from megasft.pipeline.config import (
    PipelineConfig,
    check_inputs,
    config_directory,
    load_pipeline_config,
    memory_plan,
)
from megasft.pipeline.steps import validate


class Artifact:
    """A stand-in for a KFP output artifact: a path and a metadata dict."""

    def __init__(self, path):
        self.path = str(path)
        self.metadata = {}


@pytest.mark.parametrize("name", ["demo", "demo-moe", "llama2-7b-mi300x", "qwen2.5-gsm8k"])
def test_named_configurations_load(name):
    config = load_pipeline_config(name)
    arguments = config.arguments()
    assert set(arguments) == {
        "config_name",
        "data",
        "model",
        "train",
        "launcher",
        "evaluate",
        "tracking",
        "notify",
    }
    assert PipelineConfig.from_arguments(**arguments) == dataclasses.replace(config, description="")


def test_every_shipped_configuration_is_tested():
    shipped = {path.stem for path in config_directory().glob("*.yaml")}
    assert shipped == {"demo", "demo-lora", "demo-moe", "llama2-7b-mi300x", "qwen2.5-gsm8k"}


def test_demo_lora_trains_adapters_from_the_train_peft_section(tmp_path):
    config = load_pipeline_config("demo-lora")
    settings = config.train_settings()
    assert (settings["peft"], settings["lora_rank"], settings["lora_alpha"]) == ("lora", 32, 64.0)
    # the demo's random base cannot give confident logits without an adapted output layer
    assert settings["lora_targets"] == "linear_qkv,linear_proj,linear_fc1,linear_fc2,output_layer"
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata: {path: a}\nmodel: {path: b}\ntrain: {peft: {rnk: 4}}\n")
    with pytest.raises(ConfigError, match=r"train.peft: unknown key\(s\) rnk; known: method"):
        load_pipeline_config(path)


def test_cluster_configurations_train_as_trainjobs_on_mi300x():
    for name in ("llama2-7b-mi300x", "qwen2.5-gsm8k"):
        config = load_pipeline_config(name)
        assert config.launcher.kind == "trainjob"  # Kubeflow Trainer v2
        assert config.launcher.gpu_resource == "amd.com/gpu"
        assert config.train["precision"] == "bf16"
        # The v1 training operator stays selectable, with the same settings.
        v1 = config.with_overrides(["launcher.kind=pytorchjob"])
        assert (v1.launcher.kind, v1.launcher.nodes) == ("pytorchjob", config.launcher.nodes)
    llama = load_pipeline_config("llama2-7b-mi300x")
    assert 5e-6 <= llama.train["lr"] <= 2e-5 and llama.train["global_batch_size"] == 128


def test_unknown_names_are_refused_with_what_is_known(tmp_path):
    with pytest.raises(
        InputError, match="one of: demo, demo-lora, demo-moe, llama2-7b-mi300x, qwen2.5-gsm8k"
    ):
        load_pipeline_config("nope")
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata: {path: a}\nmodel: {path: b}\ntrainer: {}\n")
    with pytest.raises(ConfigError, match="unknown section.*trainer"):
        load_pipeline_config(path)
    path.write_text("name: x\ndata: {path: a, seq_len: 5}\nmodel: {path: b}\n")
    with pytest.raises(ConfigError, match=r"data: unknown setting\(s\) seq_len"):
        load_pipeline_config(path)
    path.write_text("name: x\ndata: {path: a}\nmodel: {path: b}\ntrain: {learning_rate: 1}\n")
    with pytest.raises(ConfigError, match=r"train: unknown setting\(s\) learning_rate"):
        load_pipeline_config(path)
    path.write_text("name: x\ndata: {path: a}\nmodel: {path: b}\nlauncher: {kind: slurm}\n")
    with pytest.raises(ConfigError, match="launcher.kind 'slurm'"):
        load_pipeline_config(path)
    path.write_text("name: Bad_Name\ndata: {path: a}\nmodel: {path: b}\n")
    with pytest.raises(ConfigError, match="name 'Bad_Name'"):
        load_pipeline_config(path)


def test_overrides_parse_values_as_yaml():
    config = load_pipeline_config("demo").with_overrides(
        ["train.train_iters=7", "train.lr=1e-4", "evaluate.gate=accuracy>=0.1"]
    )
    assert config.train["train_iters"] == 7 and config.train["lr"] == 1e-4
    assert config.evaluate["gate"] == "accuracy>=0.1"
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        config.with_overrides(["train_iters=7"])
    with pytest.raises(ConfigError, match="unknown section 'optim'"):
        config.with_overrides(["optim.lr=1"])
    with pytest.raises(ConfigError, match="train: unknown setting"):
        config.with_overrides(["train.lr_max=1"])


def test_relative_paths_resolve_against_the_given_directory(tmp_path):
    config = load_pipeline_config("demo").with_paths_resolved(tmp_path)
    assert config.data["path"] == str(tmp_path / "demo-output/inputs/train.jsonl")
    assert config.tracking.uri == f"sqlite:///{tmp_path}/demo-output/mlflow.db"


def test_good_inputs_pass(tiny_config):
    hf_config = check_inputs(tiny_config)
    assert hf_config["model_type"] == "llama"


def _copy_model(tiny_config, tmp_path, **changes):
    model = tmp_path / "model"
    shutil.copytree(tiny_config.model["path"], model)
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))
    return dataclasses.replace(tiny_config, model={"path": str(model)})


def test_missing_data_fails_naming_the_setting(tiny_config, tmp_path):
    config = dataclasses.replace(
        tiny_config, data={**tiny_config.data, "path": str(tmp_path / "x")}
    )
    with pytest.raises(InputError, match=r"data.path .*x: no such file"):
        check_inputs(config)


def test_unknown_model_family_fails_naming_it(tiny_config, tmp_path):
    config = _copy_model(
        tiny_config, tmp_path, model_type="gpt2", architectures=["GPT2LMHeadModel"]
    )
    with pytest.raises(ConfigError, match="model.path .*gpt2"):
        check_inputs(config)


def test_tensor_parallel_not_dividing_the_heads_fails(tiny_config):
    train = {**tiny_config.train, "tensor_parallel": 3, "nproc": 3, "global_batch_size": 12}
    config = dataclasses.replace(tiny_config, train=train)
    with pytest.raises(ConfigError, match="train: --tp 3 does not divide the model's 4 attention"):
        check_inputs(config)


def test_the_gpus_must_be_the_world_size_the_parallel_settings_need(tiny_config):
    """Two nodes of 8 GPUs: TP 2 x PP 1 x CP 1 x DP 8 = 16, however train.nproc is left."""
    two_nodes = {"kind": "trainjob", "nodes": 2, "gpus_per_node": 8}
    train = {key: value for key, value in tiny_config.train.items() if key != "nproc"}
    train |= {"tensor_parallel": 2, "micro_batch_size": 1}
    check_inputs(dataclasses.replace(tiny_config, launcher=two_nodes, train=train))
    check_inputs(dataclasses.replace(tiny_config, launcher=two_nodes, train={**train, "nproc": 8}))
    for changes, message in (
        ({"nproc": 4}, "train.nproc 4 differs from launcher.gpus_per_node 8"),
        ({"nodes": 1}, "train.nodes 1 differs from launcher.nodes 2"),
        (
            {"tensor_parallel": 3, "pipeline_parallel": 2},
            r"launcher.gpus_per_node 8 x launcher.nodes 2 = 16 GPUs, but the world size must be "
            r"TP x PP x CP x DP and train.tensor_parallel 3 x train.pipeline_parallel 2 x "
            r"train.context_parallel 1 = 6 does not divide 16",
        ),
        (
            {"expert_parallel": 3},
            r"the expert layers split them as ETP x EP x expert-DP x PP and "
            r"train.expert_tensor_parallel 2 x train.expert_parallel 3 x "
            r"train.pipeline_parallel 1 = 6 does not divide 16",
        ),
        # an EP that fits the GPUs, for a model without experts
        ({"expert_parallel": 2}, r"--ep 2 / --etp 2: the model \(llama\) has no experts"),
        # With 16 GPUs DP is 8: 8 rows per step (micro-batch 2 would need 16).
        (
            {"micro_batch_size": 4},
            "--global-batch-size 16 is not divisible by --micro-batch-size 4",
        ),
    ):
        config = dataclasses.replace(tiny_config, launcher=two_nodes, train={**train, **changes})
        with pytest.raises(ConfigError, match=message):
            check_inputs(config)


def test_bad_gate_fails(tiny_config):
    config = dataclasses.replace(tiny_config, evaluate={**tiny_config.evaluate, "gate": "acc>>1"})
    with pytest.raises(ConfigError, match="evaluate.gate"):
        check_inputs(config)


def test_the_first_step_refuses_bad_configurations_before_heavy_work(tiny_config, tmp_path):
    """The pipeline's validate step runs the same checks where the pipeline runs."""
    bad = dataclasses.replace(tiny_config, train={**tiny_config.train, "tensor_parallel": 3})
    with pytest.raises(
        ConfigError,
        match=r"train.nproc 2 x train.nodes 1 = 2 GPUs, but .* x "
        r"train.context_parallel 1 = 3 does not divide 2",
    ):
        validate(bad.arguments(), kfp_run_id="run-1", plan=Artifact(tmp_path / "plan.md"))
    assert not (tmp_path / "plan.md").exists()


def test_validate_returns_content_digests_and_writes_the_plan(tiny_config, tmp_path):
    plan = Artifact(tmp_path / "plan.md")
    parent, data_digest, model_digest, data_path, model_path = validate(
        tiny_config.arguments(), kfp_run_id="run-1", plan=plan
    )
    assert parent == ""  # no tracking configured
    assert len(data_digest) == len(model_digest) == 64
    assert data_path == tiny_config.data["path"] and model_path == tiny_config.model["path"]
    assert plan.metadata["data_sha256"] == data_digest
    assert "# megasft run: demo" in (tmp_path / "plan.md").read_text()
    # Same content, same digest (cache hit); one byte more, another digest (cache miss).
    copy = tmp_path / "train.jsonl"
    shutil.copyfile(tiny_config.data["path"], copy)
    moved = dataclasses.replace(tiny_config, data={**tiny_config.data, "path": str(copy)})
    assert validate(moved.arguments(), kfp_run_id="r", plan=plan)[1] == data_digest
    copy.write_text(copy.read_text() + "\n")
    assert validate(moved.arguments(), kfp_run_id="r", plan=plan)[1] != data_digest


def test_run_local_refuses_a_cluster_launcher_before_anything_starts(tmp_path):
    from megasft.pipeline.local import run_local

    with pytest.raises(ConfigError, match="--set launcher.kind=local"):
        run_local(load_pipeline_config("qwen2.5-gsm8k"), workdir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_kfp_doubles_become_integers_again():
    """KFP passes dict parameters as protobuf Structs: every number arrives as a double."""
    from megasft.pipeline.config import evaluate_settings, prepare_settings, train_settings

    assert train_settings({"nproc": 2.0, "lr": 1.0, "train_iters": 4.0}) == {
        "nproc": 2,
        "lr": 1.0,
        "train_iters": 4,
    }
    assert prepare_settings({"path": "x", "seq_length": 512.0})["seq_length"] == 512
    assert evaluate_settings({"limit": 3.0})["limit"] == 3
    assert isinstance(train_settings({"nproc": 2.0})["nproc"], int)


def test_tracking_and_notify_are_typed_and_checked_by_name(tmp_path):
    config = load_pipeline_config("qwen2.5-gsm8k")
    assert config.tracking.registered_model == "qwen2.5-1.5b-gsm8k"
    assert config.tracking.alias == "champion"
    assert load_pipeline_config("llama2-7b-mi300x").notify.webhook is None  # `webhook: ""`
    path = tmp_path / "bad.yaml"
    base = "name: x\ndata: {path: a}\nmodel: {path: b}\n"
    for section, message in [
        ("tracking: {url: http://x}", r"tracking: unknown setting\(s\) url; known: alias, "),
        ("tracking: {uri: 5000}", "tracking.uri must be text, not 5000"),
        ("tracking: [uri]", "tracking: expected a mapping"),
        ("notify: {webhook: hooks.example.com}", "notify.webhook 'hooks.example.com': give an"),
        ("notify: {email: a@b}", r"notify: unknown setting\(s\) email"),
    ]:
        path.write_text(base + section + "\n")
        with pytest.raises(ConfigError, match=message):
            load_pipeline_config(path)


def test_typed_sections_travel_as_the_settings_that_are_set():
    config = load_pipeline_config("demo").with_overrides(["tracking.alias=staging"])
    assert config.tracking.alias == "staging"
    assert config.arguments()["notify"] == {}
    assert config.arguments()["tracking"] == {
        "uri": "sqlite:///demo-output/mlflow.db",
        "experiment": "megasft-demo",
        "registered_model": "megasft-demo",
        "alias": "staging",
    }


def test_a_train_section_naming_its_gpu_gets_the_memory_plan(tiny_config):
    config = dataclasses.replace(tiny_config, train={**tiny_config.train, "device": "mi300x"})
    hf_config = check_inputs(config)
    plan = memory_plan(config, hf_config)
    assert plan.device == "mi300x" and plan.fits
    assert "device" not in config.train_settings()  # the trainer never sees it
    assert memory_plan(tiny_config, hf_config) is None  # no device named: no plan


def test_a_run_that_does_not_fit_its_gpu_fails_validation_naming_the_changes(tiny_config):
    train = {**tiny_config.train, "device": "tiny", "device_memory": 3.0}
    config = dataclasses.replace(tiny_config, train=train)
    with pytest.raises(
        ConfigError, match=r"(?s)train: the run does not fit.*verdict: does not fit"
    ):
        check_inputs(config)


def test_an_unknown_gpu_is_refused(tiny_config):
    config = dataclasses.replace(tiny_config, train={**tiny_config.train, "device": "abacus"})
    with pytest.raises(ConfigError, match="train: --device 'abacus' is not in the table"):
        check_inputs(config)
