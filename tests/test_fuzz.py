"""Fuzzing the input boundaries (issue 12): the processor and the training collator, property-based with hypothesis
plus a table of hand-picked cases.

For every input: either a result that passes the sanity checks (ids in their streams' vocabularies, left padding,
feature masks that agree with the features, finite features) or a ValueError/TypeError raised by this package with
a message; never another exception type, never a NaN, never more than a bounded amount of memory.
"""

from __future__ import annotations

import io
import re
import os
import resource
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mini_omni2
from mini_omni2.training import IGNORE_INDEX, MiniOmni2DataCollator

from conftest import sine

PACKAGE = os.path.dirname(os.path.abspath(mini_omni2.__file__))
MEMORY_LIMIT = 256 * 2**20  # per call (numpy and Python allocations, tracemalloc)
#: ``MINI_OMNI2_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py`` explores further, with fresh random examples.
EXPLORE = int(os.environ.get("MINI_OMNI2_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=EXPLORE or 40,
    deadline=None,
    derandomize=not EXPLORE,  # by default the same examples on every run: CI stays reproducible
    database=None,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),  # no "explain" phase: it is slow and only annotates
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module", autouse=True)
def _warm_up(processor):
    """Import and compile what the inputs need (librosa's resampler, soundfile, PIL) outside the memory tracing: an
    import under tracemalloc is slow, and its allocations are not the input's."""
    processor(audio=(sine(0.1, 44100), 44100), images=np.zeros((8, 8, 3), np.uint8), output="text")
    outcome(lambda: processor(audio=b"not audio", output="text"))


# ----- the invariants ------------------------------------------------------------------------------------------------
def _raising_file(error: BaseException) -> str:
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename)


def _count(what: str) -> None:
    if currently_in_test_context():  # hypothesis' statistics (pytest --hypothesis-show-statistics)
        event(what)


def outcome(call):
    """Run ``call`` under the memory bound: (result, None) or (None, a ValueError/TypeError of this package).
    Any other exception propagates and fails the test."""
    tracemalloc.start()
    try:
        result = call()
        _count("accepted")
        return result, None
    except (ValueError, TypeError) as error:
        assert str(error).strip(), f"{type(error).__name__} without a message"
        assert _raising_file(error).startswith(PACKAGE), f"raised outside the package: {error!r}"
        _count(f"refused: {type(error).__name__}")
        return None, error
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MEMORY_LIMIT, f"peak {peak / 2**20:.0f} MiB"


def check_prompts(batch, processor) -> None:
    """A processor batch: ids in their streams' slices, left padding, masks and features that agree, all finite."""
    layout = processor.layout
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, streams, length = ids.shape
    assert streams == layout.num_streams and mask.shape == (rows, length) and length >= 1
    local = ids - layout.stream_offsets()[None, :, None]
    sizes = torch.tensor(layout.stream_vocab_sizes())[None, :, None]
    assert bool(((local >= 0) & (local < sizes)).all())
    assert bool((mask.diff(dim=1) >= 0).all()) and bool(mask[:, -1].all())  # left padded, no empty row
    assert batch["request_index"].shape == (rows,)
    _check_features(batch, mask)


def _check_features(batch, mask) -> None:
    audio = batch["audio_feature_mask"]
    assert not bool((audio & (mask == 0)).any())
    with_audio = audio.any(dim=1)
    if "input_features" in batch:
        features = batch["input_features"]
        assert features.shape[0] == int(with_audio.sum()) and features.shape[1] == 80
        assert bool(torch.isfinite(features).all())
        assert batch["audio_lengths"].tolist() == audio.sum(dim=1)[with_audio].tolist()
    else:
        assert not bool(with_audio.any())
    image = batch.get("image_feature_mask")
    if "pixel_values" in batch:
        pixels = batch["pixel_values"]
        assert pixels.shape[1:] == (3, 224, 224) and bool(torch.isfinite(pixels).all())
        counts = image.sum(dim=1)
        assert pixels.shape[0] == int((counts > 0).sum()) and set(counts[counts > 0].tolist()) == {50}
        assert not bool((image & (mask == 0)).any())
    else:
        assert image is None or not bool(image.any())


