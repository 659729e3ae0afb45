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


# ----- audio samples: integer PCM, dtypes, rates, amplitude ---------------------------------------------------------
@pytest.mark.parametrize("dtype, full_scale, offset", [(np.int16, 32768, 0), (np.int32, 2**31, 0), (np.uint8, 128, 128)])
def test_integer_audio_is_scaled_by_its_full_scale(processor, dtype, full_scale, offset):
    """Issue 12: int16/int32 audio (soundfile.read(..., dtype="int16")) was taken unscaled."""
    wave = sine(0.5)
    pcm = np.round(wave * (full_scale - 1) + offset).astype(dtype)
    np.testing.assert_allclose(load_audio((pcm, 16000)), wave, atol=1.5 / full_scale)
    as_float = processor(audio=(wave, 16000), output="text")["input_features"]
    as_pcm = processor(audio=(pcm, 16000), output="text")["input_features"]
    assert (as_float - as_pcm).abs().mean() < (0.05 if dtype == np.uint8 else 1e-3)  # up to quantisation noise


def test_int16_read_by_soundfile_equals_the_float_read(processor, spoken):
    paths, _ = spoken
    pcm, rate = soundfile.read(paths[0], dtype="int16")
    as_float, _ = soundfile.read(paths[0], dtype="float32")
    np.testing.assert_allclose(load_audio((pcm, rate)), load_audio((as_float, rate)), atol=1e-6)


def test_float64_and_tensors_are_accepted():
    wave = sine(0.2)
    expected = load_audio((wave, 16000))
    np.testing.assert_allclose(load_audio((wave.astype(np.float64), 16000)), expected)
    np.testing.assert_allclose(load_audio((torch.from_numpy(wave).half(), np.int64(16000))), expected, atol=1e-3)
    np.testing.assert_allclose(load_audio(torch.from_numpy(wave).bfloat16(), sampling_rate=16000.0), expected, atol=1e-2)


@pytest.mark.parametrize(
    "samples, rate, error, message",
    [
        (sine(0.1) > 0, 16000, TypeError, "bool"),
        (sine(0.1).astype(np.complex64), 16000, TypeError, "real numbers"),
        (np.array(["a", "b"]), 16000, TypeError, "real numbers"),
        (np.array([object(), object()]), 16000, TypeError, "real numbers"),
        (np.arange(100), 16000, TypeError, "int64"),
        (sine(0.1), 0, ValueError, "positive whole number"),
        (sine(0.1), -16000, ValueError, "positive whole number"),
        (sine(0.1), 16000.5, ValueError, "positive whole number"),
        (sine(0.1), float("nan"), ValueError, "positive whole number"),
        (sine(0.1), "16000", TypeError, "whole number of Hz"),
        (sine(0.1), True, TypeError, "whole number of Hz"),
        (sine(0.1), 10, ValueError, "between 1000 and 1000000"),
        (sine(0.1) * 1e30, 16000, ValueError, "peak is 3e\\+29"),
        (sine(0.1).astype(np.float64) * 1e300, 16000, ValueError, "peak"),
        (sine(0.1) * 32767, 16000, ValueError, "divide PCM values by their full scale"),
        (np.zeros(0, np.float32), 16000, ValueError, "empty"),
        (np.zeros((2, 0), np.float32), 16000, ValueError, "empty"),
        (np.zeros((2, 3, 100), np.float32), 16000, ValueError, "1-D"),
        (np.array([0.0, np.nan], np.float32), 16000, ValueError, "NaN"),
        (np.array([0.0, -np.inf], np.float32), 16000, ValueError, "infinite"),
    ],
)
def test_bad_samples_and_rates_are_refused(processor, samples, rate, error, message):
    """Issue 12: (array, 0) ended in a ZeroDivisionError inside librosa; huge amplitudes gave NaN features."""
    with pytest.raises(error, match=message):
        processor(audio=(samples, rate), output="text")


