"""Conversion of the original releases (issue 4): exactness against the original math, strictness, Hub readiness.

Synthetic checkpoints in the ORIGINAL formats (tests/original_checkpoints.py) are converted with
:func:`mini_omni2.conversion.convert.convert_checkpoint`; the converted model must reproduce a plain re-implementation of the
original forward (tests/original_reference.py) computed from the original state dicts.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import original_checkpoints as oc
import original_reference as ref
from mini_omni2 import MiniOmni2ForConditionalGeneration
from mini_omni2.conversion.mapping import LITGPT_DEFAULTS, ConversionError, litgpt_config
from mini_omni2.conversion.convert import (
    add_convert_arguments,
    convert_checkpoint,
    convert_state,
    load_clip_state,
    load_sources,
    run_convert,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("mini-omni2", "mini-omni")
NUM_FRAMES = 7  # Whisper frames used by the audio prompts (the encoder still sees 3000 mel frames)
TEXT_PROMPT = [5, 17, 33, 100, 7]


# ----------------------------------------------------------------------------------------------------------------
# fixtures: the synthetic releases, their conversions, and the reference built from the ORIGINAL files
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    return {
        # Mini-Omni2: scripted CLIP archive, SNAC in today's parametrization names
        "mini-omni2": (oc.write_release(root / "mini-omni2", vision=True, seed=0), oc.write_snac(root / "snac-new", False)),
        # Mini-Omni: no vision; SNAC with the old weight_g / weight_v names
        "mini-omni": (oc.write_release(root / "mini-omni", vision=False, seed=10), oc.write_snac(root / "snac-old", True, 4)),
    }


@pytest.fixture(scope="module")
def converted(releases, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    results = root / "asr.json"  # what `mini-omni2 eval asr --output` writes (the fields the card reads)
    results.write_text(json.dumps({"task": "asr", "dataset": "openslr/librispeech_asr", "config": "clean",
                                   "split": "test", "num_examples": 2620, "metrics": {"wer": 0.045}}))
    return {
        name: convert_checkpoint(release, root / name, snac=snac, progress=False, max_shard_size="300KB",
                                 eval_results=[results] if name == "mini-omni" else None)
        for name, (release, snac) in releases.items()
    }


@pytest.fixture(scope="module")
def models(converted):
    return {name: MiniOmni2ForConditionalGeneration.from_pretrained(path).eval() for name, path in converted.items()}


class Original:
    """The original files of one release, read without this package, and the reference computations on them."""

    def __init__(self, release: Path):
        self.config = litgpt_config(yaml.safe_load((release / "model_config.yaml").read_text()), [], [])
        self.lit = torch.load(release / "lit_model.pth")
        self.whisper = torch.load(release / "small.pt")
        clip = release / "ViT-B-32.pt"
        self.clip = torch.jit.load(str(clip)).state_dict() if clip.exists() else None
        self.gpt = ref.LitGPTReference(self.lit, self.config)
        self._features = {}

    def features(self, mel, pixels):
        """Reference Whisper frames and CLIP tokens (computed once per input tensor)."""
        key = (id(mel), id(pixels))
        if key not in self._features:
            audio = ref.whisper_encoder(self.whisper, mel) if mel is not None else None
            image = ref.clip_visual(self.clip, pixels, oc.CLIP_WIDTH // 64) if pixels is not None else None
            self._features[key] = (audio, image)
        return self._features[key]


@pytest.fixture(scope="module")
def originals(releases):
    return {name: Original(release) for name, (release, _) in releases.items()}


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1234)
    return {
        "mel": torch.randn(1, 80, 3000, generator=generator),
        "pixels": torch.randn(1, 3, oc.CLIP_IMAGE, oc.CLIP_IMAGE, generator=generator),
    }


# Release task names for the reference's feature placement (the release's concat_feat).
RELEASE_TASK = {"A1A2": "A1A2", "A1T2": "A1T2", "A1T1": "A1T1", "T1T2": None, "T1A2": None, "VA1A2": "ImageQA_A", "VA1T2": "ImageQA_AT"}


def prompt_batch(layout, tasks: list[str], inputs):
    """Model kwargs and reference arguments for rows of the same length (one request, or a batch-parallel pair)."""
    prompts = []
    for task in tasks:
        if "A1" in task:
            prompts.append(layout.build_prompt(task, num_audio_frames=NUM_FRAMES))
        else:
            prompts.append(layout.build_prompt(task, text_ids=TEXT_PROMPT))
    ids = torch.tensor([p.streams for p in prompts])
    audio_mask = torch.zeros(ids.shape[0], ids.shape[-1], dtype=torch.bool)
    image_mask = torch.zeros_like(audio_mask)
    for b, p in enumerate(prompts):
        audio_mask[b, p.audio_positions] = True
        image_mask[b, p.image_positions] = True
    has_audio, has_image = bool(audio_mask.any()), bool(image_mask.any())
    n = ids.shape[0]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones(n, ids.shape[-1], dtype=torch.long))
    if has_audio:
        kwargs.update(input_features=inputs["mel"].expand(n, -1, -1), audio_feature_mask=audio_mask)
    if has_image:
        kwargs.update(pixel_values=inputs["pixels"].expand(n, -1, -1, -1), image_feature_mask=image_mask)
    return kwargs, [RELEASE_TASK[t] for t in tasks], has_audio, has_image


def reference_prompt_embeds(original: Original, kwargs, release_tasks, has_audio, has_image, inputs):
    """The original model's embeddings of the prompt rows, features placed as the release does."""
    audio, image = original.features(inputs["mel"] if has_audio else None, inputs["pixels"] if has_image else None)
    n = kwargs["input_ids"].shape[0]
    return original.gpt.embed(
        kwargs["input_ids"].permute(1, 0, 2).clone(),
        release_tasks,
        [audio[0]] * n if audio is not None else None,
        [NUM_FRAMES] * n,
        [image[0]] * n if image is not None else None,
    )


