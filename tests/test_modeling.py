"""MiniOmni2ForConditionalGeneration: SPEC §3 embedding, feature placement, sliced head and §9 loss."""

import pytest
import torch
import torch.nn.functional as F

from mini_omni2 import MiniOmni2ForConditionalGeneration, MiniOmni2Model
from mini_omni2.tiny import tiny_model

from conftest import color_image, sine


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "request_index"}


def capture_inputs_embeds(model, **inputs):
    """Run a forward and return what the Qwen2 backbone received as inputs_embeds."""
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]


def test_output_shapes(model, processor):
    batch = processor(text=["Hello world", "What is your name?"], output=["speech", "text"])
    out = model(**model_inputs(batch))
    b, s = batch["input_ids"].shape[0], batch["input_ids"].shape[-1]
    layout = model.layout
    assert out.logits.shape == (b, s, layout.total_vocab_size)
    assert out.text_logits.shape == (b, s, layout.text_vocab_size)
    assert out.audio_logits.shape == (b, 7, s, layout.audio_vocab_size)
    assert torch.equal(out.audio_logits[:, 3], out.logits[..., layout.audio_offset(3) : layout.audio_offset(4)])
    last = model(**model_inputs(batch), logits_to_keep=1)
    assert last.logits.shape == (b, 1, layout.total_vocab_size)
    assert torch.allclose(last.logits[:, 0], out.logits[:, -1], atol=1e-5)


def test_text_prompt_input_is_the_mean_of_the_8_stream_embeddings(model, processor):
    batch = processor(text="Hello world", output="text")
    embeds = capture_inputs_embeds(model, **model_inputs(batch))
    table = model.get_input_embeddings().weight.detach()
    expected = table[batch["input_ids"][0]].sum(dim=0) / 8  # (seq, hidden): no sqrt(hidden) scaling
    assert torch.allclose(embeds[0], expected, atol=1e-6)


@pytest.mark.parametrize("task", ["A1A2", "VA1A2"])
def test_features_replace_the_audio_streams_at_spec_positions(model, processor, task):
    image = color_image() if task.startswith("V") else None
    batch = processor(audio=(sine(0.3), 16000), images=image, task=task)
    embeds = capture_inputs_embeds(model, **model_inputs(batch))
    ids = batch["input_ids"][0]
    num_frames = 0.3 * 16000 // 320 + 1
    audio_positions = torch.nonzero(batch["audio_feature_mask"][0]).flatten().tolist()
    first = 52 if task == "VA1A2" else 1  # the release's V+A1 offset of one (SPEC §4)
    assert audio_positions == list(range(first, first + int(num_frames)))
    with torch.no_grad():
        audio_feats = model.get_audio_features(batch["input_features"])[0]
        image_feats = model.get_image_features(batch["pixel_values"])[0] if image is not None else None
    table = model.get_input_embeddings().weight.detach()
    expected = table[ids].clone()  # (8, seq, hidden)
    expected[:7, audio_positions] = audio_feats[: len(audio_positions)]
    if image is not None:
        image_positions = torch.nonzero(batch["image_feature_mask"][0]).flatten().tolist()
        assert image_positions == list(range(1, 51))
        expected[:7, image_positions] = image_feats
    # the text stream keeps its own token's embedding at feature positions
    assert torch.allclose(embeds[0], expected.mean(dim=0), atol=1e-5)
    assert not torch.allclose(embeds[0], table[ids].mean(dim=0), atol=1e-3)


def test_image_features_use_all_50_tokens_after_post_layernorm(model):
    pixels = torch.randn(1, 3, 224, 224)
    tower = model.model.vision_tower
    with torch.no_grad():
        hidden = tower.vision_model(pixel_values=pixels).last_hidden_state
        tokens = tower.visual_projection(tower.vision_model.post_layernorm(hidden))
        expected = model.model.vision_projector(tokens)
        got = model.get_image_features(pixels)
    assert got.shape == (1, 50, model.config.text_config.hidden_size)
    assert torch.allclose(got, expected, atol=1e-6)


