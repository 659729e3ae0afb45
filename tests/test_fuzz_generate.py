"""Fuzzing ``generate`` (issue 12): prompts as the processor builds them, then corrupted (ids out of their streams,
masks that lie, wrong shapes and dtypes), and generation arguments drawn from their whole range.

For every call: either an answer that passes the sanity checks (shapes, lengths within bounds, text ids in the
tokenizer's range, codec codes in the codebook, finite waveforms) or a ValueError/TypeError raised by this package
with a message; never another exception type, never a NaN, never more than a bounded amount of memory (the same
invariants as tests/test_fuzz.py, whose ``outcome`` runs each call).
"""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import sine
from test_fuzz import FUZZ, outcome

MAX_STEPS = 12

REQUESTS = [
    dict(text="hello world", output="speech"),
    dict(text="what is your name?", output="text"),
    dict(audio=(sine(0.2), 16000), output="asr"),
    dict(audio=(sine(0.3, freq=330.0), 16000), output="speech"),
]

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, -1.0, 0.5, 1.0]))
ARGUMENTS = {
    "max_new_tokens": st.one_of(st.integers(-2, MAX_STEPS), st.just(10**9)),
    "min_new_tokens": st.integers(-2, 4),
    "do_sample": st.booleans(),
    "temperature": floats,
    "top_k": st.integers(-2, 5),
    "top_p": floats,
    "min_p": floats,
    "repetition_penalty": floats,
    "no_repeat_ngram_size": st.integers(-1, 3),
    "eos_token_id": st.one_of(st.integers(-5, 1000), st.lists(st.integers(0, 600), max_size=3)),
    "suppress_tokens": st.lists(st.integers(-3, 600), max_size=3),
    "num_beams": st.integers(0, 3),
    "audio_temperature": floats,
    "cache_implementation": st.sampled_from(["dynamic", "static", "paged"]),
    "slice_head": st.booleans(),
    "share_twin_prefill": st.booleans(),
    "batch_parallel": st.booleans(),
}


@st.composite
def corrupted_prompts(draw, processor):
    """The processor's inputs for 1-2 requests, then at most a few corruptions."""
    picked = draw(st.lists(st.sampled_from(range(len(REQUESTS))), min_size=1, max_size=2))
    requests = [REQUESTS[k] for k in picked]
    columns = {name: [r.get(name) for r in requests] for name in ("text", "audio", "output")}
    inputs = dict(processor(**columns))
    inputs.pop("request_index")
    for corruption in draw(st.lists(st.sampled_from(
            ["id", "mask_zero", "mask_right", "no_mask", "float_ids", "drop_features", "flat_ids", "features_nan"]),
            max_size=2)):
        ids = inputs["input_ids"]
        if corruption == "id" and (ids.ndim != 3 or ids.is_floating_point()):
            continue
        if corruption == "id":
            row, stream, pos = (draw(st.integers(0, d - 1)) for d in ids.shape)
            ids = ids.clone()
            ids[row, stream, pos] = draw(st.integers(-10, 200_000))
            inputs["input_ids"] = ids
        elif corruption in ("mask_zero", "mask_right") and "attention_mask" not in inputs:
            continue
        elif corruption == "mask_zero":
            inputs["attention_mask"] = torch.zeros_like(inputs["attention_mask"])
        elif corruption == "mask_right":
            inputs["attention_mask"] = inputs["attention_mask"].flip(-1)
        elif corruption == "no_mask":
            inputs.pop("attention_mask", None)
        elif corruption == "float_ids":
            inputs["input_ids"] = ids.float()
        elif corruption == "flat_ids":
            inputs["input_ids"] = ids[:, 0]
        elif corruption == "drop_features" and "input_features" in inputs:
            inputs.pop("input_features")
        elif corruption == "features_nan" and "input_features" in inputs:
            features = inputs["input_features"].clone()
            features[0, 0, 0] = float("nan")
            inputs["input_features"] = features
    return inputs


def check_answer(model, inputs, kwargs, out) -> None:
    layout = model.layout
    n = inputs["input_ids"].shape[0]
    assert out.sequences.shape[:2] == (n, layout.num_streams)
    steps = out.sequences.shape[-1] - inputs["input_ids"].shape[-1]
    limit = kwargs.get("max_new_tokens", MAX_STEPS)
    assert 0 < steps <= limit and all(0 <= int(g) <= steps for g in out.generated_lengths)
    for r in range(n):
        text = out.text_ids[r]
        assert bool(((text >= 0) & (text < layout.tokenizer_vocab_size)).all())
        if out.audio_frames[r] is not None:
            assert bool(layout.is_code(out.audio_frames[r]).all())
        if out.waveforms[r] is not None:
            assert bool(torch.isfinite(out.waveforms[r]).all())


@FUZZ
@given(data=st.data())
def test_generate_answers_sanely_or_refuses_clearly(model, processor, data):
    inputs = data.draw(corrupted_prompts(processor))
    names = data.draw(st.lists(st.sampled_from(sorted(ARGUMENTS)), max_size=4, unique=True))
    kwargs = {name: data.draw(ARGUMENTS[name]) for name in names}
    kwargs.setdefault("max_new_tokens", MAX_STEPS)
    if kwargs["max_new_tokens"] == 10**9:
        kwargs.setdefault("min_new_tokens", 0)
        kwargs["max_time"] = 0.5  # a huge budget must not allocate up front; the time bound ends the call
    out, error = outcome(lambda: model.generate(**inputs, codec_noise=False, **kwargs))
    if error is None:
        check_answer(model, inputs, kwargs, out)


def test_hand_picked_generate_cases(model, processor):
    inputs = dict(processor(text="hello world", output="speech"))
    inputs.pop("request_index")
    cases = [
        (dict(temperature=float("nan"), do_sample=True, top_k=0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
        (dict(suppress_tokens=[10**6]), "suppressed token ids"),
        (dict(cache_implementation="paged"), "cache_implementation"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_beams=2), "num_beams"),
    ]
    for kwargs, match in cases:
        _, error = outcome(lambda: model.generate(**inputs, **kwargs))
        assert error is not None and match in str(error), (kwargs, error)
    bad = dict(inputs, input_ids=inputs["input_ids"].clone())
    bad["input_ids"][0, 0, 0] = 10**6
    _, error = outcome(lambda: model.generate(**bad, max_new_tokens=2))
    assert error is not None and "stream" in str(error)
    out, error = outcome(lambda: model.generate(**inputs, max_new_tokens=10**9, max_time=0.3))
    assert error is None and math.isfinite(float(out.generated_lengths[0]))
