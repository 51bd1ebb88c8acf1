"""`make demo` end to end at a smaller size: the pipeline with kfp.local and an embedded MLflow."""

from __future__ import annotations

import pytest

from megasft.demo.__main__ import main

# kfp.local's task names: a second use of a component is NAME-2 (the export).
STEPS = (
    "validate",
    "checkpoint-convert",
    "tokenize-and-mask",
    "train",
    "checkpoint-convert-2",
    "evaluate",
    "record-inputs",
    "finish",
)


def test_demo_runs_the_pipeline_into_an_embedded_mlflow(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    output = tmp_path / "demo"
    arguments = ["--train-problems", "200", "--test-problems", "16", "--train-iters", "4"]
    assert main(["--output", str(output), *arguments]) == 0
    assert (output / "inputs" / "base-hf" / "config.json").is_file()
    captured = capsys.readouterr()
    printed = captured.err
    assert "megasft pipeline: demo succeeded" in printed
    assert "base accuracy" in printed and "tuned accuracy" in printed
    assert f"mlflow ui --backend-store-uri sqlite:///{output / 'mlflow.db'}" in printed

    # Quiet: a line as each step starts and one as it ends; everything else is in its log.
    assert captured.out == ""
    assert len(printed.splitlines()) <= 200
    assert "KFP Executor" not in printed and "executor_input" not in printed
    for step in STEPS:
        assert f"  {step} started\n" in printed
        assert f"  {step} done in " in printed
        assert "finished with status SUCCESS" in (output / "logs" / f"{step}.log").read_text()
    assert "train done in " in printed and "steps 4, final_loss " in printed
    assert "megasft train: checkpoint" in (output / "logs" / "train.log").read_text()
    assert f"  logs: {output / 'logs'}/ (validate.log, " in printed

    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("megasft-demo")
    # The embedded store keeps its artifacts beside it, not in the steps' working directories.
    assert experiment.artifact_location == (output / "mlartifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    parent = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    names = {run.data.tags["mlflow.runName"] for run in runs} - {parent[0].info.run_name}
    # Four steps cannot reach the demo's accuracy gate: evaluated, but not registered.
    assert names == {"tokenize-and-mask", "checkpoint-convert", "train", "export", "evaluate"}
    assert client.search_registered_models() == []


@pytest.mark.slow
def test_demo_moe_trains_a_mixture_of_experts_with_expert_parallelism(tmp_path, capsys):
    import json

    from mlflow.tracking import MlflowClient

    output = tmp_path / "demo-moe"
    arguments = ["--train-problems", "200", "--test-problems", "16", "--train-iters", "4"]
    assert main(["--config", "demo-moe", "--output", str(output), *arguments]) == 0
    config = json.loads((output / "inputs" / "base-hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    printed = capsys.readouterr().err
    assert "megasft pipeline: demo-moe succeeded" in printed
    assert "train done in " in printed and "steps 4, final_loss " in printed
    # the two training processes split the experts (EP=2) and logged the routing
    (metrics,) = output.glob("kfp/*/train/checkpoints/metrics.jsonl")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    assert all(len(record["moe_expert_tokens"]) == 4 for record in records)  # 4 MoE layers
    assert all(record["moe_aux_loss"] > 0.5 for record in records)
    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    assert client.get_experiment_by_name("megasft-demo-moe") is not None
