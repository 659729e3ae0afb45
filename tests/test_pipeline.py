"""MiniOmni2Pipeline (issue 11): requests in every input form, batching, generate arguments, the ASR task, dtype, and
the pipeline and endpoint handler of a saved folder used where mini_omni2 is not installed."""

from __future__ import annotations

import base64
import copy
import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile
import torch
from transformers import pipeline

from mini_omni2 import MiniOmni2Pipeline
from mini_omni2.modeling_mini_omni2 import native_bfloat16
from mini_omni2.pipeline_mini_omni2 import resolve_dtype
from mini_omni2.tiny import tiny_model

from conftest import color_image, espeak_wav, install_in_hub_cache

GREEDY = {"do_sample": False, "codec_noise": False}  # deterministic answers and waveforms


@pytest.fixture(scope="module")
def pipe(model, processor):
    """The session's float32 model, kept float32: ``dtype="auto"`` would cast it in place to bfloat16 on a CPU with
    AVX512_BF16 (test_dtype covers that), and batches of other shapes round differently in bfloat16."""
    return pipeline("any-to-any", model=model, processor=processor, dtype="float32", generate_kwargs=GREEDY,
                    max_new_tokens=10)


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    """A spoken question: an espeak-ng wav file (22,050 Hz) and its samples."""
    path = espeak_wav("What is your name?", tmp_path_factory.mktemp("question") / "question.wav")
    samples, rate = soundfile.read(path, dtype="float32")
    return path, samples, rate


def direct(model, processor, **request):
    """The answer of model.generate for one request, as the pipeline should give it."""
    inputs = processor(**request)
    inputs.pop("request_index")
    out = model.generate(**inputs, max_new_tokens=10, **GREEDY)
    answer = {"text": processor.decode(out.text_ids[0])}
    if out.output_kinds[0] == "speech":
        answer["audio"], answer["sampling_rate"] = out.waveforms[0].numpy(), out.sampling_rate
    return answer


