"""Quiet local runs: StepLogs files kfp.local's output per step and reports each step's end."""

from __future__ import annotations

import io
import json

from megasft.pipeline.local import step_figures
from megasft.pipeline.progress import FAILED_STEP_LINES, StepLogs

CYAN, GREEN, RED, RESET = "\x1b[96m", "\x1b[92m", "\x1b[91m", "\x1b[0m"


def kfp_line(message: str) -> str:
    """A line as kfp.local's logger writes it (time, level, message; names in colour)."""
    return f"06:36:18.534 - INFO - {message}\n"


def started(task: str) -> str:
    return kfp_line(f"Executing task {CYAN}'{task}'{RESET}")


def finished(task: str, status: str) -> str:
    colour = GREEN if status == "SUCCESS" else RED
    return kfp_line(f"Task {CYAN}'{task}'{RESET} finished with status {colour}{status}{RESET}")


def test_each_line_is_filed_under_its_step_and_the_terminal_hears_starts_and_ends(tmp_path):
    terminal = io.StringIO()
    logs = StepLogs(tmp_path / "logs", terminal, figures=lambda task: f"{task} figures")
    logs.write(kfp_line("Running pipeline: 'megasft-sft'"))
    logs.write(started("validate"))
    logs.write("    [KFP Executor] Got executor_input:\n    {\n")
    logs.write('        "inputs": {}\n    }\n')
    logs.write(finished("validate", "SUCCESS"))
    logs.write(started("train"))
    # print() writes a line in pieces: the indent, the text, the newline.
    for piece in ("    ", "[default0]:train: step 4: loss 5.39", "\n"):
        logs.write(piece)
    logs.write(finished("train", "SUCCESS"))
    logs.write(kfp_line("Pipeline 'megasft-sft' finished with status SUCCESS"))
    logs.close()

    said = terminal.getvalue().splitlines()
    assert [line.split("  ", 2)[2] for line in said] == [
        "validate started",
        "validate done in 0.0 s: validate figures",
        "train started",
        "train done in 0.0 s: train figures",
    ]
    assert list(logs.files) == ["validate", "train", "pipeline"]
    validate = (tmp_path / "logs" / "validate.log").read_text()
    assert '"inputs": {}' in validate and "\x1b[" not in validate
    train = (tmp_path / "logs" / "train.log").read_text()
    assert "    [default0]:train: step 4: loss 5.39\n" in train and "validate" not in train
    pipeline = (tmp_path / "logs" / "pipeline.log").read_text().splitlines()
    assert len(pipeline) == 2 and "Running pipeline" in pipeline[0]


def test_a_failed_step_shows_its_last_lines_and_where_the_rest_is(tmp_path):
    terminal = io.StringIO()
    logs = StepLogs(tmp_path, terminal, figures=lambda task: "never asked for a failed step")
    logs.write(started("train"))
    logs.writelines(f"    line {number}\n" for number in range(100))
    logs.write("    megasft train: error: the data is not packed; run megasft prepare\n")
    logs.write(finished("train", "FAILURE").replace("INFO", "ERROR"))
    logs.close()

    said = terminal.getvalue().splitlines()
    assert f"train FAILED after 0.0 s; the end of {tmp_path / 'train.log'}:" in said[1]
    shown = [line.removeprefix("      | ") for line in said[2:]]
    assert len(shown) == FAILED_STEP_LINES
    assert shown[-2:] == [
        "    megasft train: error: the data is not packed; run megasft prepare",
        "06:36:18.534 - ERROR - Task 'train' finished with status FAILURE",
    ]
    assert "never asked" not in terminal.getvalue()


def test_a_step_whose_figures_fail_still_reports_its_end(tmp_path):
    terminal = io.StringIO()

    def broken(task):
        raise KeyError("steps")

    logs = StepLogs(tmp_path, terminal, figures=broken)
    logs.write(started("train") + finished("train", "SUCCESS"))
    logs.close()
    assert "train done in 0.0 s: (no figures: 'steps')" in terminal.getvalue()


def test_key_figures_come_from_the_steps_executor_output(tmp_path):
    root = tmp_path / "kfp"
    before = set()
    output = {
        "artifacts": {
            "output": {"artifacts": [{"metadata": {"family": "llama", "layers": 4.0}}]},
        },
    }
    step = root / "megasft-sft-2026" / "checkpoint-convert-2"
    step.mkdir(parents=True)
    (step / "executor_output.json").write_text(json.dumps(output))
    # A second use of a component (NAME-2) shows its component's figures; KFP's doubles are
    # shown as the integers they were.
    assert step_figures(root, before, "checkpoint-convert-2") == "family llama, layers 4"
    assert step_figures(root, before, "record-inputs") == ""
    assert step_figures(root, before, "train") == ""  # not finished: nothing to read
