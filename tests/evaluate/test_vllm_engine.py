"""`--engine vllm`: megasft's side checked on CPU against a stand-in for vLLM's API; the real
engine compared with transformers on a GPU where vLLM is installed (GPU-marked, skipped here)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from megasft.errors import ConfigError
from megasft.evaluate import EvaluateConfig, evaluate
from megasft.evaluate.generate import Generation, GenerationSettings
from megasft.evaluate.model import LoadedModel

STOP = 9


class _FakeLLM:
    """Answers like vLLM's `LLM`: with the stop token in `token_ids` or without it (versions
    differ), or cut at `max_tokens`."""

    made: list[dict] = []
    replies = [([5, 6, STOP], "stop"), ([7], "stop"), ([1, 2, 3, 4], "length")]

    def __init__(self, **settings):
        self.made.append(settings)

    def generate(self, prompts, sampling, use_tqdm):
        self.made.append({"prompts": prompts, "sampling": sampling})
        return [
            types.SimpleNamespace(
                outputs=[types.SimpleNamespace(token_ids=ids, finish_reason=reason)]
            )
            for ids, reason in self.replies[: len(prompts)]
        ]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM = _FakeLLM
    module.SamplingParams = lambda **settings: settings
    monkeypatch.setitem(sys.modules, "vllm", module)
    _FakeLLM.made = []
    return _FakeLLM


def test_vllm_answers_are_cut_at_the_stop_token_as_transformers_answers_are(fake_vllm):
    from megasft.evaluate.vllm_engine import generate_greedy_vllm

    loaded = LoadedModel(
        model=torch.nn.Linear(1, 1),
        chat_tokenizer=types.SimpleNamespace(path="tokenizer-dir"),
        stop_token_ids=(STOP,),
        pad_token_id=0,
        description={"dtype": "bfloat16"},
        hf_path=Path("hf-dir"),
    )
    settings = GenerationSettings(max_new_tokens=4, stop_token_ids=(STOP,), pad_token_id=0)
    run = generate_greedy_vllm(loaded, [[1, 2], [3], [4, 5, 6]], settings, seed=3)

    assert run.generations == [
        Generation((5, 6), True),
        Generation((7,), True),
        Generation((1, 2, 3, 4), False),
    ]
    assert run.generated_tokens == 3 + 2 + 4  # stop tokens count as generated
    made, call = fake_vllm.made
    assert made == {"model": "hf-dir", "tokenizer": "tokenizer-dir", "dtype": "bfloat16", "seed": 3}
    assert call["prompts"] == [
        {"prompt_token_ids": [1, 2]},
        {"prompt_token_ids": [3]},
        {"prompt_token_ids": [4, 5, 6]},
    ]
    assert call["sampling"] == {"temperature": 0.0, "max_tokens": 4, "stop_token_ids": [STOP]}
    assert loaded.model is None  # the transformers copy left the GPU to make room for vLLM


def test_vllm_engine_is_refused_where_it_cannot_run(qa_file, tmp_path):
    values = {"model": "m", "data": str(qa_file), "output": str(tmp_path / "o")}
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match="vLLM is not installed here"):
            EvaluateConfig(**values, engine="vllm")
    else:
        with pytest.raises(ConfigError, match="--engine vllm runs on a GPU"):
            EvaluateConfig(**values, engine="vllm", device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device")
def test_vllm_and_transformers_give_the_same_greedy_answers(tuned_model_dir, qa_file, tmp_path):
    pytest.importorskip("vllm")

    def run(engine: str) -> tuple[dict, list[str]]:
        output = tmp_path / engine
        metrics = evaluate(
            EvaluateConfig(
                model=str(tuned_model_dir),
                data=str(qa_file),
                output=str(output),
                task="gsm8k",
                column_map=(("prompt", "question"), ("response", "answer")),
                max_new_tokens=24,
                dtype="float32",
                engine=engine,
                progress=False,
            )
        )
        lines = (output / "samples.jsonl").read_text().splitlines()
        return metrics, [json.loads(line)["prediction"] for line in lines]

    vllm_metrics, vllm_answers = run("vllm")
    hf_metrics, hf_answers = run("transformers")
    assert vllm_answers == hf_answers
    assert vllm_metrics["tuned"]["accuracy"] == hf_metrics["tuned"]["accuracy"] == 1.0
    assert vllm_metrics["settings"]["engine"] == "vllm"
