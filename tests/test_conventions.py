"""The transformers conventions a user trips on (issue 12): Trainer's defaults, checkpoints, frozen codec, AutoModel,
AutoPeftModel."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoProcessor, Trainer, TrainingArguments, WhisperFeatureExtractor

from mini_omni2 import MiniOmni2ForConditionalGeneration, MiniOmni2Model, MiniOmni2Processor
from mini_omni2.tiny import tiny_config, tiny_tokenizer
from mini_omni2.training import (
    ROW_FIELDS,
    MiniOmni2DataCollator,
    MiniOmni2Preprocessor,
    MiniOmni2TrainerCallback,
    apply_lora,
    configure_stage,
)
from mini_omni2.training.callbacks import remove_tokenizer_special_tokens

from conftest import color_image, sine

# A 1 s Whisper window (50 encoder frames) keeps these Trainer runs short.
SMALL_AUDIO = dict(
    d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, decoder_layers=1,
    decoder_attention_heads=2, decoder_ffn_dim=32, num_mel_bins=80, max_source_positions=50, vocab_size=51865,
)


@pytest.fixture(scope="module")
def small_processor():
    return MiniOmni2Processor.from_config(
        tiny_config(codec=False, audio_config=SMALL_AUDIO), tokenizer=tiny_tokenizer(),
        feature_extractor=WhisperFeatureExtractor(feature_size=80, chunk_length=1),
    )


def small_model(seed: int = 0) -> MiniOmni2ForConditionalGeneration:
    torch.manual_seed(seed)
    return MiniOmni2ForConditionalGeneration(tiny_config(codec=False, audio_config=SMALL_AUDIO))


def raw_examples() -> list[dict]:
    codes = np.random.default_rng(0).integers(0, 64, size=(3, 7)).tolist()
    examples = [
        {"task": "T1A2", "text": "hello world", "answer_text": "my name", "answer_codes": codes},
        {"task": "A1T2", "audio": {"array": sine(0.3), "sampling_rate": 16000}, "answer_text": "fine"},
        {"task": "VT1T2", "text": "what is it", "image": color_image(), "answer_text": "red"},
    ]
    keys = sorted({k for e in examples for k in e})
    return [{k: e.get(k) for k in keys} for e in examples]


def plain_arguments(output_dir, **overrides) -> TrainingArguments:
    """TrainingArguments as a transformers user writes them: remove_unused_columns left at its default (True)."""
    kwargs = dict(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                  report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="steps", save_steps=2, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# ----- Trainer with its default remove_unused_columns=True --------------------------------------------------------
def test_trainer_defaults_train_on_built_rows(small_processor, tmp_path):
    """Issue 12: Trainer's default remove_unused_columns=True failed; the built rows' columns are all forward args."""
    raw = datasets.Dataset.from_list(raw_examples())
    prep = MiniOmni2Preprocessor(small_processor, training_rows=True, batch_parallel_twins=True)
    rows = raw.map(prep, batched=True, remove_columns=prep.removable_columns(raw.column_names))
    assert sorted(rows.column_names) == sorted(ROW_FIELDS) and len(rows) == 4  # the speech example has its twin
    collator = MiniOmni2DataCollator(small_processor, batch_parallel_twins=True)
    expected = collator(raw_examples())
    built = collator(list(rows))
    assert built.keys() == expected.keys() and all(torch.equal(built[k], expected[k]) for k in built)

    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = plain_arguments(tmp_path)
    assert args.remove_unused_columns is True
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=MiniOmni2DataCollator(small_processor),
                      processing_class=small_processor, callbacks=[MiniOmni2TrainerCallback(small_processor)])
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the processing class did not leave the tokenizer's eos/pad in the model's configs
    text_config = model.config.get_text_config()
    assert (text_config.eos_token_id, text_config.pad_token_id) == (None, None)
    assert model.generation_config.eos_token_id is None and model.generation_config.pad_token_id is None
    saved = json.loads((tmp_path / "checkpoint-2" / "config.json").read_text())["text_config"]
    assert saved.get("pad_token_id") is None and saved.get("eos_token_id") is None


def test_trainer_with_unbuilt_columns_says_what_to_set(small_processor, tmp_path):
    raw = datasets.Dataset.from_list(raw_examples())
    prep = MiniOmni2Preprocessor(small_processor)  # processed fields: most are not forward arguments
    processed = raw.map(prep, batched=True, remove_columns=prep.removable_columns(raw.column_names))
    trainer = Trainer(model=small_model(), args=plain_arguments(tmp_path), train_dataset=processed,
                      data_collator=MiniOmni2DataCollator(small_processor))
    with pytest.raises(ValueError, match="remove_unused_columns=True keeps only arguments.*training_rows=True"):
        trainer.train()


# ----- checkpoints carry the processor ------------------------------------------------------------------------------
def test_checkpoints_load_with_auto_processor(small_processor, tmp_path):
    """Issue 12: without processing_class, checkpoints had no processor files; with it, the configs got the
    tokenizer's eos/pad. The callback covers both."""
    rows = [row for e in raw_examples() for row in MiniOmni2DataCollator(small_processor).training_rows(e)]
    model = small_model()
    trainer = Trainer(model=model, args=plain_arguments(tmp_path), train_dataset=rows,
                      data_collator=MiniOmni2DataCollator(small_processor),
                      callbacks=[MiniOmni2TrainerCallback(small_processor)])
    trainer.train()
    for folder in (tmp_path / "checkpoint-2", tmp_path):
        loaded = AutoProcessor.from_pretrained(folder)
        assert isinstance(loaded, MiniOmni2Processor) and loaded.layout == small_processor.layout
        request = dict(text="hello world", output="text")
        assert torch.equal(loaded(**request)["input_ids"], small_processor(**request)["input_ids"])
    reloaded = MiniOmni2ForConditionalGeneration.from_pretrained(tmp_path / "checkpoint-2")
    assert reloaded.model.language_model.embed_tokens.padding_idx is None


