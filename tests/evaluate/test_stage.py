"""The evaluation stage end to end on tiny models: outputs, tuned vs base, gate, bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from megasft.errors import ConfigError, InputError
from megasft.evaluate import EvaluateConfig, evaluate
from megasft.evaluate.model import is_megatron_checkpoint
from megasft.evaluate.paired import paired_statistics
from tests.evaluate.conftest import QA_ROWS, write_jsonl

GSM8K_MAP = (("prompt", "question"), ("response", "answer"))
ROLES = ("tuned", "base")


def _config(tmp_path, **overrides) -> EvaluateConfig:
    values = {
        "output": str(tmp_path / "eval"),
        "task": "gsm8k",
        "max_new_tokens": 24,
        "column_map": GSM8K_MAP,
        "progress": False,
        # float32 wherever the tests run: "auto" means bfloat16 on an accelerator.
        "dtype": "float32",
    }
    values.update(overrides)
    return EvaluateConfig(**values)


def test_tuned_beats_base(tuned_model_dir, base_model_dir, qa_file, prepared_dir, tmp_path):
    log = write_jsonl(
        tmp_path / "metrics.jsonl",
        [{"step": step, "loss": 6.0 / step, "lr": 1e-3} for step in range(1, 40)]
        + [{"step": 40, "loss": 0.1, "val_loss": 0.2}],
    )
    metrics = evaluate(
        _config(
            tmp_path,
            model=str(tuned_model_dir),
            data=str(qa_file),
            baseline=str(base_model_dir),
            val_data=str(prepared_dir),
            val_split="train",
            gate="accuracy>=0.75,delta_accuracy>0,val_loss<0.5,delta_val_loss<0,mcnemar_p<=1",
            training_log=str(log),
            batch_size=3,
        )
    )
    output = tmp_path / "eval"
    assert sorted(path.name for path in output.iterdir()) == [
        "metrics.json",
        "report.html",
        "samples.jsonl",
    ]
    assert json.loads((output / "metrics.json").read_text()) == metrics
    tuned, base = metrics["tuned"], metrics["base"]
    assert tuned["accuracy"] == 1.0 and tuned["correct"] == 4 and tuned["truncated"] == 0
    assert tuned["answer_extraction"] == {"hash": 3, "answer_tag": 1}
    assert tuned["format_accuracy"] == 1.0
    assert base["accuracy"] < 1.0 and base["truncated"] > 0
    assert metrics["deltas"]["delta_accuracy"] == tuned["accuracy"] - base["accuracy"]
    assert tuned["val_loss"] < base["val_loss"]
    assert metrics["summary"]["base_accuracy"] == base["accuracy"]
    assert metrics["gate"]["passed"], metrics["gate"]["reason"]
    assert metrics["model"]["kind"] == "hf" and metrics["baseline"]["path"] == str(base_model_dir)
    assert metrics["warnings"] == []

    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert [(s["model"], s["index"]) for s in samples] == [
        *(("tuned", i) for i in range(4)),
        *(("base", i) for i in range(4)),
    ]
    first = samples[0]
    assert first["prediction"] == QA_ROWS[0]["answer"]
    assert first["reference"] == QA_ROWS[0]["answer"] and first["reference_answer"] == "8"
    assert first["extracted_answer"] == "8" and first["correct"] and first["stopped"]
    assert first["prompt"].endswith("<|im_start|>assistant\n")
    assert first["prompt"].count("How many apples does Tom have?") == 1

    # The paired statistics compare the two models' verdicts prompt by prompt.
    by_model = {role: [s["correct"] for s in samples if s["model"] == role] for role in ROLES}
    assert metrics["paired"] == paired_statistics(by_model["tuned"], by_model["base"])
    assert metrics["paired"]["only_base_correct"] == 0
    for name in ("delta_accuracy_ci_low", "delta_accuracy_ci_high", "mcnemar_p"):
        assert metrics["summary"][name] == metrics["paired"][name]
    low = metrics["paired"]["delta_accuracy_ci_low"]
    high = metrics["paired"]["delta_accuracy_ci_high"]
    assert low < metrics["deltas"]["delta_accuracy"] <= high

    report = (output / "report.html").read_text()
    assert "Gate PASSED" in report and "<polyline" in report and "val_loss" in report
    assert "Paired comparison" in report and f"[{low:+.4f}, {high:+.4f}]" in report
    assert "<script" not in report and "http://" not in report.replace(
        "http://www.w3.org/2000/svg", ""
    )


def test_failing_gate_says_why(tuned_model_dir, base_model_dir, qa_file, tmp_path):
    metrics = evaluate(
        _config(
            tmp_path,
            model=str(base_model_dir),
            data=str(qa_file),
            baseline=str(tuned_model_dir),
            gate="delta_accuracy>0",
        )
    )
    gate = metrics["gate"]
    assert not gate["passed"]
    assert gate["reason"].startswith("failed: delta_accuracy = -")
    assert "Gate FAILED" in (tmp_path / "eval" / "report.html").read_text()


def test_generation_is_deterministic(tuned_model_dir, base_model_dir, qa_file, tmp_path):
    def predictions(name, batch_size):
        evaluate(
            _config(
                tmp_path,
                model=str(base_model_dir),
                data=str(qa_file),
                output=str(tmp_path / name),
                batch_size=batch_size,
                seed=7,
            )
        )
        lines = (tmp_path / name / "samples.jsonl").read_text().splitlines()
        return [json.loads(line)["prediction"] for line in lines]

    assert predictions("one", 4) == predictions("two", 4) == predictions("three", 1)


def test_prepared_dataset_as_data_gives_val_loss_only(tuned_model_dir, prepared_dir, tmp_path):
    metrics = evaluate(
        _config(
            tmp_path,
            model=str(tuned_model_dir),
            data=str(prepared_dir),
            val_split="train",
            gate="perplexity<1.5",
        )
    )
    assert set(metrics["tuned"]) == {"val_loss", "perplexity", "val_target_tokens", "val_documents"}
    assert metrics["gate"]["passed"]
    assert metrics["data"]["prompts"] is None and metrics["data"]["val_data"] == str(prepared_dir)
    assert (tmp_path / "eval" / "samples.jsonl").read_text() == ""


def test_format_and_exact_match_tasks(tuned_model_dir, tmp_path):
    # Prompt-only rows: the format task needs no reference.
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": row["question"]} for row in QA_ROWS])
    metrics = evaluate(
        _config(
            tmp_path,
            model=str(tuned_model_dir),
            data=str(prompts),
            task="format",
            format_pattern=r"^####",
            column_map=(),
        )
    )
    assert metrics["tuned"]["accuracy"] == metrics["tuned"]["format_accuracy"] == 0.25

    labels = write_jsonl(
        tmp_path / "l.jsonl",
        [
            {"prompt": "hello world", "gold": "#### 12"},
            {"prompt": "What is 3 plus 5?", "gold": 8},
        ],
    )
    metrics = evaluate(
        _config(
            tmp_path,
            model=str(tuned_model_dir),
            data=str(labels),
            output=str(tmp_path / "em"),
            task="exact-match",
            reference_field="gold",
            column_map=(),
        )
    )
    # "<answer>8</answer>" matches 8 (the answer tag), "#### 12" matches itself.
    assert metrics["tuned"]["accuracy"] == 1.0


def test_output_is_not_overwritten_by_accident(tuned_model_dir, prepared_dir, tmp_path):
    config = _config(
        tmp_path, model=str(tuned_model_dir), data=str(prepared_dir), val_split="train"
    )
    evaluate(config)
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        evaluate(config)
    (tmp_path / "eval" / "stale.txt").write_text("old")
    evaluate(
        _config(
            tmp_path,
            model=str(tuned_model_dir),
            data=str(prepared_dir),
            val_split="train",
            overwrite=True,
        )
    )
    assert not (tmp_path / "eval" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- bad input -------------------------------------------------------------------------------


def test_settings_errors_before_any_model_loads(qa_file, prepared_dir, tmp_path):
    base = {"model": "absent", "data": str(qa_file)}
    with pytest.raises(ConfigError, match="unknown metric 'acc'.*accuracy, format_accuracy"):
        _config(tmp_path, **base, gate="acc>0.5")
    with pytest.raises(ConfigError, match="delta_accuracy compares with the base model"):
        _config(tmp_path, **base, gate="delta_accuracy>0")
    with pytest.raises(ConfigError, match="val_loss needs a prepared dataset"):
        _config(tmp_path, **base, gate="val_loss<1")
    with pytest.raises(ConfigError, match="--task format scores answers by --format-pattern"):
        _config(tmp_path, **base, task="format")
    with pytest.raises(ConfigError, match="not a valid regex"):
        _config(tmp_path, **base, format_pattern="(")
    with pytest.raises(ConfigError, match="--task must be one of"):
        _config(tmp_path, **base, task="mmlu")
    with pytest.raises(ConfigError, match="either that or --val-data"):
        _config(tmp_path, model="m", data=str(prepared_dir), val_data=str(prepared_dir))
    with pytest.raises(ConfigError, match="accuracy comes from generation"):
        _config(tmp_path, model="m", data=str(prepared_dir), gate="accuracy>0")
    with pytest.raises(ConfigError, match="--max-new-tokens"):
        _config(tmp_path, **base, max_new_tokens=0)
    with pytest.raises(ConfigError, match="delta_accuracy_ci_low compares with the base model"):
        _config(tmp_path, **base, gate="delta_accuracy_ci_low>0")
    with pytest.raises(ConfigError, match="--engine must be one of transformers, vllm"):
        _config(tmp_path, **base, engine="llama.cpp")
    with pytest.raises(ConfigError, match="--num-fewshot apply to lm-eval tasks"):
        _config(tmp_path, **base, num_fewshot=5)


def test_data_errors_come_before_the_model_loads(prepared_dir, tmp_path):
    rows = [{"question": "Q1", "answer": "#### 1"}, {"question": "Q2"}]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InputError, match="row 2, field 'answer'"):
        evaluate(_config(tmp_path, model=str(tmp_path / "no-model"), data=str(bad)))

    unmarked = write_jsonl(tmp_path / "u.jsonl", [{"question": "Q", "answer": "so it is 4"}])
    with pytest.raises(
        InputError, match=r"row 1: 'so it is 4'[\s\S]*|needs its answer after '####'"
    ):
        evaluate(_config(tmp_path, model=str(tmp_path / "no-model"), data=str(unmarked)))

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        evaluate(_config(tmp_path, model=str(tmp_path / "no-model"), data=str(empty)))

    with pytest.raises(InputError, match="the val split of .* is empty"):
        evaluate(_config(tmp_path, model="m", data=str(prepared_dir)))
    with pytest.raises(InputError, match="not a `megasft prepare` output"):
        evaluate(_config(tmp_path, model="m", data=str(tmp_path)))

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2}\n')
    good = write_jsonl(tmp_path / "good.jsonl", rows[:1])
    with pytest.raises(InputError, match="line 2: 'loss' must be a number"):
        evaluate(_config(tmp_path, model="m", data=str(good), training_log=str(log)))


def test_model_errors(base_model_dir, tokenizer_dir, qa_file, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        evaluate(_config(tmp_path, model=str(tmp_path / "absent"), data=str(qa_file)))
    with pytest.raises(InputError, match="neither a Hugging Face model"):
        evaluate(_config(tmp_path, model=str(tmp_path), data=str(qa_file)))

    bare = tmp_path / "bare"
    shutil.copytree(base_model_dir, bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="comes without a tokenizer.*--tokenizer DIR"):
        evaluate(_config(tmp_path, model=str(bare), data=str(qa_file)))
    # --tokenizer supplies it, and the baseline borrows it.
    metrics = evaluate(
        _config(
            tmp_path,
            model=str(bare),
            data=str(qa_file),
            tokenizer=str(tokenizer_dir),
            baseline=str(bare),
            max_new_tokens=2,
        )
    )
    assert metrics["baseline"]["tokenizer"] == str(tokenizer_dir)

    no_template = tmp_path / "no-template"
    shutil.copytree(base_model_dir, no_template)
    config_file = no_template / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    del tokenizer_config["chat_template"]
    config_file.write_text(json.dumps(tokenizer_config))
    with pytest.raises(ConfigError, match="has no chat template.*--chatml-fallback"):
        evaluate(
            _config(
                tmp_path, model=str(no_template), data=str(qa_file), output=str(tmp_path / "o2")
            )
        )
    metrics = evaluate(
        _config(
            tmp_path,
            model=str(no_template),
            data=str(qa_file),
            output=str(tmp_path / "o3"),
            chatml_fallback=True,
            max_new_tokens=2,
        )
    )
    assert metrics["model"]["chat_template"] == "chatml-fallback"


# The convert stage saves and loads with torch.distributed.checkpoint in a single process.
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_megatron_checkpoint_is_converted_in_process(tuned_model_dir, qa_file, tmp_path):
    """A real round trip: the tuned HF model converted to megatron-core by the convert stage,
    evaluated as a megatron checkpoint, answers exactly as the HF model does."""
    from megasft.checkpoint.convert import convert

    checkpoint = tmp_path / "mcore"
    convert("hf", "megatron", tuned_model_dir, checkpoint)
    assert is_megatron_checkpoint(checkpoint)
    assert not is_megatron_checkpoint(tuned_model_dir)

    from_megatron = evaluate(
        _config(tmp_path, model=str(checkpoint), data=str(qa_file), output=str(tmp_path / "m"))
    )
    from_hf = evaluate(
        _config(tmp_path, model=str(tuned_model_dir), data=str(qa_file), output=str(tmp_path / "h"))
    )
    assert from_megatron["model"]["kind"] == "megatron"
    assert from_megatron["model"]["path"] == str(checkpoint)
    assert from_megatron["tuned"]["accuracy"] == from_hf["tuned"]["accuracy"] == 1.0

    def predictions(name):
        lines = (tmp_path / name / "samples.jsonl").read_text().splitlines()
        return [json.loads(line)["prediction"] for line in lines]

    assert predictions("m") == predictions("h")
    # The converted copy was scratch space: nothing is left beside the outputs.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_megatron_checkpoint_errors(qa_file, tmp_path):
    training_output = tmp_path / "run"
    (training_output / "iter_0000010").mkdir(parents=True)
    with pytest.raises(InputError, match="holds a training run's checkpoints.*pass one"):
        evaluate(_config(tmp_path, model=str(training_output), data=str(qa_file)))

    # A checkpoint without the tokenizer copies conversion would bring along.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "architecture.json").write_text("{}")
    with pytest.raises(InputError, match="comes without a tokenizer"):
        evaluate(_config(tmp_path, model=str(broken), data=str(qa_file)))


def test_a_bad_baseline_fails_before_any_model_loads(
    tuned_model_dir, qa_file, tmp_path, monkeypatch
):
    import megasft.evaluate.stage

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the baseline was checked")

    monkeypatch.setattr(megasft.evaluate.stage, "load_model", no_loading)
    with pytest.raises(InputError, match="does not exist"):
        evaluate(
            _config(
                tmp_path,
                model=str(tuned_model_dir),
                data=str(qa_file),
                baseline=str(tmp_path / "nope"),
            )
        )


def test_prompts_longer_than_the_context_are_flagged(tuned_model_dir, qa_file, tmp_path):
    # The tiny models have 256 positions; the tuned one stops after a few tokens anyway.
    metrics = evaluate(
        _config(tmp_path, model=str(tuned_model_dir), data=str(qa_file), max_new_tokens=250)
    )
    assert metrics["tuned"]["accuracy"] == 1.0
    assert metrics["warnings"] == [
        "4 prompt(s) plus --max-new-tokens 250 run past the tuned model's "
        "max_position_embeddings (256); their answers may be garbage"
    ]