def test_audio_over_the_window_is_refused_before_resampling(processor):
    """A 40 s array at 8 kHz: refused, or cut to 30 s of source samples before it is resampled."""
    long = np.zeros(40 * 8000, np.float32)
    with pytest.raises(ValueError, match="40.0 s, over the 30 s"):
        processor(audio=(long, 8000), output="text")
    assert processor.prepare_audio((long, 8000), truncate_audio=True).shape == (30 * 16000,)


# ----- images ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def picture():
    """A smooth random RGB picture (uint8, 48 x 64)."""
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (12, 16, 3)).astype(np.uint8)
    return np.array(Image.fromarray(noise).resize((64, 48), Image.BILINEAR))


@pytest.mark.parametrize(
    "form",
    ["float [0, 1]", "float [0, 255]", "float16 [0, 1]", "uint16", "int64", "CHW numpy", "CHW tensor",
     "CHW float tensor [0, 1]", "HWC tensor", "nested list (collator)"],
)
def test_image_arrays_in_every_range_and_layout(processor, picture, form):
    """Issue 12: a float image in [0, 1] (np.random.rand(64, 64, 3)) became black, in the processor and the collator."""
    value = {
        "float [0, 1]": picture / 255.0,
        "float [0, 255]": picture.astype(np.float32),
        "float16 [0, 1]": (picture / 255.0).astype(np.float16),
        "uint16": picture.astype(np.uint16) * 257,
        "int64": picture.astype(np.int64),
        "CHW numpy": np.moveaxis(picture, -1, 0),
        "CHW tensor": torch.from_numpy(picture).permute(2, 0, 1),
        "CHW float tensor [0, 1]": torch.from_numpy(picture).permute(2, 0, 1) / 255.0,
        "HWC tensor": torch.from_numpy(picture),
        "nested list (collator)": picture.tolist(),  # how datasets gives an Array3D column; the processor reads
    }[form]                                           # a list as a batch
    expected = processor(images=picture, output="text")["pixel_values"]
    tolerance = 0.02 if form == "float16 [0, 1]" else 0.0  # float16 rounds a few values by one step
    if not isinstance(value, list):
        assert torch.allclose(processor(images=value, output="text")["pixel_values"], expected, atol=tolerance)
    example = {"task": "VT2", "image": value, "answer_text": "red"}
    assert torch.allclose(MiniOmni2DataCollator(processor)([example])["pixel_values"], expected, atol=tolerance)


def test_random_float_image_is_not_black(processor):
    pixels = processor(images=np.random.default_rng(0).random((64, 64, 3)), output="text")["pixel_values"]
    black = processor(images=np.zeros((64, 64, 3), np.uint8), output="text")["pixel_values"]
    assert (pixels - black).abs().mean() > 0.5


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "P", "PA", "RGBA", "RGBa", "CMYK", "YCbCr", "HSV", "LAB", "I", "I;16", "I;16B", "F"])
def test_every_pil_mode_and_bit_depth(processor, picture, mode):
    from PIL import Image

    grey = picture[..., 0]
    if mode in ("I", "I;16", "I;16B", "F"):
        sixteen = grey.astype(np.uint16) * 257
        if mode == "I;16B":
            image = Image.frombytes("I;16B", (grey.shape[1], grey.shape[0]), sixteen.astype(">u2").tobytes())
        else:
            image = Image.fromarray({"I": grey.astype(np.int32) * 257, "I;16": sixteen, "F": grey / 255.0}[mode])
        assert image.mode == mode
        # the same grey picture as 8 bits
        expected = processor(images=Image.fromarray(grey), output="text")["pixel_values"]
        assert torch.allclose(processor(images=image, output="text")["pixel_values"], expected, atol=1e-6)
        return
    image = Image.new("La", (64, 48), (100, 200)) if mode == "La" else Image.fromarray(picture).convert(mode)
    pixels = processor(images=image, output="text")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224) and torch.isfinite(pixels).all()
    if mode in ("RGBA", "RGBa", "CMYK", "YCbCr"):  # lossless or nearly: the same picture
        expected = processor(images=picture, output="text")["pixel_values"]
        assert (pixels - expected).abs().mean() < 0.05