def test_tokenizer_special_tokens_are_taken_back_out(small_processor):
    """What transformers' align_special_tokens writes (Trainer with processing_class) is removed again."""
    from transformers.trainer_utils import align_special_tokens

    model = small_model()
    align_special_tokens(model, small_processor)
    eos = small_processor.tokenizer.eos_token_id
    assert model.config.get_text_config().eos_token_id == eos  # what Trainer does on its own
    removed = remove_tokenizer_special_tokens(model, small_processor.tokenizer)
    assert removed == {"eos_token_id": eos, "pad_token_id": small_processor.tokenizer.pad_token_id}
    for config in (model.config.get_text_config(), model.generation_config):
        assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == (None, None, None)


# ----- loading: a frozen codec, no load report for the base model ----------------------------------------------------
@pytest.fixture(scope="module")
def saved_full_model(tmp_path_factory):
    from mini_omni2.tiny import tiny_model

    folder = tmp_path_factory.mktemp("full")
    tiny_model(seed=0).save_pretrained(folder)
    return folder


def test_the_codec_stays_frozen_after_from_pretrained(saved_full_model):
    """Issue 12: after from_pretrained the codec's parameters had requires_grad=True."""
    model = MiniOmni2ForConditionalGeneration.from_pretrained(saved_full_model)
    assert not any(p.requires_grad for p in model.codec.parameters())
    codec = sum(p.numel() for p in model.codec.parameters())
    assert codec > 0 and model.num_parameters(only_trainable=True) == model.num_parameters() - codec
    loaded, info = MiniOmni2ForConditionalGeneration.from_pretrained(saved_full_model, output_loading_info=True)
    assert not any(p.requires_grad for p in loaded.codec.parameters()) and not info["missing_keys"]
    assert configure_stage(model, 3)["codec"] == 0


def test_auto_model_on_a_full_folder_loads_quietly(saved_full_model, capfd):
    """Issue 12: AutoModel.from_pretrained on a full folder printed a long load report of unexpected keys."""
    capfd.readouterr()
    model, info = AutoModel.from_pretrained(saved_full_model, output_loading_info=True)
    assert isinstance(model, MiniOmni2Model)
    assert info["unexpected_keys"] == set() and info["missing_keys"] == set()
    assert "UNEXPECTED" not in capfd.readouterr().err
    full = MiniOmni2ForConditionalGeneration.from_pretrained(saved_full_model)
    assert torch.equal(model.language_model.embed_tokens.weight, full.model.language_model.embed_tokens.weight)


def test_auto_peft_model_loads_an_adapter_without_an_import_allowlist(saved_full_model, tmp_path):
    """Issue 12: AutoPeftModel.from_pretrained needed import_allowlist=["mini_omni2"]."""
    from peft import AutoPeftModel

    base = MiniOmni2ForConditionalGeneration.from_pretrained(saved_full_model)
    peft_model = apply_lora(base, r=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # a non-trivial adapter
    peft_model.save_pretrained(tmp_path / "adapter")
    mapping = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["auto_mapping"]
    assert mapping["base_model_class"] == "AutoModelForMultimodalLM"
    loaded = AutoPeftModel.from_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[[peft_model.layout.layershift(peft_model.layout.pad_a, i)] * 3 for i in range(7)] + [[5, 6, 7]]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits, atol=1e-5)