def assert_same_answer(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    assert got["text"] == expected["text"]
    if "audio" in expected:
        assert got["sampling_rate"] == expected["sampling_rate"] == 24000
        assert isinstance(got["audio"], np.ndarray) and got["audio"].dtype == np.float32 and got["audio"].ndim == 1
        np.testing.assert_array_equal(got["audio"], expected["audio"])


# ----- requests ------------------------------------------------------------------------------------------------------
def test_the_registered_any_to_any_pipeline_answers_as_generate(pipe, model, processor):
    assert isinstance(pipe, MiniOmni2Pipeline)
    answer = pipe("hello world")  # a string is a written prompt; the default answer is spoken
    assert_same_answer(answer, direct(model, processor, text="hello world", output="speech"))
    assert answer["audio"].size > 0
    assert_same_answer(pipe("hello world", output="text"), direct(model, processor, text="hello world", output="text"))


def test_audio_in_every_form_gives_the_same_answer(pipe, model, processor, question):
    import datasets

    path, samples, rate = question
    with open(path, "rb") as handle:
        encoded = handle.read()
    at_16k = processor.prepare_audio(path)
    column = datasets.Dataset.from_dict({"audio": [path]}).cast_column("audio", datasets.Audio(decode=False))
    forms = [
        path,
        encoded,
        (samples, rate),
        {"array": samples, "sampling_rate": rate},
        {"raw": samples, "sampling_rate": rate},
        {"path": None, "bytes": encoded},
        column[0]["audio"],  # a datasets Audio value
        at_16k,  # a bare array is at 16 kHz, as in transformers' ASR pipeline
        torch.from_numpy(at_16k),
    ]
    expected = direct(model, processor, audio=path, output="asr")
    for form in forms:
        assert_same_answer(pipe({"audio": form, "output": "asr"}), expected)
    # an audio value alone is a request with the default (spoken) answer
    assert_same_answer(pipe(encoded), direct(model, processor, audio=path, output="speech"))
    assert_same_answer(pipe(samples, sampling_rate=rate, output="text"), direct(model, processor, audio=path, output="text"))


def test_images_and_keyword_requests(pipe, model, processor, question):
    path = question[0]
    image = color_image((0, 0, 255))
    expected = direct(model, processor, audio=path, images=image, output="speech")
    assert_same_answer(pipe({"audio": path, "image": image}), expected)
    assert_same_answer(pipe(audio=path, images=image), expected)
    assert_same_answer(pipe(image, output="text"), direct(model, processor, images=image, output="text"))
    answers = pipe(text=["hello world", None], audio=[None, path], output="text")
    assert_same_answer(answers[0], direct(model, processor, text="hello world", output="text"))
    assert_same_answer(answers[1], direct(model, processor, audio=path, output="text"))


def test_batches_answer_as_one_by_one(pipe, question):
    path = question[0]
    requests = [
        "hello world",
        {"audio": path, "output": "asr"},
        {"text": "the quick fox", "output": "text"},
        {"audio": path, "image": color_image(), "output": "speech"},
        "what is your name",
    ]
    alone = [pipe(r) for r in requests]
    for batch_size in (2, 5):
        batched = pipe(requests, batch_size=batch_size)
        assert len(batched) == len(requests)
        for got, expected in zip(batched, alone):
            assert_same_answer(got, expected)
    streamed = list(pipe((r for r in requests), batch_size=2))  # a generator streams the answers
    for got, expected in zip(streamed, alone):
        assert_same_answer(got, expected)


def test_generation_arguments(pipe, model, processor):
    short = pipe("hello world", output="text", max_new_tokens=2, generate_kwargs={"do_sample": False})
    inputs = processor(text="hello world", output="text")
    inputs.pop("request_index")
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert short["text"] == processor.decode(out.text_ids[0])
    sampled = [pipe("hello world", output="text", max_new_tokens=8,
                    generate_kwargs={"do_sample": True, "top_k": 0, "temperature": 5.0, "generator": torch.Generator().manual_seed(s)})
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    with pytest.raises(ValueError, match="max_new_tokens is given both"):
        pipe("hello world", max_new_tokens=3, generate_kwargs={"max_new_tokens": 4})
    with pytest.raises(TypeError, match="unexpected arguments \\['temperature'\\]"):
        pipe("hello world", temperature=0.5)
    with pytest.raises(TypeError, match="generate\\(\\) got unexpected arguments"):
        pipe("hello world", generate_kwargs={"num_beam": 2})
    with pytest.raises(ValueError, match="num_beams=2: beam search"):
        pipe("hello world", generate_kwargs={"num_beams": 2})


def test_bad_requests_get_one_clear_error(pipe, model_no_vision, processor_no_vision, question):
    path = question[0]
    with pytest.raises(ValueError, match="No layout for inputs \\['audio', 'text'\\]"):
        pipe({"text": "hello", "audio": path})
    with pytest.raises(ValueError, match="output must be one of"):
        pipe("hello", output="music")
    with pytest.raises(ValueError, match="unknown request keys \\['prompt'\\]"):
        pipe({"prompt": "hello"})
    with pytest.raises(TypeError, match="cannot make a request of a int"):
        pipe(3)
    with pytest.raises(ValueError, match="the request has no text, audio or image"):
        pipe({"output": "text"})
    with pytest.raises(ValueError, match="audio file not found"):
        pipe({"audio": "/nowhere/question.wav"} | {"output": "text"})
    with pytest.raises(ValueError, match="not both"):
        pipe("hello", text="hello")
    mini_omni = pipeline("any-to-any", model=model_no_vision, processor=processor_no_vision, dtype="float32")
    with pytest.raises(ValueError, match="no vision encoder"):
        mini_omni({"image": color_image(), "output": "text"})
    with pytest.raises(ValueError, match="needs the model's processor"):
        MiniOmni2Pipeline(model=model_no_vision)


def test_the_asr_task(model, processor, question):
    asr = pipeline("automatic-speech-recognition", model=model, processor=processor, pipeline_class=MiniOmni2Pipeline,
                   dtype="float32", generate_kwargs=GREEDY, max_new_tokens=10)  # float32: see the pipe fixture
    path = question[0]
    answer = asr(path)  # with this task a string is an audio file, and the answer a transcription
    assert answer == {"text": direct(model, processor, audio=path, output="asr")["text"]}
    assert asr([path, path], batch_size=2) == [answer, answer]


def test_other_models_keep_transformers_any_to_any(monkeypatch):
    """Registered for any-to-any, the class hands models that are not Mini-Omni2 to transformers' own pipeline."""
    import transformers.pipelines.any_to_any as any_to_any
    from transformers import Qwen2Config, Qwen2ForCausalLM

    class Stub:
        def __init__(self, *args, **kwargs):
            self.kwargs = kwargs

    monkeypatch.setattr(any_to_any, "AnyToAnyPipeline", Stub)
    other = Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    built = MiniOmni2Pipeline(model=other, task="any-to-any")
    assert isinstance(built, Stub) and built.kwargs["model"] is other


def test_dtype(processor):
    native = torch.bfloat16 if native_bfloat16("cpu") else torch.float32  # auto: the hardware's choice
    assert resolve_dtype("auto", None) is native and resolve_dtype(None, None) is native
    assert resolve_dtype("bfloat16", None) is torch.bfloat16 and resolve_dtype(torch.float16, None) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'bf17'"):
        resolve_dtype("bf17", None)
    model = tiny_model(seed=3)
    auto = pipeline("any-to-any", model=model, processor=processor, dtype="auto")
    assert auto.model.dtype == native
    cast = pipeline("any-to-any", model=model, processor=processor, dtype="bfloat16", max_new_tokens=6)
    assert cast.model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for p in cast.model.codec.parameters()} == {torch.float32}  # SNAC stays float32
    answer = cast("hello world")
    assert answer["audio"].dtype == np.float32 and isinstance(answer["text"], str)


# ----- a Hub repo, where mini_omni2 is not installed ------------------------------------------------------------------
REMOTE_USER = textwrap.dedent(
    """
    import base64, importlib.util, io, json, re, sys
    class BlockMiniOmni2:
        def find_spec(self, name, path=None, target=None):
            if name == "mini_omni2" or name.startswith("mini_omni2."):
                raise ImportError("mini_omni2 is not installed here")
    sys.meta_path.insert(0, BlockMiniOmni2())
    import numpy as np, soundfile
    from PIL import Image
    from transformers import pipeline
    repo_id, snapshot, question = sys.argv[1:4]
    greedy = {"do_sample": False, "codec_noise": False}
    report = {}

    # the model card's usage code, as written (the repo id), with short answers
    soundfile.write("question.wav", *soundfile.read(question))
    Image.new("RGB", (320, 240), (255, 0, 0)).save("picture.jpg")
    card = open(snapshot + "/README.md").read()
    for block in re.findall(r"```python\\n(.*?)```", card, re.S):
        exec(compile(block.replace("max_new_tokens=512", "max_new_tokens=12"), "README.md", "exec"), {})
    report["card_blocks"] = len(re.findall(r"```python\\n(.*?)```", card, re.S))

    # the Inference Endpoints runtime: handler.py imported from the repository folder, called with the parsed body
    spec = importlib.util.spec_from_file_location("handler", snapshot + "/handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = module.EndpointHandler(path=snapshot)

    # the pipeline it serves (built by pipeline(model=..., trust_remote_code=True))
    pipe = handler.pipeline
    report["pipeline"] = type(pipe).__module__ + "." + type(pipe).__name__
    report["task"] = pipe.task
    audio = open(question, "rb").read()
    answers = pipe(["hello world", {"audio": audio, "output": "asr"}, {"audio": {"path": question, "bytes": None}}],
                   batch_size=2, max_new_tokens=10, generate_kwargs=greedy)
    report["answers"] = [{"text": a["text"], "audio": a["audio"].tolist() if "audio" in a else None} for a in answers]
    body = json.dumps({"inputs": [{"text": "hello world"}, {"audio": base64.b64encode(audio).decode(), "output": "text"}],
                       "parameters": {"max_new_tokens": 10, "generate_kwargs": greedy, "batch_size": 2}})
    report["endpoint"] = json.loads(json.dumps(handler(json.loads(body))))
    single = {"inputs": "hello world", "parameters": {"output": "text", "max_new_tokens": 10}}
    report["endpoint_single"] = json.loads(json.dumps(handler(single)))
    try:
        handler({"inputs": {"audio": "not base64!"}})
    except ValueError as error:
        report["endpoint_error"] = str(error)
    print(json.dumps(report))
    """
)


def test_a_hub_repo_serves_the_card_code_pipeline_and_endpoint_without_the_package(model, processor, question, tmp_path):
    folder = tmp_path / "tiny-mini-omni2"
    model.save_pretrained(folder, repo_id="me/tiny-mini-omni2")
    processor.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"] == {
        "any-to-any": {"impl": "pipeline_mini_omni2.MiniOmni2Pipeline", "pt": ["AutoModelForMultimodalLM"],
                       "type": "multimodal"}
    }
    for name in ("pipeline_mini_omni2.py", "handler.py", "requirements.txt", "README.md"):
        assert (folder / name).is_file(), name
    assert 'pipeline(model="me/tiny-mini-omni2", trust_remote_code=True)' in (folder / "README.md").read_text()
    snapshot = install_in_hub_cache(folder, "me/tiny-mini-omni2", tmp_path / "hf")
    script = tmp_path / "user.py"
    script.write_text(REMOTE_USER)
    result = subprocess.run(
        [sys.executable, str(script), "me/tiny-mini-omni2", snapshot, question[0]], cwd=tmp_path, capture_output=True,
        text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path),
             "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["card_blocks"] == 2 and (tmp_path / "answer.wav").is_file()  # the card's code ran, as written
    assert report["pipeline"].startswith("transformers_modules.") and report["pipeline"].endswith(".MiniOmni2Pipeline")
    assert report["task"] == "any-to-any"

    # the remote pipeline runs in the auto dtype (bfloat16 on a CPU with AVX512_BF16): the package's pipeline in that
    # dtype, on the same batches, is what it must equal
    local = pipeline("any-to-any", model=copy.deepcopy(model), processor=processor, dtype="auto", generate_kwargs=GREEDY,
                     max_new_tokens=10)
    expected = local(["hello world", {"audio": question[0], "output": "asr"}, {"audio": question[0]}], batch_size=2)
    for got, want in zip(report["answers"], expected):
        assert got["text"] == want["text"]
        if "audio" in want:
            np.testing.assert_allclose(np.array(got["audio"], dtype=np.float32), want["audio"], atol=1e-6)
        else:
            assert got["audio"] is None

    speech, text = report["endpoint"]
    want_speech, want_text = local(["hello world", {"audio": question[0], "output": "text"}], batch_size=2)
    assert speech["text"] == want_speech["text"] and speech["sampling_rate"] == 24000
    waveform, rate = soundfile.read(io.BytesIO(base64.b64decode(speech["audio"])), dtype="float32")
    assert rate == 24000 and waveform.shape == want_speech["audio"].shape
    np.testing.assert_allclose(waveform, want_speech["audio"], atol=1 / 32768 + 1e-6)  # 16-bit PCM
    assert text == {"text": want_text["text"]}
    assert report["endpoint_single"] == {"text": local("hello world", output="text")["text"]}
    assert "audio is not valid base64" in report["endpoint_error"]