def reference_logits(original: Original, kwargs, release_tasks, has_audio, has_image, inputs):
    return original.gpt.forward(reference_prompt_embeds(original, kwargs, release_tasks, has_audio, has_image, inputs))


CASES = [
    ("mini-omni2", "A1A2"),
    ("mini-omni2", "T1T2"),
    ("mini-omni2", "VA1A2"),
    ("mini-omni2", "VA1T2"),
    ("mini-omni2", "A1T1"),
    ("mini-omni", "A1A2"),
    ("mini-omni", "T1T2"),
    ("mini-omni", "A1T2"),
]


# ----------------------------------------------------------------------------------------------------------------
# exactness
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,task", CASES, ids=[f"{f}-{t}" for f, t in CASES])
@torch.no_grad()
def test_logits_equal_the_original_math(models, originals, inputs, family, task):
    model = models[family]
    kwargs, release_tasks, has_audio, has_image = prompt_batch(model.layout, [task], inputs)
    logits = model(**kwargs).logits
    expected = reference_logits(originals[family], kwargs, release_tasks, has_audio, has_image, inputs)
    assert logits.shape == expected.shape
    assert expected.abs().max() > 1.0  # the weights are large enough for a wrong mapping to show
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_a_wrong_qkv_split_is_detected(converted, originals, inputs):
    """Negative control: splitting the fused qkv naively (q, k, v blocks) instead of per group changes the logits."""
    model = MiniOmni2ForConditionalGeneration.from_pretrained(converted["mini-omni2"]).eval()
    c = originals["mini-omni2"].config
    fused = originals["mini-omni2"].lit["transformer.h.0.attn.attn.weight"]
    q_rows, kv_rows = c["n_head"] * c["head_size"], c["n_query_groups"] * c["head_size"]
    attn = model.model.language_model.layers[0].self_attn
    attn.q_proj.weight.copy_(fused[:q_rows])
    attn.k_proj.weight.copy_(fused[q_rows : q_rows + kv_rows])
    attn.v_proj.weight.copy_(fused[q_rows + kv_rows :])
    kwargs, release_tasks, has_audio, has_image = prompt_batch(model.layout, ["T1T2"], inputs)
    expected = reference_logits(originals["mini-omni2"], kwargs, release_tasks, has_audio, has_image, inputs)
    assert (model(**kwargs).logits - expected).abs().max() > 1e-2


@torch.no_grad()
def test_reference_clip_matches_the_torchscript_archive(releases, originals, inputs):
    """The re-implemented CLIP tower agrees with the archive's own forward (all tokens, ln_post, @ proj)."""
    archive = torch.jit.load(str(releases["mini-omni2"][0] / "ViT-B-32.pt"))
    expected = archive(inputs["pixels"])
    got = ref.clip_visual(originals["mini-omni2"].clip, inputs["pixels"], oc.CLIP_WIDTH // 64)
    assert got.shape == (1, 50, oc.CLIP_OUT)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_codec_equals_snac_loaded_by_snac(models, releases):
    """Both weight-norm spellings give the codec that ``snac.SNAC.from_pretrained`` builds from the same files."""
    from snac import SNAC

    for family in FAMILIES:
        original = SNAC.from_pretrained(str(releases[family][1])).eval()
        expected = original.state_dict()
        got = models[family].codec.snac.state_dict()
        assert set(got) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), name
        codes = [torch.randint(0, oc.CODEBOOK, (1, n)) for n in (2, 4, 8)]
        torch.manual_seed(0)
        a = original.decode(codes)
        torch.manual_seed(0)
        b = models[family].codec.snac.decode(codes)
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------------------
# greedy decoding: the converted model (step by step with a KV cache) vs the reference loop
# ----------------------------------------------------------------------------------------------------------------
def model_stepper(model, kwargs):
    from mini_omni2.modeling_mini_omni2 import CACHE_NAME

    state = {}

    def step(new_ids):
        if new_ids is None:
            out = model(**kwargs, use_cache=True)
            state["length"] = kwargs["input_ids"].shape[-1]
        else:
            state["length"] += 1
            mask = torch.ones(new_ids.shape[0], state["length"], dtype=torch.long)
            out = model(input_ids=new_ids, attention_mask=mask, past_key_values=state["cache"], use_cache=True)
        state["cache"] = getattr(out, CACHE_NAME)
        return out.logits[:, -1]

    return step


