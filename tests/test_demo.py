"""`make demo` end to end, at a smaller size."""

from __future__ import annotations

import json

from megasft.demo.__main__ import main


def test_demo_runs_every_stage(tmp_path, capsys):
    output = tmp_path / "demo"
    arguments = ["--train-problems", "200", "--test-problems", "16", "--train-iters", "4"]
    assert main(["--output", str(output), *arguments]) == 0
    assert (output / "dataset" / "preview.html").is_file()
    assert (output / "base-mcore").is_dir()
    assert (output / "train" / "iter_0000004").is_dir()
    assert (output / "tuned-hf" / "config.json").is_file()
    metrics = json.loads((output / "eval" / "metrics.json").read_text())
    assert set(metrics["summary"]) >= {"accuracy", "base_accuracy", "val_loss", "base_val_loss"}
    # Four steps at a high learning rate already move the validation loss down.
    assert metrics["summary"]["val_loss"] < metrics["summary"]["base_val_loss"]
    assert "tuned accuracy" in capsys.readouterr().err
