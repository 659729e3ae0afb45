"""``mini-omni2 chat`` runs offline with the random tiny model and writes a playable 24 kHz wav."""

from __future__ import annotations

import pytest
import soundfile

from conftest import sine
from mini_omni2.cli import main


def test_chat_tiny_random_writes_a_wav(tmp_path, capsys):
    out = tmp_path / "answer.wav"
    code = main(["chat", "--model", "tiny-random", "--text", "What is your name?", "--out", str(out),
                 "--max-new-tokens", "24", "--no-codec-noise"])
    assert code == 0
    captured = capsys.readouterr()
    assert "RANDOM weights" in captured.err
    assert f"wrote {out}" in captured.err
    audio, rate = soundfile.read(str(out))
    assert rate == 24000
    assert audio.ndim == 1 and len(audio) > 0 and len(audio) % 2048 == 0


def test_chat_audio_prompt_text_answer(tmp_path, capsys):
    wav = tmp_path / "question.wav"
    soundfile.write(str(wav), sine(0.5, sampling_rate=22050), 22050)
    out = tmp_path / "unused.wav"
    code = main(["chat", "--model", "tiny-random", "--audio", str(wav), "--output", "text", "--out", str(out),
                 "--max-new-tokens", "8"])
    assert code == 0
    assert not out.exists()  # a text answer writes no wav
    assert "steps" in capsys.readouterr().err


def test_chat_needs_a_prompt(capsys):
    assert main(["chat", "--model", "tiny-random"]) == 2
    assert "give at least one of" in capsys.readouterr().err


def test_chat_loads_a_saved_folder(model, processor, tmp_path, capsys):
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    out = tmp_path / "answer.wav"
    code = main(["chat", "--model", str(folder), "--text", "hello world", "--out", str(out), "--max-new-tokens", "16",
                 "--greedy", "--no-codec-noise"])
    assert code == 0
    assert "RANDOM" not in capsys.readouterr().err
    audio, rate = soundfile.read(str(out))
    assert rate == 24000 and len(audio) > 0 and len(audio) % 2048 == 0


def test_quickstart_example_streams_a_wav(tmp_path, capsys):
    import runpy
    from pathlib import Path

    example = runpy.run_path(str(Path(__file__).parent.parent / "examples" / "quickstart.py"))
    out = tmp_path / "q.wav"
    example["main"](["--out", str(out), "--max-new-tokens", "20"])
    assert "RANDOM weights" in capsys.readouterr().out
    audio, rate = soundfile.read(str(out))
    assert rate == 24000 and len(audio) == (20 - 7) * 2048  # every frame after the 7-step delay, streamed


def test_chat_with_a_model_it_cannot_load_says_so(tmp_path, capsys):
    release = tmp_path / "mini-omni2-release"
    release.mkdir()
    (release / "lit_model.pth").write_bytes(b"")
    code = main(["chat", "--model", str(release), "--text", "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: cannot load {str(release)!r}" in err
    assert "mini-omni2 convert --source" in err
    assert main(["chat", "--model", str(tmp_path / "missing"), "--text", "hi"]) == 2
    assert "error: cannot load" in capsys.readouterr().err


# ----- one error line, before the work (issue 12) ---------------------------------------------------------------
def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "loading tiny-random" not in err  # refused before the model was loaded
    return lines[0]


def test_chat_out_is_checked_before_the_model_is_loaded(tmp_path, capsys):
    """Issue 12: --out into a missing folder failed after generating, and the answer was lost."""
    base = ["chat", "--model", "tiny-random", "--text", "hi", "--max-new-tokens", "4"]
    assert main(base + ["--out", str(tmp_path / "missing" / "answer.wav")]) == 2
    assert "does not exist" in _error_line(capsys)
    assert main(base + ["--out", str(tmp_path)]) == 2
    assert "is a folder" in _error_line(capsys)
    assert main(base + ["--out", str(tmp_path / "answer.xyz")]) == 2
    assert "cannot write XYZ" in _error_line(capsys)
    (tmp_path / "file").write_text("x")
    assert main(base + ["--out", str(tmp_path / "file" / "answer.wav")]) == 2
    assert "does not exist" in _error_line(capsys)


def test_chat_device_that_this_torch_cannot_use(monkeypatch, capsys):
    """Issue 12: --device cuda on a CPU-only torch ended in an AssertionError traceback."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["chat", "--model", "tiny-random", "--text", "hi", "--device", "cuda"]) == 2
    assert "cannot use cuda here; use --device cpu" in _error_line(capsys)
    assert main(["chat", "--model", "tiny-random", "--text", "hi", "--device", "gpu7"]) == 2
    assert "is not a torch device" in _error_line(capsys)


def test_chat_bad_prompt_files_and_numbers(tmp_path, capsys):
    assert main(["chat", "--model", "tiny-random", "--audio", str(tmp_path / "none.wav"), "--output", "text"]) == 2
    assert "audio file not found" in _error_line(capsys)
    (tmp_path / "noise.wav").write_bytes(b"RIFF....not really")
    assert main(["chat", "--model", "tiny-random", "--audio", str(tmp_path / "noise.wav"), "--output", "text"]) == 2
    assert "cannot decode" in _error_line(capsys)
    for flag, value in (("--max-new-tokens", "0"), ("--temperature", "-1"), ("--top-p", "1.5"), ("--top-k", "-2")):
        with pytest.raises(SystemExit) as info:
            main(["chat", "--model", "tiny-random", "--text", "hi", flag, value])
        assert info.value.code == 2
        assert f"argument {flag}" in capsys.readouterr().err
