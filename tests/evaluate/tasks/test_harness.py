"""`--task lm-eval:TASK`: lm-evaluation-harness's gsm8k on a tiny model, a few local rows, offline.

The tests that run the harness need the `lmeval` extra (`make setup` installs it) and skip
without it. The harness's index of its tasks takes seconds to read; it is read once per run.
"""

from __future__ import annotations

import importlib.util
import json
import socket

import pytest
import torch
from transformers import AutoTokenizer

from megasft.cli import main
from megasft.errors import ConfigError
from megasft.evaluate import EvaluateConfig, evaluate
from megasft.evaluate.paired import paired_statistics
from megasft.evaluate.tasks import get_task, task_choices, task_families
from megasft.evaluate.tasks.harness import HarnessTask
from tests.evaluate.conftest import QA_ROWS, _save, one_torch_thread, tiny_llama, write_jsonl

needs_harness = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="needs lm-evaluation-harness (the lmeval extra, which `make setup` installs)",
)


@pytest.fixture
def offline(monkeypatch):
    """No network at all: the hub libraries' offline switches on, and a connection fails."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # The libraries read the variables when imported, which happened before this test.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setattr(datasets.config, name, True, raising=False)

    def refuse(*args, **kwargs):
        raise OSError("this test is offline: no network connections")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def harness_tuned_dir(tmp_path_factory, tokenizer_dir, vocab_size):
    """A tiny model trained on QA_ROWS as the harness poses gsm8k zero-shot: "Question: Q\\n
    Answer: A", then the next "Question:", which is where the harness stops generating."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = [
        f"Question: {row['question']}\nAnswer: {row['answer']}\n\nQuestion:" for row in QA_ROWS
    ]
    encoded = [tokenizer(text)["input_ids"] for text in texts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.zeros(len(encoded), width, dtype=torch.long)
    attention_mask = torch.zeros(len(encoded), width, dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    model = tiny_llama(vocab_size)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with one_torch_thread():
        for _ in range(300):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if loss.item() < 0.01:
                break
    model.eval()
    return _save(model, tokenizer_dir, tmp_path_factory.mktemp("harness-tuned"))


def test_lm_eval_names_a_family_of_tasks():
    task = get_task("lm-eval:gsm8k")
    assert isinstance(task, HarnessTask) and task.name == "lm-eval:gsm8k"
    assert task.harness_name == "gsm8k" and not task.uses_chat_template
    assert "lm-eval" in task_families()
    assert task_choices() == "exact-match, format, gsm8k, tool-call or lm-eval:TASK"
    with pytest.raises(ConfigError, match="needs the harness task's name"):
        get_task("lm-eval:")
    with pytest.raises(
        ConfigError, match="one of exact-match, format, gsm8k, tool-call or lm-eval:TASK"
    ):
        get_task("helm:gsm8k")


def test_settings_are_checked_without_the_harness(qa_file, tmp_path):
    values = {"model": "m", "data": str(qa_file), "output": str(tmp_path / "o")}
    config = EvaluateConfig(
        **values,
        task="lm-eval:gsm8k",
        baseline="b",
        num_fewshot=0,
        gate="exact_match,strict-match>=0.5,delta_accuracy_ci_low>0",
    )
    assert config.num_fewshot == 0
    with pytest.raises(ConfigError, match="--num-fewshot must not be negative"):
        EvaluateConfig(**values, task="lm-eval:gsm8k", num_fewshot=-1)
    with pytest.raises(ConfigError, match="--fewshot-data .*: no such file"):
        EvaluateConfig(**values, task="lm-eval:gsm8k", fewshot_data=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="--task gsm8k gives no exact_match,strict-match"):
        EvaluateConfig(**values, task="gsm8k", gate="exact_match,strict-match>0.5")


@needs_harness
def test_gsm8k_through_the_harness_offline(
    offline, harness_tuned_dir, base_model_dir, qa_file, tmp_path, capsys
):
    output = tmp_path / "eval"
    argv = [
        "evaluate", "--model", str(harness_tuned_dir), "--baseline", str(base_model_dir),
        "--data", str(qa_file), "--task", "lm-eval:gsm8k", "--num-fewshot", "0",
        "--limit", "3", "--max-new-tokens", "32", "--batch-size", "2", "--dtype", "float32",
        "--gate", "exact_match,strict-match>=0.6,delta_exact_match,strict-match>0",
        "--fail-on-gate", "--quiet", "--output", str(output),
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((output / "metrics.json").read_text())
    tuned, base = metrics["tuned"], metrics["base"]
    # Rows 1 and 3 end in "#### N": the strict match finds them; row 2's reference is
    # "<answer>8</answer>", which the harness's gsm8k cannot match.
    assert tuned["exact_match,strict-match"] == pytest.approx(2 / 3)
    assert tuned["exact_match,flexible-extract"] == pytest.approx(2 / 3)
    assert base["exact_match,strict-match"] == 0.0
    assert metrics["deltas"]["delta_exact_match,strict-match"] == pytest.approx(2 / 3)
    assert metrics["summary"]["base_exact_match,strict-match"] == 0.0
    assert tuned["verdict_metric"] == "exact_match,strict-match"
    assert tuned["accuracy"] == pytest.approx(2 / 3) and tuned["samples"] == 3
    assert tuned["n_shot"] == 0 and set(tuned["stderr"]) == {
        "exact_match,strict-match",
        "exact_match,flexible-extract",
    }
    paired = metrics["paired"]
    assert (paired["both_correct"], paired["only_tuned_correct"]) == (0, 2)
    assert (paired["only_base_correct"], paired["both_wrong"]) == (0, 1)
    assert paired == paired_statistics([True, False, True], [False, False, False])
    assert paired["mcnemar_p"] == 0.5  # 2 * (1/2)^2: two discordant prompts prove little
    assert metrics["gate"]["passed"], metrics["gate"]["reason"]

    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert [(s["model"], s["index"]) for s in samples] == [
        *(("tuned", i) for i in range(3)),
        *(("base", i) for i in range(3)),
    ]
    first = samples[0]
    assert first["prompt"] == "Question: How many apples does Tom have?\nAnswer:"
    assert first["prediction"].startswith(" Tom has 8 apples.\n#### 8")
    assert first["extracted_answer"] == "8" and first["correct"] is True
    assert first["extraction_method"] == "strict-match"
    assert first["reference"] == QA_ROWS[0]["answer"]
    assert first["metrics"] == {
        "exact_match,strict-match": 1.0,
        "exact_match,flexible-extract": 1.0,
    }
    report = (output / "report.html").read_text()
    assert "<td>exact_match,strict-match</td>" in report and "Paired comparison" in report


@needs_harness
def test_few_shot_examples_come_from_the_data_or_the_fewshot_file(
    offline, base_model_dir, qa_file, tmp_path
):
    def prompts(name: str, **settings) -> tuple[list[str], list[str]]:
        metrics = evaluate(
            EvaluateConfig(
                model=str(base_model_dir),
                data=str(qa_file),
                output=str(tmp_path / name),
                task="lm-eval:gsm8k",
                max_new_tokens=4,
                dtype="float32",
                progress=False,
                **settings,
            )
        )
        lines = (tmp_path / name / "samples.jsonl").read_text().splitlines()
        return [json.loads(line)["prompt"] for line in lines], metrics["warnings"]

    own, warnings = prompts("own", num_fewshot=2)
    for row, prompt in zip(QA_ROWS, own, strict=True):
        assert prompt.count("Question:") == 3
        # The question is asked once, at the end: never shown as its own worked example.
        assert prompt.count(row["question"]) == 1
        assert prompt.endswith(f"Question: {row['question']}\nAnswer:")
    assert any("2-shot examples were drawn from --data" in warning for warning in warnings)

    shots = [{"question": "What is 1 plus 1?", "answer": "1 + 1 = 2\n#### 2"}]
    fewshot = write_jsonl(tmp_path / "train.jsonl", shots)
    from_file, warnings = prompts("file", num_fewshot=1, fewshot_data=str(fewshot), limit=2)
    for prompt in from_file:
        assert prompt.startswith("Question: What is 1 plus 1?\nAnswer: 1 + 1 = 2\n#### 2\n\n")
    assert warnings == []


@needs_harness
def test_harness_problems_are_found_before_any_model_loads(offline, qa_file, tmp_path):
    def run(**settings):
        values = {"model": str(tmp_path / "absent"), "data": str(qa_file)}
        values.update(output=str(tmp_path / "o"), task="lm-eval:gsm8k")
        evaluate(EvaluateConfig(**{**values, **settings}))

    with pytest.raises(ConfigError, match="no task 'gsm8kk'; did you mean gsm8k"):
        run(task="lm-eval:gsm8kk")
    with pytest.raises(ConfigError, match="'mmlu' is a harness group"):
        run(task="lm-eval:mmlu")
    with pytest.raises(ConfigError, match="gives no exact_match,nonsense; its metrics are "):
        run(gate="exact_match,nonsense>0", num_fewshot=0)
    text = write_jsonl(tmp_path / "rows.txt", QA_ROWS)
    with pytest.raises(ConfigError, match="an lm-eval task reads .jsonl, .json"):
        run(data=str(text))