def reference_stepper(original, kwargs, release_tasks, has_audio, has_image, inputs):
    cache: list = []
    prompt = reference_prompt_embeds(original, kwargs, release_tasks, has_audio, has_image, inputs)

    def step(new_ids):
        if new_ids is None:
            x = prompt
        else:
            x = original.gpt.embed(new_ids.permute(1, 0, 2))
        return original.gpt.forward(x, cache)[:, -1]

    return step


DECODE_CASES = [
    ("mini-omni2", "VA1A2", True),
    ("mini-omni2", "T1T2", False),
    ("mini-omni2", "A1A2", False),
    ("mini-omni", "A1A2", True),
    ("mini-omni", "A1T2", False),
]
MAX_NEW_TOKENS = 20


def _rows(layout, task, batch_parallel):
    return [task, layout.text_output_task(task)] if batch_parallel else [task]


@pytest.mark.parametrize("family,task,batch_parallel", DECODE_CASES, ids=[f"{f}-{t}-{b}" for f, t, b in DECODE_CASES])
@torch.no_grad()
def test_greedy_cached_decoding_equals_the_original(models, originals, inputs, family, task, batch_parallel):
    model = models[family]
    layout = model.layout
    kwargs, release_tasks, has_audio, has_image = prompt_batch(layout, _rows(layout, task, batch_parallel), inputs)
    output = "speech" if task.endswith("A2") else "text"
    got = ref.greedy_decode(model_stepper(model, kwargs), layout, output, MAX_NEW_TOKENS, batch_parallel)
    expected = ref.greedy_decode(
        reference_stepper(originals[family], kwargs, release_tasks, has_audio, has_image, inputs),
        layout,
        output,
        MAX_NEW_TOKENS,
        batch_parallel,
    )
    assert got == expected
    assert len(expected["text"]) >= 1


GENERATE_CASES = DECODE_CASES + [("mini-omni2", "VA1A2", "release-sampling")]


@pytest.mark.parametrize("family,task,batch_parallel", GENERATE_CASES, ids=[f"{f}-{t}-{b}" for f, t, b in GENERATE_CASES])
@torch.no_grad()
def test_generate_equals_the_original_greedy_loop(models, originals, inputs, family, task, batch_parallel):
    """``model.generate`` (issue 3) gives the token streams of the original greedy loop.

    ``"release-sampling"``: generate with the converted folder's generation_config.json (temperature 0.9, top_k 1,
    do_sample True), which is greedy, with batch parallel decoding.
    """
    from mini_omni2.generation_mini_omni2 import MiniOmni2GenerationMixin

    if "generate" not in MiniOmni2GenerationMixin.__dict__:
        pytest.fail("MiniOmni2GenerationMixin.generate is not implemented yet (issue 3)")
    model = models[family]
    layout = model.layout
    release_sampling = batch_parallel == "release-sampling"
    batch_parallel = bool(batch_parallel)
    kwargs = prompt_batch(layout, [task], inputs)[0]
    output = "speech" if task.endswith("A2") else "text"
    expected = ref.greedy_decode(
        reference_stepper(originals[family], *prompt_batch(layout, _rows(layout, task, batch_parallel), inputs), inputs),
        layout,
        output,
        MAX_NEW_TOKENS,
        batch_parallel,
    )
    sampling = {} if release_sampling else {"do_sample": False}
    generated = model.generate(
        **kwargs, max_new_tokens=MAX_NEW_TOKENS, batch_parallel=batch_parallel, decode_audio=False, **sampling
    )
    prompt_len = kwargs["input_ids"].shape[-1]
    n = int(generated.generated_lengths[0])
    fed = generated.sequences[0, :, prompt_len : prompt_len + n]
    text = expected["text"]
    if output == "text" and text and text[-1] == layout.eot:
        text = text[:-1]  # generate does not count the step that stopped a text answer
    assert fed[layout.text_stream].tolist() == text
    offsets = layout.stream_offsets()[: layout.num_audio_layers, None]
    if output == "speech":
        audio = torch.tensor(expected["audio"])
        assert fed[: layout.num_audio_layers].tolist() == (audio + offsets).tolist()
        frames, _ = layout.sanitize_frames(layout.undelay(audio))
        assert torch.equal(generated.audio_frames[0], frames)
    else:
        assert bool((fed[: layout.num_audio_layers] == offsets + layout.pad_a).all())
    until_eot = text[: text.index(layout.eot)] if layout.eot in text else text
    assert generated.text_ids[0].tolist() == [t for t in until_eot if t < layout.tokenizer_vocab_size]