def check_training_batch(batch, processor) -> None:
    """A collator batch: labels shaped as the ids, -100 wherever the attention mask is 0, features as above."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert labels.shape == ids.shape and ids.shape[1] == processor.layout.num_streams
    assert bool((labels[:, :, ~mask.bool().any(dim=0)] == IGNORE_INDEX).all())
    assert bool((labels.masked_select(~mask.bool()[:, None, :].expand_as(labels)) == IGNORE_INDEX).all())
    learned = labels != IGNORE_INDEX
    assert bool((labels[learned] == ids[learned]).all())  # targets are the ids the model is fed
    _check_features(batch, mask)


# ----- strategies -----------------------------------------------------------------------------------------------------
AUDIO_DTYPES = [np.float32, np.float64, np.float16, np.int16, np.int32, np.uint8, np.int64, np.bool_, np.complex64]
IMAGE_DTYPES = [np.uint8, np.uint16, np.int32, np.int64, np.float32, np.float64, np.float16, np.bool_, np.complex64]
RATES = st.one_of(
    st.sampled_from([16000, 8000, 22050, 44100, 48000]),
    st.sampled_from([0, -16000, 1, 999, 16000.0, 16000.5, float("nan"), "16000", True, None, 10**9]),
)


def _values(dtype):
    if np.dtype(dtype).kind == "f":
        return st.floats(allow_nan=True, allow_infinity=True, width=np.dtype(dtype).itemsize * 8)
    return None  # hypothesis' own full range


@st.composite
def sample_arrays(draw):
    dtype = draw(st.sampled_from(AUDIO_DTYPES))
    if draw(st.booleans()):
        shape = (draw(st.integers(0, 4000)),)
    else:
        channels, samples = draw(st.integers(0, 3)), draw(st.integers(0, 2000))
        shape = (channels, samples) if draw(st.booleans()) else (samples, channels)
    if draw(st.integers(0, 9)) == 0:
        shape = shape + (2,)  # 3-D: refused
    kind = draw(st.sampled_from(["sine", "random", "constant"]))
    if kind == "random" or np.dtype(dtype).kind in "bc":  # drawn element by element: kept short
        shape = tuple(min(n, 8) for n in shape[:-1]) + (min(shape[-1], 64),) if shape else shape
        return draw(hnp.arrays(dtype, shape, elements=_values(dtype)))
    base = np.broadcast_to(sine(max(shape[-1], 1) / 16000)[: shape[-1]], shape)
    scale = draw(st.sampled_from([1.0, 1e-6, 9.0, 11.0, 1e30])) if np.dtype(dtype).kind == "f" else float(np.iinfo(dtype).max)
    with np.errstate(over="ignore", invalid="ignore"):  # 1e30 as float16 is inf: one more non-finite input
        return (base * scale if kind == "sine" else np.full(shape, scale)).astype(dtype)


@st.composite
def audio_values(draw):
    """Audio as a user might give it: (array, rate), a datasets dict, a tensor, bytes, garbage."""
    form = draw(st.sampled_from(["tuple", "dict", "tensor", "bytes", "garbage"]))
    if form == "bytes":
        return draw(st.binary(max_size=200)), None
    if form == "garbage":
        return draw(st.sampled_from([None, 3, "x.wav", {"foo": 1}, (1, 2, 3), [0.1, 0.2], object()])), 16000
    samples, rate = draw(sample_arrays()), draw(RATES)
    if form == "tuple":
        return (samples, rate), None
    if form == "dict":
        return {"array": samples, "sampling_rate": rate}, None
    if samples.dtype.kind in "c" or samples.dtype == np.uint16:
        return (samples, rate), None
    return torch.from_numpy(np.ascontiguousarray(samples)), rate


@st.composite
def image_values(draw):
    """Images as a user might give them: arrays of any dtype/layout/range, tensors, PIL images of any mode."""
    from PIL import Image

    form = draw(st.sampled_from(["array", "array", "tensor", "pil", "elongated", "garbage"]))
    if form == "pil":
        mode = draw(st.sampled_from(["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "HSV", "LAB",
                                     "I", "I;16", "F"]))
        size = (draw(st.integers(0, 40)), draw(st.integers(0, 40)))
        return Image.new(mode, size)
    if form == "elongated":
        long = draw(st.integers(1000, 100_000))
        return np.zeros((1, long, 3) if draw(st.booleans()) else (long, 1), np.uint8)
    if form == "garbage":
        return draw(st.sampled_from([None, 7, b"\x89PNG broken", {"path": None, "bytes": None}, "no/such.png"]))
    dtype = draw(st.sampled_from(IMAGE_DTYPES))
    height, width = draw(st.integers(0, 24)), draw(st.integers(0, 24))
    layout = draw(st.sampled_from(["hw", "hwc", "chw", "4d"]))
    channels = draw(st.integers(0, 5))
    shape = {"hw": (height, width), "hwc": (height, width, channels), "chw": (channels, height, width),
             "4d": (1, height, width, 3)}[layout]
    if draw(st.booleans()) and np.dtype(dtype).kind == "f":
        array = draw(hnp.arrays(dtype, shape, elements=st.floats(0, 1, width=np.dtype(dtype).itemsize * 8)))
    else:
        array = draw(hnp.arrays(dtype, shape, elements=_values(dtype)))
    return torch.from_numpy(array) if form == "tensor" and array.dtype != np.uint16 else array


TEXTS = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(exclude_categories=()), max_size=10),  # lone surrogates included
    st.sampled_from(["", "   ", "\ud800", "hello \udfff", "x" * 3000]),
    st.sampled_from([None, 42, b"bytes", ["a list"]]),
)


# ----- the processor ---------------------------------------------------------------------------------------------------
@FUZZ
@given(value=audio_values(), output=st.sampled_from(["text", "speech", "asr"]))
def test_processor_audio(processor, value, output):
    audio, rate = value
    batch, error = outcome(lambda: processor(audio=audio, sampling_rate=rate, output=output))
    if error is None:
        check_prompts(batch, processor)
        assert batch["input_features"].shape[0] == 1


@FUZZ
@given(image=image_values(), text=st.none() | st.just("What is it?"))
def test_processor_images(processor, image, text):
    batch, error = outcome(lambda: processor(images=image, text=text, output="text"))
    if error is None:
        check_prompts(batch, processor)
        assert ("pixel_values" in batch) == (image is not None)


@FUZZ
@given(text=TEXTS, output=st.sampled_from(["text", "speech", "asr", "song", None]), batch_parallel=st.booleans())
def test_processor_text(processor, text, output, batch_parallel):
    batch, error = outcome(lambda: processor(text=text, output=output, batch_parallel=batch_parallel))
    if error is None:
        check_prompts(batch, processor)


@FUZZ
@given(
    requests=st.lists(
        st.tuples(st.none() | st.just("Hello world"), st.none() | st.just((sine(0.1), 16000)),
                  st.none() | st.just(np.full((8, 8, 3), 0.5))),
        min_size=0, max_size=4,
    ),
    output=st.sampled_from(["text", "speech"]),
)
def test_processor_batches(processor, requests, output):
    texts, audios, images = ([r[k] for r in requests] for k in range(3))
    batch, error = outcome(lambda: processor(text=texts, audio=audios, images=images, output=output))
    if error is None:
        check_prompts(batch, processor)
        assert batch["request_index"].tolist() == list(range(len(requests)))


# ----- the collator ----------------------------------------------------------------------------------------------------
CODES = st.one_of(
    hnp.arrays(st.sampled_from([np.int64, np.int32, np.float64, np.float32]),
               st.tuples(st.integers(0, 6), st.sampled_from([7, 7, 7, 6])),
               elements=st.integers(-2, 70)),
    hnp.arrays(np.bool_, st.tuples(st.integers(1, 3), st.just(7))),
    hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.just(7)), elements=st.floats(-1, 70) | st.just(np.nan)),
    st.sampled_from([None, [], [[1, 2]], [[0] * 7, [0] * 6], "codes"]),
)


def _mostly(draw, good, strategy):
    """``good`` three times in four, else a draw from ``strategy`` (to reach both sane results and refusals)."""
    return good if draw(st.integers(0, 3)) else draw(strategy)


@st.composite
def examples(draw):
    """A training example for a task, each field well formed three times in four, sometimes with a stray field."""
    from mini_omni2.token_layout import TASKS

    task = draw(st.sampled_from(["T1A2", "T1T2", "A1T2", "A1T1", "A1A2", "VT2", "VA1T2", "VT1A2"]))
    inputs, output = TASKS[task]
    example = {"task": _mostly(draw, task, st.sampled_from([None, "XX", "A1T2"]))}
    if "text" in inputs:
        example["text"] = _mostly(draw, "hello world", TEXTS)
    if "audio" in inputs:
        example["audio"] = _mostly(draw, {"array": sine(0.1), "sampling_rate": 16000}, audio_values().map(lambda v: v[0]))
    if "image" in inputs:
        example["image"] = _mostly(draw, np.full((16, 16, 3), 0.25), image_values())
    example["answer_text"] = _mostly(draw, "my name", st.sampled_from(["", None, "blue dog", 5]))
    if output == "speech":
        frames = np.random.default_rng(draw(st.integers(0, 99))).integers(0, 64, size=(draw(st.integers(1, 4)), 7))
        example["answer_codes"] = _mostly(draw, frames, CODES)
    if draw(st.integers(0, 4)) == 0:  # a stray field
        field = draw(st.sampled_from(["text", "audio", "image", "answer_codes", "prompt_text_ids", "output"]))
        example[field] = draw(st.sampled_from({
            "text": ["stray text"], "audio": [(sine(0.1), 16000)], "image": [np.zeros((4, 4), np.uint8)],
            "answer_codes": [np.zeros((2, 7), np.int64)], "prompt_text_ids": [[1, 2], [-3], [600]],
            "output": ["text", "song"],
        }[field]))
    return example


@FUZZ
@given(batch=st.lists(examples(), min_size=1, max_size=3), twins=st.booleans(), side=st.sampled_from(["left", "right"]))
def test_collator(processor, batch, twins, side):
    collator = MiniOmni2DataCollator(processor, batch_parallel_twins=twins, padding_side=side)
    result, error = outcome(lambda: collator(batch))
    if error is None:
        check_training_batch(result, processor)


# ----- hand-picked cases -----------------------------------------------------------------------------------------------
def _png_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


HAND_PICKED = [
    # (name, processor kwargs, expected: None for a sane result, else (exception type, message regex))
    ("int16 audio", dict(audio=((sine(0.3) * 32767).astype(np.int16), 16000)), None),
    ("int32 audio", dict(audio=((sine(0.3) * 2**31).astype(np.int32), 16000)), None),
    ("uint8 audio", dict(audio=((sine(0.3) * 127 + 128).astype(np.uint8), 16000)), None),
    ("float64 audio", dict(audio=(sine(0.3).astype(np.float64), 44100)), None),
    ("stereo (samples, 2)", dict(audio=(np.stack([sine(0.3)] * 2, 1), 16000)), None),
    ("one sample", dict(audio=(np.array([0.1], np.float32), 16000)), None),
    ("silence", dict(audio=(np.zeros(1600, np.float32), 16000)), None),
    ("rate 0", dict(audio=(sine(0.3), 0)), (ValueError, "positive whole number")),
    ("rate 16000.5", dict(audio=(sine(0.3), 16000.5)), (ValueError, "positive whole number")),
    ("rate as text", dict(audio=(sine(0.3), "16k")), (TypeError, "whole number of Hz")),
    ("huge amplitude", dict(audio=(sine(0.3) * 1e20, 16000)), (ValueError, "peak")),
    ("NaN sample", dict(audio=(np.array([0.0, np.nan]), 16000)), (ValueError, "NaN")),
    ("empty audio", dict(audio=(np.zeros(0), 16000)), (ValueError, "empty")),
    ("bool audio", dict(audio=(np.ones(100, bool), 16000)), (TypeError, "bool")),
    ("complex audio", dict(audio=(np.ones(100, complex), 16000)), (TypeError, "real numbers")),
    ("int64 audio", dict(audio=(np.ones(100, np.int64), 16000)), (TypeError, "int64")),
    ("audio bytes", dict(audio=b"RIFF\x00\x00"), (ValueError, "cannot decode")),
    ("float image [0, 1]", dict(images=np.random.default_rng(0).random((64, 64, 3))), None),
    ("float image [0, 255]", dict(images=np.full((64, 64, 3), 200.0)), None),
    ("CHW tensor", dict(images=torch.rand(3, 32, 48)), None),
    ("grey 2-D", dict(images=np.zeros((20, 30), np.uint8)), None),
    ("uint16 image", dict(images=np.full((20, 30, 3), 65535, np.uint16)), None),
    ("5000 x 1 image", dict(images=np.zeros((5000, 1, 3), np.uint8)), None),
    ("1 x 5000 image", dict(images=np.zeros((1, 5000), np.uint8)), None),
    ("PNG bytes", dict(images=_png_bytes()), None),
    ("0 x 0 image", dict(images=np.zeros((0, 0, 3), np.uint8)), (ValueError, "empty")),
    ("normalised pixels", dict(images=np.full((8, 8, 3), -1.5)), (ValueError, "\\[0, 1\\] or \\[0, 255\\]")),
    ("NaN image", dict(images=np.full((8, 8, 3), np.nan)), (ValueError, "NaN")),
    ("batch of images as 4-D", dict(images=np.zeros((2, 8, 8, 3))), (ValueError, "as a list")),
    ("lone surrogate", dict(text="hi \ud83d there"), (ValueError, "surrogate")),
    ("bytes as text", dict(text=b"hi"), (TypeError, "got bytes")),
    ("no input", dict(), (ValueError, "at least one")),
    ("unknown output", dict(text="hi", output="song"), (ValueError, "Unknown output")),
]


@pytest.mark.parametrize("name, kwargs, expected", HAND_PICKED, ids=[case[0] for case in HAND_PICKED])
def test_hand_picked_processor_inputs(processor, name, kwargs, expected):
    kwargs = dict(kwargs)
    kwargs.setdefault("output", "text")
    result, error = outcome(lambda: processor(**kwargs))
    if expected is None:
        assert error is None, f"{name}: {error!r}"
        check_prompts(result, processor)
    else:
        assert error is not None, f"{name}: no error"
        assert isinstance(error, expected[0]), f"{name}: {error!r}"
        assert re.search(expected[1], str(error)), f"{name}: {error}"


def test_memory_stays_bounded_over_the_fuzz_inputs(processor):
    """Process-wide: the peak resident memory grows by little over a run of the largest hand-picked inputs."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for shape in ((5000, 1, 3), (1, 100_000, 3), (3, 200_000)):
        check_prompts(processor(images=np.zeros(shape, np.uint8), output="text"), processor)
    long = (np.zeros(16000 * 600, np.int16), 16000)  # 10 minutes: refused before it is converted or resampled
    _, error = outcome(lambda: processor(audio=long, output="text"))
    assert isinstance(error, ValueError) and "truncate_audio" in str(error)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 512 * 1024, f"peak RSS grew by {grown_kib / 1024:.0f} MiB"