def test_adapters_are_llama_mlps_without_bias(model):
    adapter = model.model.audio_projector
    x = torch.randn(3, model.config.audio_feature_dim)
    assert adapter.fc_1.bias is None and adapter.fc_2.bias is None and adapter.proj.bias is None
    expected = adapter.proj(F.silu(adapter.fc_1(x)) * adapter.fc_2(x))
    assert torch.allclose(adapter(x), expected)


def hand_loss(logits, labels, layout):
    losses = []
    for s in range(8):
        lo = layout.audio_offset(s) if s < 7 else 0
        size = layout.audio_vocab_size if s < 7 else layout.text_vocab_size
        terms = []
        for b in range(labels.shape[0]):
            for t in range(labels.shape[-1] - 1):
                target = int(labels[b, s, t + 1])
                if target == -100:
                    continue
                logp = torch.log_softmax(logits[b, t, lo : lo + size].double(), dim=-1)
                terms.append(-logp[target - lo])
        losses.append(torch.stack(terms).mean() if terms else torch.zeros((), dtype=torch.double))
    return torch.stack(losses)


def test_loss_is_the_sum_of_8_stream_cross_entropies(model, processor):
    batch = processor(text=["Hello world", "Tell me a story"], output=["speech", "text"])
    labels = batch["input_ids"].clone()
    labels[:, :, :2] = -100
    labels[1, :7] = -100  # a text answer learns nothing on the audio streams
    labels[batch["attention_mask"][:, None, :].expand_as(labels) == 0] = -100
    out = model(**model_inputs(batch), labels=labels)
    expected = hand_loss(out.logits.detach(), labels, model.layout)
    assert torch.allclose(out.stream_losses.double(), expected, atol=1e-4)
    assert torch.allclose(out.loss.double(), expected.sum(), atol=1e-4)


def test_labels_outside_a_streams_slice_are_refused(model, processor):
    batch = processor(text="Hello world", output="text")
    labels = batch["input_ids"].clone()
    labels[0, 7, -1] = model.layout.layershift(3, 0)  # an audio id on the text stream
    with pytest.raises(ValueError, match="stream 7"):
        model(**model_inputs(batch), labels=labels)


def test_gradients_reach_the_adapters_and_not_the_codec(processor):
    model = tiny_model(seed=3).train()
    batch = processor(audio=[(sine(0.2), 16000)], images=[color_image()], task="VA1A2")
    out = model(**model_inputs(batch), labels=batch["input_ids"])
    out.loss.backward()
    for adapter in (model.model.audio_projector, model.model.vision_projector):
        for p in adapter.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.codec.parameters())


def test_left_padding_does_not_change_a_rows_logits(model, processor):
    short = processor(text="Hi", output="text")
    both = processor(text=["Hi", "Tell me a story about a cat"], output="text")
    alone = model(**model_inputs(short)).logits[0]
    padded = model(**model_inputs(both)).logits[0, -alone.shape[0] :]
    assert both["attention_mask"][0, 0] == 0
    assert torch.allclose(alone, padded, atol=1e-4)


