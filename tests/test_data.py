"""Training data: the example format, prepare_example, the datasets preprocessor (map and streaming map)."""

from __future__ import annotations

import pickle

import datasets
import numpy as np
import pytest
import torch

from mini_omni2.training.data import (
    PROCESSED_FIELDS,
    MiniOmni2Preprocessor,
    encode_answer_audio,
    prepare_example,
    resolve_task,
    synthetic_examples,
)
from mini_omni2.token_layout import TASKS
from mini_omni2.training import MiniOmni2DataCollator

from conftest import color_image, sine



def codes(frames: int, seed: int, codebook: int = 64) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, codebook, size=(frames, 7)).tolist()


def uniform(examples: list[dict]) -> list[dict]:
    """Give every example every key (None where absent), as Dataset.from_list needs."""
    keys = sorted({k for e in examples for k in e})
    return [{k: e.get(k) for k in keys} for e in examples]


def mixed_examples(vision: bool = True) -> list[dict]:
    examples = [
        {"task": "T1A2", "text": "hello world", "answer_text": "my name", "answer_codes": codes(3, 0)},
        {"task": "A1T2", "audio": {"array": sine(0.3, freq=300.0), "sampling_rate": 16000}, "answer_text": "fine"},
        {"output": "asr", "audio": {"array": sine(0.5, 8000, freq=500.0), "sampling_rate": 8000}, "answer_text": "one two"},
        {"task": "T1T2", "text": "the quick fox", "answer_text": "blue dog"},
        {"task": "A1A2", "audio": {"array": sine(0.2, freq=900.0), "sampling_rate": 16000}, "answer_text": "red",
         "answer_codes": codes(2, 1)},
    ]
    if vision:
        examples.append(
            {"task": "VA1T2", "image": color_image((0, 128, 255)), "audio": {"array": sine(0.25), "sampling_rate": 16000},
             "answer_text": "a blue image"}
        )
    return uniform(examples)


def assert_batches_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


# ----- prepare_example -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["dict", "tuple", "array+rate", "path", "stereo-44k", "bytes"])
def test_audio_inputs_give_the_processors_features(processor, tmp_path, form):
    import soundfile

    wave = sine(0.4, freq=440.0)
    reference = (wave, 16000)  # what the processor is given for the same audio
    if form == "dict":
        audio, rate = {"array": wave, "sampling_rate": 16000}, None
    elif form == "tuple":
        audio, rate = (wave, 16000), None
    elif form == "array+rate":
        audio, rate = wave, 16000
    elif form == "path":
        soundfile.write(tmp_path / "a.wav", wave, 16000)
        audio, rate = str(tmp_path / "a.wav"), None
        reference = audio
    elif form == "bytes":
        soundfile.write(tmp_path / "a.wav", wave, 16000)
        audio, rate = {"bytes": (tmp_path / "a.wav").read_bytes(), "path": None}, None
        reference = str(tmp_path / "a.wav")
    else:
        wave = sine(0.4, 44100, freq=440.0, channels=2)
        audio, rate = {"array": wave.T, "sampling_rate": 44100}, None
        reference = (wave, 44100)
    example = {"task": "A1T2", "audio": audio, "sampling_rate": rate, "answer_text": "fine"}
    prepared = prepare_example(example, processor)
    expected = processor(audio=reference, output="text")
    assert prepared["task"] == "A1T2"
    assert prepared["audio_num_frames"] == int(expected["audio_lengths"][0])
    np.testing.assert_allclose(prepared["input_features"], expected["input_features"][0].numpy(), atol=1e-6)
    assert prepared["answer_text_ids"].tolist() == processor.tokenizer.encode("fine", add_special_tokens=False)
    assert prepared["answer_codes"].shape == (0, 7)


