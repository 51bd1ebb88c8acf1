"""`megasft evaluate` on the command line: exit codes, the gate, errors without tracebacks."""

from __future__ import annotations

import json

from megasft.cli import main
from megasft.evaluate.config import DTYPE_CHOICES
from megasft.evaluate.model import DTYPES


def _argv(model, data, output, *extra):
    return [
        "evaluate",
        "--model", str(model),
        "--data", str(data),
        "--output", str(output),
        "--task", "gsm8k",
        "--map", "prompt=question,response=answer",
        "--max-new-tokens", "24",
        "--dtype", "float32",
        "--quiet",
        *extra,
    ]  # fmt: skip


def test_gate_decides_the_exit_code(tuned_model_dir, base_model_dir, qa_file, tmp_path, capsys):
    passing = _argv(
        tuned_model_dir, qa_file, tmp_path / "pass",
        "--baseline", str(base_model_dir), "--gate", "accuracy>=0.75,delta_accuracy>0",
        "--fail-on-gate",
    )  # fmt: skip
    assert main(passing) == 0
    err = capsys.readouterr().err
    assert "accuracy" in err and "gate passed" in err and "report:" in err

    failing = _argv(
        base_model_dir, qa_file, tmp_path / "fail", "--gate", "accuracy>=0.75", "--fail-on-gate"
    )
    assert main(failing) == 1
    assert "gate failed: accuracy" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "fail" / "metrics.json").read_text())
    assert metrics["gate"]["passed"] is False

    # Without --fail-on-gate the verdict is written, and the run still succeeds.
    assert main(_argv(base_model_dir, qa_file, tmp_path / "soft", "--gate", "accuracy>=0.75")) == 0


def test_errors_are_one_line_without_traceback(qa_file, tmp_path, capsys):
    code = main(_argv(tmp_path, qa_file, tmp_path / "o", "--gate", "accurcy>0"))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("megasft evaluate: error: --gate: unknown metric 'accurcy'")
    assert "Traceback" not in err

    assert main(_argv(tmp_path, qa_file, tmp_path / "o", "--fail-on-gate")) == 2
    assert "--fail-on-gate needs a --gate" in capsys.readouterr().err


def test_dtype_choices_match_the_loader():
    assert set(DTYPE_CHOICES) == set(DTYPES)
