"""Training: collator layout, Trainer round trips (full and LoRA) back through decoding, stages, checkpointing."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import datasets
import numpy as np
import pytest
import torch
from transformers import Trainer, WhisperFeatureExtractor

from mini_omni2 import MiniOmni2ForConditionalGeneration, MiniOmni2Processor
from mini_omni2.training.data import MiniOmni2Preprocessor
from mini_omni2.tiny import tiny_config, tiny_model, tiny_tokenizer
from mini_omni2.token_layout import OUTPUT_SPEECH, TASKS
from mini_omni2.training import (
    IGNORE_INDEX,
    LORA_TARGET_MODULES,
    MiniOmni2DataCollator,
    apply_lora,
    build_training_row,
    configure_stage,
    load_lora,
    parameter_counts,
    training_arguments,
)

from conftest import color_image, sine


REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES_DIR = os.path.join(REPO_DIR, "examples")

# A smaller Whisper than tiny_config's: 1 s windows (100 log-mel frames, 50 encoder frames) keep training fast.
SMALL_AUDIO = dict(
    d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, decoder_layers=1,
    decoder_attention_heads=2, decoder_ffn_dim=32, num_mel_bins=80, max_source_positions=50, vocab_size=51865,
)


def small_config(vision: bool = False):
    return tiny_config(vision=vision, codec=False, audio_config=SMALL_AUDIO)


def small_model(seed: int = 0, vision: bool = False) -> MiniOmni2ForConditionalGeneration:
    torch.manual_seed(seed)
    return MiniOmni2ForConditionalGeneration(small_config(vision)).eval()


@pytest.fixture(scope="module")
def small_processor():
    return MiniOmni2Processor.from_config(
        small_config(vision=True), tokenizer=tiny_tokenizer(),
        feature_extractor=WhisperFeatureExtractor(feature_size=80, chunk_length=1),
    )


def codes(frames: int, seed: int, codebook: int = 64) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, codebook, size=(frames, 7)).tolist()


def noise(seconds: float, seed: int) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


def audio(wave: np.ndarray) -> dict:
    return {"array": wave, "sampling_rate": 16000}


def round_trip_examples() -> list[dict]:
    """Short answers (2-4 frames, 1-3 text tokens) of every output kind; distinct inputs."""
    examples = [
        {"task": "T1A2", "text": "hello world", "answer_text": "my name", "answer_codes": codes(3, 1)},
        {"task": "T1A2", "text": "the quick fox", "answer_text": "blue", "answer_codes": codes(4, 2)},
        {"task": "A1A2", "audio": audio(sine(0.25, freq=900.0)), "answer_text": "red dog", "answer_codes": codes(2, 3)},
        {"task": "A1T2", "audio": audio(sine(0.3, freq=300.0)), "answer_text": "fine thank you"},
        {"task": "A1T1", "audio": audio(noise(0.4, 0)), "answer_text": "one two"},
        {"task": "T1T2", "text": "what is your name", "answer_text": "omni"},
    ]
    keys = sorted({k for e in examples for k in e})
    return [{k: e.get(k) for k in keys} for e in examples]


def fit(model, processor, examples, max_steps: int, learning_rate: float, output_dir, twins: bool = True,
        batch_size: int | None = None, **kwargs):
    """Train with transformers' Trainer (by default on all examples in every step); return the trainer.

    The examples go through the datasets preprocessing first (Whisper features computed once, ahead of time).
    """
    raw = datasets.Dataset.from_list(examples)
    prep = MiniOmni2Preprocessor(processor)
    train_set = raw.map(prep, batched=True, remove_columns=prep.removable_columns(raw.column_names))
    kwargs.setdefault("lr_scheduler_type", "constant")
    args = training_arguments(
        3, str(output_dir), learning_rate=learning_rate, warmup_steps=0, max_steps=max_steps,
        per_device_train_batch_size=batch_size or len(examples), logging_steps=max_steps, save_strategy="no",
        disable_tqdm=True, use_cpu=True, seed=0, **kwargs,
    )
    model.train()
    trainer = Trainer(model=model, args=args, train_dataset=train_set,
                      data_collator=MiniOmni2DataCollator(processor, batch_parallel_twins=twins))
    trainer.train()
    model.eval()
    return trainer


# ----- decoding, to check that what is learned is what decoding reproduces ------------------------------------------
def reference_decode(model, processor, example: dict, batch_parallel: bool, max_steps: int = 40):
    """Greedy delayed parallel decoding written from SPEC §6 (no cache): (text ids, frames or None).

    Each step takes one token per stream from the last position; audio layer i is fed ``layershift(token, i)``; the
    text stream is fed the text token (``pad_t`` once ``eot`` was produced). Speech stops when layer 7 yields ``eoa``
    (that step is not kept); text answers feed ``pad_a`` to the audio streams and stop at ``eot``. With
    ``batch_parallel`` a speech request runs as two rows: the audio tokens from row 0, the text token from row 1
    (the text-out twin), fed to both; row 1's audio streams get ``pad_a``.
    """
    layout = model.layout
    task = example["task"]
    speech = TASKS[task][1] == OUTPUT_SPEECH
    kwargs = {"task": task}
    if example.get("text"):
        kwargs["text"] = example["text"]
    if example.get("audio"):
        kwargs["audio"] = (example["audio"]["array"], example["audio"]["sampling_rate"])
    batch = processor(**kwargs, batch_parallel=batch_parallel)
    ids, mask, audio_mask = batch["input_ids"], batch["attention_mask"], batch["audio_feature_mask"]
    rows = ids.shape[0]
    pad_audio = [layout.layershift(layout.pad_a, i) for i in range(layout.num_audio_layers)]
    text_out, audio_out, text_done = [], [], False
    for _ in range(max_steps):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, audio_feature_mask=audio_mask,
                        input_features=batch.get("input_features"))
        text_logits, audio_logits = layout.split_logits(out.logits[:, -1])
        audio_tokens = audio_logits[0].argmax(-1).tolist()
        text_token = layout.pad_t if text_done else int(text_logits[rows - 1].argmax(-1))
        if speech and audio_tokens[-1] == layout.eoa:
            break
        text_done = text_done or text_token == layout.eot
        if not speech and text_done:
            break
        text_out.append(text_token)
        audio_out.append(audio_tokens)
        new = torch.empty(rows, layout.num_streams, 1, dtype=torch.long)
        for r in range(rows):
            fed = [layout.layershift(t, i) for i, t in enumerate(audio_tokens)] if speech and r == 0 else pad_audio
            new[r, :, 0] = torch.tensor(fed + [text_token])
        ids = torch.cat([ids, new], dim=2)
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype)], dim=1)
        audio_mask = torch.cat([audio_mask, torch.zeros(rows, 1, dtype=audio_mask.dtype)], dim=1)
    else:
        raise AssertionError(f"{task}: no end within {max_steps} steps")
    text = [t for t in text_out if t < layout.tokenizer_vocab_size]
    frames = layout.undelay(torch.tensor(audio_out).T) if speech else None
    return text, frames


def generate_answer(model, processor, example: dict, batch_parallel: bool):
    """The package's generate (issue 3), greedy: (text ids, frames or None)."""
    kwargs = {"task": example["task"]}
    if example.get("text"):
        kwargs["text"] = example["text"]
    if example.get("audio"):
        kwargs["audio"] = (example["audio"]["array"], example["audio"]["sampling_rate"])
    inputs = processor(**kwargs)  # one row per request: generate builds the batch parallel twin itself
    inputs.pop("request_index")
    out = model.generate(**inputs, batch_parallel=batch_parallel, do_sample=False, max_new_tokens=40,
                         decode_audio=False)
    frames = out.audio_frames[0]
    return out.text_ids[0].tolist(), frames


