"""`make demo` end to end, at a smaller size."""

from __future__ import annotations

import json

from megasft.demo.__main__ import main


def test_demo_runs_every_stage(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main(["--output", str(output), "--train-problems", "200", "--test-problems", "16"]) == 0
    assert (output / "dataset" / "preview.html").is_file()
    assert (output / "base-mcore").is_dir()
    metrics = json.loads((output / "eval-base" / "metrics.json").read_text())
    assert 0.0 <= metrics["summary"]["accuracy"] <= 1.0
    assert "base model: accuracy" in capsys.readouterr().err