# ----------------------------------------------------------------------------------------------------------------
# the written folder
# ----------------------------------------------------------------------------------------------------------------
def test_written_folder(converted, models):
    for family, path in converted.items():
        config = json.loads((path / "config.json").read_text())
        assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForMultimodalLM"}
        for module in ("configuration_mini_omni2", "modeling_mini_omni2", "token_layout", "processing_mini_omni2"):
            assert (path / f"{module}.py").is_file(), module
        assert json.loads((path / "processor_config.json").read_text())["auto_map"]["AutoProcessor"]
        assert len(list(path.glob("model-*.safetensors"))) > 1  # sharded
        generation = json.loads((path / "generation_config.json").read_text())
        assert {k: generation[k] for k in ("do_sample", "temperature", "top_k", "top_p")} == dict(
            do_sample=True, temperature=0.9, top_k=1, top_p=1.0
        )
        for name in ("tokenizer.json", "tokenizer_config.json", "README.md"):
            assert (path / name).is_file(), name
        model = models[family]
        c = model.config
        assert c.has_vision == (family == "mini-omni2")
        assert (c.text_vocab_size, c.audio_vocab_size, c.num_audio_layers, c.audio_codebook_size) == (
            oc.TEXT_VOCAB, oc.AUDIO_VOCAB, 7, oc.CODEBOOK,
        )
        t = c.text_config
        assert (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (64, 6, 2, 16)
        assert t.rope_parameters["rope_theta"] == 1e6 and t.rms_norm_eps == 1e-6
        assert c.audio_config.max_source_positions == 1500 and c.audio_config.d_model == 32
        if c.has_vision:
            v = c.vision_config
            assert (v.hidden_size, v.num_attention_heads, v.projection_dim, v.image_size) == (128, 2, 16, 224)
            assert c.num_image_tokens == 50
        assert c.codec_config["codebook_size"] == oc.CODEBOOK


def test_report_lists_what_was_dropped_on_purpose(releases):
    loaded = load_sources(releases["mini-omni2"][0], releases["mini-omni2"][1], progress=False)
    _, target, report = convert_state(loaded, progress=False)
    dropped = {name for names in report.dropped.values() for name in names}
    decoder = {k for k in loaded["whisper_state"] if k.startswith("decoder.")}
    text_tower = {k for k in loaded["clip_state"] if not k.startswith("visual.")}
    assert decoder and text_tower and dropped == decoder | text_tower
    assert report.num_target_tensors == len(target)


def test_written_model_cards(converted):
    """Each converted folder's README.md is the real card: metadata, the release it converts, usage with the folder
    (the repo id when pushed) through the pipeline, code that compiles (it runs in the test below)."""
    from huggingface_hub import ModelCard

    for family, path in converted.items():
        card = ModelCard((path / "README.md").read_text())
        meta = card.data
        assert meta.license == "mit" and meta.pipeline_tag == "any-to-any" and meta.library_name == "transformers"
        assert meta.base_model == f"gpt-omni/{family}"  # the release; the source here is a local folder
        assert {"mini-omni2", "any-to-any", "custom_code"} <= set(meta.tags)
        assert meta.widget and all("example_title" in w for w in meta.widget)
        assert "converted with `mini-omni2 convert`" in card.text
        assert f'pipeline(model="{path}", trust_remote_code=True)' in card.text
        assert ('"image": "picture.jpg"' in card.text) == (family == "mini-omni2")
        if family == "mini-omni":  # converted with --eval-results
            (result,) = meta.eval_results
            assert (result.task_type, result.metric_type, result.metric_value) == ("automatic-speech-recognition", "wer", 4.5)
        else:
            assert meta.eval_results is None
        blocks = re.findall(r"```python\n(.*?)```", card.text, re.S)
        assert len(blocks) == 2
        for block in blocks:
            compile(block, f"{family}/README.md", "exec")


def test_the_docs_check_runs_on_a_conversion(releases, converted, capsys):
    """The "Checking a conversion" code of docs/conversion.md, pointed at the synthetic Mini-Omni2 release."""
    text = (REPO / "docs" / "conversion.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    for block in blocks:
        compile(block, "docs/conversion.md", "exec")
    check = next(b for b in blocks if "original_reference" in b)
    check = check.replace('"./mini-omni2-release"', repr(str(releases["mini-omni2"][0])))
    check = check.replace('"./mini-omni2-hf"', repr(str(converted["mini-omni2"])))
    check = check.replace('sys.path.insert(0, "tests")', f"sys.path.insert(0, {str(REPO / 'tests')!r})")
    namespace: dict = {}
    exec(compile(check, "docs/conversion.md", "exec"), namespace)
    assert namespace["difference"] <= 1e-4
    assert "max |logits difference|" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# strictness
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(releases):
    return load_sources(releases["mini-omni2"][0], releases["mini-omni2"][1], progress=False)


def _with_lit(loaded, change):
    broken = dict(loaded)
    broken["lit_state"] = dict(loaded["lit_state"])
    change(broken["lit_state"])
    return broken


def _problems(loaded) -> list[str]:
    with pytest.raises(ConversionError) as info:
        convert_state(loaded, progress=False)
    assert isinstance(info.value, ValueError)
    assert str(info.value).count("\n  - ") == len(info.value.problems)
    return info.value.problems


def test_missing_tensor(loaded):
    problems = _problems(_with_lit(loaded, lambda s: s.pop("transformer.h.1.mlp.fc_2.weight")))
    assert problems == [
        "lit_model.pth: missing tensor 'transformer.h.1.mlp.fc_2.weight'",
        "target tensor 'model.language_model.layers.1.mlp.up_proj.weight' is not filled by any source tensor",
    ]


def test_extra_tensor(loaded):
    problems = _problems(_with_lit(loaded, lambda s: s.update({"transformer.h.0.attn.rotary.inv_freq": torch.ones(8)})))
    assert problems == ["lit_model.pth: tensor 'transformer.h.0.attn.rotary.inv_freq' is not used by the conversion"]


def test_wrong_shape(loaded):
    problems = _problems(_with_lit(loaded, lambda s: s.update({"whisper_adapter.proj.weight": torch.ones(64, 95)})))
    assert problems == [
        "target tensor 'model.audio_projector.proj.weight' (from lit_model.pth 'whisper_adapter.proj.weight'): "
        "converted shape (64, 95) != model shape (64, 96)"
    ]


def test_all_problems_in_one_error(loaded):
    def change(state):
        state.pop("lm_head.weight")
        state["extra.weight"] = torch.ones(1)
        state["transformer.h.0.attn.attn.weight"] = torch.ones(5, 64)

    broken = _with_lit(loaded, change)
    broken["whisper_state"] = {k: v for k, v in loaded["whisper_state"].items() if k != "encoder.ln_post.bias"}
    broken["snac_state"] = dict(loaded["snac_state"], **{"decoder.extra": torch.ones(1)})
    problems = _problems(broken)
    text = "\n".join(problems)
    for needle in (
        "missing tensor 'lm_head.weight'",
        "'extra.weight' is not used",
        "'transformer.h.0.attn.attn.weight' has shape (5, 64), expected (160, 64)",
        "small.pt: missing tensor 'encoder.ln_post.bias'",
        "SNAC pytorch_model.bin: tensor 'decoder.extra' is not used",
        "target tensor 'lm_head.weight' is not filled",
    ):
        assert needle in text, needle


def test_unsupported_litgpt_options_are_refused(loaded):
    broken = dict(loaded, lit_raw=dict(loaded["lit_raw"], parallel_residual=True, norm_class_name="LayerNorm"))
    problems = _problems(broken)
    assert len(problems) == 2
    assert any("parallel_residual=True" in p for p in problems)
    assert any("norm_class_name='LayerNorm'" in p for p in problems)


def test_missing_files_are_listed_together(releases, tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    for item in releases["mini-omni2"][0].iterdir():
        if item.name not in ("small.pt", "tokenizer.json"):
            (release / item.name).symlink_to(item)
    with pytest.raises(ConversionError) as info:
        load_sources(release, releases["mini-omni2"][1], progress=False)
    assert len(info.value.problems) == 2
    assert "small.pt" in info.value.problems[0] and "tokenizer.json" in info.value.problems[1]


def test_litgpt_defaults_apply_to_a_short_yaml():
    """A yaml with only the values that differ from the release's Config defaults means the same config."""
    full = oc.release_yaml(vision=True)
    short = {k: v for k, v in full.items() if LITGPT_DEFAULTS.get(k, object()) != v}
    assert len(short) < len(full)
    assert litgpt_config(short, [], []) == litgpt_config(full, [], [])


def test_release_sizes_give_the_default_config():
    """The release's sizes (SPEC §1, §8) map onto this package's default MiniOmni2Config (built from shapes only)."""
    from mini_omni2 import MiniOmni2Config
    from mini_omni2.configuration_mini_omni2 import SNAC_24KHZ
    from mini_omni2.conversion.mapping import build_config, clip_config, snac_config, whisper_config

    lit_yaml = dict(oc.release_yaml(vision=True), n_embd=896, n_layer=24, n_head=14, n_query_groups=2, head_size=64,
                    intermediate_size=4864, padded_vocab_size=181120, text_vocab_size=152000, audio_vocab_size=4160,
                    cat_audio_vocab_size=29120, whisper_adapter_dim=768, vision_adapter_dim=512, block_size=32768)
    dims = dict(n_mels=80, n_vocab=51865, n_audio_ctx=1500, n_audio_state=768, n_audio_head=12, n_audio_layer=12,
                n_text_ctx=448, n_text_state=768, n_text_head=12, n_text_layer=12)
    meta = dict(device="meta")
    clip = {"visual.conv1.weight": torch.empty(768, 3, 32, 32, **meta),
            "visual.positional_embedding": torch.empty(50, 768, **meta), "visual.proj": torch.empty(768, 512, **meta)}
    clip.update({f"visual.transformer.resblocks.{n}.ln_1.weight": torch.empty(768, **meta) for n in range(12)})
    snac_json = {k: v for k, v in SNAC_24KHZ.items() if k != "latent_dim"}
    problems: list[str] = []
    lit = litgpt_config(lit_yaml, problems, [])
    config = build_config(lit, whisper_config(dims, problems), clip_config(clip, problems), snac_config(snac_json, problems), problems)
    assert problems == []
    default = MiniOmni2Config()
    assert config.codec_config == default.codec_config
    for name in ("text_vocab_size", "num_text_special_tokens", "audio_codebook_size", "audio_vocab_size",
                 "num_audio_layers", "num_image_tokens", "adapter_intermediate_size", "total_vocab_size"):
        assert getattr(config, name) == getattr(default, name), name
    for sub, names in (
        ("text_config", ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "num_key_value_heads", "head_dim", "rms_norm_eps", "hidden_act", "tie_word_embeddings")),
        ("audio_config", ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins",
                          "max_source_positions", "activation_function")),
        ("vision_config", ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                           "num_attention_heads", "image_size", "patch_size", "hidden_act", "layer_norm_eps")),
    ):
        for name in names:
            assert getattr(getattr(config, sub), name) == getattr(getattr(default, sub), name), f"{sub}.{name}"
    assert config.text_config.rope_parameters["rope_theta"] == default.text_config.rope_parameters["rope_theta"]