def test_image_files_bytes_and_datasets_dicts(processor, picture, tmp_path):
    from PIL import Image

    path = tmp_path / "picture.png"
    Image.fromarray(picture).save(path)
    data = path.read_bytes()
    expected = processor(images=picture, output="text")["pixel_values"]
    for value in (str(path), path, data, io.BytesIO(data), {"bytes": data, "path": None}, {"bytes": None, "path": str(path)}):
        assert torch.equal(processor(images=value, output="text")["pixel_values"], expected)


@pytest.mark.parametrize("shape", [(5000, 1), (1, 5000), (3, 200_000)])
def test_extremely_elongated_images_cost_little_memory(processor, shape):
    """Issue 12: a 5000 x 1 image took 2.8 GB and 9 s (CLIP resizes the short side to 224 before the centre crop)."""
    import tracemalloc

    image = np.random.default_rng(0).integers(0, 256, shape + (3,)).astype(np.uint8)
    tracemalloc.start()
    try:
        pixels = processor(images=image, output="text")["pixel_values"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pixels.shape == (1, 3, 224, 224) and torch.isfinite(pixels).all()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_elongated_images_keep_what_the_centre_crop_keeps(processor, picture):
    """The cut to the central 4:1 part changes nothing that CLIP's centre crop keeps (up to resampling)."""
    from PIL import Image

    wide = np.asarray(Image.fromarray(picture).resize((640, 48), Image.BILINEAR))  # 13:1
    full = processor.image_processor([Image.fromarray(wide)], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(processor.image_pixels([wide]), full, atol=0.05)


@pytest.mark.parametrize(
    "value, error, message",
    [
        ("0x0 pil", ValueError, "empty \\(0x0"),
        (np.zeros((0, 0, 3), np.uint8), ValueError, "empty|needs an image"),  # an empty array is an absent field
        (np.zeros((4, 0), np.float32), ValueError, "empty \\(0x4|needs an image"),  # in a training example
        (np.full((8, 8, 3), -0.5), ValueError, "\\[0, 1\\] or \\[0, 255\\]"),
        (np.full((8, 8, 3), 256.0), ValueError, "\\[0, 1\\] or \\[0, 255\\]"),
        (np.full((8, 8), np.nan), ValueError, "NaN"),
        (np.full((8, 8), 70000), ValueError, "16-bit"),
        (np.full((8, 8), -3), ValueError, "8-bit"),
        (np.zeros((8, 8, 7)), ValueError, "1 to 4 channels"),
        (np.zeros((1, 8, 8, 3)), ValueError, "as a list"),
        (np.zeros((8, 8), np.complex64), TypeError, "real numbers"),
        (b"not an image", ValueError, "cannot decode the image bytes"),
        ({"bytes": None, "path": None}, ValueError, "needs 'bytes' or 'path'"),
        (42, TypeError, "got int"),
    ],
)
def test_bad_images_are_refused(processor, value, error, message):
    from PIL import Image

    if isinstance(value, str) and value == "0x0 pil":
        value = Image.new("RGB", (0, 0))
    with pytest.raises(error, match=message):
        processor(images=value, output="text")
    with pytest.raises(error, match=message):
        MiniOmni2DataCollator(processor)([{"task": "VT2", "image": value, "answer_text": "red"}])


# ----- text ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, error, message",
    [
        ("hello \ud800 world", ValueError, "surrogates not allowed '\\\\ud800' at position 6"),
        ("\udfff", ValueError, "lone surrogate"),
        (b"hello", TypeError, "got bytes"),
        (42, TypeError, "got int"),
        ("", ValueError, "non-empty|no answer"),  # an empty field is an absent one in a training example
    ],
)
def test_text_that_cannot_be_encoded(processor, text, error, message):
    """Issue 12: a lone surrogate gave a TypeError from inside the tokenizer."""
    with pytest.raises(error, match=message):
        processor(text=text, output="text")
    with pytest.raises(error, match=message):
        prepare_example({"task": "T1T2", "text": "hi", "answer_text": text}, processor)


def test_unusual_but_valid_text(processor):
    for text in ("ünïcödé ✓ 漢字 🙂", "a\x00b", "x" * 2000, "\n\ttabs\n"):
        batch = processor(text=text, output="text")
        assert batch["input_ids"].shape[-1] >= 4 and batch["attention_mask"].all()


# ----- the model's own boundary: ids and feature positions ---------------------------------------------------------
def test_ids_outside_a_streams_vocabulary_are_refused(model, processor):
    """Issue 12: ids outside the vocabulary ended in an IndexError inside the embedding."""
    batch = processor(text="Hello world", output="text")
    batch.pop("request_index")
    layout = model.layout
    for stream, value, expected in (
        (7, layout.text_vocab_size, f"stream 7 \\(text\\) must lie in \\[0, {layout.text_vocab_size}\\)"),
        (0, -1, f"stream 0 \\(audio layer 1\\) must lie in \\[{layout.audio_offset(0)}, {layout.audio_offset(1)}\\)"),
        (3, 5, f"stream 3 \\(audio layer 4\\) must lie in \\[{layout.audio_offset(3)}, "),
        (6, layout.total_vocab_size, "stream 6"),
    ):
        ids = batch["input_ids"].clone()
        ids[0, stream, 1] = value
        with pytest.raises(ValueError, match=expected):
            model(**dict(batch, input_ids=ids))
    with pytest.raises(TypeError, match="integer ids"):
        model(**dict(batch, input_ids=batch["input_ids"].float()))


@pytest.mark.parametrize("kind", ["audio", "image"])
def test_a_prompt_with_feature_positions_needs_its_features(model, processor, kind):
    """Issue 12: a prompt with audio (or image) positions but no features generated without hearing (or seeing)."""
    inputs = {"audio": (sine(0.3), 16000)} if kind == "audio" else {"images": np.zeros((32, 32, 3), np.uint8)}
    batch = processor(text=["Hello world", None], **{k: [None, v] for k, v in inputs.items()}, output="text")
    batch.pop("request_index")
    dropped = ("input_features", "audio_feature_mask", "audio_lengths") if kind == "audio" else (
        "pixel_values", "image_feature_mask")
    with torch.no_grad():
        model(**batch)  # complete: fine
        incomplete = {k: v for k, v in batch.items() if k not in dropped}
        with pytest.raises(ValueError, match=f"row 1 of input_ids holds a prompt with {kind} positions but no {kind}"):
            model(**incomplete)
        with pytest.raises(ValueError, match=f"no {kind} features"):
            model.generate(**incomplete, max_new_tokens=2, decode_audio=False)



# ----- training examples -------------------------------------------------------------------------------------------
def test_float_speech_codes_are_refused_unless_whole(processor):
    """Issue 12: float speech codes in a training example were truncated to integers."""
    codes = np.random.default_rng(0).integers(0, 64, size=(3, 7))
    example = {"task": "T1A2", "text": "hello", "answer_text": "hi", "answer_codes": codes}
    expected = MiniOmni2DataCollator(processor)([example])
    whole = MiniOmni2DataCollator(processor)([dict(example, answer_codes=codes.astype(np.float64).tolist())])
    assert torch.equal(whole["labels"], expected["labels"])
    with pytest.raises(ValueError, match=r"answer_codes must be whole numbers, got \[54.5, 40.5"):
        MiniOmni2DataCollator(processor)([dict(example, answer_codes=codes + 0.5)])
    with pytest.raises(ValueError, match="answer_text_ids must be whole numbers"):
        prepare_example(dict(example, answer_text_ids=[3.7, 4.0]), processor)
    with pytest.raises(ValueError, match="whole numbers"):
        prepare_example(dict(example, answer_codes=torch.full((2, 7), float("nan"))), processor)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(answer_codes=[[1, 2, 3, 4, 5, 6, 7], [1, 2]]), ValueError, "rectangular"),
        (dict(answer_codes=[["a"] * 7]), TypeError, "must hold numbers"),
        (dict(answer_codes=[1, 2, 3, 4, 5, 6, 7]), ValueError, "2 dimensions"),
        (dict(answer_codes=np.full((2, 7), 64)), ValueError, "codec codes"),
        (dict(prompt_text_ids=[5, 10_000]), ValueError, "prompt_text_ids \\(tokenizer ids\\) must be in \\[0, 448\\)"),
        (dict(answer_text_ids=[-1]), ValueError, "must be in \\[0, 448\\)"),
        (dict(task=["T1A2"]), ValueError, "Unknown task"),
        (dict(task=None, output={"speech"}), ValueError, "Unknown output"),
        (dict(text=42), TypeError, "got int"),
        (dict(answer_text=None, answer_codes=None), ValueError, "the example has no answer"),
    ],
)
def test_malformed_training_examples(processor, change, error, message):
    codes = np.zeros((2, 7), np.int64)
    example = dict({"task": "T1A2", "text": "hello", "answer_text": "hi", "answer_codes": codes}, **change)
    with pytest.raises(error, match=message):
        MiniOmni2DataCollator(processor)([example])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(input_features=np.zeros((80, 100), np.float32)), "shape \\(80, 3000\\), got \\(80, 100\\)"),
        (dict(input_features=np.full((80, 3000), np.nan, np.float32)), "NaN"),
        (dict(audio_num_frames=0), "in \\[1, 1500\\]"),
        (dict(audio_num_frames=2000), "in \\[1, 1500\\]"),
        (dict(audio_num_frames=2.5), "whole numbers"),
        (dict(audio_num_frames=None), "need audio_num_frames"),
    ],
)
def test_malformed_precomputed_audio_features(processor, change, message):
    example = dict({"task": "A1T2", "input_features": np.zeros((80, 3000), np.float32), "audio_num_frames": 10,
                    "answer_text": "hi"}, **change)
    with pytest.raises(ValueError, match=message):
        MiniOmni2DataCollator(processor)([example])