def test_the_cache_goes_in_under_either_name_and_comes_out_under_the_installed_transformers_one(model, processor):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (CACHE_NAME): a step fed the cache under either name
    gives the logits of the whole sequence, and the outputs carry it under the installed name."""
    from mini_omni2.modeling_mini_omni2 import CACHE_NAME

    batch = model_inputs(processor(text="Tell me a story", output="text"))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        for name in ("cache", "past_key_values"):
            prefix = model(input_ids=ids[..., :-1], attention_mask=mask[:, :-1], use_cache=True)
            assert {f for f in prefix.keys() if f in ("cache", "past_key_values")} == {CACHE_NAME}
            step = model(input_ids=ids[..., -1:], attention_mask=mask, use_cache=True,
                         **{name: getattr(prefix, CACHE_NAME)})
            assert torch.allclose(step.logits[:, -1], whole, atol=1e-4), name
        with pytest.raises(ValueError, match="as `cache` or as `past_key_values`, not both"):
            model(input_ids=ids, cache=getattr(prefix, CACHE_NAME), past_key_values=getattr(prefix, CACHE_NAME))


def test_save_load_round_trip_gives_identical_logits(model, processor, tmp_path):
    batch = processor(audio=[(sine(0.2), 16000)], images=[color_image()], task="VA1T2")
    model.save_pretrained(tmp_path)
    loaded = MiniOmni2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(**model_inputs(batch)).logits, loaded(**model_inputs(batch)).logits)
    frames = torch.randint(0, model.config.audio_codebook_size, (1, 3, 7))
    assert torch.equal(model.codec.decode(frames, noise=False), loaded.codec.decode(frames, noise=False))
    base = MiniOmni2Model.from_pretrained(tmp_path)
    assert torch.equal(base.language_model.embed_tokens.weight, model.model.language_model.embed_tokens.weight)


def test_attention_implementations_agree(model, processor, tmp_path):
    batch = processor(text=["Hi", "Tell me a story"], output="text")
    model.save_pretrained(tmp_path)
    logits = {}
    for impl in ("eager", "sdpa"):
        m = MiniOmni2ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=impl).eval()
        assert m.config.text_config._attn_implementation == impl
        with torch.no_grad():
            logits[impl] = m(**model_inputs(batch)).logits
    mask = batch["attention_mask"].bool()
    assert torch.allclose(logits["eager"][mask], logits["sdpa"][mask], atol=1e-4)


def test_dtype_and_device_map_loading(model, tmp_path):
    model.save_pretrained(tmp_path)
    half = MiniOmni2ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert next(half.codec.parameters()).dtype == torch.float32
    legacy = MiniOmni2ForConditionalGeneration.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert legacy.lm_head.weight.dtype == torch.float16
    assert next(legacy.codec.parameters()).dtype == torch.float32  # the codec is kept in float32
    mapped = MiniOmni2ForConditionalGeneration.from_pretrained(tmp_path, device_map="auto")
    placed = {p.device.type for p in mapped.parameters()}
    assert placed == {"cuda" if torch.cuda.is_available() else "cpu"}
    assert torch.equal(mapped.lm_head.weight.cpu(), model.lm_head.weight)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(processor):
    batch = processor(text=["Hello world", "Tell me a story"], output="speech")
    results = []
    for checkpointing in (False, True):
        model = tiny_model(seed=5).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.model.language_model.gradient_checkpointing
        out = model(**model_inputs(batch), labels=batch["input_ids"])
        out.loss.backward()
        results.append((out.loss.detach(), model.model.language_model.layers[0].mlp.up_proj.weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_feature_count_mismatches_are_refused(model, processor):
    batch = model_inputs(processor(audio=(sine(0.2), 16000), output="text"))
    with pytest.raises(ValueError, match="together"):
        model(**{**batch, "input_features": None})
    with pytest.raises(ValueError, match="audio inputs given"):
        model(**{**batch, "input_features": batch["input_features"].repeat(2, 1, 1)})
    with pytest.raises(ValueError, match="audio_lengths"):
        model(**{**batch, "audio_lengths": batch["audio_lengths"] + 1})
    with pytest.raises(ValueError, match="shape"):
        model(input_ids=batch["input_ids"][:, :7])


def test_mini_omni_model_refuses_images(model_no_vision):
    assert model_no_vision.model.vision_tower is None and model_no_vision.model.vision_projector is None
    with pytest.raises(ValueError, match="no vision"):
        model_no_vision.get_image_features(torch.randn(1, 3, 224, 224))