def test_clip_loaders(tmp_path):
    """Scripted and traced archives and a plain state dict give the same tensors; only scripting keeps num_heads."""
    scripted, traced, plain = tmp_path / "s.pt", tmp_path / "t.pt", tmp_path / "p.pt"
    module = oc.save_clip_archive(scripted, seed=5)
    oc.save_clip_archive(traced, seed=5, trace=True)
    torch.save(module.state_dict(), plain)
    results = [load_clip_state(path) for path in (scripted, traced, plain)]
    assert [heads for _, heads in results] == [oc.CLIP_WIDTH // 64, None, None]
    for state, _ in results[1:]:
        assert set(state) == set(results[0][0])
        assert all(torch.equal(state[k], results[0][0][k]) for k in state)


# ----------------------------------------------------------------------------------------------------------------
# command line, Hub ids, dtype, push
# ----------------------------------------------------------------------------------------------------------------
def test_cli_from_hub_ids_in_bfloat16_with_push(releases, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from safetensors import safe_open

    downloads, calls = [], []
    local = {"gpt-omni/mini-omni": releases["mini-omni"][0], "hubertsiuzdak/snac_24khz": releases["mini-omni"][1]}

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        downloads.append((repo_id, allow_patterns))
        return str(local[repo_id])

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload_folder", repo_id, Path(folder_path)))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    output = tmp_path / "out"
    args = add_convert_arguments(argparse.ArgumentParser()).parse_args(
        ["--source", "gpt-omni/mini-omni", "--output", str(output), "--dtype", "bfloat16",
         "--push-to-hub", "me/mini-omni-hf", "--no-progress"]
    )
    assert run_convert(args) == 0
    assert [d[0] for d in downloads] == ["gpt-omni/mini-omni", "hubertsiuzdak/snac_24khz"]
    assert "lit_model.pth" in downloads[0][1] and "pytorch_model.bin" in downloads[1][1]
    assert calls == [("create_repo", "me/mini-omni-hf"), ("upload_folder", "me/mini-omni-hf", output)]
    assert '"<repo_id>"' not in (output / "README.md").read_text()
    assert "me/mini-omni-hf" in (output / "README.md").read_text()
    dtypes = {}
    for shard in output.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            for name in handle.keys():
                dtypes[name] = handle.get_slice(name).get_dtype()
    assert {d for n, d in dtypes.items() if n.startswith("codec.")} == {"F32"}
    assert {d for n, d in dtypes.items() if not n.startswith("codec.")} == {"BF16"}
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"


def test_cli_reports_a_broken_release(releases, tmp_path, capsys):
    release = tmp_path / "release"
    shutil.copytree(releases["mini-omni"][0], release)
    state = torch.load(release / "lit_model.pth")
    state.pop("transformer.ln_f.weight")
    torch.save(state, release / "lit_model.pth")
    args = add_convert_arguments(argparse.ArgumentParser()).parse_args(
        ["--source", str(release), "--output", str(tmp_path / "out"), "--snac", str(releases["mini-omni"][1]),
         "--no-progress"]
    )
    assert run_convert(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing tensor 'transformer.ln_f.weight'" in err
    assert not (tmp_path / "out" / "config.json").exists()


def test_a_bad_source_name_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="neither a folder nor a Hub repo id"):
        convert_checkpoint(tmp_path / "nowhere", tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------------------------------------------
# Hub readiness: loads where mini_omni2 cannot be imported
# ----------------------------------------------------------------------------------------------------------------
HUB_LOADER = textwrap.dedent(
    """
    import json, re, sys
    class BlockMiniOmni2:
        def find_spec(self, name, path=None, target=None):
            if name == "mini_omni2" or name.startswith("mini_omni2."):
                raise ImportError("mini_omni2 is not installed here")
    sys.meta_path.insert(0, BlockMiniOmni2())
    sys.path = [p for p in sys.path if p not in ("", {repo!r}) and not p.startswith({repo!r} + "/")]
    try:
        import mini_omni2
        raise SystemExit("mini_omni2 was importable")
    except ImportError:
        pass
    import numpy as np, soundfile, torch
    from PIL import Image
    from transformers import AutoModelForMultimodalLM, AutoProcessor
    soundfile.write("question.wav", 0.3 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000), 16000)
    Image.new("RGB", (320, 240), (255, 0, 0)).save("picture.jpg")
    report = {{}}
    for folder in sys.argv[1:]:
        model = AutoModelForMultimodalLM.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        batch = processor(text="Hello world. How are you today?", output="text")
        batch.pop("request_index")
        with torch.no_grad():
            logits = model(**batch).logits
        entry = {{"module": type(model).__module__, "processor": type(processor).__module__,
                 "input_ids": batch["input_ids"].tolist(), "last_logits": logits[0, -1].tolist()}}
        mixin = [c for c in type(model).__mro__ if c.__name__ == "MiniOmni2GenerationMixin"]
        if mixin and "generate" in mixin[0].__dict__:
            # the usage code of the model card written into the folder, with short answers
            card = open(folder + "/README.md").read()
            for block in re.findall(r"```python\\n(.*?)```", card, re.S):
                exec(compile(block.replace("max_new_tokens=512", "max_new_tokens=12"), "README.md", "exec"), {{}})
            entry["card_ran"] = True
        report[folder] = entry
    print(json.dumps(report))
    """
)


def test_converted_folders_load_without_the_package(converted, models, tmp_path):
    script = tmp_path / "load.py"
    script.write_text(HUB_LOADER.format(repo=str(REPO)))
    folders = [str(converted[f]) for f in FAMILIES]
    result = subprocess.run(
        [sys.executable, str(script), *folders],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for family, folder in zip(FAMILIES, folders):
        entry = report[folder]
        assert entry["module"].startswith("transformers_modules")
        assert entry["processor"].startswith("transformers_modules")
        with torch.no_grad():
            expected = models[family](input_ids=torch.tensor(entry["input_ids"])).logits[0, -1]
        torch.testing.assert_close(torch.tensor(entry["last_logits"]), expected, atol=1e-5, rtol=0)
        assert entry.get("card_ran"), "generate is missing: the model card's usage code was not run"
    assert (tmp_path / "answer.wav").is_file()


# ----------------------------------------------------------------------------------------------------------------
# corrupted, empty or foreign files; the output folder (issue 12)
# ----------------------------------------------------------------------------------------------------------------
def _release_with(releases, tmp_path, family: str, name: str, content) -> tuple[Path, Path]:
    """A copy of a synthetic release (links) whose file ``name`` is replaced by ``content`` (bytes, or a callable
    writing the file); SNAC files are looked up in the SNAC folder."""
    release, snac = releases[family]
    copies = {}
    for label, folder in (("release", release), ("snac", snac)):
        copy = tmp_path / label
        copy.mkdir()
        for item in folder.iterdir():
            (copy / item.name).symlink_to(item)
        copies[label] = copy
    target = copies["snac" if name in ("pytorch_model.bin", "config.json") else "release"] / name
    target.unlink()
    if callable(content):
        content(target)
    else:
        target.write_bytes(content)
    return copies["release"], copies["snac"]


def _half_of(path: Path):
    return lambda target: target.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BROKEN_FILES = [
    ("mini-omni2", "lit_model.pth", b"", "is empty"),
    ("mini-omni2", "lit_model.pth", b"\x00\x01garbage" * 10, "cannot be read"),
    ("mini-omni2", "lit_model.pth", "half", "cannot be read"),
    ("mini-omni2", "lit_model.pth", "text", "cannot be read"),
    ("mini-omni2", "lit_model.pth", "whisper", "not tensors: 'dims' \\(dict\\)"),
    ("mini-omni2", "lit_model.pth", "list", "found a list"),
    ("mini-omni2", "ViT-B-32.pt", b"", "is empty"),
    ("mini-omni2", "ViT-B-32.pt", "half", "cannot be read"),
    ("mini-omni2", "ViT-B-32.pt", "whisper", "not tensors"),
    ("mini-omni", "small.pt", b"", "is empty"),
    ("mini-omni", "small.pt", "lit", "not an openai-whisper checkpoint"),
    ("mini-omni", "model_config.yaml", b"", "empty or not a mapping"),
    ("mini-omni", "model_config.yaml", b"n_head: [unclosed", "cannot be read \\(ScannerError|cannot be read \\(ParserError"),
    ("mini-omni", "pytorch_model.bin", b"PK\x03\x04broken zip", "cannot be read"),
    ("mini-omni", "config.json", b"{not json", "cannot be read \\(JSONDecodeError"),
]


@pytest.mark.parametrize("family,name,content,message", BROKEN_FILES,
                         ids=[f"{n}-{c if isinstance(c, str) else len(c)}" for _, n, c, _ in BROKEN_FILES])
def test_a_corrupted_empty_or_foreign_file_is_named(releases, tmp_path, family, name, content, message):
    """Issue 12: such files ended in UnicodeDecodeError, UnpicklingError or a bare EOFError."""
    source = releases[family][0]
    writers = {
        "half": _half_of((source if name != "pytorch_model.bin" else releases[family][1]) / name),
        "text": lambda target: target.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n"),
        "whisper": lambda target: target.write_bytes((source / "small.pt").read_bytes()),
        "lit": lambda target: target.write_bytes((source / "lit_model.pth").read_bytes()),
        "list": lambda target: torch.save([torch.ones(2)], target),
    }
    release, snac = _release_with(releases, tmp_path, family, name, writers.get(content, content))
    with pytest.raises(ConversionError, match=message) as info:
        convert_checkpoint(release, tmp_path / "out", snac=snac, progress=False)
    assert name in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_head="six"), "n_head is 'six', expected a positive integer"),
        (dict(n_head=0), "n_head is 0, expected a positive integer"),
        (dict(norm_eps="small"), "norm_eps is 'small', expected a number"),
        (dict(bias="no"), "bias is 'no', expected bool"),
        (dict(padded_vocab_size=12.5), "padded_vocab_size is 12.5"),
    ],
)
def test_mistyped_yaml_values_are_problems(loaded, change, message):
    problems = _problems(dict(loaded, lit_raw=dict(loaded["lit_raw"], **change)))
    assert any(re.search(message, p) for p in problems), problems