def test_prepare_example_fields_and_types(processor):
    prepared = prepare_example({"task": "T1A2", "text": "hello world", "answer_text": "my name",
                                "answer_codes": codes(3, 0)}, processor)
    assert set(prepared) == set(PROCESSED_FIELDS)
    assert prepared["prompt_text_ids"].tolist() == processor.tokenizer.encode("hello world", add_special_tokens=False)
    assert prepared["answer_codes"].dtype == np.int64 and prepared["answer_codes"].shape == (3, 7)
    assert prepared["input_features"].size == 0 and prepared["audio_num_frames"] == 0
    assert prepared["pixel_values"].size == 0

    image = prepare_example({"task": "VT1T2", "text": "what is it", "image": color_image(), "answer_text": "red"}, processor)
    expected = processor(text="what is it", images=color_image(), output="text")["pixel_values"][0].numpy()
    np.testing.assert_allclose(image["pixel_values"], expected)
    kept = prepare_example({"task": "VT1T2", "text": "what", "image": color_image(), "answer_text": "red"}, processor,
                           images="keep")
    assert kept["pixel_values"].size == 0 and kept["image"] is not None


def test_prepare_example_is_idempotent(processor):
    for example in mixed_examples():
        for audio in ("features", "waveform"):
            once = prepare_example(example, processor, audio=audio)
            twice = prepare_example(once, processor, audio=audio)
            for key in PROCESSED_FIELDS:
                if isinstance(once[key], np.ndarray):
                    np.testing.assert_array_equal(once[key], twice[key], err_msg=key)
                else:
                    assert once[key] == twice[key], key


def test_task_resolution():
    assert resolve_task({"text": "hi", "output": "text"}) == "T1T2"
    assert resolve_task({"text": "hi"}) == "T1A2"  # speech is the default output
    assert resolve_task({"audio": "x.wav", "output": "asr"}) == "A1T1"
    assert resolve_task({"audio": "x.wav", "image": "y.png", "output": "speech"}) == "VA1A2"
    assert resolve_task({"input_features": [[0.0]], "output": "text"}) == "A1T2"
    assert resolve_task({"task": "VT2", "text": "ignored for the name"}) == "VT2"


@pytest.mark.parametrize(
    "example, message",
    [
        ({"task": "T1A2", "text": "hi", "answer_text": "yo"}, "answer_codes"),
        ({"task": "T1T2", "text": "hi"}, "answer_text"),
        ({"task": "T1T2", "text": "hi", "answer_text": "yo", "answer_codes": [[0] * 7]}, "text answer"),
        ({"task": "A1T2", "text": "hi", "audio": (np.zeros(800, np.float32), 16000), "answer_text": "yo"}, "no text"),
        ({"task": "A1T2", "input_features": np.zeros((80, 3000), np.float32), "answer_text": "yo"}, "audio_num_frames"),
        ({"task": "A1T2", "audio": np.zeros(800, np.float32), "answer_text": "yo"}, "sampling_rate"),
        ({"task": "T1A2", "text": "hi", "answer_text": "yo", "answer_codes": [[0] * 6]}, "shape"),
        ({"task": "T1A2", "text": "hi", "answer_text": "yo", "answer_codes": [[64] * 7]}, "codec codes"),
        ({"task": "T1A2", "text": "hi", "answer_text": "yo", "answer_audio": np.zeros(4096, np.float32)}, "codec"),
        ({"task": "XYZ", "text": "hi", "answer_text": "yo"}, "Unknown task"),
        ({"output": "text", "answer_text": "yo"}, "No layout"),
        ({"task": "A1T2", "audio": (np.zeros(16000 * 31, np.float32), 16000), "answer_text": "yo"}, "truncate_audio"),
    ],
)
def test_bad_examples_are_refused(processor, example, message):
    with pytest.raises(ValueError, match=message):
        prepare_example(example, processor)


def test_long_audio_is_truncated_on_request(processor):
    example = {"task": "A1T2", "audio": (np.zeros(16000 * 31, np.float32), 16000), "answer_text": "yo"}
    prepared = prepare_example(example, processor, truncate_audio=True)
    assert prepared["audio_num_frames"] == processor.max_audio_frames


