"""Duplex interruption (extension, docs/duplex.md): the listening row's ids, layout and labels, its front end, the
model's listening adapter, the step-by-step listener, the synthetic data, and a small trained model that detects."""

import argparse
import math
import re
import types
from collections import Counter

import numpy as np
import pytest
import torch

from mini_omni2.duplex_mini_omni2 import MiniOmni2ListenFrontEnd, MiniOmni2Listener, codec_encoder_receptive_field
from mini_omni2.modeling_mini_omni2 import CACHE_NAME, IGNORE_INDEX
from mini_omni2.tiny import tiny_model
from mini_omni2.token_layout import LISTEN_TASK, TokenLayout
from mini_omni2.training import MiniOmni2DataCollator
from mini_omni2.training.collator import build_listen_training_row

R = TokenLayout()  # the released sizes
EOT, PAD_T, IN_T, ANS_T, ASR, IRQ, N_IRQ = 151936, 151937, 151938, 151939, 151940, 151941, 151942
PAD_A, IN_A = 4097, 4098


def audio_row(local_ids, layer):
    return [c + 152000 + 4160 * layer for c in local_ids]


# ----- ids and the listening row (docs/duplex.md, "Ids" and "The listening row") ----------------------------------
def test_irq_and_n_irq_take_the_next_text_specials_after_asr():
    assert (R.eot, R.pad_t, R.input_t, R.answer_t, R.asr) == (EOT, PAD_T, IN_T, ANS_T, ASR)
    assert (R.irq, R.n_irq) == (IRQ, N_IRQ) == (R.tokenizer_vocab_size + 5, R.tokenizer_vocab_size + 6)
    tiny = tiny_model(vision=False, codec=False).config.token_layout
    assert (tiny.irq, tiny.n_irq) == (448 + 5, 448 + 6)


def test_listening_row_with_codec_input_matches_the_doc_table():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [10, 20, 30, 40, 50, 60, 70]])
    row = R.build_listen_row(frames=codes)
    for i in range(7):
        assert row.streams[i] == audio_row([IN_A, codes[0, i].item(), codes[1, i].item()], i)
    assert row.streams[7] == [N_IRQ] * 3
    assert row.listen_positions == [] and row.audio_positions == [] and row.image_positions == []
    assert R.build_listen_prompt().streams == [audio_row([IN_A], i) for i in range(7)] + [[N_IRQ]]


def test_listening_row_with_feature_input_matches_the_doc_table():
    row = R.build_listen_row(num_frames=4)
    for i in range(7):
        assert row.streams[i] == audio_row([IN_A] + [PAD_A] * 4, i)
    assert row.streams[7] == [N_IRQ] * 5
    assert row.listen_positions == [1, 2, 3, 4]


def test_listen_step_feeds_a_frame_and_the_state():
    assert R.listen_step([5] * 7) == [5 + 152000 + 4160 * i for i in range(7)] + [N_IRQ]
    assert R.listen_step(None) == [PAD_A + 152000 + 4160 * i for i in range(7)] + [N_IRQ]
    assert R.listen_step(None, state=IRQ)[-1] == IRQ
    assert R.listen_step(torch.arange(7))[:7] == [c + 152000 + 4160 * c for c in range(7)]
    with pytest.raises(ValueError, match="irq"):
        R.listen_step(None, state=EOT)
    with pytest.raises(ValueError, match="codec codes"):
        R.listen_step([4096] * 7)  # a special, not a code
    with pytest.raises(ValueError, match="codec codes"):
        R.listen_step([1] * 6)
    with pytest.raises(ValueError, match="exactly one"):
        R.build_listen_row()


def test_the_state_is_read_from_the_two_state_logits_only():
    logits = torch.zeros(3, R.text_vocab_size)
    logits[:, 0] = 100.0  # any other text id is ignored
    logits[0, IRQ], logits[0, N_IRQ] = 2.0, 1.0
    logits[1, IRQ], logits[1, N_IRQ] = 1.0, 3.0
    logits[2, IRQ], logits[2, N_IRQ] = 0.0, float(np.log(3.0))  # P(irq) = 1/4
    assert R.read_listen_state(logits).tolist() == [IRQ, N_IRQ, N_IRQ]
    assert torch.allclose(R.listen_irq_probability(logits)[2], torch.tensor(0.25))
    assert R.listen_states == (N_IRQ, IRQ)
    assert torch.allclose(R.irq_probability(logits[:, list(R.listen_states)]), R.listen_irq_probability(logits))
    assert R.read_listen_state(logits, threshold=0.2).tolist() == [IRQ, N_IRQ, IRQ]
    with pytest.raises(ValueError, match="threshold"):
        R.read_listen_state(logits, threshold=1.0)


def test_listening_training_row_labels_the_states_only():
    labels = [0, 0, 1, 1]
    row = build_listen_training_row(R, labels)
    # prompt, 4 frames, 1 position that holds the last label
    assert len(row) == 6 and row.listen_positions == [1, 2, 3, 4]
    for i in range(7):
        assert row.input_ids[i] == audio_row([IN_A] + [PAD_A] * 5, i)
        assert row.labels[i] == [IGNORE_INDEX] * 6
    assert row.input_ids[7] == [N_IRQ] * 6
    # the state of frame k is read at position k + 1 and labelled (shifted) at k + 2
    assert row.labels[7] == [IGNORE_INDEX, IGNORE_INDEX, N_IRQ, N_IRQ, IRQ, IRQ]
    codes = np.arange(4 * 7).reshape(4, 7) % 64
    codec_row = build_listen_training_row(R, labels, codes=codes)
    assert codec_row.listen_positions == [] and codec_row.labels[7] == row.labels[7]
    assert codec_row.input_ids[3][1:5] == audio_row(codes[:, 3].tolist(), 3)
    with pytest.raises(ValueError, match="frame labels"):
        build_listen_training_row(R, [0, 1], codes=codes)
    with pytest.raises(ValueError, match="0 \\(n_irq\\) or 1"):
        build_listen_training_row(R, [0, 2])


# ----- the collator ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def features_model():
    return tiny_model(vision=False, codec=False, listen_input="features", seed=3)


@pytest.fixture(scope="module")
def gru_model():
    return tiny_model(vision=False, codec=False, listen_input="features", listen_adapter="gru", seed=5)


@pytest.fixture(scope="module")
def codec_model():
    return tiny_model(vision=False, codec=True, seed=4)


def test_collator_builds_listening_rows_beside_other_rows(features_model, processor_no_vision):
    from mini_omni2.training.data import synthetic_examples

    layout = features_model.config.token_layout
    dim = features_model.config.listen_feature_dim
    rng = np.random.default_rng(0)
    listen = [
        {"task": LISTEN_TASK, "listen_features": rng.standard_normal((n, dim)).astype(np.float32), "frame_labels": labels}
        for n, labels in ((3, [0, 0, 1]), (5, [0, 0, 0, 0, 0]))
    ]
    other = synthetic_examples(processor_no_vision, 1, tasks=("T1T2",))
    batch = MiniOmni2DataCollator(processor_no_vision)(listen + other)
    assert batch["listen_features"].shape == (3, batch["input_ids"].shape[2], dim)
    mask = batch["listen_feature_mask"]
    assert mask[0].nonzero().flatten().tolist() == [1, 2, 3]
    assert mask[1].nonzero().flatten().tolist() == [1, 2, 3, 4, 5] and not mask[2].any()
    assert torch.equal(batch["listen_features"][0, 1:4], torch.as_tensor(listen[0]["listen_features"]))
    assert batch["labels"][0, 7, :5].tolist() == [IGNORE_INDEX, IGNORE_INDEX, layout.n_irq, layout.n_irq, layout.irq]
    assert (batch["labels"][:2, :7] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].sum() == 5 and batch["attention_mask"][1].sum() == 7
    out = features_model(**batch)  # the model takes the mixed batch
    assert out.stream_losses[7] > 0 and torch.isfinite(out.loss)


def _mixed_listening_batch(model, processor):
    """Two listening rows and one text row (the stage-3 mix), collated."""
    from mini_omni2.training.data import synthetic_examples

    dim = model.config.listen_feature_dim
    rng = np.random.default_rng(1)
    listen = [
        {"task": LISTEN_TASK, "listen_features": rng.standard_normal((n, dim)).astype(np.float32), "frame_labels": labels}
        for n, labels in ((4, [0, 0, 1, 1]), (5, [0, 0, 0, 0, 0]))
    ]
    return MiniOmni2DataCollator(processor)(listen + synthetic_examples(processor, 1, tasks=("T1T2",)))


def test_distillation_replaces_each_state_label_by_the_teachers_probability(features_model, processor_no_vision):
    """Each state label's target becomes (1 - w) * the label + w * the teachers' P(irq); other labels are untouched.
    Cross-entropy is linear in its target, so the loss equals the model's loss with the labels mixed that way."""
    import torch.nn.functional as F

    from mini_omni2.training.duplex import listen_distillation_loss

    layout = features_model.config.token_layout
    batch = _mixed_listening_batch(features_model, processor_no_vision)
    out = features_model(**batch)
    text = batch["labels"][:, 7, 1:]  # the label that the logits at each position predict
    states = (text == layout.irq) | (text == layout.n_irq)
    assert states[:2].sum() == 4 + 5 and not states[2].any()  # the listening rows' frames, not the text row
    said = torch.zeros(batch["labels"].shape[0], batch["labels"].shape[2])
    said[:, :-1] = (text == layout.irq).float()  # teachers that say exactly the labels
    for weight in (0.0, 0.5, 1.0):
        assert torch.allclose(listen_distillation_loss(out, batch["labels"], said, layout, weight), out.loss)
    teacher = torch.full_like(said, 0.25)
    logits = out.text_logits[:, :-1].float()
    target = torch.zeros_like(logits)  # the text stream's targets, as distributions over the text vocabulary
    known = text != IGNORE_INDEX
    target[known] = F.one_hot(text[known], logits.shape[-1]).float()
    mixed = target.clone()
    mixed[states] *= 0.4
    mixed[states, layout.irq] += 0.6 * 0.25
    mixed[states, layout.n_irq] += 0.6 * 0.75
    text_stream = -(mixed * logits.log_softmax(-1)).sum(-1)[known].mean()
    expected = out.stream_losses[:7].sum() + text_stream
    assert torch.allclose(listen_distillation_loss(out, batch["labels"], teacher, layout, 0.6), expected, atol=1e-5)
    with pytest.raises(ValueError, match="in \\[0, 1\\], got 1.5"):
        listen_distillation_loss(out, batch["labels"], teacher, layout, 1.5)


class _SaysIrq(torch.nn.Module):
    """A teacher whose P(irq) is ``p`` at every position (and one parameter, to check that it stays frozen)."""

    def __init__(self, config, p: float):
        super().__init__()
        self.config = config
        self.logit = torch.nn.Parameter(torch.tensor(math.log(p / (1 - p))))

    def forward(self, input_ids, **kwargs):
        layout = self.config.token_layout
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[2], layout.text_vocab_size)
        logits[..., layout.irq] = self.logit
        return types.SimpleNamespace(text_logits=logits)


def test_a_row_distilled_from_teachers_learns_their_mean_probability(features_model, processor_no_vision, tmp_path):
    """train_listener(teachers=...) at weight 1 fits the row to the teachers' mean P(irq), not to the labels; the
    teachers are left frozen and unchanged."""
    import copy

    from mini_omni2.training.duplex import listen_state_targets, train_listener

    teachers = [_SaysIrq(features_model.config, p) for p in (0.8, 0.5)]
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    batch = _mixed_listening_batch(features_model, processor_no_vision)
    mean = torch.tensor(0.65)
    assert torch.allclose(listen_state_targets(teachers, batch), mean.expand(batch["labels"].shape[::2]))
    dim = features_model.config.listen_feature_dim
    rng = np.random.default_rng(2)
    examples = [{"task": LISTEN_TASK, "listen_features": rng.standard_normal((6, dim)).astype(np.float32),
                 "frame_labels": [0, 0, 0, 1, 1, 1]} for _ in range(8)]
    student = copy.deepcopy(features_model)
    train_listener(student, processor_no_vision, examples, str(tmp_path), max_steps=60, batch_size=8,
                   learning_rate=1e-2, warmup_steps=0, logging_steps=1000, weight_averaging=0.0,
                   teachers=teachers, distillation_weight=1.0)
    probabilities = MiniOmni2Listener(student).run(torch.as_tensor(np.stack([e["listen_features"] for e in examples])))
    assert torch.allclose(probabilities, mean.expand_as(probabilities), atol=0.05), probabilities
    for teacher, state in zip(teachers, before):
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match="distillation weight must be in \\[0, 1\\], got -0.1"):
        train_listener(student, processor_no_vision, examples, str(tmp_path), max_steps=1, teachers=teachers,
                       distillation_weight=-0.1)
    released = _SaysIrq(types.SimpleNamespace(token_layout=R), 0.5)  # the released sizes' ids
    with pytest.raises(ValueError, match="teacher 1 has the token layout .* distil models of the same sizes"):
        train_listener(student, processor_no_vision, examples, str(tmp_path), max_steps=1, teachers=[teachers[0], released])