def test_mistyped_whisper_dims_and_snac_config_are_problems(loaded):
    broken = dict(loaded, whisper_dims=dict(loaded["whisper_dims"], n_audio_head="2"),
                  snac_raw=dict(loaded["snac_raw"], vq_strides=[4, "2", 1]))
    text = "\n".join(_problems(broken))
    assert "small.pt dims: n_audio_head is '2', expected a positive integer" in text
    assert "SNAC config.json: vq_strides is [4, '2', 1]" in text


def test_converting_over_an_older_sharded_conversion(releases, tmp_path):
    """Issue 12: the stale model.safetensors.index.json of an older sharded conversion stayed, naming deleted shards,
    and the folder check read it and passed."""
    release, snac = releases["mini-omni"]
    output = tmp_path / "out"
    convert_checkpoint(release, output, snac=snac, progress=False, max_shard_size="300KB")
    assert len(list(output.glob("model-*.safetensors"))) > 1 and (output / "model.safetensors.index.json").is_file()
    (output / "notes.txt").write_text("mine")  # not a weight file: kept
    convert_checkpoint(release, output, snac=snac, progress=False)  # one file this time
    assert sorted(p.name for p in output.glob("model*.safetensors*")) == ["model.safetensors"]
    assert (output / "notes.txt").read_text() == "mine"
    MiniOmni2ForConditionalGeneration.from_pretrained(output)


