"""generate's arguments: every transformers GenerationConfig field is applied to the text stream through
transformers' own logits processors and stopping criteria, or refused with its reason; none is ignored."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor
from transformers.generation.logits_process import (
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

STEPS = 12


def text_request(processor):
    return processor(text="what is your name? tell me a story", output="text")


def greedy(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, decode_audio=False, **kwargs)


class Favour(LogitsProcessor):
    """Makes one text id the best at every step (to see what penalties and stops do to it)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] = scores.max() + 5.0
        return scores


@pytest.mark.parametrize(
    "field, value, processor_class, arguments",
    [
        ("repetition_penalty", 1.8, RepetitionPenaltyLogitsProcessor, dict(penalty=1.8)),
        ("bad_words_ids", [[253], [127, 361]], NoBadWordsLogitsProcessor, dict(bad_words_ids=[[253], [127, 361]],
                                                                                eos_token_id=None)),
        ("sequence_bias", {(40,): 9.0}, SequenceBiasLogitsProcessor, dict(sequence_bias={(40,): 9.0})),
    ],
)
def test_config_fields_apply_transformers_processors_to_the_text(model, processor, field, value, processor_class,
                                                                 arguments):
    inputs = text_request(processor)
    plain = greedy(model, inputs)
    via_config = greedy(model, inputs, generation_config=GenerationConfig(**{field: value}))
    via_kwarg = greedy(model, inputs, **{field: value})
    by_hand = greedy(model, inputs, logits_processor=[processor_class(**arguments)])
    assert torch.equal(via_config.sequences, by_hand.sequences)
    assert torch.equal(via_kwarg.sequences, by_hand.sequences)
    assert not torch.equal(plain.sequences, by_hand.sequences)  # the field changed the answer: it was not ignored


def test_repetition_penalty_in_the_models_generation_config(model, processor):
    inputs = text_request(processor)
    model.generation_config.repetition_penalty = 1.8
    try:
        penalised = greedy(model, inputs)
    finally:
        model.generation_config.repetition_penalty = None
    assert torch.equal(penalised.sequences,
                       greedy(model, inputs, logits_processor=[RepetitionPenaltyLogitsProcessor(1.8)]).sequences)


def test_no_repeat_ngram_size_and_suppress_tokens(model, processor):
    inputs = text_request(processor)
    plain = greedy(model, inputs).text_ids[0].tolist()
    repeated = max(set(plain), key=plain.count)
    assert plain.count(repeated) > 1 and plain[0] == repeated  # the random tiny model repeats itself
    once = greedy(model, inputs, no_repeat_ngram_size=1).text_ids[0].tolist()
    assert len(set(once)) == len(once)
    assert repeated not in greedy(model, inputs, suppress_tokens=[repeated]).text_ids[0].tolist()
    first = greedy(model, inputs, begin_suppress_tokens=[repeated]).text_ids[0].tolist()
    assert first[0] != repeated and repeated in first[1:]


def test_eos_token_id_ends_the_text_like_eot(model, processor):
    inputs = text_request(processor)
    layout = model.layout
    stop = 99
    out = greedy(model, inputs, logits_processor=[Favour(stop)], eos_token_id=stop)
    assert out.finish_reasons == ["eot"] and out.generated_lengths.tolist() == [0]
    speech = greedy(model, processor(text="hello", output="speech"), logits_processor=[Favour(stop)],
                    eos_token_id=[stop], min_new_tokens=STEPS)
    prompt_len = processor(text="hello", output="speech")["input_ids"].shape[-1]
    fed_text = speech.sequences[0, layout.text_stream, prompt_len:].tolist()
    assert fed_text[0] == layout.eot and set(fed_text[1:]) == {layout.pad_t}  # eot fed in its place, then pad_t
    with pytest.raises(ValueError, match="eos_token_id"):
        greedy(model, inputs, eos_token_id=10**6)