def test_hard_examples_are_the_clips_the_row_gets_wrong_at_an_eager_rule(features_model, monkeypatch):
    """A missed command or an interrupt in command-free audio (in a negative, or before the command) is hard at
    P >= 0.2 on 2 frames; a detection, a quiet negative and an interrupted near miss are not."""
    import mini_omni2.training.duplex as duplex
    from mini_omni2.training.duplex import HARD_EXAMPLE_RULE, hard_examples

    frame = features_model.config.listen_frame_seconds
    low, eager, high = 0.05, 0.25, 0.9

    def clip(start, end, spoken, p):
        return {"listen_features": np.zeros((len(p), 4), np.float16), "command_start": start * frame,
                "command_end": end * frame, "spoken": spoken, "kind": "speech", "probabilities": np.array(p)}

    clips = [clip(4, 8, "stop omni", [low] * 8 + [high] * 3 + [low] * 9),  # detected
             clip(4, 8, "stop omni", [low] * 20),  # missed
             clip(-1, -1, "", [low] * 10 + [eager] * 2 + [low] * 8),  # an interrupt at the eager rule
             clip(-1, -1, "", [low] * 10 + [eager] + [low] * 9),  # one frame: none
             clip(4, 8, "stop omni", [high] * 2 + [low] * 18),  # an interrupt before the command
             clip(-1, -1, "top omni", [high] * 20)]  # a near miss: counted apart, never hard
    # half-precision training features (as the benchmark stores them) are scored as their float32 values are
    half = [np.random.default_rng(k).standard_normal((9, features_model.config.listen_feature_dim)).astype(np.float16)
            for k in range(3)]
    as_half = duplex.listener_probabilities(features_model, [{"listen_features": f} for f in half])
    as_float = duplex.listener_probabilities(features_model, [{"listen_features": f.astype(np.float32)} for f in half])
    assert all(np.array_equal(a, b) for a, b in zip(as_half, as_float))
    monkeypatch.setattr(duplex, "listener_probabilities", lambda model, examples, batch_size=32:
                        [e["probabilities"] for e in examples])
    assert (HARD_EXAMPLE_RULE.threshold, HARD_EXAMPLE_RULE.min_frames) == (0.2, 2)
    assert hard_examples(features_model, clips) == [1, 2, 4]
    assert hard_examples(features_model, clips, duplex.ListenRule(0.5, 1)) == [1, 4]


def test_the_hard_example_round_trains_on_with_the_hard_clips_repeated(features_model, processor_no_vision,
                                                                     tmp_path, monkeypatch):
    import copy

    import mini_omni2.training.duplex as duplex
    from mini_omni2.training.duplex import HARD_EXAMPLE_LEARNING_RATE, train_on_hard_examples

    dim = features_model.config.listen_feature_dim
    rng = np.random.default_rng(4)
    examples = [{"task": LISTEN_TASK, "listen_features": rng.standard_normal((6, dim)).astype(np.float16),
                 "frame_labels": [0, 0, 0, 1, 1, 1], "command_start": 0.1, "command_end": 0.25, "spoken": "stop omni",
                 "kind": "white", "id": i} for i in range(10)]
    trained = {}

    def fake_train(model, processor, data, output_dir, **kwargs):
        trained.update(data=data, **kwargs)
        return "output"

    monkeypatch.setattr(duplex, "hard_examples", lambda model, clips: [i for i, e in enumerate(clips) if e["id"] % 3 == 0])
    monkeypatch.setattr(duplex, "train_listener", fake_train)
    output, hard = train_on_hard_examples(features_model, processor_no_vision, examples, str(tmp_path), steps=7,
                                          clips=6, repeat=3, seed=5, weight_averaging=0.0)
    assert output == "output" and hard == [0, 3]  # mined among the first 6 clips only
    assert [e["id"] for e in trained["data"]] == list(range(10)) + [0, 3] * 3
    assert trained["max_steps"] == 7 and trained["learning_rate"] == HARD_EXAMPLE_LEARNING_RATE
    assert trained["seed"] == 5 and trained["weight_averaging"] == 0.0
    monkeypatch.undo()
    # end to end on a real row: it scores the clips, then trains on (its weights move)
    model = copy.deepcopy(features_model)
    before = [p.detach().clone() for p in model.parameters()]
    _, hard = train_on_hard_examples(model, processor_no_vision, examples, str(tmp_path), steps=2, clips=4,
                                     logging_steps=1000)
    assert set(hard) <= set(range(4)) and not model.training
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_collator_keeps_listen_tail_frames_after_the_first_irq(features_model, processor_no_vision):
    from mini_omni2.training.collator import listen_row_length
    from mini_omni2.training.duplex import DETECTION_WINDOW_SECONDS

    assert listen_row_length([0, 0, 1, 1, 1, 1], 2) == 4  # the first irq frame and the next one
    assert listen_row_length([0, 0, 1, 1], 5) == 4 and listen_row_length([0, 0, 0], 1) == 3  # no irq: all
    assert listen_row_length([0, 1, 1, 1], None) == 4
    assert features_model.config.listen_frame_seconds == 2048 / 24000  # one codec frame, one decoding step
    assert math.ceil(DETECTION_WINDOW_SECONDS / features_model.config.listen_frame_seconds) == 24  # train_listener's cut
    dim = features_model.config.listen_feature_dim
    features = np.arange(6 * dim, dtype=np.float32).reshape(6, dim)
    example = {"task": LISTEN_TASK, "listen_features": features, "frame_labels": [0, 0, 1, 1, 1, 1]}
    batch = MiniOmni2DataCollator(processor_no_vision, listen_tail_frames=2)([example])
    assert batch["listen_feature_mask"][0].nonzero().flatten().tolist() == [1, 2, 3, 4]
    assert torch.equal(batch["listen_features"][0, 1:5], torch.as_tensor(features[:4]))
    layout = features_model.config.token_layout
    assert batch["labels"][0, 7].tolist() == [IGNORE_INDEX, IGNORE_INDEX, layout.n_irq, layout.n_irq, layout.irq,
                                              layout.irq]
    with pytest.raises(ValueError, match="listen_tail_frames"):
        MiniOmni2DataCollator(processor_no_vision, listen_tail_frames=0)
    mismatched = {**example, "frame_labels": [0, 1, 1]}  # still refused, not cut to fit
    with pytest.raises(ValueError, match="6 feature frames but 3 frame labels"):
        MiniOmni2DataCollator(processor_no_vision, listen_tail_frames=1)([mismatched])


def test_collator_computes_listening_inputs_from_raw_clips(codec_model, processor_no_vision):
    front_end = codec_model.listen_front_end()
    seconds = front_end.frame_seconds
    t = np.arange(int(16000 * 6 * seconds)) / 16000
    clip = {"task": LISTEN_TASK, "audio": (0.1 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), "sampling_rate": 16000,
            "command_end": 3.5 * seconds}
    collator = MiniOmni2DataCollator(processor_no_vision, listen_front_end=front_end)
    batch = collator([clip])
    layout = codec_model.config.token_layout
    codes = front_end.frames(clip["audio"], 16000)
    assert codes.shape == (6, 7) and "listen_features" not in batch
    assert batch["input_ids"][0, :7, 1:7].tolist() == [
        [layout.layershift(c, i) for c in codes[:, i].tolist()] for i in range(7)
    ]
    # the command ends inside frame 3: frames 3, 4, 5 are irq
    assert batch["labels"][0, 7, 2:].tolist() == [layout.n_irq] * 3 + [layout.irq] * 3
    with pytest.raises(ValueError, match="listen_front_end"):
        MiniOmni2DataCollator(processor_no_vision)([clip])


# ----- the streaming front end -------------------------------------------------------------------------------------
def _chunked(front_end, audio, rate, sizes):
    front_end.reset()
    out, start, k = [], 0, 0
    while start < len(audio):
        size = sizes[k % len(sizes)]
        out.append(front_end.feed(audio[start : start + size], rate))
        start, k = start + size, k + 1
    out.append(front_end.flush())
    return torch.cat(out)


@pytest.mark.parametrize("rate", [16000, 24000, 44100])
def test_feature_frames_of_odd_chunks_equal_the_whole_signal(features_model, rate):
    front_end = features_model.listen_front_end()
    audio = (np.random.default_rng(1).standard_normal(int(rate * 1.3)) * 0.1).astype(np.float32)
    whole = front_end.frames(audio, rate)
    assert whole.shape == (front_end.num_frames(len(audio), rate), features_model.config.listen_feature_dim)
    padded = front_end.frames(audio, rate, pad_partial=True)  # a last partial frame only when asked for
    assert padded.shape[0] == whole.shape[0] + 1 and torch.equal(padded[:-1], whole)
    chunked = _chunked(front_end, audio, rate, [1, 997, 3, 4099, 2048, 17])
    assert chunked.shape == whole.shape
    assert torch.allclose(chunked, whole, atol=1e-5)  # STFT batching may round differently
    # int16 PCM and stereo chunks are the same audio
    pcm = np.round(audio * 32767).astype(np.int16)
    assert torch.allclose(front_end.frames(pcm, rate), front_end.frames(pcm / 32768.0, rate), atol=1e-5)
    stereo = np.stack([audio, audio], axis=1)
    assert torch.allclose(front_end.frames(stereo, rate), whole, atol=1e-5)


def test_feature_frames_are_causal(features_model):
    front_end = features_model.listen_front_end()
    audio = (np.random.default_rng(2).standard_normal(24000) * 0.1).astype(np.float32)
    front_end.reset()
    early = front_end.feed(audio[: 2048 * 5], 24000)  # five whole frames are out at once, without lookahead
    assert early.shape[0] == 5
    later = audio.copy()
    later[2048 * 5 :] = 0.5  # the future does not change them
    assert torch.allclose(front_end.frames(later, 24000)[:5], early, atol=1e-5)
    config = features_model.config
    default = MiniOmni2ListenFrontEnd("features", feature_config=config.listen_feature_config)
    assert (default.sampling_rate, default.frame_samples) == (config.listen_sampling_rate, config.listen_frame_samples)
    assert default.frame_seconds == config.listen_frame_seconds == 2048 / 24000  # one codec frame, one decoding step


def test_running_mean_features_remove_the_input_level():
    from mini_omni2.tiny import tiny_config

    config = tiny_config(vision=False, codec=False, listen_input="features",
                         listen_feature_config={"running_mean_seconds": 1.0})
    front_end = MiniOmni2ListenFrontEnd.from_config(config)
    audio = (np.random.default_rng(3).standard_normal(24000) * 0.05).astype(np.float32)
    assert torch.allclose(front_end.frames(audio, 24000), front_end.frames(audio * 10, 24000), atol=1e-4)


