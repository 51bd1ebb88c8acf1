"""The prepare stage end to end: files in, Arrow + manifest + rejects + preview out."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megasft.cli import main
from megasft.data import read_examples, read_manifest
from megasft.data import spool as spool_module
from megasft.data import workers as workers_module
from megasft.data.conversation import Message
from megasft.data.prepare import PrepareConfig, prepare
from megasft.data.store import EXAMPLE_SCHEMA, open_split
from megasft.errors import ConfigError, InputError, MegasftError
from tests.data.conftest import as_example, make_masker, trained_segments


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def qa_rows(count: int, start: int = 0) -> list[dict]:
    return [
        {"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}.\n#### {2 * i}"}
        for i in range(start, start + count)
    ]


def run(tmp_path, inputs, tokenizer, name="out", **settings) -> tuple[dict, Path]:
    settings.setdefault("workers", 1)
    settings.setdefault("progress", False)
    output = tmp_path / name
    config = PrepareConfig(
        inputs=tuple(str(p) for p in inputs),
        tokenizer=str(tokenizer),
        output=str(output),
        **settings,
    )
    return prepare(config), output


@pytest.fixture
def chatml(tokenizer_dirs):
    return tokenizer_dirs["chatml"]


def test_read_examples_contract_unpacked(tmp_path, chatml, chat_tokenizers):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(5))
    manifest, output = run(
        tmp_path,
        [data],
        chatml,
        pack=False,
        val_fraction=0.0,
        column_map=(("prompt", "question"), ("response", "answer")),
    )
    rows = list(read_examples(output, "train"))
    assert len(rows) == 5 and manifest["examples"] == 5
    chat = chat_tokenizers["chatml"]
    for i, row in enumerate(rows):
        assert set(row) == {"input_ids", "loss_mask", "seq_lengths"}
        assert len(row["input_ids"]) == len(row["loss_mask"]) == row["seq_lengths"][0]
        # Identical to masking the conversation directly: the stage adds nothing of its own.
        expected = make_masker(chat).mask(
            [
                Message("user", f"What is {i} plus {i}?"),
                Message("assistant", f"{i} plus {i} is {2 * i}.\n#### {2 * i}"),
            ]
        )
        assert row["input_ids"] == expected.input_ids.tolist()
        assert row["loss_mask"] == expected.loss_mask.tolist()
    assert trained_segments(expected, chat.tokenizer) == ["4 plus 4 is 8.\n#### 8<|im_end|>"]
    assert open_split(output, "train").schema.equals(EXAMPLE_SCHEMA)
    assert list(read_examples(output, "val")) == []


def test_packed_rows_are_their_examples_concatenated(tmp_path, chatml):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(60))
    mapping = (("prompt", "question"), ("response", "answer"))
    _, unpacked = run(
        tmp_path, [data], chatml, "unpacked", pack=False, val_fraction=0.0, column_map=mapping
    )
    manifest, packed = run(
        tmp_path,
        [data],
        chatml,
        "packed",
        pack=True,
        seq_length=256,
        val_fraction=0.0,
        column_map=mapping,
    )
    examples = {tuple(r["input_ids"]): r["loss_mask"] for r in read_examples(unpacked)}
    seen = []
    for row in read_examples(packed):
        assert len(row["input_ids"]) == sum(row["seq_lengths"]) <= 256
        start = 0
        for length in row["seq_lengths"]:
            ids = tuple(row["input_ids"][start : start + length])
            assert row["loss_mask"][start : start + length] == examples[ids]
            seen.append(ids)
            start += length
    assert sorted(seen) == sorted(examples), "no example lost or duplicated"
    stats = manifest["splits"]["train"]
    assert stats["examples"] == 60 and stats["rows"] < 60
    assert stats["packing_efficiency"] == pytest.approx(stats["tokens"] / (stats["rows"] * 256))


@pytest.mark.parametrize("pack", [True, False])
def test_write_batches_split_the_arrow_file_not_the_rows(tmp_path, chatml, monkeypatch, pack):
    """Rows are written a bounded number of tokens at a time (memory stays flat however large
    the dataset): smaller batches, even smaller than one row, change nothing read back."""
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(60))
    settings = dict(
        pack=pack,
        seq_length=256,
        val_fraction=0.0,
        column_map=(("prompt", "question"), ("response", "answer")),
    )
    _, whole = run(tmp_path, [data], chatml, "whole", **settings)
    monkeypatch.setattr(spool_module, "WRITE_BATCH_TOKENS", 100)
    _, small = run(tmp_path, [data], chatml, "small", **settings)
    assert list(read_examples(small)) == list(read_examples(whole))
    rows = open_split(small, "train").num_rows
    with pa.memory_map(str(small / "train.arrow")) as source:
        assert pa.ipc.open_file(source).num_record_batches == rows  # every row alone
    with pa.memory_map(str(whole / "train.arrow")) as source:
        assert pa.ipc.open_file(source).num_record_batches == 1


def test_outputs_are_deterministic_and_independent_of_workers(tmp_path, chatml):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(300))
    mapping = (("prompt", "question"), ("response", "answer"))
    _, one = run(
        tmp_path, [data], chatml, "one", seq_length=512, val_fraction=0.2, column_map=mapping
    )
    # The command in a process of its own, as users run it: its workers are forked.
    two = tmp_path / "two"
    command = [sys.executable, "-m", "megasft", "prepare", "--input", str(data)]
    command += ["--tokenizer", str(chatml), "--output", str(two), "--seq-length", "512"]
    command += ["--val-fraction", "0.2", "--map", "prompt=question,response=answer"]
    subprocess.run([*command, "--workers", "2", "--quiet"], check=True, capture_output=True)
    fresh = "from megasft.data.workers import can_fork; assert can_fork()"
    subprocess.run([sys.executable, "-c", fresh], check=True)
    with pytest.MonkeyPatch.context() as patch:
        # Workers started fresh (what a parent with other threads gets), not forked.
        patch.setattr(workers_module, "can_fork", lambda: False)
        _, spawned = run(
            tmp_path,
            [data],
            chatml,
            "spawned",
            seq_length=512,
            val_fraction=0.2,
            column_map=mapping,
            workers=2,
        )
    for split in ("train", "val"):
        assert list(read_examples(one, split)) == list(read_examples(two, split))
        assert list(read_examples(one, split)) == list(read_examples(spawned, split))
    manifest = read_manifest(one)
    assert 0 < manifest["splits"]["val"]["examples"] < 300 * 0.35


def test_split_is_by_content_so_adding_data_never_moves_examples(tmp_path, chatml):
    mapping = (("prompt", "question"), ("response", "answer"))
    small = write_jsonl(tmp_path / "small.jsonl", qa_rows(200))
    large = write_jsonl(tmp_path / "large.jsonl", qa_rows(150, start=500) + qa_rows(200))

    def val_examples(path, name):
        _, output = run(
            tmp_path, [path], chatml, name, pack=False, val_fraction=0.3, column_map=mapping
        )
        return {tuple(r["input_ids"]) for r in read_examples(output, "val")}, {
            tuple(r["input_ids"]) for r in read_examples(output, "train")
        }

    small_val, small_train = val_examples(small, "small")
    large_val, large_train = val_examples(large, "large")
    assert small_val <= large_val and small_train <= large_train
    assert small_val and small_train


def test_every_input_format_and_container(tmp_path, chatml, chat_tokenizers):
    chat = chat_tokenizers["chatml"]
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl", [{"instruction": "Say hi", "input": "", "output": "hi"}]
    )
    pr = tmp_path / "pr.jsonl.gz"
    pr.write_bytes(
        gzip.compress((json.dumps({"prompt": "Say hello", "completion": "hello"}) + "\n").encode())
    )
    messages = tmp_path / "messages.json"
    messages.write_text(
        json.dumps(
            [
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "Say "},
                                {"type": "text", "text": "yes"},
                            ],
                        },
                        {"role": "assistant", "content": "yes"},
                    ]
                }
            ]
        )
    )
    sharegpt = tmp_path / "sharegpt.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "conversations": [
                        {"from": "human", "value": "Say no"},
                        {"from": "gpt", "value": "no"},
                    ]
                }
            ]
        ),
        sharegpt,
    )
    manifest, output = run(
        tmp_path, [alpaca, pr, messages, sharegpt], chatml, pack=False, val_fraction=0.0
    )
    assert manifest["rejected"]["total"] == 0
    assert [s["format"] for s in manifest["sources"]] == [
        "alpaca",
        "prompt-response",
        "messages",
        "sharegpt",
    ]
    texts = []
    for row in read_examples(output):
        ids = [t for t, m in zip(row["input_ids"], row["loss_mask"], strict=True) if m]
        texts.append(chat.tokenizer.decode(ids, skip_special_tokens=False))
    assert texts == ["hi<|im_end|>", "hello<|im_end|>", "yes<|im_end|>", "no<|im_end|>"]


BAD_ROWS = [
    b'{"messages": [{"role": "user", "content": "ok 1"}, {"role": "assistant", "content": "fine 1"}]}',
    b'{"messages": [{"role": "user", "content": "broken"',  # malformed JSON
    b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
    b'{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
    b'{"messages": [{"role": "user", "content": "hi"}]}',
    b'{"messages": [{"role": "user", "content": "caf\xff"}, {"role": "assistant", "content": "x"}]}',
    b'{"instruction": "in another format", "output": "x"}',
    b'{"messages": [{"role": "user", "content": "ok 2"}, {"role": "assistant", "content": "fine 2"}]}',
    b'{"messages": [{"role": "user", "content": "long '
    + b"word " * 400
    + b'"}, {"role": "assistant", "content": "x"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "train": false}]}',
    b'{"messages": [{"role": "user", "content": "ok 3"}, {"role": "assistant", "content": "fine 3"}]}',
]
EXPECTED_REJECTS = [
    (2, "malformed_json"),
    (3, "wrong_type"),
    (4, "unknown_role"),
    (5, "empty_assistant"),
    (6, "no_assistant_turn"),
    (7, "invalid_utf8"),
    (8, "mixed_formats"),
    (10, "too_long"),
    (11, "no_trained_tokens"),
]


def test_bad_rows_are_rejected_with_row_and_reason_and_valid_rows_kept(
    tmp_path, chatml, chat_tokenizers
):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b"\n".join(BAD_ROWS) + b"\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    manifest, output = run(
        tmp_path, [data, empty], chatml, pack=False, val_fraction=0.0, seq_length=256
    )
    rejects = [json.loads(line) for line in (output / "rejects.jsonl").read_text().splitlines()]
    got = [(r["row"], r["reason"]) for r in rejects if r["source"] == str(data)]
    assert got == EXPECTED_REJECTS
    assert [(r["row"], r["reason"]) for r in rejects if r["source"] == str(empty)] == [
        (0, "empty_file")
    ]
    assert all(r["message"] for r in rejects)
    field_of = {r["row"]: r["field"] for r in rejects if r["source"] == str(data)}
    assert field_of[3] == "messages[0].content" and field_of[4] == "messages[0].role"
    chat = chat_tokenizers["chatml"]
    answers = [
        chat.tokenizer.decode([t for t, m in zip(r["input_ids"], r["loss_mask"], strict=True) if m])
        for r in read_examples(output)
    ]
    assert answers == ["fine 1", "fine 2", "fine 3"]
    assert manifest["rejected"]["total"] == len(EXPECTED_REJECTS) + 1
    assert manifest["rows_read"] == len(BAD_ROWS)


def test_on_error_fail_stops_with_the_row_and_leaves_nothing(tmp_path, chatml, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b"\n".join(BAD_ROWS) + b"\n")
    output = tmp_path / "out"
    code = main(
        [
            "prepare",
            "--input",
            str(data),
            "--tokenizer",
            str(chatml),
            "--output",
            str(output),
            "--on-error",
            "fail",
            "--workers",
            "1",
            "--quiet",
        ]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert f"{data}, row 2" in error and "malformed_json" in error
    assert "Traceback" not in error
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no staging left"


def test_file_level_errors_are_clear(tmp_path, chatml):
    with pytest.raises(InputError, match="missing.jsonl"):
        run(tmp_path, [tmp_path / "missing.jsonl"], chatml)
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "response": "b"}])
    empty_tokenizer = tmp_path / "no-tokenizer"
    empty_tokenizer.mkdir()
    with pytest.raises(InputError, match="no tokenizer.json"):
        run(tmp_path, [data], empty_tokenizer)
    with pytest.raises(ConfigError, match="--val-fraction"):
        run(tmp_path, [data], chatml, val_fraction=1.5)
    only_bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}])
    with pytest.raises(InputError, match="no valid example"):
        run(tmp_path, [only_bad], chatml, name="x")


def test_existing_output_needs_overwrite(tmp_path, chatml):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "response": "b"}])
    run(tmp_path, [data], chatml, val_fraction=0.0)
    with pytest.raises(MegasftError, match="already exists"):
        run(tmp_path, [data], chatml, val_fraction=0.0)
    manifest, _ = run(tmp_path, [data], chatml, val_fraction=0.0, overwrite=True)
    assert manifest["examples"] == 1


def test_manifest_preview_and_cli_summary(tmp_path, chatml, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(20))
    output = tmp_path / "out"
    code = main(
        [
            "prepare",
            "--input",
            str(data),
            "--tokenizer",
            str(chatml),
            "--output",
            str(output),
            "--map",
            "prompt=question,response=answer",
            "--seq-length",
            "128",
            "--val-fraction",
            "0.1",
            "--workers",
            "1",
            "--quiet",
        ]
    )
    assert code == 0
    manifest = read_manifest(output)
    assert manifest["sources"][0]["sha256"] and manifest["tokenizer"]["sha256"]
    assert (
        manifest["chat_template"]["sha256"]
        and manifest["chat_template"]["origin"] == "tokenizer_config.json"
    )
    assert manifest["splits"]["train"]["examples"] + manifest["splits"]["val"]["examples"] == 20
    assert manifest["loss_tokens"] < manifest["tokens"]
    preview = (output / "preview.html").read_text()
    assert 'class="t trained' in preview and "&lt;|im_end|&gt;" in preview
    assert "mask preview" in capsys.readouterr().err


FORMAT_ROWS = {
    "alpaca": ({"instruction": "Add 2 and 2.", "input": "", "output": "It is 4."}, ["It is 4."]),
    "prompt-response": ({"prompt": "Add 2 and 2.", "response": "It is 4."}, ["It is 4."]),
    "messages": (
        {
            "messages": [
                {"role": "user", "content": "Add 2 and 2."},
                {"role": "assistant", "content": "It is 4."},
                {"role": "user", "content": "And 3 and 3?"},
                {"role": "assistant", "content": "6"},
            ]
        },
        ["It is 4.", "6"],
    ),
    "sharegpt": (
        {
            "conversations": [
                {"from": "human", "value": "Add 2 and 2."},
                {"from": "gpt", "value": "It is 4."},
                {"from": "human", "value": "And 3 and 3?"},
                {"from": "gpt", "value": "6"},
            ]
        },
        ["It is 4.", "6"],
    ),
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_ROWS))
@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral", "reasoning"])
def test_exact_trained_tokens_for_every_format_and_template_style(
    tmp_path, tokenizer_dirs, chat_tokenizers, fmt, style
):
    from tests.data.styles import STYLES

    row, answers = FORMAT_ROWS[fmt]
    data = write_jsonl(tmp_path / "data.jsonl", [row])
    manifest, output = run(tmp_path, [data], tokenizer_dirs[style], pack=False, val_fraction=0.0)
    assert manifest["sources"][0]["format"] == fmt
    (example,) = list(read_examples(output))
    chat = chat_tokenizers[style]
    leading = " " if style == "mistral" else ""  # [INST] ... [/INST] puts a space before answers
    expected = [leading + answer + STYLES[style].end_of_turn for answer in answers]
    assert trained_segments(as_example(example), chat.tokenizer) == expected


def _tokenizer_with_an_unreachable_token(directory: Path) -> Path:
    """A byte-level BPE whose merges are ranked by token id (so tiktoken's core is built for
    it), but whose "abc" the merges never make: they join "b"+"c" first, and "a"+"bc" is no
    merge. tokenizers spells "abc" as a, bc; tiktoken takes the whole piece as one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: index for index, char in enumerate(alphabet)}
    vocab.update({"bc": 256, "ab": 257, "abc": 258})
    tokenizer = Tokenizer(models.BPE(vocab, [("b", "c"), ("a", "b"), ("ab", "c")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def test_manifest_says_which_library_encoded(tmp_path, chatml):
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}"} for i in range(20)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    manifest, _ = run(tmp_path, [data], chatml, name="auto")
    assert manifest["tokenizer"]["encoder"]["library"] == "tiktoken"
    manifest, _ = run(tmp_path, [data], chatml, name="tok", encoder="tokenizers")
    assert manifest["tokenizer"]["encoder"] == {
        "library": "tokenizers",
        "reason": "--encoder tokenizers",
    }


def test_where_tiktoken_differs_prepare_writes_the_tokenizers_ids_and_says_so(tmp_path, caplog):
    tokenizer = _tokenizer_with_an_unreachable_token(tmp_path / "unreachable")
    rows = [{"prompt": f"say it {i}", "response": "abc"} for i in range(12)]
    data = write_jsonl(tmp_path / "abc.jsonl", rows)
    settings = {"val_fraction": 0.0, "pack": False}
    with caplog.at_level("WARNING"):
        manifest, auto = run(tmp_path, [data], tokenizer, name="auto", **settings)
    assert manifest["tokenizer"]["encoder"]["library"] == "tiktoken, then tokenizers"
    assert "other ids than the tokenizer" in caplog.text
    _, reference = run(tmp_path, [data], tokenizer, name="ref", encoder="tokenizers", **settings)
    got = [row["input_ids"] for row in read_examples(auto, split="train")]
    expected = [row["input_ids"] for row in read_examples(reference, split="train")]
    assert got == expected
    assert all(256 in ids and 258 not in ids for ids in got), "a, bc as tokenizers spells it"