def test_the_folder_check_does_not_trust_an_index(releases, tmp_path):
    from mini_omni2.conversion.convert import _verify_folder

    release, snac = releases["mini-omni"]
    output = convert_checkpoint(release, tmp_path / "out", snac=snac, progress=False)
    with safe_open_keys(output / "model.safetensors") as names:
        expected = set(names)
    _verify_folder(output, expected)
    stale = {"metadata": {}, "weight_map": {name: "model-00001-of-00002.safetensors" for name in expected}}
    (output / "model.safetensors.index.json").write_text(json.dumps(stale))
    with pytest.raises(ConversionError) as info:
        _verify_folder(output, expected)
    text = str(info.value)
    assert "names model-00001-of-00002.safetensors, which is not in the folder" in text
    assert "model.safetensors is in the folder but not in model.safetensors.index.json" in text


class safe_open_keys:
    def __init__(self, path):
        from safetensors import safe_open

        self.handle = safe_open(str(path), "pt")

    def __enter__(self):
        return list(self.handle.keys())

    def __exit__(self, *exc):
        return False


def test_the_output_is_checked_before_anything_is_read(releases, tmp_path):
    release, snac = releases["mini-omni"]
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(ConversionError, match="exists and is not a folder"):
        convert_checkpoint(tmp_path / "no-release-here", a_file, progress=False)
    with pytest.raises(ConversionError, match="taken is not a folder"):
        convert_checkpoint(tmp_path / "no-release-here", a_file / "sub" / "out", progress=False)
    with pytest.raises(ConversionError, match="is the release folder itself"):
        convert_checkpoint(release, release, snac=snac, progress=False)
    with pytest.raises(ValueError, match="max_shard_size"):
        convert_checkpoint(tmp_path / "no-release-here", tmp_path / "out", max_shard_size="big", progress=False)


def test_convert_cli_errors_are_one_line(releases, tmp_path, capsys):
    from mini_omni2.cli import main

    release, snac = _release_with(releases, tmp_path, "mini-omni", "lit_model.pth", b"")
    code = main(["convert", "--source", str(release), "--snac", str(snac), "--output", str(tmp_path / "out"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert str(release / "lit_model.pth") in err
    assert main(["convert", "--source", str(release), "--output", str(tmp_path / "o2"), "--max-shard-size", "-3"]) == 2
    assert capsys.readouterr().err.startswith("error: max_shard_size must be")