def expected_answer(processor, example: dict):
    text = processor.tokenizer.encode(example["answer_text"], add_special_tokens=False)
    frames = torch.tensor(example["answer_codes"]) if example.get("answer_codes") else None
    return text, frames


def assert_teacher_forced_argmax_is_the_labels(model, batch) -> None:
    """At every learned position the argmax of the stream's own logit slice is the label (SPEC §2 slices)."""
    layout = model.layout
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1]
    labels = batch["labels"][:, :, 1:]
    for stream, (offset, size) in enumerate(zip(layout.stream_offsets().tolist(), layout.stream_vocab_sizes())):
        learned = labels[:, stream] != IGNORE_INDEX
        predicted = logits[..., offset : offset + size].argmax(-1) + offset
        assert torch.equal(predicted[learned], labels[:, stream][learned]), f"stream {stream}"


# ----- the collator -----------------------------------------------------------------------------------------------
def test_training_row_is_prompt_plus_delayed_answer(small_processor):
    layout = small_processor.layout
    prompt_ids = [5, 6, 7]
    frames = torch.tensor(codes(3, 0))
    row = build_training_row(layout, "T1A2", [11, 12], frames, prompt_text_ids=prompt_ids)
    prompt = layout.build_prompt("T1A2", text_ids=prompt_ids)
    answer, learned = layout.delay_answer([11, 12], frames)
    assert row.input_ids == [p + a for p, a in zip(prompt.streams, answer)]
    assert row.prompt_length == len(prompt) and len(row) == len(prompt) + len(answer[0])
    for stream in range(8):
        assert row.labels[stream][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert row.labels[stream][len(prompt):] == answer[stream]  # a speech answer is learned everywhere
    # audio layer i: i+1 pads, the codes, eoa, pads; text: tokens, eot, pad_t
    for i in range(7):
        local = [t - layout.audio_offset(i) for t in row.labels[i][len(prompt):]]
        assert local[: i + 1] == [layout.pad_a] * (i + 1)
        assert local[i + 1 : i + 4] == frames[:, i].tolist() and local[i + 4] == layout.eoa
        assert set(local[i + 5 :]) <= {layout.pad_a}
    assert row.labels[7][len(prompt):][:3] == [11, 12, layout.eot]
    assert row.labels[6][-1] == layout.layershift(layout.eoa, 6)  # generation stops on this last position

    text_row = build_training_row(layout, "A1T1", [11, 12], None, num_audio_frames=4)
    asr_prompt = layout.build_prompt("A1T1", num_audio_frames=4)
    assert text_row.audio_positions == asr_prompt.audio_positions
    assert text_row.labels[7][len(asr_prompt):] == [11, 12, layout.eot]
    for i in range(7):  # audio streams of a text answer: fed pad_a by generation, never learned
        assert text_row.labels[i] == [IGNORE_INDEX] * len(text_row)
        assert text_row.input_ids[i][len(asr_prompt):] == [layout.layershift(layout.pad_a, i)] * 3
    with pytest.raises(ValueError, match="speech answer"):
        build_training_row(layout, "T1A2", [11], None, prompt_text_ids=[1])
    with pytest.raises(ValueError, match="tokenizer ids"):
        build_training_row(layout, "T1T2", [layout.eot], None, prompt_text_ids=[1])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collator_batch(small_processor, padding_side):
    processor = small_processor
    layout = processor.layout
    examples = round_trip_examples() + [
        {"task": "VA1T2", "image": color_image(), "audio": audio(sine(0.2)), "answer_text": "red"}
    ]
    batch = MiniOmni2DataCollator(processor, padding_side=padding_side, pad_to_multiple_of=8)(examples)
    n = len(examples)
    assert batch["input_ids"].shape[:2] == (n, 8) and batch["input_ids"].shape[2] % 8 == 0
    assert batch["labels"].shape == batch["input_ids"].shape
    seq = batch["input_ids"].shape[2]
    pads = layout.pad_ids()
    audio_rows = [k for k, e in enumerate(examples) if e.get("audio")]
    assert batch["input_features"].shape == (len(audio_rows), 80, 100)
    assert batch["pixel_values"].shape == (1, 3, 224, 224)
    assert batch["image_feature_mask"].sum().item() == layout.num_image_tokens
    assert batch["audio_feature_mask"].sum(1)[audio_rows].tolist() == batch["audio_lengths"].tolist()
    for k, example in enumerate(examples):
        real = batch["attention_mask"][k].bool()
        length = int(real.sum())
        # real positions are contiguous at the chosen side
        expected_real = torch.arange(seq) < length if padding_side == "right" else torch.arange(seq) >= seq - length
        assert torch.equal(real, expected_real)
        assert torch.equal(batch["input_ids"][k][:, ~real], pads[:, None].expand(8, seq - length))
        assert (batch["labels"][k][:, ~real] == IGNORE_INDEX).all()
        prepared_row = MiniOmni2DataCollator(processor).rows(example)[0][0]
        assert batch["input_ids"][k][:, real].tolist() == prepared_row.input_ids
        assert batch["labels"][k][:, real].tolist() == prepared_row.labels
    # the model takes the batch, and both paddings give the same loss
    model = small_model(vision=True)
    right = MiniOmni2DataCollator(processor)(examples)
    with torch.no_grad():
        assert torch.allclose(model(**batch).loss, model(**right).loss, atol=1e-4)


def test_collator_adds_batch_parallel_twins(small_processor):
    layout = small_processor.layout
    tokenizer = small_processor.tokenizer
    examples = round_trip_examples()
    batch = MiniOmni2DataCollator(small_processor, batch_parallel_twins=True)(examples)
    row = 0
    features = 0
    for example in examples:
        task = example["task"]
        tasks = [task] + ([layout.text_output_task(task)] if TASKS[task][1] == OUTPUT_SPEECH else [])
        answer = tokenizer.encode(example["answer_text"], add_special_tokens=False)
        for k, row_task in enumerate(tasks):
            prompt = layout.build_prompt(
                row_task,
                text_ids=tokenizer.encode(example["text"], add_special_tokens=False) if example.get("text") else None,
                num_audio_frames=int(batch["audio_lengths"][features]) if example.get("audio") else None,
            )
            ids, labels = batch["input_ids"][row], batch["labels"][row]
            assert ids[:, : len(prompt)].tolist() == prompt.streams, row_task
            # the same text answer in both rows; the twin (k == 1) learns no audio
            assert labels[7, len(prompt) : len(prompt) + len(answer) + 1].tolist() == answer + [layout.eot]
            if k == 1:
                assert (labels[:7] == IGNORE_INDEX).all()
                assert int(batch["attention_mask"][row].sum()) == len(prompt) + len(answer) + 1
            if example.get("audio"):  # features in row order: a twin repeats its example's
                assert batch["audio_feature_mask"][row].nonzero().flatten().tolist() == prompt.audio_positions
                if k == 1:
                    assert torch.equal(batch["input_features"][features], batch["input_features"][features - 1])
                features += 1
            row += 1
    assert row == batch["input_ids"].shape[0] == len(examples) + 3
    assert features == batch["input_features"].shape[0] == 4


# ----- Trainer round trip -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(small_processor, tmp_path_factory):
    model = small_model(seed=0)
    report = configure_stage(model, 3)
    assert report["audio_tower"] == 0
    examples = round_trip_examples()
    fit(model, small_processor, examples, max_steps=150, learning_rate=5e-3, output_dir=tmp_path_factory.mktemp("full"))
    return model, examples


def test_training_reaches_a_near_zero_loss(trained, small_processor):
    model, examples = trained
    batch = MiniOmni2DataCollator(small_processor, batch_parallel_twins=True)(examples)
    with torch.no_grad():
        out = model(**batch)
    assert out.loss.item() < 0.1, out.stream_losses
    assert_teacher_forced_argmax_is_the_labels(model, batch)


def assert_decodes_the_trained_answers(decode, model, processor, examples, batch_parallel: bool) -> None:
    """``decode(model, processor, example, batch_parallel)`` gives back every example's text and frames exactly."""
    for example in examples:
        text, frames = decode(model, processor, example, batch_parallel)
        expected_text, expected_frames = expected_answer(processor, example)
        assert text == expected_text, example["task"]
        if expected_frames is None:
            assert frames is None
        else:
            assert torch.equal(frames.cpu(), expected_frames), example["task"]


@pytest.mark.parametrize("batch_parallel", [True, False])
def test_trained_answers_are_decoded_back(trained, small_processor, batch_parallel):
    model, examples = trained
    assert_decodes_the_trained_answers(reference_decode, model, small_processor, examples, batch_parallel)


@pytest.mark.parametrize("batch_parallel", [True, False])
def test_generate_reproduces_the_trained_answers(trained, small_processor, batch_parallel):
    model, examples = trained
    assert_decodes_the_trained_answers(generate_answer, model, small_processor, examples, batch_parallel)


# ----- LoRA ------------------------------------------------------------------------------------------------------------
def test_lora_targets_only_the_language_model():
    model = tiny_model(seed=0)
    peft_model = apply_lora(model, r=4, lora_alpha=8)
    wrapped = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    layers = model.config.text_config.num_hidden_layers
    assert len(wrapped) == 7 * layers
    assert all(".language_model.layers." in name for name in wrapped)
    assert not any("audio_tower" in n or "vision_tower" in n for n in wrapped)
    import re

    assert re.fullmatch(LORA_TARGET_MODULES, "model.language_model.layers.0.mlp.down_proj")
    assert not re.fullmatch(LORA_TARGET_MODULES, "model.audio_tower.layers.0.self_attn.q_proj")
    assert not re.fullmatch(LORA_TARGET_MODULES, "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".modules_to_save." in n for n in trainable)
    assert any("audio_projector.modules_to_save" in n for n in trainable)
    assert any("vision_projector.modules_to_save" in n for n in trainable)
    counts = parameter_counts(peft_model)
    assert counts["audio_tower"]["trainable"] == counts["vision_tower"]["trainable"] == counts["codec"]["trainable"] == 0
    assert counts["language_model"]["trainable"] > 0 and counts["lm_head"]["trainable"] == 0


@pytest.fixture(scope="module")
def lora_trained(small_processor, tmp_path_factory):
    base = small_model(seed=0)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    # a random frozen head cannot reach a near-zero loss (its logits are too small), so the tiny test trains it
    peft_model = apply_lora(base, r=16, lora_alpha=32, lora_dropout=0.0, modules_to_save=["lm_head"])
    examples = round_trip_examples()
    out_dir = tmp_path_factory.mktemp("lora")
    trainer = fit(peft_model, small_processor, examples, max_steps=150, learning_rate=5e-3, output_dir=out_dir)
    trainer.save_model(str(out_dir / "adapter"))
    return peft_model, original, examples, out_dir / "adapter"


def test_lora_round_trip_save_load_merge(lora_trained, small_processor):
    peft_model, original, examples, adapter_dir = lora_trained
    assert (adapter_dir / "adapter_config.json").exists()
    # the base weights under the adapter did not move
    base_state = {
        k.replace(".base_layer", "").replace(".original_module", ""): v
        for k, v in peft_model.get_base_model().state_dict().items()
        if "lora_" not in k and ".modules_to_save." not in k
    }
    assert base_state.keys() == original.keys()
    for name, value in original.items():
        assert torch.equal(base_state[name], value), name

    loaded = load_lora(small_model(seed=0), str(adapter_dir)).eval()
    batch = MiniOmni2DataCollator(small_processor, batch_parallel_twins=True)(examples)
    with torch.no_grad():
        trained_logits = peft_model(**batch).logits
        loaded_out = loaded(**batch)
    assert torch.allclose(loaded_out.logits, trained_logits, atol=1e-5)
    assert loaded_out.loss.item() < 0.1, loaded_out.stream_losses
    assert_teacher_forced_argmax_is_the_labels(loaded, batch)
    for decode in (reference_decode, generate_answer):
        assert_decodes_the_trained_answers(decode, loaded, small_processor, examples, batch_parallel=True)

    merged = loaded.merge_and_unload()
    assert isinstance(merged, MiniOmni2ForConditionalGeneration)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, trained_logits, atol=1e-4)


# ----- stages, freezing, checkpointing ----------------------------------------------------------------------------------
def test_configure_stage_reports_trainable_parts():
    model = tiny_model(seed=0)  # with vision and the codec
    totals = {part: c["total"] for part, c in parameter_counts(model).items()}
    expected = {
        1: {"audio_projector", "vision_projector"},
        2: {"language_model", "lm_head"},
        3: {"language_model", "lm_head", "audio_projector", "vision_projector"},
    }
    for stage, parts in expected.items():
        report = configure_stage(model, stage)
        for part in totals:
            assert report[part] == (totals[part] if part in parts else 0), (stage, part)
        assert report["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert report["total"] == sum(p.numel() for p in model.parameters())
    report = configure_stage(model, 1, train_encoders=True)
    assert report["audio_tower"] == totals["audio_tower"] and report["vision_tower"] == totals["vision_tower"]
    assert report["codec"] == 0 and report["language_model"] == 0
    with pytest.raises(ValueError):
        configure_stage(model, 4)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_frozen_weights_stay_bit_identical(small_processor, tmp_path, stage):
    model = small_model(seed=1, vision=True)
    report = configure_stage(model, stage)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    examples = round_trip_examples()[:4] + [
        {"task": "VA1T2", "image": color_image((0, 200, 0)), "audio": audio(sine(0.2)), "answer_text": "green"}
    ]
    keys = sorted({k for e in examples for k in e})
    examples = [{k: e.get(k) for k in keys} for e in examples]
    fit(model, small_processor, examples, max_steps=2, learning_rate=1e-3, output_dir=tmp_path)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    assert changed, "nothing was trained"
    for part, count in report.items():
        if part in ("trainable", "total") or count == 0:
            continue
        assert any(k.split(".")[0 if part == "lm_head" else 1] == part for k in changed), part


def test_activation_checkpointing_gives_the_same_loss_and_gradients(small_processor):
    model = small_model(seed=2)
    configure_stage(model, 3)
    batch = MiniOmni2DataCollator(small_processor, batch_parallel_twins=True)(round_trip_examples())
    model.train()

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    # a pre-hook: the recomputation stops early (non-reentrant checkpointing) so forward hooks may not fire again
    hook = model.model.language_model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    plain_loss, plain_grads = loss_and_grads()
    plain_calls = len(calls)
    model.activation_checkpointing_enable()
    calls.clear()
    ckpt_loss, ckpt_grads = loss_and_grads()
    hook.remove()
    assert len(calls) == 2 * plain_calls  # the layer really was recomputed in the backward pass
    assert torch.allclose(plain_loss, ckpt_loss, atol=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        assert torch.allclose(plain_grads[name], ckpt_grads[name], atol=1e-5), name


def test_training_arguments_and_gradient_accumulation(small_processor, tmp_path):
    args = training_arguments(1, str(tmp_path))
    assert args.learning_rate == 1e-3 and args.warmup_steps == 1500
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs["min_lr_rate"] == pytest.approx(0.02)
    assert args.remove_unused_columns is False and args.label_names == ["labels"]
    assert training_arguments(2, str(tmp_path)).learning_rate == 2e-4
    assert training_arguments(3, str(tmp_path), learning_rate=1e-5, warmup_steps=0).learning_rate == 1e-5

    # with accumulation Trainer must average the micro-batch losses (the model's loss is already a mean)
    model = small_model(seed=3)
    example = round_trip_examples()[0]
    batch = MiniOmni2DataCollator(small_processor)([example, example])
    with torch.no_grad():
        expected = model(**batch).loss.item()
    trainer = fit(model, small_processor, [example] * 4, max_steps=1, learning_rate=0.0, output_dir=tmp_path,
                  twins=False, batch_size=2, gradient_accumulation_steps=2)
    assert trainer.model_accepts_loss_kwargs is False
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged and logged[0] == pytest.approx(expected, rel=1e-3)


# ----- the example scripts ----------------------------------------------------------------------------------------------
def load_script(folder: str, name: str):
    """A script of the tree (``examples/``, ``benchmarks/``) loaded as a module, its folder on sys.path for the
    scripts' imports of their siblings."""
    directory = os.path.join(REPO_DIR, folder)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(f"mini_omni2_{folder}_{name}", os.path.join(directory, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_example(name: str):
    return load_script("examples", name)


def test_example_train_script(tmp_path):
    out = tmp_path / "run"
    summary = load_example("train").main([
        "--model", "tiny-random", "--stage", "3", "--max-steps", "2", "--num-synthetic", "4", "--tasks", "T1A2,A1T2",
        "--global-batch-size", "2", "--per-device-train-batch-size", "2", "--output-dir", str(out),
    ])
    assert summary["steps"] == 2 and summary["audio_tower"] == 0 and summary["language_model"] > 0
    assert json.loads((out / "train_summary.json").read_text())["stage"] == 3
    reloaded = MiniOmni2ForConditionalGeneration.from_pretrained(str(out))
    assert not torch.equal(reloaded.lm_head.weight, tiny_model(seed=0).lm_head.weight)  # trained
    assert torch.equal(reloaded.model.audio_tower.conv1.weight, tiny_model(seed=0).model.audio_tower.conv1.weight)
    MiniOmni2Processor.from_pretrained(str(out))


def test_example_train_lora_script(tmp_path):
    out = tmp_path / "lora"
    summary = load_example("train_lora").main([
        "--model", "tiny-random", "--max-steps", "2", "--num-synthetic", "4", "--tasks", "T1A2,T1T2",
        "--global-batch-size", "2", "--per-device-train-batch-size", "2", "--train-head", "--merge",
        "--output-dir", str(out),
    ])
    assert summary["steps"] == 2
    loaded = load_lora(tiny_model(seed=0), str(out))
    merged = MiniOmni2ForConditionalGeneration.from_pretrained(summary["merged"])
    ids = MiniOmni2Processor.from_pretrained(str(out))(text="hello world", output="text")
    ids.pop("request_index")
    with torch.no_grad():
        assert torch.allclose(loaded(**ids).logits, merged(**ids).logits, atol=1e-4)