def test_malformed_pixel_values_waveforms_and_batches(processor):
    image = {"task": "VT2", "answer_text": "red", "pixel_values": np.zeros((3, 32, 32), np.float32)}
    with pytest.raises(ValueError, match="pixel_values must have the processor's shape \\(3, 224, 224\\)"):
        MiniOmni2DataCollator(processor)([image])
    waveform = {"task": "A1T2", "answer_text": "hi", "audio_waveform": np.full(100, 50.0, np.float32)}
    with pytest.raises(ValueError, match="peak is 50"):
        MiniOmni2DataCollator(processor)([waveform])
    example = {"task": "T1T2", "text": "hello", "answer_text": "hi"}
    with pytest.raises(TypeError, match="a list of examples, got dict"):
        MiniOmni2DataCollator(processor)(example)
    with pytest.raises(TypeError, match="must be a dict of fields"):
        MiniOmni2DataCollator(processor)([("hello", "hi")])
    with pytest.raises(ValueError, match="empty batch"):
        MiniOmni2DataCollator(processor)([])
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive int"):
        MiniOmni2DataCollator(processor, pad_to_multiple_of=0)


def test_malformed_built_rows(processor):
    collator = MiniOmni2DataCollator(processor)
    row = collator.training_rows({"task": "A1T2", "audio": (sine(0.2), 16000), "answer_text": "hi"})[0]
    assert torch.equal(collator([row])["labels"], collator([{"task": "A1T2", "audio": (sine(0.2), 16000),
                                                              "answer_text": "hi"}])["labels"])
    for change, message in (
        (dict(labels=row["labels"][:, :-1]), "must both be \\(8, seq >= 1\\)"),
        (dict(input_ids=row["input_ids"][:7]), "must both be \\(8, seq >= 1\\)"),
        (dict(input_features=np.zeros((0, 0), np.float32)), "input_features must be given with them"),
        (dict(audio_feature_mask=row["audio_feature_mask"][:-1]), "zeros and ones"),
        (dict(audio_lengths=3), "disagrees"),
    ):
        with pytest.raises(ValueError, match=message):
            collator([dict(row, **change)])
