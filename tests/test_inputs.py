"""The accepted input forms of the processor (docs/inputs.md) and one clear error for each bad one (issue 12)."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
import soundfile
import torch

from mini_omni2.processing_mini_omni2 import load_audio
from mini_omni2.training import MiniOmni2DataCollator
from mini_omni2.training.data import MiniOmni2Preprocessor, prepare_example

from conftest import espeak_wav, sine

QUESTIONS = ["What is your name?", "Tell me a story."]


def assert_same_batch(a, b) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----- audio: the forms of a datasets Audio column, files, bytes ----------------------------------------------------
@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    """Two espeak-ng questions (22,050 Hz wav files) and their samples as read by soundfile."""
    folder = tmp_path_factory.mktemp("spoken")
    paths = [espeak_wav(text, folder / f"q{k}.wav") for k, text in enumerate(QUESTIONS)]
    return paths, [soundfile.read(path, dtype="float32") for path in paths]


def test_a_datasets_audio_column_saved_to_disk(processor, spoken, tmp_path):
    """A Dataset with an Audio column, saved and loaded back: its encoded values {"path", "bytes"} are what the
    processor, the preprocessor and the collator take (decoding the column itself needs torchcodec, docs/inputs.md)."""
    paths, decoded = spoken
    raw = datasets.Dataset.from_dict(
        {"audio": paths, "task": ["A1T2", "A1T1"], "answer_text": ["my name is omni", "one two"]}
    ).cast_column("audio", datasets.Audio())
    raw.save_to_disk(str(tmp_path / "saved"))
    dataset = datasets.load_from_disk(str(tmp_path / "saved")).cast_column("audio", datasets.Audio(decode=False))
    values = [row["audio"] for row in dataset]
    assert all(isinstance(v["bytes"], bytes) and v["bytes"] for v in values)  # the saved dataset holds the audio

    for value, (samples, rate) in zip(values, decoded):
        assert rate == 22050
        assert_same_batch(processor(audio=value, output="text"), processor(audio=(samples, rate), output="text"))
    # the path alone (bytes None) is read from the file
    assert_same_batch(
        processor(audio={"path": paths[0], "bytes": None}, output="text"),
        processor(audio=(decoded[0][0], 22050), output="text"),
    )

    examples = list(dataset)
    expected = MiniOmni2DataCollator(processor)(
        [dict(e, audio={"array": s, "sampling_rate": r}) for e, (s, r) in zip(examples, decoded)]
    )
    assert_same_batch(MiniOmni2DataCollator(processor)(examples), expected)
    prep = MiniOmni2Preprocessor(processor, audio="waveform")
    mapped = dataset.map(prep, batched=True, remove_columns=prep.removable_columns(dataset.column_names))
    assert_same_batch(MiniOmni2DataCollator(processor)(list(mapped)), expected)


class _Samples:
    def __init__(self, data: torch.Tensor, sample_rate: int):
        self.data, self.sample_rate = data, sample_rate


class StandInAudioDecoder:
    """torchcodec's ``AudioDecoder`` interface (``get_all_samples()`` -> ``.data`` (channels, samples), ``.sample_rate``),
    which a datasets Audio column decodes to when torchcodec is installed. torchcodec itself cannot load here: its
    PyPI wheels are built against CUDA torch (docs/inputs.md)."""

    def __init__(self, path: str):
        samples, self.rate = soundfile.read(path, dtype="float32", always_2d=True)
        self.samples = torch.from_numpy(samples.T.copy())

    def get_all_samples(self) -> _Samples:
        return _Samples(self.samples, self.rate)


def test_a_torchcodec_decoder_is_read(processor, spoken):
    paths, decoded = spoken
    expected = processor(audio=(decoded[0][0], decoded[0][1]), output="asr")
    assert_same_batch(processor(audio=StandInAudioDecoder(paths[0]), output="asr"), expected)
    example = {"task": "A1T1", "audio": StandInAudioDecoder(paths[0]), "answer_text": "hello"}
    np.testing.assert_array_equal(prepare_example(example, processor)["input_features"], expected["input_features"][0])


@pytest.mark.parametrize("form", ["path", "pathlib", "bytes", "bytearray", "file", "bytes-dict", "array-dict"])
def test_audio_files_bytes_and_dicts(processor, spoken, form):
    paths, decoded = spoken
    path = paths[1]
    data = open(path, "rb").read()
    value = {
        "path": path,
        "pathlib": __import__("pathlib").Path(path),
        "bytes": data,
        "bytearray": bytearray(data),
        "file": io.BytesIO(data),
        "bytes-dict": {"bytes": data, "path": "q1.wav"},
        "array-dict": {"array": decoded[1][0], "sampling_rate": decoded[1][1]},
    }[form]
    np.testing.assert_array_equal(load_audio(value), load_audio(decoded[1]))


def test_a_rate_that_disagrees_with_the_audio_is_refused(spoken):
    paths, _ = spoken
    with pytest.raises(ValueError, match="22050 Hz but sampling_rate=16000"):
        load_audio(paths[0], sampling_rate=16000)
    with pytest.raises(ValueError, match="8000 Hz but sampling_rate=16000"):
        load_audio((sine(0.1, 8000), 8000), sampling_rate=16000)
    assert load_audio((sine(0.1), 16000), sampling_rate=16000).shape == (1600,)


@pytest.mark.parametrize(
    "value, error, message",
    [
        (b"not a sound file at all", ValueError, "cannot decode the audio bytes as audio"),
        (b"", ValueError, "cannot decode"),
        ({"bytes": None, "path": None}, ValueError, "needs 'array'"),
        ({"array": sine(0.1), "sampling_rate": 0}, ValueError, "positive whole number"),
        ("/no/such/file.wav", ValueError, "not found"),
    ],
)
def test_bad_audio_values(value, error, message):
    with pytest.raises(error, match=message):
        load_audio(value)


def test_a_file_that_is_not_audio_names_the_file(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is text")
    with pytest.raises(ValueError, match=f"cannot decode {path} as audio"):
        load_audio(str(path))
