from __future__ import annotations

from megasft.cli import main


def test_convert_command_both_ways(hf_model_dirs, tmp_path, capsys):
    assert (
        main(
            [
                "convert",
                "--from",
                "hf",
                "--to",
                "megatron",
                "--src",
                str(hf_model_dirs["llama"]),
                "--dst",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    assert "llama, 2 layers" in capsys.readouterr().out
    arguments = [
        "convert",
        "--from",
        "megatron",
        "--to",
        "hf",
        "--src",
        str(tmp_path / "m"),
        "--dst",
        str(tmp_path / "h"),
    ]
    assert main([*arguments, "--max-shard-size", "100KB"]) == 0
    assert (tmp_path / "h" / "model.safetensors.index.json").is_file()


def test_convert_error_is_one_line_without_traceback(tmp_path, capsys):
    arguments = [
        "convert",
        "--from",
        "hf",
        "--to",
        "megatron",
        "--src",
        str(tmp_path / "missing"),
        "--dst",
        str(tmp_path / "m"),
    ]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("megasft convert: error: ") and "does not exist" in error
    assert "Traceback" not in error