def test_stop_strings_need_the_tokenizer(model, processor):
    inputs = text_request(processor)
    plain = greedy(model, inputs)
    text = processor.decode(plain.text_ids[0])
    assert len(text) > 4
    stop = text[2:4]
    out = greedy(model, inputs, stop_strings=[stop], tokenizer=processor.tokenizer)
    assert out.finish_reasons == ["stopping_criteria"]
    assert processor.decode(out.text_ids[0]).endswith(stop) or stop in processor.decode(out.text_ids[0])
    assert len(out.text_ids[0]) < len(plain.text_ids[0])
    with pytest.raises(ValueError, match="tokenizer"):
        greedy(model, inputs, stop_strings=[stop])


def test_lengths_and_time(model, processor):
    inputs = text_request(processor)
    prompt_len = inputs["input_ids"].shape[-1]
    eot = model.layout.eot
    ends_at_once = dict(sequence_bias={(eot,): 100.0})
    assert greedy(model, inputs, **ends_at_once).generated_lengths.tolist() == [0]
    out = greedy(model, inputs, min_length=prompt_len + 3, **ends_at_once)
    assert out.generated_lengths.tolist() == [3]  # eot banned for the first 3 steps
    timed = model.generate(**inputs, max_new_tokens=10**6, max_time=0.0, do_sample=False)
    assert timed.finish_reasons == ["stopping_criteria"] and timed.generated_lengths.tolist() == [1]


def test_min_p_draws_only_from_likely_tokens(model, processor):
    inputs = text_request(processor)
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=True, top_k=0, temperature=1.0, min_p=1.0,
                         decode_audio=False)
    assert torch.equal(out.sequences, greedy(model, inputs).sequences)  # min_p 1.0 keeps only the best id
    with pytest.raises(ValueError, match="min_p"):
        greedy(model, inputs, min_p=2.0)


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("num_beams", 3, "beam search"),
        ("num_return_sequences", 2, "one answer per request"),
        ("output_scores", True, "logits_processor"),
        ("output_logits", True, "logits_processor"),
        ("output_attentions", True, "forward"),
        ("return_dict_in_generate", False, "MiniOmni2GenerateOutput"),
        ("use_cache", False, "cache"),
        ("typical_p", 0.5, "no meaning"),
        ("penalty_alpha", 0.6, "no meaning"),
        ("guidance_scale", 2.0, "no meaning"),
        ("forced_eos_token_id", 5, "no meaning"),
    ],
)
def test_fields_that_cannot_apply_are_refused_with_the_reason(model, processor, field, value, reason):
    inputs = text_request(processor)
    with pytest.raises(ValueError, match=f"{field}={value!r}.*{reason}"):
        greedy(model, inputs, **{field: value})
    with pytest.raises(ValueError, match=field):
        greedy(model, inputs, generation_config=GenerationConfig(**{field: value}))


def test_neutral_values_of_older_configs_are_accepted(model, processor):
    inputs = text_request(processor)
    legacy = GenerationConfig(num_beams=1, num_return_sequences=1, output_scores=False, repetition_penalty=1.0,
                              typical_p=1.0, length_penalty=1.0, use_cache=True, pad_token_id=0, bos_token_id=1)
    assert torch.equal(greedy(model, inputs, generation_config=legacy).sequences, greedy(model, inputs).sequences)
    assert greedy(model, inputs, return_dict_in_generate=True).sequences is not None
    with pytest.raises(TypeError, match="unexpected"):
        greedy(model, inputs, not_a_field=1)


def test_left_padding_without_its_mask_is_refused(model, processor):
    batch = processor(text=["hi", "what is your name? tell me a story"], output="text")
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(input_ids=batch["input_ids"], max_new_tokens=2)
    single = processor(text="hi", output="text")  # no padding: the mask may be left out
    assert model.generate(input_ids=single["input_ids"], max_new_tokens=2).sequences.shape[0] == 1