def test_codec_frames_of_odd_chunks_equal_a_one_shot_encode(codec_model):
    front_end = codec_model.listen_front_end()
    assert front_end.lookahead_frames == front_end.left_context_frames == 3  # 5,268 samples of reach, 2,048 a frame
    assert codec_encoder_receptive_field(codec_model.codec) == 5268
    rate = 16000
    audio = (np.random.default_rng(4).standard_normal(int(rate * 1.5)) * 0.1).astype(np.float32)
    import soxr

    resampled = torch.from_numpy(soxr.resample(audio, rate, 24000).astype(np.float32))
    one_shot = codec_model.codec.encode(resampled[None])[0]  # SNAC pads the last partial frame with zeros
    chunked = _chunked(front_end, audio, rate, [5, 1024, 333, 3001])
    assert len(resampled) % 2048 and chunked.shape[0] == one_shot.shape[0] - 1  # the partial frame is dropped
    assert torch.equal(chunked, one_shot[:-1])
    assert torch.equal(front_end.frames(audio, rate, pad_partial=True), one_shot)
    # a frame is out once its lookahead has arrived
    front_end.reset()
    assert front_end.feed(np.zeros(24000 * 2048 * 4 // 24000, np.float32), 24000).shape[0] == 1


def test_front_end_refuses_bad_input(features_model, codec_model):
    front_end = features_model.listen_front_end()
    front_end.reset()
    front_end.feed(np.zeros(100, np.float32), 16000)
    with pytest.raises(ValueError, match="16000 Hz"):
        front_end.feed(np.zeros(100, np.float32), 48000)
    with pytest.raises(ValueError, match="NaN"):
        front_end.feed(np.array([np.nan], np.float32), 16000)
    with pytest.raises(ValueError, match="1-D"):
        front_end.feed(np.zeros((2, 2, 2), np.float32), 16000)
    with pytest.raises(TypeError, match="int16"):
        front_end.feed(np.zeros(4, np.int32), 16000)
    front_end.flush()
    with pytest.raises(ValueError, match="flushed"):
        front_end.feed(np.zeros(4, np.float32), 16000)
    with pytest.raises(ValueError, match="codec"):
        tiny_model(vision=False, codec=False).listen_front_end()  # codec input without a codec


# ----- the model ---------------------------------------------------------------------------------------------------
def test_listen_projector_exists_only_for_feature_input(features_model, codec_model):
    config = features_model.config
    assert config.listen_input == "features" and codec_model.config.listen_input == "codec"
    assert config.listen_feature_dim == 64 * 8  # 64 mel bins x 8 columns of 256 samples per 2,048-sample frame
    assert features_model.model.listen_projector.fc_1.in_features == config.listen_feature_dim
    assert codec_model.model.listen_projector is None
    assert config.listen_frame_samples == codec_model.codec.samples_per_frame == 2048
    ids = torch.tensor(codec_model.config.token_layout.build_listen_row(num_frames=1).streams)[None]
    with pytest.raises(ValueError, match="no listen_projector"):
        codec_model(input_ids=ids, listen_features=torch.zeros(1, 2, 4), listen_feature_mask=torch.ones(1, 2))


def test_listen_features_replace_the_audio_stream_embeddings_at_their_positions(features_model):
    layout = features_model.config.token_layout
    row = layout.build_listen_row(num_frames=3)
    ids = torch.tensor(row.streams)[None]
    features = torch.randn(1, 4, features_model.config.listen_feature_dim)
    mask = torch.tensor([[False, True, True, True]])
    inner = features_model.model
    embeds = inner.embed(ids, listen_features=features, listen_feature_mask=mask)
    plain = inner.embed(ids)
    assert torch.equal(embeds[0, 0], plain[0, 0])  # the prompt position takes no features
    table = inner.get_input_embeddings()
    expected = (7 * inner.listen_projector(features[0, 2]) + table(ids[0, 7, 2])) / 8
    assert torch.allclose(embeds[0, 2], expected, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        inner.embed(ids, listen_features=features[:, :2], listen_feature_mask=mask)
    with pytest.raises(ValueError, match="together"):
        inner.embed(ids, listen_features=features)


def test_a_features_model_saves_and_loads(features_model, tmp_path):
    from mini_omni2 import MiniOmni2ForConditionalGeneration

    features_model.save_pretrained(tmp_path)
    loaded = MiniOmni2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.listen_input == "features"
    assert loaded.config.listen_feature_config == features_model.config.listen_feature_config
    for name, tensor in features_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert (tmp_path / "duplex_mini_omni2.py").exists()  # the front end ships with the remote code


def test_the_conv_listening_adapter_hears_each_frame_as_an_image_of_columns_by_mel_bins(tmp_path):
    """listen_adapter="conv": convolutions over a frame's (columns, mel bins), torch's own initialisation (the
    library's small normal one would leave three stacked convolutions almost silent), saved and loaded as it was."""
    from mini_omni2 import MiniOmni2Config, MiniOmni2ForConditionalGeneration
    from mini_omni2.modeling_mini_omni2 import MiniOmni2Adapter, MiniOmni2ListenConvAdapter
    from mini_omni2.training.duplex import duplex_tiny_config

    assert duplex_tiny_config().listen_adapter == "gru"  # the recipe's
    assert duplex_tiny_config("codec").listen_adapter == "mlp"  # codec input needs no adapter: the config's default
    assert MiniOmni2Config().listen_adapter == "mlp"  # a config's own default: saved configs load as saved
    config = duplex_tiny_config(listen_adapter="conv", listen_feature_config={"context_frames": 2})
    assert config.listen_feature_shape == (16, 64) and config.listen_feature_dim == 16 * 64  # 2 frames x 8 columns
    torch.manual_seed(0)
    model = MiniOmni2ForConditionalGeneration(config).eval()
    adapter = model.model.listen_projector
    assert isinstance(adapter, MiniOmni2ListenConvAdapter) and adapter.feature_shape == (16, 64)
    first = adapter.convs[0].weight
    assert first.shape == (16, 1, 3, 3) and first.abs().max() <= 1 / 3 and first.std() > 0.1  # U(+-1/sqrt(9))
    features = torch.randn(2, 5, config.listen_feature_dim)
    out = adapter(features)
    assert out.shape == (2, 5, config.text_config.hidden_size)
    assert torch.allclose(out[1, 3], adapter(features[1, 3][None])[0], atol=1e-6)  # frame by frame
    # one mel bin's pattern moved up the mel axis still reaches the convolutions (shared along it)
    image = torch.zeros(16, 64)
    image[4:8, 10:14] = 1.0
    moved = torch.roll(image, 20, dims=1)
    hidden = [adapter.convs(x.reshape(1, 1, 16, 64)) for x in (image, moved)]
    assert torch.allclose(hidden[0].sum(), hidden[1].sum(), rtol=0.05)
    model.save_pretrained(tmp_path)
    loaded = MiniOmni2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.listen_adapter == "conv" and torch.equal(loaded.model.listen_projector(features), out)
    mlp = MiniOmni2ForConditionalGeneration(duplex_tiny_config(listen_adapter="mlp")).model.listen_projector
    assert isinstance(mlp, MiniOmni2Adapter)
    # added to a model saved without one (a converted release): the new adapter gets the same initialisation
    tiny_model(vision=False).save_pretrained(tmp_path / "codec")
    added = MiniOmni2ForConditionalGeneration.from_pretrained(tmp_path / "codec", listen_input="features",
                                                              listen_adapter="conv").model.listen_projector
    assert isinstance(added, MiniOmni2ListenConvAdapter)
    assert added.convs[0].weight.abs().max() <= 1 / 3 and added.convs[0].weight.std() > 0.1
    for bad, message in [
        ({"listen_adapter": "lstm"}, "listen_adapter must be one of ('mlp', 'conv', 'gru'), got 'lstm'"),
        ({"listen_conv_channels": 0}, "listen_conv_channels must be a positive integer, got 0"),
        ({"listen_gru_size": 0}, "listen_gru_size must be a positive integer, got 0"),
        ({"listen_gru_layers": True}, "listen_gru_layers must be a positive integer, got True"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            duplex_tiny_config(**bad)


def test_the_gru_listening_adapter_hears_each_row_in_order_and_carries_its_state(tmp_path):
    """listen_adapter="gru": a GRU over each row's frames in order; a state given to embed goes on where the last
    call stopped, so frames fed one at a time give what the whole row gives; torch's own initialisation, also when
    the adapter is added to a model saved without one; saved and loaded as it was."""
    from mini_omni2 import MiniOmni2ForConditionalGeneration
    from mini_omni2.engine_mini_omni2 import MiniOmni2ListenState
    from mini_omni2.modeling_mini_omni2 import MiniOmni2ListenRecurrentAdapter
    from mini_omni2.training.duplex import duplex_tiny_config

    config = duplex_tiny_config(listen_adapter="gru", listen_gru_size=32, listen_gru_layers=2)
    torch.manual_seed(0)
    model = MiniOmni2ForConditionalGeneration(config).eval()
    adapter = model.model.listen_projector
    assert isinstance(adapter, MiniOmni2ListenRecurrentAdapter)
    assert adapter.gru.hidden_size == 32 and adapter.gru.num_layers == 2
    hidden = config.text_config.hidden_size
    assert adapter.proj.out_features == hidden
    bound = 1 / 32 ** 0.5
    assert adapter.gru.weight_hh_l1.abs().max() <= bound and adapter.gru.weight_hh_l1.std() > bound / 2  # U(+-bound)
    # two rows of 5 and 3 frames at their mask's positions: each row alone, in order
    features = torch.randn(2, 6, config.listen_feature_dim)
    mask = torch.tensor([[False, True, True, True, True, True], [False, False, True, True, True, False]])
    out = adapter(features[mask], mask.sum(1))
    assert out.shape == (8, hidden)
    alone = adapter(features[1, 2:5], torch.tensor([3]))
    assert torch.allclose(out[5:], alone, atol=1e-6)
    assert not torch.allclose(adapter(features[1, 2:5].flip(0), torch.tensor([3]))[-1], alone[-1])  # order matters
    # frame by frame through embed with a state = the whole row
    layout = config.token_layout
    row = layout.build_listen_row(num_frames=5)
    ids = torch.tensor(row.streams)[None]
    whole = model.model.embed(ids, listen_features=features[:1], listen_feature_mask=mask[:1])
    state = MiniOmni2ListenState()
    for k in range(1, 6):
        step = model.model.embed(ids[..., k : k + 1], listen_features=features[:1, k : k + 1],
                                 listen_feature_mask=mask[:1, k : k + 1], listen_state=state)
        assert torch.allclose(step[0, 0], whole[0, k], atol=1e-6)
    assert state.hidden.shape == (2, 1, 32)
    # the model's forward in two calls with a cache and a state = one call over the whole row
    with torch.no_grad():
        whole_logits = model(input_ids=ids, listen_features=features[:1], listen_feature_mask=mask[:1]).text_logits
        state = MiniOmni2ListenState()
        first = model(input_ids=ids[..., :3], listen_features=features[:1, :3], listen_feature_mask=mask[:1, :3],
                      use_cache=True, listen_state=state)
        second = model(input_ids=ids[..., 3:], listen_features=features[:1, 3:], listen_feature_mask=mask[:1, 3:],
                       cache=getattr(first, CACHE_NAME), listen_state=state)
    assert torch.allclose(torch.cat([first.text_logits, second.text_logits], 1), whole_logits, atol=1e-5)
    with pytest.raises(ValueError, match="listen_state holds 1 rows, but 2 rows have frames"):
        model.model.embed(ids[..., :1].repeat(2, 1, 1), listen_features=features[:, :1],
                          listen_feature_mask=torch.ones(2, 1, dtype=torch.bool), listen_state=state)
    model.save_pretrained(tmp_path)
    loaded = MiniOmni2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.listen_gru_size == 32
    assert torch.equal(loaded.model.listen_projector(features[mask], mask.sum(1)), out)
    tiny_model(vision=False).save_pretrained(tmp_path / "codec")
    added = MiniOmni2ForConditionalGeneration.from_pretrained(tmp_path / "codec", listen_input="features",
                                                              listen_adapter="gru").model.listen_projector
    assert isinstance(added, MiniOmni2ListenRecurrentAdapter) and added.gru.hidden_size == 128
    for name, weight in added.gru.named_parameters():
        assert weight.abs().max() <= 1 / 128 ** 0.5 and weight.std() > 0.02, name


def test_a_model_keeps_its_listening_rule_in_its_config(tmp_path):
    """config.listen_rule: the decision rule chosen when the row was trained, saved and loaded with the model;
    min_frames defaults to 1; anything else is refused with what was given."""
    from mini_omni2 import MiniOmni2Config
    from mini_omni2.training.duplex import duplex_tiny_config

    assert duplex_tiny_config().listen_rule is None
    config = duplex_tiny_config(listen_rule={"threshold": 0.6, "min_frames": 3})
    config.save_pretrained(tmp_path)
    assert MiniOmni2Config.from_pretrained(tmp_path).listen_rule == {"threshold": 0.6, "min_frames": 3}
    assert duplex_tiny_config(listen_rule={"threshold": 0.8}).listen_rule == {"threshold": 0.8, "min_frames": 1}
    # an override at load is set after the config is built: it is checked (and completed) all the same
    assert MiniOmni2Config.from_pretrained(tmp_path, listen_rule={"threshold": 0.7}).listen_rule == {
        "threshold": 0.7, "min_frames": 1}
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\), got 5"):
        MiniOmni2Config.from_pretrained(tmp_path, listen_rule={"threshold": 5})
    with pytest.raises(ValueError, match="listen_input must be one of"):
        MiniOmni2Config.from_pretrained(tmp_path, listen_input="bogus")
    for bad, message in [
        ({"threshold": 1.5}, r"threshold must be a number in \(0, 1\), got 1.5"),
        ({"threshold": "0.6"}, r"threshold must be a number in \(0, 1\), got '0.6'"),
        ({"threshold": 0.6, "min_frames": 2.5}, r"min_frames must be an int >= 1, got 2.5"),
        ({"min_frames": 2}, r"listen_rule must be None or .*got \{'min_frames': 2\}"),
        ({"threshold": 0.6, "frames": 2}, r"listen_rule must be None or .*'frames': 2"),
        (0.6, r"listen_rule must be None or .*got 0.6"),
    ]:
        with pytest.raises(ValueError, match=message):
            duplex_tiny_config(listen_rule=bad)


def test_the_rule_chosen_on_validation_detects_most_within_the_false_interrupt_limit():
    from mini_omni2.engine_mini_omni2 import ListenRule
    from mini_omni2.training.duplex import choose_listen_rule

    def row(t, m, detection, false):
        return {"threshold": t, "min_frames": m, "detection": detection, "false_per_10min": false}

    sweep = [row(0.5, 1, 0.95, 4.0), row(0.6, 2, 0.90, 1.0), row(0.6, 3, 0.90, 0.5), row(0.8, 1, 0.70, 0.0)]
    assert choose_listen_rule(sweep) == ListenRule(0.6, 3)  # 0.90 at most 1 false; of the two, fewer false
    assert ListenRule(0.6, 3).as_config() == {"threshold": 0.6, "min_frames": 3}  # as config.listen_rule keeps it
    assert choose_listen_rule(sweep, max_false_per_10min=5.0) == ListenRule(0.5, 1)
    noisy = [row(0.5, 1, 0.95, 4.0), row(0.9, 3, 0.40, 2.0)]
    assert choose_listen_rule(noisy) == ListenRule(0.9, 3)  # none within the limit: the fewest false interrupts
    with pytest.raises(ValueError, match="need commands and command-free audio"):
        choose_listen_rule([row(0.5, 1, None, 0.0)])
    with pytest.raises(ValueError, match="non-empty sweep"):
        choose_listen_rule([])


def test_the_evaluation_reports_95_percent_intervals_of_its_small_counts():
    from mini_omni2.training.duplex import ClipOutcome, detection_interval, false_rate_interval, per_10min, summarize

    # Wilson: no detection in 10 commands is consistent with up to 27.8 %; all of them with down to 72.2 %
    assert detection_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert detection_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert detection_interval(0, 0) is None
    # Garwood: no false interrupt in 10 minutes is consistent with up to -ln(0.025) = 3.69 per 10 minutes
    assert false_rate_interval(0, 10.0) == pytest.approx((0.0, -math.log(0.025)), abs=1e-3)
    low, high = false_rate_interval(2, 28.5)  # the proof's 0.70 per 10 minutes: 2 in 28.5 minutes
    assert low < 0.7 < 1.0 < high  # the goal lies inside: one run cannot tell 0.70 from 1
    assert false_rate_interval(3, 0.0) is None
    assert per_10min(2, 28.5) == pytest.approx(0.7018, abs=1e-4) and per_10min(3, 0.0) is None

    def outcome(has_command, detected, false, seconds):
        return ClipOutcome("stop omni" if has_command else "", "speech", has_command, None, detected, false,
                           0.1 if detected else None, seconds)

    clips = [outcome(True, True, False, 5.0)] * 19 + [outcome(True, False, False, 5.0)]
    clips += [outcome(False, False, True, 60.0)] * 2 + [outcome(False, False, False, 60.0)] * 8
    summary = summarize(clips)
    assert (summary["detected"], summary["positives"], summary["false_interrupts"]) == (19, 20, 2)
    assert summary["detection_interval"] == detection_interval(19, 20)
    assert summary["false_per_10min_interval"] == false_rate_interval(2, summary["command_free_minutes"])
    assert summary["command_free_minutes"] == pytest.approx(20 * 5 / 60 + 10)


# ----- the listener: step by step with a cache, as the engine runs the row --------------------------------------
def _teacher_forced(model, frames):
    layout = model.config.token_layout
    if model.config.listen_input == "features":
        row = layout.build_listen_row(num_frames=frames.shape[1])
        ids = torch.tensor(row.streams)[None].repeat(frames.shape[0], 1, 1)
        features = torch.zeros(frames.shape[0], ids.shape[2], frames.shape[2])
        features[:, row.listen_positions] = frames
        mask = torch.zeros(frames.shape[0], ids.shape[2], dtype=torch.bool)
        mask[:, row.listen_positions] = True
        kwargs = {"listen_features": features, "listen_feature_mask": mask}
    else:
        ids = torch.stack([torch.tensor(layout.build_listen_row(frames=f).streams) for f in frames])
        kwargs = {}
    with torch.no_grad():
        logits = model(input_ids=ids, **kwargs).text_logits[:, 1:]
    return layout.listen_irq_probability(logits)


@pytest.mark.parametrize("catch_up", [1, 4], ids=["one-frame-a-step", "catching-up"])
@pytest.mark.parametrize("kind", ["features", "codec", "gru"])
def test_listener_steps_equal_the_whole_row(kind, catch_up, features_model, codec_model, gru_model):
    """A row fed one frame a step, or up to four at once (a row catching up on a backlog), hears what the whole row
    hears in one forward."""
    model = {"features": features_model, "codec": codec_model, "gru": gru_model}[kind]
    if kind != "codec":
        frames = torch.randn(2, 9, model.config.listen_feature_dim)
    else:
        frames = torch.randint(0, model.config.audio_codebook_size, (2, 9, 7))
    stepped = MiniOmni2Listener(model, catch_up_frames=catch_up).run(frames)
    assert stepped.shape == (2, 9)
    assert torch.allclose(stepped, _teacher_forced(model, frames), atol=1e-5)


@pytest.mark.parametrize("catch_up", [1, 4], ids=["one-frame-a-step", "catching-up"])
@pytest.mark.parametrize("kind", ["features", "gru"])
def test_listener_window_restarts_with_the_last_frames(kind, catch_up, features_model, gru_model):
    model = features_model if kind == "features" else gru_model
    frames = torch.randn(1, 10, model.config.listen_feature_dim)
    windowed = MiniOmni2Listener(model, window_frames=6, refeed_frames=2, catch_up_frames=catch_up).run(frames)
    assert torch.allclose(windowed[:, :6], _teacher_forced(model, frames[:, :6]), atol=1e-5)
    # after 6 frames: a fresh row (a fresh adapter state too) that heard frames 4, 5 again, then 6..9
    assert torch.allclose(windowed[:, 6:], _teacher_forced(model, frames[:, 4:])[:, 2:], atol=1e-5)
    with pytest.raises(ValueError, match="refeed_frames"):
        MiniOmni2Listener(features_model, window_frames=3, refeed_frames=3)


def test_the_sliced_head_gives_a_listening_row_its_two_state_logits_at_every_column(codec_model):
    """forward(listen_logits_rows=...) computes the head's (n_irq, irq) columns alone, at every input column (the
    engine's listening rows read nothing else): the full head's logits at those two ids."""
    layout = codec_model.config.token_layout
    frames = torch.randint(0, codec_model.config.audio_codebook_size, (2, 5, 7))
    ids = torch.stack([torch.tensor(layout.build_listen_row(frames=f).streams) for f in frames])
    with torch.no_grad():
        full = codec_model(input_ids=ids)
        sliced = codec_model(input_ids=ids, logits_to_keep=1, text_logits_rows=torch.tensor([0]),
                             listen_logits_rows=torch.tensor([1]))
    assert sliced.logits is None and sliced.listen_logits.shape == (1, ids.shape[-1], 2)
    assert torch.allclose(sliced.listen_logits[0], full.text_logits[1][:, list(layout.listen_states)], atol=1e-5)
    assert torch.allclose(layout.irq_probability(sliced.listen_logits[0]), layout.listen_irq_probability(
        full.text_logits[1]), atol=1e-6)
    assert sliced.text_logits.shape == (1, 1, layout.text_vocab_size)  # the other rows: the kept column only
    assert torch.allclose(sliced.text_logits[0, -1], full.text_logits[0, -1], atol=1e-5)
    with pytest.raises(ValueError, match="labels need the full head"):
        codec_model(input_ids=ids, labels=ids, listen_logits_rows=torch.tensor([0]))


# ----- the synthetic data --------------------------------------------------------------------------------------------
#: Short clips for tests of what a clip's options change.
SHORT_CLIP = dict(lead_seconds=(0.5, 1.0), tail_seconds=(0.5, 1.0), negative_seconds=(1.5, 2.0))


def test_clips_are_deterministic_and_labelled():
    from mini_omni2.training.duplex_data import COMMAND_TEXTS, NEAR_MISSES, frame_labels, make_clip

    short = dict(SHORT_CLIP, kinds=("white",))
    clips = [make_clip("train", i, seed=7, **short) for i in range(6)]
    again = make_clip("train", 0, seed=7, **short)
    assert np.array_equal(clips[0]["audio"], again["audio"]) and clips[0]["voice"] == again["voice"]
    assert not np.array_equal(clips[0]["audio"][:8000], make_clip("train", 0, seed=8, **short)["audio"][:8000])
    for clip in clips:
        assert clip["task"] == LISTEN_TASK and clip["sampling_rate"] == 16000 and clip["audio"].dtype == np.float32
        if clip["command_end"] >= 0:
            assert clip["spoken"] in COMMAND_TEXTS and 0.5 <= clip["command_start"] < clip["command_end"]
            assert clip["command_end"] + 0.5 <= len(clip["audio"]) / 16000 + 1e-6  # then a tail
        else:
            assert clip["spoken"] in NEAR_MISSES + ("",) and clip["command_start"] == -1.0
    assert {c["command_end"] >= 0 for c in clips} == {True, False}
    # the shares of commands and near misses are the clips' draws (200 clips: within 3.5 standard deviations)
    shares = [make_clip("train", i, seed=7, positive_fraction=0.6, near_miss_fraction=0.3, **short) for i in range(200)]
    positives = sum(c["spoken"] in COMMAND_TEXTS for c in shares)
    near_misses = sum(c["spoken"] in NEAR_MISSES for c in shares)
    assert abs(positives - 120) <= 3.5 * (200 * 0.6 * 0.4) ** 0.5
    assert abs(near_misses - 60) <= 3.5 * (200 * 0.3 * 0.7) ** 0.5
    assert positives + near_misses < 200  # and some background alone
    with pytest.raises(ValueError, match="sum to <= 1, got 0.8 and 0.3"):
        make_clip("train", 0, positive_fraction=0.8, near_miss_fraction=0.3)
    # n_irq before the tail, irq from the frame in which the command ends
    assert frame_labels(5, 0.2, 0.1).tolist() == [0, 0, 1, 1, 1]
    assert frame_labels(5, 0.15, 0.1).tolist() == [0, 1, 1, 1, 1]
    assert frame_labels(3, -1.0, 0.1).tolist() == [0, 0, 0]


def test_test_split_holds_voices_words_and_noises_never_used_in_training():
    from mini_omni2.training.duplex_data import ACCENTS, KINDS, VARIANTS, WORDS, split_voices

    assert not set(split_voices("train")) & set(split_voices("test"))
    assert not set(ACCENTS["train"]) & set(ACCENTS["test"]) and not set(VARIANTS["train"]) & set(VARIANTS["test"])
    assert not set(WORDS["train"]) & set(WORDS["test"])
    assert set(KINDS["test"]) - set(KINDS["train"]) == {"pink", "chords"}
    with pytest.raises(ValueError, match="split"):
        split_voices("dev")


def test_random_voice_variants_are_fixed_distinct_and_spoken_by_espeak():
    from mini_omni2.training.duplex_data import ACCENTS, RANDOM_VARIANTS, random_variant, speak, split_voices

    assert random_variant(7) == random_variant(7) and random_variant(7) != random_variant(8)
    lines = random_variant(7).splitlines()
    assert lines[:2] == ["language variant", "name mo2rnd7"]
    assert sum(line.startswith("formant ") for line in lines) == 9
    assert all("klatt 3" != line for i in range(50) for line in random_variant(i).splitlines())  # the test split's
    made_up = [v for v in split_voices("train") if "+mo2rnd" in v]
    assert len(made_up) == RANDOM_VARIANTS["train"] * len(ACCENTS["train"]) and not any("+mo2rnd" in v for v in split_voices("test"))
    plain, varied = speak("stop omni", "en-us"), speak("stop omni", "en-us+mo2rnd0")
    assert varied.size > 0 and not np.array_equal(plain[: varied.size], varied[: plain.size])
    # espeak-ng lists at most 349 voices per data path: the variants are spread over several, and the last one speaks
    last = speak("stop", f"en-us+mo2rnd{RANDOM_VARIANTS['train'] - 1}")
    assert last.size > 0 and not np.array_equal(last[:1000], speak("stop", "en-us+mo2rnd1")[:1000])


def test_foreign_accents_join_the_train_splits_voices_only_when_asked_and_never_the_test_splits():
    from mini_omni2.training.duplex_data import (ACCENTS, FOREIGN_ACCENTS, _pool_utterance, make_clip, speak,
                                                 split_voices)

    english, widened = split_voices("train"), split_voices("train", foreign_accents=True)
    # the train split's voices come first, then each of them in each foreign accent (its variants: the same)
    assert widened[: len(english)] == english
    assert {v.split("+")[0] for v in widened[len(english):]} == set(FOREIGN_ACCENTS)
    assert len(widened) == len(english) * (len(ACCENTS["train"]) + len(FOREIGN_ACCENTS)) // len(ACCENTS["train"])
    assert not set(FOREIGN_ACCENTS) & set(ACCENTS["test"]) and not set(widened) & set(split_voices("test"))
    # espeak-ng's German voice reads the English words with its own phonemes, not the English voice's
    assert not np.array_equal(speak("stop omni", "de+m3")[:4000], speak("stop omni", "en-us+m3")[:4000])
    # the pools' entries, and the clips, draw from the widened voices, deterministically
    voices = [_pool_utterance("train", i, foreign_accents=True)[1] for i in range(24)]
    assert set(voices) <= set(widened) and any(v.split("+")[0] in FOREIGN_ACCENTS for v in voices)
    assert voices == [_pool_utterance("train", i, foreign_accents=True)[1] for i in range(24)]
    assert all(_pool_utterance("train", i)[1] in english for i in range(24))
    short = {"negative_seconds": (1.5, 2.0), "lead_seconds": (0.5, 1.0), "tail_seconds": (0.0, 0.5)}
    clips = [make_clip("train", i, seed=2, foreign_accents=True, **short) for i in range(16)]
    spoken = [c["voice"] for c in clips if c["voice"]]
    assert set(spoken) <= set(widened) and any(v.split("+")[0] in FOREIGN_ACCENTS for v in spoken)
    # the test split keeps accents training never hears
    with pytest.raises(ValueError, match="foreign_accents is an option of the train split .* got split 'test'"):
        make_clip("test", 0, foreign_accents=True)
    with pytest.raises(ValueError, match="got split 'test'"):
        split_voices("test", foreign_accents=True)
    with pytest.raises(TypeError, match="foreign_accents must be True or False, got 0.5"):
        make_clip("train", 0, foreign_accents=0.5)


def test_flite_voices_speak_at_their_pitch_and_enter_the_pools_only_when_asked(monkeypatch):
    from mini_omni2.training import duplex_data
    from mini_omni2.training.duplex_data import FLITE_FRACTION, FLITE_PREFIX, FLITE_VOICES, _pool_utterance, speak

    # the recipe draws no flite voice: its pools (and so its clips) are espeak-ng's
    assert FLITE_FRACTION == {"train": 0.0, "test": 0.0}
    assert not any(_pool_utterance("train", i)[1].startswith(FLITE_PREFIX) for i in range(30))
    # a flite voice speaks, trimmed, at 16 kHz; the pitch draw moves its F0 by +- half an octave (yin's median F0)
    import librosa

    low, high = speak("stop omni", "flite:slt", 175, 20), speak("stop omni", "flite:slt", 175, 80)
    assert low.dtype == np.float32 and 0.4 < low.size / 16000 < 2.0
    f0 = [float(np.median(librosa.yin(x, fmin=60, fmax=500, sr=16000))) for x in (low, high)]
    assert 1.5 < f0[1] / f0[0] < 2.5
    assert speak("stop omni", "flite:slt", 130).size > speak("stop omni", "flite:slt", 220).size  # speed: a stretch
    # asked for, a fraction of the train split's pool utterances are said by flite's voices, drawn deterministically
    monkeypatch.setitem(FLITE_FRACTION, "train", 0.5)
    voices = [_pool_utterance("train", i)[1] for i in range(24)]
    flite = [v for v in voices if v.startswith(FLITE_PREFIX)]
    assert 4 <= len(flite) <= 20 and {v[len(FLITE_PREFIX):] for v in flite} <= set(FLITE_VOICES)
    assert voices == [_pool_utterance("train", i)[1] for i in range(24)]
    with pytest.raises(ValueError, match="unknown flite voice 'bob'"):
        speak("stop", "flite:bob")
    monkeypatch.setattr(duplex_data.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install flite"):
        speak("omni", "flite:awb")


def test_extra_backgrounds_hum_sweeps_clatter_and_mixtures_of_two_kinds():
    from mini_omni2.training.duplex_data import EXTRA_KINDS, KINDS, background, make_clip

    assert EXTRA_KINDS == ("hum", "sweeps", "clatter") and not set(EXTRA_KINDS) & {k for ks in KINDS.values() for k in ks}
    rate = 16000
    audio = {}
    for kind in EXTRA_KINDS + ("white",):
        audio[kind] = background(kind, 2 * rate, np.random.default_rng(0), "train")
        assert np.array_equal(audio[kind], background(kind, 2 * rate, np.random.default_rng(0), "train"))
        assert audio[kind].dtype == np.float32
        assert np.sqrt(np.mean(audio[kind].astype(np.float64) ** 2)) == pytest.approx(1, abs=1e-3)
    # hum: nearly all its power in a few lines, the lowest at the mains frequency (50 or 60 Hz, within 1 %)
    power, freqs = np.abs(np.fft.rfft(audio["hum"])) ** 2, np.fft.rfftfreq(2 * rate, 1 / rate)
    lines = power > 0.01 * power.max()
    assert power[lines].sum() > 0.9 * power.sum() and lines.sum() < 100
    assert 49 <= freqs[lines].min() <= 51 or 59 <= freqs[lines].min() <= 61
    # clatter: impacts, far peakier than steady noise
    assert np.abs(audio["clatter"]).max() > 2 * np.abs(audio["white"]).max()
    # sweeps: one gliding pitch, whose peak moves from one 50 ms window to the next
    peaks = {int(np.argmax(np.abs(np.fft.rfft(audio["sweeps"][i : i + 800])))) for i in range(0, 2 * rate - 800, 800)}
    assert len(peaks) > 5
    # mixtures of two kinds; none by default (the clips every measurement scored)
    short = dict(SHORT_CLIP, kinds=("white", "hum", "sweeps"))
    mixed = [make_clip("train", i, seed=3, mixture_fraction=1.0, **short)["kind"] for i in range(4)]
    assert all(len(k.split("+")) == 2 and set(k.split("+")) <= {"white", "hum", "sweeps"} for k in mixed)
    assert all("+" not in make_clip("train", i, seed=3, **short)["kind"] for i in range(4))
    with pytest.raises(ValueError, match="mixture_fraction"):
        make_clip("train", 0, mixture_fraction=1.5)
    with pytest.raises(ValueError, match=r"kinds must be background kinds of \[.*'hum'.*\], got unknown \['rain'\]"):
        background("rain", 100, np.random.default_rng(0), "train")
    with pytest.raises(ValueError, match=r"kinds must be .* got unknown \['rain'\]"):
        make_clip("train", 0, kinds=("white", "rain"))
    with pytest.raises(ValueError, match="got unknown none"):
        make_clip("train", 0, kinds=())


def test_a_kind_named_twice_is_drawn_twice_as_often_and_the_recipe_weights_talkers_up():
    from mini_omni2.training.duplex import LISTEN_TRAIN_KINDS, add_listen_training_arguments, clip_kwargs
    from mini_omni2.training.duplex_data import KINDS, make_clip

    noise_only = dict(SHORT_CLIP, positive_fraction=0.0, near_miss_fraction=0.0)
    drawn = Counter(make_clip("train", i, seed=5, kinds=("white", "white", "white", "brown"), **noise_only)["kind"]
                    for i in range(400))
    assert set(drawn) == {"white", "brown"} and 0.65 < drawn["white"] / 400 < 0.85
    # the recipe: the train split's kinds, one other talker 3 times in 8 and babble 2 in 8
    assert sorted(set(LISTEN_TRAIN_KINDS)) == sorted(KINDS["train"])
    assert Counter(LISTEN_TRAIN_KINDS) == {"white": 1, "brown": 1, "tones": 1, "speech": 3, "babble": 2}
    parser = argparse.ArgumentParser()
    add_listen_training_arguments(parser)
    assert clip_kwargs(parser.parse_args([]))["kinds"] == LISTEN_TRAIN_KINDS
    assert clip_kwargs(parser.parse_args(["--train-kinds", "white,speech,speech"]))["kinds"] == (
        "white", "speech", "speech")


def _assert_only_talkers_change(split: str, index: int, seed: int, kinds: tuple[str, str], **option) -> None:
    """A talkers' ``option`` of make_clip changes a clip over the talker kind (``kinds[0]``) and not one over the
    other kind, and leaves what is said, and where, as it was."""
    from mini_omni2.training.duplex_data import make_clip

    for kind, changes in zip(kinds, (True, False)):
        plain = make_clip(split, index, seed=seed, kinds=(kind,), **SHORT_CLIP)
        talked = make_clip(split, index, seed=seed, kinds=(kind,), **option, **SHORT_CLIP)
        assert talked["spoken"] == plain["spoken"]
        assert (talked["command_start"], talked["command_end"]) == (plain["command_start"], plain["command_end"])
        assert (not np.array_equal(talked["audio"], plain["audio"])) == changes


def test_background_talkers_may_say_made_up_words_that_are_never_the_command_or_a_real_word():
    from mini_omni2.training.duplex_data import (COMMAND_TEXTS, NEAR_MISSES, PSEUDO_POOL, WORDS, _pool_utterance,
                                                 make_clip, pseudo_word)

    words = [pseudo_word(np.random.default_rng([7, i])) for i in range(2000)]
    assert words == [pseudo_word(np.random.default_rng([7, i])) for i in range(2000)]
    assert len(set(words)) > 1500 and all(w.isalpha() and w.islower() for w in words)
    forbidden = {w.strip(",.!").lower() for t in COMMAND_TEXTS + NEAR_MISSES for w in t.split()}
    assert not set(words) & (forbidden | set(WORDS["train"]) | set(WORDS["test"]))
    assert sum("om" in w and "n" in w.split("om", 1)[1][:2] for w in words) >= 1  # "omni"-like sounds occur
    # a pool of its own: entry k with made-up words is not entry k of the split's sentences
    assert not np.array_equal(_pool_utterance("train", 3, pool=PSEUDO_POOL)[0], _pool_utterance("train", 3)[0])
    _assert_only_talkers_change("train", 0, 1, ("speech", "white"), pseudo_word_fraction=1.0)
    speech = dict(SHORT_CLIP, kinds=("speech",))
    assert np.array_equal(make_clip("train", 0, seed=1, pseudo_word_fraction=0.0, **speech)["audio"],
                          make_clip("train", 0, seed=1, **speech)["audio"])
    with pytest.raises(ValueError, match=r"pseudo_word_fraction must be in \[0, 1\], got 1.5"):
        make_clip("train", 0, pseudo_word_fraction=1.5)


def test_background_talkers_may_say_common_words_but_never_the_other_splits_words_or_the_command():
    from mini_omni2.training.duplex_data import (COMMAND_TEXTS, COMMON_POOL, NEAR_MISSES, PSEUDO_POOL, WORDS,
                                                 _pool_utterance, common_words, make_clip)

    train, test = common_words("train"), common_words("test")
    assert len(train) > 4000 and len(test) > 4000 and all(w.isascii() and w.isalpha() for w in train + test)
    # the held-out split's words and their forms stay unheard in training, and the command's words in both splits
    assert {"money", "computer", "program", "company"} <= set(WORDS["test"])
    assert not {"money", "computer", "computers", "program", "programs", "company", "companies"} & set(train)
    assert not set(WORDS["test"]) & set(train) and not set(WORDS["train"]) & set(test)
    phrase_words = {w.strip(",.!").lower() for t in COMMAND_TEXTS + NEAR_MISSES for w in t.split()}
    assert not ({"stopped", "stopping", "omnibus"} | phrase_words) & set(train + test)
    assert {"honey", "common", "one"} <= set(train)  # near sounds are said by talkers who do not give the command
    # a pool of its own: entry k with common words is neither entry k of the split's sentences nor of made-up words
    common = _pool_utterance("train", 3, pool=COMMON_POOL)[0]
    assert not np.array_equal(common, _pool_utterance("train", 3)[0])
    assert not np.array_equal(common, _pool_utterance("train", 3, pool=PSEUDO_POOL)[0])
    _assert_only_talkers_change("test", 1, 2, ("babble", "pink"), common_word_fraction=1.0)
    # with made-up words alone, the clips are the ones made before common words existed
    made_up = make_clip("train", 0, seed=1, kinds=("speech",), pseudo_word_fraction=0.5, **SHORT_CLIP)["audio"]
    assert np.array_equal(made_up, make_clip("train", 0, seed=1, kinds=("speech",), pseudo_word_fraction=0.5,
                                             common_word_fraction=0.0, **SHORT_CLIP)["audio"])
    assert not np.array_equal(made_up, make_clip("train", 0, seed=1, kinds=("speech",), pseudo_word_fraction=0.5,
                                                 common_word_fraction=0.5, **SHORT_CLIP)["audio"])
    with pytest.raises(ValueError, match=r"common_word_fraction must be in \[0, 1\], got -0.5"):
        make_clip("train", 0, common_word_fraction=-0.5)
    with pytest.raises(ValueError, match=r"pseudo_word_fraction \+ common_word_fraction must be <= 1, got 0.6 \+ 0.6"):
        make_clip("train", 0, pseudo_word_fraction=0.6, common_word_fraction=0.6)


def test_near_misses_may_be_sound_alikes_of_the_command_one_or_two_phonemes_away():
    from mini_omni2.training.duplex import SOUND_ALIKE_GROUP, ClipOutcome, summarize
    from mini_omni2.training.duplex_data import (COMMAND_PHONEMES, COMMAND_TEXTS, CONFUSABLE_PHONEMES, NEAR_MISSES,
                                                 is_sound_alike, make_clip, sound_alike, speak)

    alikes = [sound_alike(np.random.default_rng([3, i])) for i in range(500)]
    assert alikes == [sound_alike(np.random.default_rng([3, i])) for i in range(500)]
    assert len(set(alikes)) > 200 and all(is_sound_alike(a) and a.endswith("]]") for a in alikes)
    command = "".join(COMMAND_PHONEMES)
    assert command == "st'0p '0mni" and f"[[{command}]]" not in alikes  # what espeak-ng -x says for "stop omni"
    assert all(COMMAND_PHONEMES[slot] not in options for slot, options in CONFUSABLE_PHONEMES.items())

    def changed(edits: dict) -> str:
        return "[[" + "".join(edits.get(slot, phoneme) for slot, phoneme in enumerate(COMMAND_PHONEMES)) + "]]"

    edits = [(slot, option) for slot, options in CONFUSABLE_PHONEMES.items() for option in options]
    one_or_two = {changed(dict([a])) for a in edits} | {changed(dict([a, b])) for a in edits for b in edits
                                                        if a[0] < b[0]}
    assert set(alikes) <= one_or_two  # one or two slots changed, each to one of its confusable phonemes
    assert {changed(dict([a])) for a in edits} & set(alikes) and set(alikes) - {changed(dict([a])) for a in edits}
    assert not is_sound_alike("stop on me") and len(speak(alikes[0], "en-us+m3")) > 0.3 * 16000
    # near misses only: a fraction of them say a sound-alike (labelled n_irq throughout); positives stay the command
    spoken = [make_clip("train", i, seed=4, sound_alike_fraction=1.0, negative_seconds=(2.0, 3.0),
                        lead_seconds=(0.5, 1.0), tail_seconds=(0.0, 0.5), kinds=("white",)) for i in range(24)]
    near = [c for c in spoken if c["spoken"] and c["command_end"] < 0]
    assert near and all(is_sound_alike(c["spoken"]) for c in near)  # said where the command would be, never labelled
    assert all(c["spoken_start"] >= 0 and c["command_start"] == c["command_end"] == -1 for c in near)
    commands = [c["spoken"] for c in spoken if c["command_end"] >= 0]
    assert commands and set(commands) <= set(COMMAND_TEXTS)
    plain = [make_clip("train", i, seed=4, negative_seconds=(2.0, 3.0), lead_seconds=(0.5, 1.0),
                       tail_seconds=(0.0, 0.5), kinds=("white",)) for i in range(24)]
    assert {c["spoken"] for c in plain if c["spoken"] and c["command_end"] < 0} <= set(NEAR_MISSES)
    # without sound-alikes nothing is drawn: the clips made before the option existed
    assert all(np.array_equal(a["audio"], make_clip("train", i, seed=4, sound_alike_fraction=0.0,
                                                    negative_seconds=(2.0, 3.0), lead_seconds=(0.5, 1.0),
                                                    tail_seconds=(0.0, 0.5), kinds=("white",))["audio"])
               for i, a in enumerate(plain[:4]))
    with pytest.raises(ValueError, match=r"sound_alike_fraction must be in \[0, 1\], got 2"):
        make_clip("train", 0, sound_alike_fraction=2)
    # background talkers may say them among their sentences (a pool of its own); the clip's command stays as it was
    from mini_omni2.training.duplex_data import SOUND_ALIKE_SENTENCE_POOL, WORDS, _pool_utterance

    _, _, sentence = _pool_utterance("train", 2, pool=SOUND_ALIKE_SENTENCE_POOL)
    words = sentence.split(" ")
    assert sum(is_sound_alike(w) for w in words) == 1 and len(words) >= 5  # "[[st'0p" and "'0mni]]" count once
    assert all(w in WORDS["train"] for w in re.sub(r"\[\[.*\]\]", "", sentence).split())
    _assert_only_talkers_change("train", 0, 1, ("babble", "white"), talker_sound_alike_fraction=1.0)
    with pytest.raises(ValueError, match=r"common_word_fraction \+ talker_sound_alike_fraction must be <= 1, got "
                                         r"0.5 \+ 0.2 \+ 0.4"):
        make_clip("train", 0, pseudo_word_fraction=0.5, common_word_fraction=0.2, talker_sound_alike_fraction=0.4)
    # the evaluation counts the sound-alikes apart from the command-free audio, together under one name
    outcomes = [ClipOutcome(a, "white", False, 10, False, True, None, 4.0) for a in alikes[:3]]
    outcomes += [ClipOutcome("stop", "white", False, None, False, False, None, 4.0)]
    summary = summarize(outcomes)
    assert summary["near_miss_interrupted"] == {SOUND_ALIKE_GROUP: 1.0, "stop": 0.0}


def test_distractors_are_short_phrases_of_the_splits_words_said_where_the_command_would_be_and_never_labelled():
    from mini_omni2.training.duplex import DISTRACTOR_GROUP, SOUND_ALIKE_GROUP, ClipOutcome, summarize
    from mini_omni2.training.duplex_data import (COMMAND_TEXTS, DISTRACTOR_WORDS, NEAR_MISSES, WORDS, frame_labels,
                                                 make_clip)

    short = dict(negative_seconds=(2.0, 3.0), lead_seconds=(0.5, 1.0), tail_seconds=(0.0, 0.5), kinds=("white",))
    clips = [make_clip("train", i, seed=5, distractor_fraction=1.0, **short) for i in range(24)]
    plain = [make_clip("train", i, seed=5, **short) for i in range(24)]
    # every clip of background alone says one instead; the commands and the near misses stay as they were
    for clip, before in zip(clips, plain):
        if before["spoken"]:
            assert clip["spoken"] == before["spoken"] and np.array_equal(clip["audio"], before["audio"])
    distractors = [c for c, before in zip(clips, plain) if not before["spoken"]]
    assert distractors and all(c["command_start"] == c["command_end"] == -1 for c in distractors)
    for clip in distractors:
        words = clip["spoken"].split(" ")
        assert DISTRACTOR_WORDS[0] <= len(words) <= DISTRACTOR_WORDS[1] and set(words) <= set(WORDS["train"])
        assert clip["spoken"] not in COMMAND_TEXTS + NEAR_MISSES and 0 <= clip["spoken_start"] < clip["spoken_end"]
        assert clip["snr_db"] >= 5.0  # at the command's level over the background
        assert not frame_labels(40, clip["command_end"], 0.085).any()  # n_irq throughout
    test_clip = next(c for i in range(40) if (c := make_clip("test", i, seed=5, distractor_fraction=1.0, **short))
                     ["spoken"] and c["spoken"] not in NEAR_MISSES + COMMAND_TEXTS)
    assert set(test_clip["spoken"].split(" ")) <= set(WORDS["test"])  # each split's own words
    # deterministic, and a share of them: about half at 0.5
    assert all(np.array_equal(a["audio"], make_clip("train", i, seed=5, distractor_fraction=1.0, **short)["audio"])
               for i, a in enumerate(clips[:4]))
    half = [make_clip("train", i, seed=5, distractor_fraction=0.5, **short)["spoken"] for i in range(80)]
    said = sum(bool(s) and s not in NEAR_MISSES + COMMAND_TEXTS for s in half)
    assert 0 < said < sum(not s or s not in NEAR_MISSES + COMMAND_TEXTS for s in half)
    with pytest.raises(ValueError, match=r"distractor_fraction must be in \[0, 1\], got -0.5"):
        make_clip("train", 0, distractor_fraction=-0.5)
    # the evaluation counts them apart from the command-free audio, together under one name
    outcomes = [ClipOutcome(c["spoken"], "white", False, None, False, False, None, 4.0) for c in distractors[:2]]
    outcomes += [ClipOutcome(distractors[2]["spoken"], "white", False, 10, False, True, None, 4.0),
                 ClipOutcome("[[st'0p 'Vmni]]", "white", False, 10, False, True, None, 4.0),
                 ClipOutcome("omni", "white", False, None, False, False, None, 4.0)]
    summary = summarize(outcomes)
    assert summary["near_miss_interrupted"] == {DISTRACTOR_GROUP: pytest.approx(1 / 3), SOUND_ALIKE_GROUP: 1.0,
                                                "omni": 0.0}
    assert summary["false_interrupts"] == 0 and summary["false_per_10min_all"] == pytest.approx(2 * 600 / 20)  # 2 in 20 s


def test_clips_build_a_dataset_and_map_to_listening_rows(features_model, processor_no_vision):
    import datasets

    from mini_omni2.training.duplex_data import DuplexPreprocessor, duplex_generator

    short = dict(SHORT_CLIP, kinds=("white",))
    clips = datasets.Dataset.from_generator(
        duplex_generator, gen_kwargs={"split": "test", "num_examples": 3, "seed": 1, **short}, keep_in_memory=True
    )
    assert len(clips) == 3 and clips[0]["id"] == "test-1-000000"
    front_end = features_model.listen_front_end()
    listen = clips.map(DuplexPreprocessor(front_end), batched=True, remove_columns=["audio"]).with_format("numpy")
    row = listen[0]
    assert row["listen_features"].shape == (len(row["frame_labels"]), features_model.config.listen_feature_dim)
    batch = MiniOmni2DataCollator(processor_no_vision)([listen[i] for i in range(3)])
    assert batch["listen_feature_mask"].sum() == sum(len(listen[i]["frame_labels"]) for i in range(3))


# ----- a small model learns it (trained here: nothing pre-trained is shipped) ----------------------------------------
@pytest.mark.parametrize("adapter", ["mlp", "gru"])
def test_a_small_trained_model_detects_the_command_on_held_out_clips(adapter, tmp_path):
    """~15 s: a tiny model trains for 150 steps on 160 easy clips (noise and tones, 10-20 dB, no near misses), then
    runs held-out clips (unheard voices; pink noise and chords, never heard) step by step: the command is detected in
    each, and pink noise alone does not interrupt. With either listening adapter (the GRU carries its state from step
    to step). The full proof is benchmarks/bench_duplex.py."""
    from mini_omni2 import MiniOmni2ForConditionalGeneration
    from mini_omni2.tiny import tiny_processor
    from mini_omni2.training.duplex import (
        duplex_tiny_config,
        evaluate_listener,
        listener_probabilities,
        prepare_listen_examples,
        train_listener,
    )
    from mini_omni2.training.duplex_data import make_clip

    torch.manual_seed(0)
    model = MiniOmni2ForConditionalGeneration(duplex_tiny_config(adapter_intermediate_size=128, listen_adapter=adapter))
    front_end = model.listen_front_end()
    easy = dict(positive_fraction=0.5, near_miss_fraction=0.0, lead_seconds=(0.5, 2.0), tail_seconds=(0.5, 1.5),
                negative_seconds=(2.0, 3.5), snr_db=(10.0, 20.0))
    keep = ("command_start", "command_end", "spoken", "kind")
    train = [make_clip("train", i, seed=1, kinds=("white", "brown", "tones"), **easy) for i in range(160)]
    held_out = [  # 3 commands over pink noise or chords, then 2 clips of pink noise alone
        make_clip("test", i, seed=1, kinds=kinds, **{**easy, "tail_seconds": (2.0, 2.5), "positive_fraction": fraction})
        for i, kinds, fraction in [(0, ("pink", "chords"), 1.0), (1, ("pink", "chords"), 1.0),
                                   (2, ("pink", "chords"), 1.0), (3, ("pink",), 0.0), (4, ("pink",), 0.0)]
    ]
    assert [c["command_end"] >= 0 for c in held_out] == [True] * 3 + [False] * 2
    train_listener(model, tiny_processor(vision=False), prepare_listen_examples(train, front_end), str(tmp_path),
                   max_steps=150, batch_size=16, learning_rate=3e-3, warmup_steps=10, logging_steps=1000)
    test = prepare_listen_examples(held_out, front_end, keep)
    probabilities = listener_probabilities(model, test)
    result = evaluate_listener(model, test, probabilities=probabilities)
    assert result["positives"] == 3 and result["detection"] == 1.0, probabilities
    assert result["false_interrupts"] == 0, probabilities
    assert result["median_delay_ms"] < 500


def _bench_duplex():
    from test_training import load_script  # the scripts' loader

    return load_script("benchmarks", "bench_duplex")


def _train_duplex_script():
    from test_training import load_example

    return load_example("train_duplex")


def test_the_cost_benchmark_runs_at_tiny_sizes(features_model, codec_model, gru_model):
    """The code path of ``bench_duplex.py --cost``: one spoken answer on the engine, with and without its listening
    row (timed for real at the released sizes, not here); ``--listen-adapter`` picks the features' adapter."""
    bench = _bench_duplex()
    for model in (features_model, codec_model, gru_model):
        row = bench.listen_cost(model, context=8, steps=2, warmup=1, lag_seconds=0.3)
        assert row["listen_input"] == model.config.listen_input
        assert row["listen_adapter"] == (None if model is codec_model else model.config.listen_adapter)
        assert row["steps_per_s_without"] > 0 and row["steps_per_s_with_listening_row"] > 0
        assert row["frames_heard_per_s_catching_up"] == row["steps_per_s_catching_up"] * row["catch_up_frames"] > 0
        assert list(row["lag_by_catch_up_frames"]) == ["1", "4"]
        lags = row["lag_by_catch_up_frames"].values()
        assert all(lag["lag_s"] >= 0 and lag["answer_steps_per_s"] > 0 for lag in lags)
        assert row["front_end_ms_per_frame"] > 0 and abs(row["realtime_steps_per_s"] - 24000 / 2048) < 1e-9
    args = bench.build_parser().parse_args(["--cost", "--cost-size", "tiny", "--listen-adapter", "gru",
                                            "--cost-steps", "2", "--cost-context", "8", "--cost-lag-seconds", "0",
                                            "--cpu"])
    rows = bench.cost(args)["results"]
    assert [(r["listen_input"], r["listen_adapter"]) for r in rows] == [("features", "gru"), ("codec", None)]


def test_the_proof_benchmark_refuses_bad_training_options_before_making_clips(capsys):
    bench = _bench_duplex()
    for argv, message in [(["--train-kinds", "white,rain"], "--train-kinds: kinds must be background kinds of"),
                          (["--mixture-fraction", "1.5"], "--mixture-fraction: mixture_fraction must be in [0, 1], got 1.5"),
                          (["--tail-seconds", "-1"], "--tail-seconds: tail seconds must be > 0, or 0 for the whole tail"),
                          (["--weight-averaging", "1"], "--weight-averaging: decay must be in [0, 1), got 1.0"),
                          (["--distillation-weight", "2"],
                           "--distillation-weight: the distillation weight must be in [0, 1], got 2"),
                          (["--teachers", "-1"], "--teachers: must be >= 0, got -1"),
                          (["--listen-adapter", "lstm"], "--listen-adapter: invalid choice: 'lstm'"),
                          (["--gru-size", "0"], "--gru-size: must be >= 1, got 0"),
                          (["--positive-fraction", "1.2"], "--positive-fraction: must be a fraction in [0, 1], got 1.2"),
                          (["--pseudo-word-fraction", "-1"],
                           "--pseudo-word-fraction: must be a fraction in [0, 1], got -1"),
                          (["--common-word-fraction", "1.1"],
                           "--common-word-fraction: must be a fraction in [0, 1], got 1.1"),
                          (["--sound-alike-fraction", "1.5"],
                           "--sound-alike-fraction: must be a fraction in [0, 1], got 1.5"),
                          (["--distractor-fraction", "-0.2"],
                           "--distractor-fraction: must be a fraction in [0, 1], got -0.2"),
                          (["--hard-example-steps", "-5"], "--hard-example-steps: must be >= 0, got -5"),
                          (["--hard-example-repeat", "0"], "--hard-example-repeat: must be >= 1, got 0"),
                          (["--common-word-fraction", "0.5", "--talker-sound-alike-fraction", "0.6"],
                           "common_word_fraction + talker_sound_alike_fraction must be <= 1, got 0.5 + 0.6"),
                          (["--pseudo-word-fraction", "0.5", "--common-word-fraction", "0.7"],
                           "pseudo_word_fraction + common_word_fraction must be <= 1, got 0.5 + 0.7"),
                          (["--positive-fraction", "0.8", "--near-miss-fraction", "0.3"],
                           "positive_fraction and near_miss_fraction must be >= 0 and sum to <= 1, got 0.8 and 0.3")]:
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert message in capsys.readouterr().err
    for adapter in ("conv", "gru"):
        model = bench.new_model(bench.build_parser().parse_args(["--listen-adapter", adapter]), seed=0)
        assert model.config.listen_adapter == adapter and model.config.text_config.hidden_size == 128
    model = bench.new_model(bench.build_parser().parse_args(["--gru-size", "32"]), seed=0)
    assert model.config.listen_gru_size == 32 and model.model.listen_projector.gru.hidden_size == 32
    # --seed draws the clips and by default the training; --train-seed another training on the same clips
    parse = bench.build_parser().parse_args
    assert bench.training_seed(parse(["--seed", "3"])) == 3
    assert bench.training_seed(parse(["--seed", "3", "--train-seed", "1003"])) == 1003


def test_the_recipe_trains_on_batches_of_32_clips_by_default():
    """The recipe's batch (docs/duplex.md, Training) is the default of train_listener, the benchmark and the script."""
    import inspect

    from mini_omni2.training.duplex import LISTEN_BATCH_SIZE, train_listener

    assert LISTEN_BATCH_SIZE == 32
    assert inspect.signature(train_listener).parameters["batch_size"].default == LISTEN_BATCH_SIZE
    assert _bench_duplex().build_parser().parse_args([]).batch_size == LISTEN_BATCH_SIZE
    script = _train_duplex_script()
    assert script.build_parser().parse_args(["--output-dir", "x"]).per_device_train_batch_size == LISTEN_BATCH_SIZE


def test_the_proof_benchmark_distils_its_teachers_and_reads_them_back(tmp_path, capsys):
    """``bench_duplex.py --teachers K --teacher-dir DIR``: K models of the recipe from their own seeds, each scored and
    saved, their average scored, then the scored model trained from another seed against them; a second run reads
    the saved teachers back (the same teachers: the same scores)."""
    bench = _bench_duplex()
    argv = ["--train-clips", "8", "--val-clips", "8", "--test-clips", "8", "--steps", "2", "--batch-size", "4",
            "--hidden", "32", "--layers", "1", "--adapter", "32", "--teachers", "2", "--seed", "1",
            "--teacher-dir", str(tmp_path / "teachers"), "--output-dir", str(tmp_path / "out")]
    first = bench.main(argv)["proof"]
    assert [t["seed"] for t in first["teachers"]] == [1000, 1001] and bench.student_seed(1) == 1100
    assert sorted(p.name for p in (tmp_path / "teachers").iterdir()) == ["teacher-0", "teacher-1"]
    assert {"metrics", "argmax_rule_metrics", "sweep"} <= set(first["teachers_average"]) <= set(first)
    assert "average of the 2 teachers" in capsys.readouterr().out
    second = bench.main(argv)["proof"]
    assert [t["metrics"] for t in second["teachers"]] == [t["metrics"] for t in first["teachers"]]
    assert second["settings"]["teachers"] == 2 and second["goals_met"].keys() == first["goals_met"].keys()


def test_the_proof_benchmark_runs_the_hard_example_round_when_asked(tmp_path, capsys, monkeypatch):
    import mini_omni2.training.duplex as duplex

    bench = _bench_duplex()
    rounds = []
    real = duplex.train_on_hard_examples

    def spy(model, processor, train, output_dir, steps, clips, repeat, **kwargs):
        rounds.append((len(train), steps, clips, repeat, kwargs["seed"]))
        return real(model, processor, train, output_dir, steps, clips, repeat, **kwargs)

    monkeypatch.setattr(duplex, "train_on_hard_examples", spy)
    argv = ["--train-clips", "8", "--val-clips", "8", "--test-clips", "8", "--steps", "2", "--batch-size", "4",
            "--hidden", "32", "--layers", "1", "--adapter", "32", "--seed", "2", "--output-dir", str(tmp_path)]
    bench.main(argv)
    assert rounds == []  # none by default: the recipe
    result = bench.main(argv + ["--hard-example-steps", "2", "--hard-example-clips", "5", "--hard-example-repeat", "3"])
    assert rounds == [(8, 2, 5, 3, 2)] and result["proof"]["settings"]["hard_example_steps"] == 2
    out = capsys.readouterr().out
    assert out.count("hard-example round: ") == 1 and "of the first 5 training clips, 2 steps" in out


def test_the_proof_benchmark_cache_gives_the_examples_made_anew(features_model, tmp_path):
    """``bench_duplex.py --cache``: a second run reads the first run's examples, equal to examples made anew; other
    clip options or front-end settings are other files, never the stale ones."""
    bench = _bench_duplex()
    front_end = features_model.listen_front_end()
    key = {"listen_feature_config": features_model.config.listen_feature_config}
    first = bench.make_examples("train", 2, front_end, 0, start=7, half=True, cache=str(tmp_path), cache_key=key)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pkl"
    second = bench.make_examples("train", 2, front_end, 0, start=7, half=True, cache=str(tmp_path), cache_key=key)
    fresh = bench.make_examples("train", 2, front_end, 0, start=7, half=True)
    assert sorted(tmp_path.iterdir()) == files
    for cached, again, made in zip(first, second, fresh):
        assert cached.keys() == made.keys()
        for name in made:
            assert np.array_equal(np.asarray(cached[name]), np.asarray(made[name]))
            assert np.array_equal(np.asarray(again[name]), np.asarray(made[name]))
    bench.make_examples("train", 2, front_end, 0, start=7, half=True, cache=str(tmp_path), cache_key=key,
                        kinds=("white",))
    other_front_end = {"listen_feature_config": {**key["listen_feature_config"], "num_mel_bins": 32}}
    bench.make_examples("train", 2, front_end, 0, start=7, half=True, cache=str(tmp_path), cache_key=other_front_end)
    assert len(list(tmp_path.iterdir())) == 3


REMOTE_LISTENER = '''
import sys, json
class BlockMiniOmni2:
    def find_spec(self, name, path=None, target=None):
        if name == "mini_omni2" or name.startswith("mini_omni2."):
            raise ImportError("mini_omni2 is not installed here")
sys.meta_path.insert(0, BlockMiniOmni2())
import numpy as np, torch
from transformers import AutoModelForMultimodalLM
model = AutoModelForMultimodalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
front_end = model.listen_front_end()
t = np.arange(16000) / 16000
frames = front_end.frames((0.1 * np.sin(2 * np.pi * 440 * t)).astype("float32"), 16000)
listener = sys.modules[type(front_end).__module__].MiniOmni2Listener(model)
print(json.dumps({"module": type(front_end).__module__, "p": listener.run(frames[None]).tolist()}))
'''


def test_the_listening_row_runs_from_remote_code(features_model, tmp_path):
    import json
    import subprocess
    import sys

    features_model.save_pretrained(tmp_path / "model")
    script = tmp_path / "listen.py"
    script.write_text(REMOTE_LISTENER)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model")], cwd=tmp_path, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules")
    t = np.arange(16000) / 16000
    frames = features_model.listen_front_end().frames((0.1 * np.sin(2 * np.pi * 440 * t)).astype("float32"), 16000)
    expected = MiniOmni2Listener(features_model).run(frames[None])
    assert torch.allclose(torch.tensor(report["p"]), expected, atol=1e-5)


def test_band_masking_zeroes_whole_mel_bands_of_listening_rows_only(features_model, processor_no_vision):
    from mini_omni2.training.collator import MiniOmni2DataCollator
    from mini_omni2.training.duplex import FeatureBandMasking

    dim = features_model.config.listen_feature_dim
    bins = features_model.config.listen_feature_config["num_mel_bins"]
    rng = np.random.default_rng(0)
    examples = [{"task": "LISTEN", "listen_features": rng.standard_normal((5, dim)).astype(np.float32) + 3,
                 "frame_labels": [0, 0, 0, 1, 1]} for _ in range(2)]
    plain = MiniOmni2DataCollator(processor_no_vision)(examples)
    masked = FeatureBandMasking(MiniOmni2DataCollator(processor_no_vision), bins, bands=2, max_width=4, seed=1)(examples)
    for row in range(2):
        positions = plain["listen_feature_mask"][row]
        before = plain["listen_features"][row, positions].view(5, -1, bins)
        after = masked["listen_features"][row, positions].view(5, -1, bins)
        zeroed = (after == 0).all(dim=0).all(dim=0)  # bins zero in every column of every frame
        assert 1 <= int(zeroed.sum()) <= 8
        assert torch.equal(after[:, :, ~zeroed], before[:, :, ~zeroed])
    assert torch.equal(masked["labels"], plain["labels"]) and torch.equal(masked["input_ids"], plain["input_ids"])
    with pytest.raises(ValueError, match="max_width"):
        FeatureBandMasking(None, bins, bands=1, max_width=bins + 1)


def test_mel_warping_stretches_the_mel_axis_of_each_listening_row(features_model, processor_no_vision):
    from mini_omni2.training.collator import MiniOmni2DataCollator
    from mini_omni2.training.duplex import FeatureBandMasking, _stretch_mels

    ramp = torch.arange(8.0).repeat(3, 1)
    assert torch.equal(_stretch_mels(ramp, 1.0), ramp)
    assert torch.allclose(_stretch_mels(ramp, 1.25)[0], torch.arange(8.0) * 0.8)  # bin i hears bin i / 1.25
    assert _stretch_mels(ramp, 0.8)[0].tolist() == [0.0, 1.25, 2.5, 3.75, 5.0, 6.25, 7.0, 7.0]  # the top bin repeats
    bins = features_model.config.listen_feature_config["num_mel_bins"]
    dim = features_model.config.listen_feature_dim
    ramp_frames = np.tile(np.arange(bins, dtype=np.float32), (4, dim // bins))
    example = {"task": "LISTEN", "listen_features": ramp_frames, "frame_labels": [0, 0, 1, 1]}
    warped = FeatureBandMasking(MiniOmni2DataCollator(processor_no_vision), bins, bands=0, seed=0, warp=0.2)([example])
    rows = warped["listen_features"][0, warped["listen_feature_mask"][0]].view(4, -1, bins)
    factor = 1 / float(rows[0, 0, 1])  # bin 1 now holds position 1 / factor
    assert 0.8 <= factor <= 1.2 and factor != 1.0
    assert torch.allclose(rows, _stretch_mels(torch.from_numpy(ramp_frames).view(4, -1, bins), factor), atol=1e-5)
    with pytest.raises(ValueError, match="warp must be in"):
        FeatureBandMasking(None, bins, warp=1.0)


def test_example_train_duplex_script_trains_and_saves(tmp_path, monkeypatch):
    import mini_omni2.training.duplex as duplex

    script = _train_duplex_script()
    out = tmp_path / "duplex"
    batches = []
    real = duplex.train_listener

    def spy(*args, **kwargs):  # the step's clips: the batch size times the accumulated batches
        batches.append((kwargs["batch_size"], kwargs["gradient_accumulation_steps"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(duplex, "train_listener", spy)
    summary = script.main(["--output-dir", str(out), "--train-clips", "4", "--max-steps", "2",
                           "--per-device-train-batch-size", "1", "--gradient-accumulation-steps", "2",
                           "--warmup-steps", "0", "--tail-seconds", "1.0", "--val-clips", "8"])
    assert batches == [(1, 2)]
    assert summary["steps"] == 2 and summary["examples"] == 4 and summary["listen_input"] == "features"
    assert (out / "train_summary.json").exists() and (out / "config.json").exists()
    # the rule chosen on the validation clips is the saved model's own, and what it scored there is reported
    from mini_omni2 import MiniOmni2Config
    from mini_omni2.training.duplex import LISTEN_RULE_GRID

    rule = summary["listen_rule"]
    assert (rule["threshold"], rule["min_frames"]) in LISTEN_RULE_GRID
    assert MiniOmni2Config.from_pretrained(out).listen_rule == rule
    assert {"detection", "false_per_10min"} <= set(summary["validation"])
    for bad in (["--val-clips", "-1"], ["--gradient-accumulation-steps", "0"]):
        with pytest.raises(SystemExit):
            script.build_parser().parse_args(["--output-dir", "x", *bad])
    args = script.build_parser().parse_args(["--output-dir", "x", "--tail-seconds", "0",
                                             "--train-kinds", "hum,speech", "--mixture-fraction", "0.5",
                                             "--positive-fraction", "0.7", "--near-miss-fraction", "0.1",
                                             "--pseudo-word-fraction", "0.5", "--common-word-fraction", "0.25",
                                             "--sound-alike-fraction", "0.4", "--talker-sound-alike-fraction", "0.2",
                                             "--distractor-fraction", "0.3", "--foreign-accents"])
    from mini_omni2.training.duplex import clip_kwargs, listen_training_kwargs

    assert listen_training_kwargs(args) == {"tail_seconds": None, "weight_averaging": 0.999, "distillation_weight": 0.5}
    assert clip_kwargs(args) == {"kinds": ("hum", "speech"), "mixture_fraction": 0.5, "positive_fraction": 0.7,
                                 "near_miss_fraction": 0.1, "pseudo_word_fraction": 0.5, "common_word_fraction": 0.25,
                                 "sound_alike_fraction": 0.4, "talker_sound_alike_fraction": 0.2,
                                 "distractor_fraction": 0.3, "foreign_accents": True}
    for bad in (["--positive-fraction", "1.5"], ["--near-miss-fraction", "-0.1"], ["--pseudo-word-fraction", "2"],
                # a share outside [0, 1], or the sum of positives and near misses (or of the talkers' shares)
                ["--positive-fraction", "0.8", "--near-miss-fraction", "0.3"],  # over 1
                ["--pseudo-word-fraction", "0.8", "--common-word-fraction", "0.3"],
                ["--pseudo-word-fraction", "0.8", "--talker-sound-alike-fraction", "0.3"]):
        with pytest.raises(SystemExit):
            script.main(["--output-dir", str(tmp_path / "refused"), *bad])
    assert not (tmp_path / "refused").exists()
    summary = script.main(["--output-dir", str(tmp_path / "kinds"), "--train-clips", "4", "--max-steps", "1",
                           "--per-device-train-batch-size", "4", "--warmup-steps", "0",
                           "--train-kinds", "hum,white", "--mixture-fraction", "1", "--val-clips", "0",
                           "--teacher", str(out), "--distillation-weight", "0.7",  # distilled from the first model
                           "--listen-adapter", "conv"])  # into another adapter
    assert summary["steps"] == 1 and summary["examples"] == 4 and summary["listen_rule"] is None  # kept the model's
    assert summary["teachers"] == [str(out)]
    assert MiniOmni2Config.from_pretrained(tmp_path / "kinds").listen_adapter == "conv"
    assert MiniOmni2Config.from_pretrained(out).listen_adapter == "gru"  # the recipe's, by default


class _Line(torch.nn.Module):
    """A least-squares line for Trainer: one trained and one frozen parameter."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))
        self.frozen = torch.nn.Parameter(torch.full((3,), 7.0), requires_grad=False)

    def forward(self, x, labels):
        return {"loss": ((x * self.weight).sum(-1) - labels).pow(2).mean()}


def test_weight_averaging_leaves_the_moving_average_of_the_trained_weights_in_the_model(tmp_path):
    """After optimizer step n: average <- d * average + (1 - d) * weights, d = min(decay, (1 + n) / (10 + n)); the
    model ends with the average; frozen parameters are left alone."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from mini_omni2.training import WeightAveragingCallback

    class Record(TrainerCallback):
        def __init__(self):
            self.weights = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.weights.append(model.weight.detach().clone())

    generator = torch.Generator().manual_seed(0)
    data = [{"x": x, "labels": float(x @ torch.tensor([1.0, -2.0, 3.0]))} for x in torch.randn(40, 3, generator=generator)]
    record, decay = Record(), 0.8
    args = TrainingArguments(str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=0.05,
                             lr_scheduler_type="constant", save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=0)
    model = _Line()
    Trainer(model=model, args=args, train_dataset=data, callbacks=[record, WeightAveragingCallback(decay)]).train()

    expected = torch.zeros(3)
    for n, weights in enumerate(record.weights, start=1):
        keep = min(decay, (1 + n) / (10 + n))
        expected = keep * expected + (1 - keep) * weights
    assert len(record.weights) == 12
    assert not torch.allclose(record.weights[-1], expected, atol=1e-3)  # the average is not the last weights
    assert torch.allclose(model.weight.detach(), expected, atol=1e-6)
    assert torch.equal(model.frozen, torch.full((3,), 7.0))


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan")])
def test_weight_averaging_refuses_a_decay_outside_0_to_1(decay):
    from mini_omni2.training import WeightAveragingCallback

    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        WeightAveragingCallback(decay)