def test_answer_audio_is_encoded_with_the_codec(processor, model):
    rng = np.random.default_rng(0)
    wave24 = (0.1 * rng.standard_normal(3 * 2048)).astype(np.float32)
    expected = model.codec.encode(torch.from_numpy(wave24)[None])[0].numpy()
    example = {"task": "T1A2", "text": "hi", "answer_text": "yo", "answer_audio": wave24}
    prepared = prepare_example(example, processor, codec=model)
    np.testing.assert_array_equal(prepared["answer_codes"], expected)
    assert prepared["answer_codes"].shape == (3, 7)
    # the codec alone works too, and a waveform at another rate is resampled to 24 kHz first
    np.testing.assert_array_equal(encode_answer_audio(model.codec, wave24), expected)
    wave48 = np.repeat(wave24, 2)
    resampled = prepare_example({**example, "answer_audio": {"array": wave48, "sampling_rate": 48000}}, processor,
                                codec=model.codec)
    assert resampled["answer_codes"].shape == (3, 7)


# ----- datasets --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("audio, images", [("features", "pixels"), ("waveform", "keep")])
def test_dataset_map_gives_the_same_batch_as_raw_examples(processor, audio, images):
    examples = mixed_examples()
    collator = MiniOmni2DataCollator(processor, batch_parallel_twins=True)
    expected = collator(examples)

    raw = datasets.Dataset.from_list(examples)
    prep = MiniOmni2Preprocessor(processor, audio=audio, images=images)
    mapped = raw.map(prep, batched=True, batch_size=2, remove_columns=prep.removable_columns(raw.column_names))
    assert ("image" in mapped.column_names) == (images == "keep")
    assert all(c in mapped.column_names for c in PROCESSED_FIELDS)
    assert_batches_equal(collator([mapped[i] for i in range(len(mapped))]), expected)
    # numpy-formatted rows work too
    as_numpy = mapped.with_format("numpy")
    assert_batches_equal(collator([as_numpy[i] for i in range(len(as_numpy))]), expected)


def test_streaming_dataset_map(processor, model):
    examples = mixed_examples()
    examples[0]["answer_codes"] = None
    examples[0]["answer_audio"] = {"array": np.zeros(2 * 2048, np.float32), "sampling_rate": 24000}
    examples = uniform(examples)
    prep = MiniOmni2Preprocessor(processor, codec=model, audio="waveform")
    collator = MiniOmni2DataCollator(processor, codec=model)
    expected = collator(examples)

    def generate():
        yield from examples

    stream = datasets.IterableDataset.from_generator(generate)
    mapped = stream.map(prep, batched=True, batch_size=2, remove_columns=list(examples[0]), features=prep.features())
    rows = list(mapped)
    assert len(rows) == len(examples) and set(rows[0]) == set(PROCESSED_FIELDS)
    assert_batches_equal(collator(rows), expected)
    # and a map-style dataset turned into a stream
    stream2 = datasets.Dataset.from_list(examples).to_iterable_dataset(num_shards=2)
    rows2 = list(stream2.map(prep, batched=True, batch_size=3, remove_columns=list(examples[0])))
    assert_batches_equal(collator(rows2), expected)


def test_preprocessor_pickles_with_its_codec(processor, model):
    """datasets pickles the map function (fingerprints, num_proc > 1): the codec goes as config + state dict."""
    from datasets.fingerprint import Hasher

    prep = MiniOmni2Preprocessor(processor, codec=model)
    clone = pickle.loads(pickle.dumps(prep))
    wave = torch.randn(1, 2 * 2048)
    assert torch.equal(clone.codec.encode(wave), model.codec.encode(wave))
    assert Hasher.hash(prep) == Hasher.hash(MiniOmni2Preprocessor(processor, codec=model))
    assert Hasher.hash(prep) != Hasher.hash(MiniOmni2Preprocessor(processor, codec=model, audio="waveform"))


def test_synthetic_examples_cover_every_task(processor):
    tasks = [t for t in TASKS if t != "ASR"]
    examples = synthetic_examples(processor, len(tasks), tasks=tasks, seed=3)
    assert [e["task"] for e in examples] == tasks
    assert len({tuple(sorted(e)) for e in examples}) == 1  # uniform keys, for Dataset.from_list
    batch = MiniOmni2DataCollator(processor, batch_parallel_twins=True)(examples)
    speech = sum(TASKS[t][1] == "speech" for t in tasks)
    assert batch["input_ids"].shape[0] == len(tasks) + speech
    ds = datasets.Dataset.from_list(examples)
    assert sorted(ds.unique("task")) == sorted(tasks)
