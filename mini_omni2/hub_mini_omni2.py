"""What a saved Mini-Omni2 folder needs on the Hub besides weights and code: the model card, the Inference Endpoints
handler and the pipeline entry in ``config.json``.

``MiniOmni2PreTrainedModel.save_pretrained`` and ``push_to_hub`` call :func:`save_with_hub_files` and
:func:`push_to_hub`, so every saved model (converted, fine-tuned, LoRA-merged) gets them. See ``docs/pipeline.md``.

This file is shipped as remote code with saved models: it imports only torch, transformers, their dependencies
(huggingface_hub) and sibling modules.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .pipeline_mini_omni2 import custom_pipelines_entry

#: The released checkpoints of each family (SPEC §8), the default ``base_model`` of a card.
RELEASES = {True: "gpt-omni/mini-omni2", False: "gpt-omni/mini-omni"}
DISPLAY_NAMES = {True: "Mini-Omni2", False: "Mini-Omni"}
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: First line of the card body; a README.md that lacks it is the user's own and is never overwritten.
CARD_MARKER = "<!-- Written by mini-omni2's save_pretrained; rewritten on every save (remove this line to keep edits). -->"
HANDLER_FILE = "handler.py"
REQUIREMENTS_FILE = "requirements.txt"
#: What the remote code needs beyond torch and transformers (installed by Inference Endpoints from the repo).
ENDPOINT_REQUIREMENTS = ["snac>=1.2", "soundfile", "librosa"]
#: The eval results behind a folder's card, kept so that later additions merge with them.
EVAL_RESULTS_FILE = "eval_results.json"
_EVALUATION_SECTION = re.compile(r"^## Evaluation\n.*?(?=^## )", re.S | re.M)
_AFTER_EVALUATION = "## Facts kept from the release"

HANDLER_SOURCE = '''"""Inference Endpoints handler of this Mini-Omni2 model (written by mini-omni2's save_pretrained).

Request: {"inputs": <text, base64 audio/image object, or a list of them>, "parameters": {...}}; answer: {"text": ...,
"audio": <base64 wav>, "sampling_rate": 24000}. See the model card. The model's code is in this repository
(trust_remote_code), so the endpoint needs no mini-omni2 installation.
"""

from typing import Any

from transformers import pipeline


class EndpointHandler:
    def __init__(self, path: str = ""):
        self.pipeline = pipeline(model=path or ".", trust_remote_code=True)

    def __call__(self, data: dict[str, Any]) -> Any:
        return self.pipeline.handle_endpoint_request(data)
'''

_SAVE_PUSH_KEYS = ("commit_message", "commit_description", "private", "token", "create_pr", "revision")


@dataclass(frozen=True)
class EvalMetric:
    """How the card reports one metric of a ``mini-omni2 eval`` results dict."""

    key: str  # in results["metrics"], a fraction
    task_type: str  # model-index task type
    task_name: str
    metric_type: str  # model-index metric type
    label: str  # the table's and model-index's name (shown in %)


#: The metrics each ``mini-omni2 eval`` task reports (docs/evaluation.md).
EVAL_METRICS = {
    "asr": [EvalMetric("wer", "automatic-speech-recognition", "Automatic Speech Recognition", "wer", "WER")],
    "spoken-qa": [
        EvalMetric("speech_text_wer", "any-to-any", "Spoken question answering", "wer", "Speech-text WER"),
        EvalMetric("accuracy", "any-to-any", "Spoken question answering", "accuracy", "Accuracy"),
    ],
}


# ----------------------------------------------------------------------------------------------------------------
# evaluation results -> model-index
# ----------------------------------------------------------------------------------------------------------------
def load_eval_results(eval_results: Any) -> list[dict]:
    """``mini-omni2 eval`` results: a results dict, a path to its JSON file, or a list of those -> list of dicts."""
    if eval_results is None:
        return []
    items = eval_results if isinstance(eval_results, (list, tuple)) else [eval_results]
    loaded = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if not path.is_file():
                raise ValueError(f"evaluation results file not found: {path}")
            item = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(item, dict) or "task" not in item or "metrics" not in item:
            raise ValueError("evaluation results must be the JSON written by `mini-omni2 eval` (with 'task' and 'metrics')")
        loaded.append(item)
    return loaded


def _dataset_type(dataset: str) -> str:
    return dataset if HUB_ID.match(dataset or "") and not Path(dataset).exists() else Path(dataset or "dataset").name


def _reported(result: dict) -> list[tuple[EvalMetric, float]]:
    """The metrics of one results dict that have a value, with how the card reports them."""
    if result["task"] not in EVAL_METRICS:
        raise ValueError(f"unknown evaluation task {result['task']!r}; expected one of {sorted(EVAL_METRICS)}")
    metrics = result["metrics"]
    return [(m, metrics[m.key]) for m in EVAL_METRICS[result["task"]] if metrics.get(m.key) is not None]


def eval_results_to_model_index(results: Iterable[dict]):
    """``mini-omni2 eval`` results -> ``huggingface_hub.EvalResult``s (WER and accuracy in %)."""
    from huggingface_hub import EvalResult

    entries = []
    for result in results:
        dataset = _dataset_type(result.get("dataset") or "dataset")
        parts = [p for p in (result.get("config"), result.get("split")) if p]
        for metric, value in _reported(result):
            entries.append(EvalResult(
                task_type=metric.task_type, task_name=metric.task_name, metric_type=metric.metric_type,
                metric_name=f"{metric.label} (%)", metric_value=round(100 * value, 2), dataset_type=dataset,
                dataset_name=f"{dataset} ({', '.join(parts)})" if parts else dataset,
                dataset_config=result.get("config"), dataset_split=result.get("split"),
            ))
    return entries


# ----------------------------------------------------------------------------------------------------------------
# the card
# ----------------------------------------------------------------------------------------------------------------
def default_base_model(config) -> str:
    """The model this one comes from: the Hub id it was loaded from, else its family's release."""
    name = getattr(config, "_name_or_path", "") or ""
    if HUB_ID.match(name) and not Path(name).exists():
        return name
    return RELEASES[bool(config.has_vision)]


def _tags(config, extra: Iterable[str] | None) -> list[str]:
    tags = ["mini-omni2", "any-to-any", "speech-to-speech", "automatic-speech-recognition", "text-to-speech", "audio",
            "multimodal", "snac", "whisper"]
    if config.has_vision:
        tags += ["vision", "clip"]
    tags.append("custom_code")
    for tag in extra or ():
        if tag not in tags:
            tags.append(tag)
    return tags


#: The Hub widget's examples: a written question, and a spoken prompt (a public speech sample of the Hub).
WIDGET = [
    {"text": "What is your name?", "example_title": "A written question (text and speech answer)"},
    {"src": "https://cdn-media.huggingface.co/speech_samples/sample1.flac", "example_title": "A spoken prompt"},
]


def _parts_table(config) -> str:
    t, a = config.text_config, config.audio_config
    rows = [
        ("language model", f"Qwen2: {t.num_hidden_layers} layers, hidden {t.hidden_size}, {t.num_attention_heads} query "
                           f"heads, {t.num_key_value_heads} key/value groups"),
        ("audio encoder", f"Whisper encoder: {a.encoder_layers} layers, d_model {a.d_model}, {config.max_audio_frames} "
                          "frames (30 s at the released size)"),
    ]
    if config.has_vision:
        v = config.vision_config
        rows.append(("vision encoder", f"CLIP ViT ({v.num_hidden_layers} layers, width {v.hidden_size}): all "
                                       f"{config.num_image_tokens} tokens after the post layer norm, projected to "
                                       f"{v.projection_dim}"))
    rows.append(("adapters", "LLaMA-MLP shaped, one per modality"))
    if config.codec_config:
        rows.append(("codec", f"SNAC {config.codec_config.get('sampling_rate', 24000) // 1000} kHz, included"))
    return "| part | this model |\n|---|---|\n" + "\n".join(f"| {p} | {d} |" for p, d in rows)


def _usage(config, repo_id: str) -> str:
    vision = (
        '\n# A spoken question about a picture.\n'
        'answer = pipe({"audio": "question.wav", "image": "picture.jpg"}, max_new_tokens=512)\n'
        'print(answer["text"])\n'
        if config.has_vision else ""
    )
    image_field = ' "image": "<base64 of an image>",' if config.has_vision else ""
    return f'''## Usage

With transformers' `pipeline` (the model's code, the pipeline included, is in this repository; nothing else to
install but `snac`, `soundfile` and `librosa`):

```python
import soundfile as sf
from transformers import pipeline

pipe = pipeline(model="{repo_id}", trust_remote_code=True)

# A written question, answered in text and speech.
answer = pipe("What is your name?", max_new_tokens=512)
print(answer["text"])
sf.write("answer.wav", answer["audio"], answer["sampling_rate"])

# A spoken question (a path, encoded bytes, (array, rate) or a datasets Audio value), answered in text only.
print(pipe({{"audio": "question.wav", "output": "text"}}, max_new_tokens=512)["text"])

# Transcription, several requests in one batch.
print(pipe([{{"audio": "question.wav", "output": "asr"}}] * 2, batch_size=2, max_new_tokens=512))
{vision}```

`output` is `"speech"` (the default: text and a 24 kHz waveform), `"text"` or `"asr"`; `generate_kwargs={{...}}` takes
any argument of `model.generate` (`do_sample`, `temperature`, `codec_noise`, ...).

With the model and processor (streaming, the generate output's codes and frames):

```python
import torch
from transformers import AutoModelForMultimodalLM, AutoProcessor

model = AutoModelForMultimodalLM.from_pretrained("{repo_id}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = processor(audio="question.wav", output="speech")
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=512)
print(processor.decode(out.text_ids[0]))   # out.waveforms[0]: the spoken answer at out.sampling_rate
```

### Inference Endpoints

`handler.py` serves the pipeline. Request: `{{"inputs": "What is your name?"}}`, or
`{{"inputs": {{"audio": "<base64 of a wav/flac file>",{image_field} "output": "speech"}}, "parameters":
{{"max_new_tokens": 256}}}}` (a list of inputs answers a batch). Answer: `{{"text": "...", "audio": "<base64 of a
16-bit wav>", "sampling_rate": 24000}}`.
'''


def _evaluation(eval_results: list[dict]) -> str:
    if not eval_results:
        return ""
    lines = ["## Evaluation", "", "Measured with `mini-omni2 eval` (text normalized with Whisper's English normalizer).",
             "", "| task | dataset | config | split | examples | metric | value |", "|---|---|---|---|---:|---|---:|"]
    for result in eval_results:
        for metric, value in _reported(result):
            lines.append(f"| {result['task']} | {_dataset_type(result.get('dataset') or '')} | {result.get('config') or ''} "
                         f"| {result.get('split') or ''} | {result.get('num_examples', '')} | {metric.label} % | "
                         f"{100 * value:.2f} |")
    return "\n".join(lines) + "\n"


def render_model_card(
    config,
    repo_id: str,
    *,
    base_model: str | None = None,
    origin: str | None = None,
    eval_results: Any = None,
    tags: Iterable[str] | None = None,
) -> str:
    """The model card (README.md) of a saved Mini-Omni2 / Mini-Omni model.

    Args:
        config: the model's ``MiniOmni2Config``.
        repo_id: the Hub id (or folder) the usage code loads.
        base_model: the model this one was converted or fine-tuned from (default: :func:`default_base_model`).
        origin: one sentence on where the weights come from (default: saved with mini-omni2 from ``base_model``).
        eval_results: ``mini-omni2 eval`` results (dicts or JSON paths) for the ``model-index`` and a table.
        tags: extra tags.
    """
    from huggingface_hub import ModelCardData

    vision = bool(config.has_vision)
    base_model = base_model or default_base_model(config)
    results = load_eval_results(eval_results)
    model_index = eval_results_to_model_index(results)
    data = ModelCardData(
        license="mit",
        library_name="transformers",
        pipeline_tag="any-to-any",
        base_model=base_model,
        tags=_tags(config, tags),
        widget=WIDGET,
        eval_results=model_index or None,
        model_name=repo_id if model_index else None,
    )
    name = DISPLAY_NAMES[vision]
    origin = origin or (
        f"Saved with the `mini-omni2` package; it comes from [`{base_model}`](https://huggingface.co/{base_model})"
        " (converted, fine-tuned or merged)."
    )
    hears = "hears (Whisper encoder), sees (CLIP ViT) and reads text" if vision else "hears (Whisper encoder) and reads text"
    body = f"""{CARD_MARKER}

# {repo_id.rstrip('/').split('/')[-1]} ({name}, transformers)

{name} is an omni model: it {hears}, and answers in text and streaming speech at the same time. Its Qwen2 language
model emits 8 tokens per step, one text token and 7 [SNAC](https://huggingface.co/hubertsiuzdak/snac_24khz)
audio-codec tokens (each audio layer one step behind the previous), and a second, text-only row steers the spoken
answer ("batch parallel decoding").

{origin} It loads with `trust_remote_code=True`: the code files are in this repository.

{_parts_table(config)}

{_usage(config, repo_id)}
{_evaluation(results)}
## Facts kept from the release

- One embedding table and LM head over text ids (Qwen2 + 64 specials) and 7 audio layers (codec codes + 64 specials).
- Input = mean of the 8 stream embeddings; Whisper frames and CLIP tokens replace the 7 audio-stream embeddings at
  their positions (for image + speech, audio starts at position 52, as the release does).
- Text-instruct delayed parallel decoding and batch parallel decoding, as in the release's inference code; its
  sampling (temperature 0.9, top-k 1, top-p 1.0) is greedy.

## Limitations

The model is small: answers are short and simple, English only. Speech input is limited to 30 s. The image + text
and image-only prompts are extensions of this port, not layouts the released model was trained on.

## Citation

```bibtex
@article{{xie2024miniomni2,
  title   = {{Mini-Omni2: Towards Open-source GPT-4o with Vision, Speech and Duplex Capabilities}},
  author  = {{Xie, Zhifei and Wu, Changqiao}},
  journal = {{arXiv preprint arXiv:2410.11190}},
  year    = {{2024}}
}}
```
"""
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


# ----------------------------------------------------------------------------------------------------------------
# writing a folder
# ----------------------------------------------------------------------------------------------------------------
def _is_ours(readme: Path) -> bool:
    return not readme.exists() or CARD_MARKER in readme.read_text(encoding="utf-8")


def write_hub_files(
    model,
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    origin: str | None = None,
    eval_results: Any = None,
    tags: Iterable[str] | None = None,
    model_card: bool = True,
) -> None:
    """Write ``handler.py``, ``requirements.txt`` and (unless the folder holds a card of the user's own, or
    ``model_card=False``) ``README.md`` into a saved folder."""
    folder = Path(folder)
    (folder / HANDLER_FILE).write_text(HANDLER_SOURCE, encoding="utf-8")
    (folder / REQUIREMENTS_FILE).write_text("\n".join(ENDPOINT_REQUIREMENTS) + "\n", encoding="utf-8")
    readme = folder / "README.md"
    if model_card and _is_ours(readme):
        results = load_eval_results(eval_results)
        card = render_model_card(
            model.config, repo_id or str(folder.resolve()), base_model=base_model, origin=origin,
            eval_results=results, tags=tags,
        )
        readme.write_text(card, encoding="utf-8")
        # the results behind the card (for add_eval_results); results of other weights must not survive a save
        results_file = folder / EVAL_RESULTS_FILE
        if results:
            results_file.write_text(json.dumps(results, indent=2), encoding="utf-8")
        elif results_file.exists():
            results_file.unlink()


def add_eval_results(folder: str | os.PathLike, eval_results: Any) -> Path:
    """Add ``mini-omni2 eval`` results to the card of a saved folder: its ``model-index`` and evaluation table.

    Results of the same task, dataset, config and split replace the earlier ones; the rest of the card is kept.
    """
    from huggingface_hub import ModelCard

    folder = Path(folder)
    readme = folder / "README.md"
    if not readme.is_file() or not _is_ours(readme):
        raise ValueError(f"{readme} is not a card written by mini-omni2's save_pretrained; save the model there first")
    new = load_eval_results(eval_results)
    key = lambda r: (r["task"], r.get("dataset"), r.get("config"), r.get("split"))  # noqa: E731
    results_file = folder / EVAL_RESULTS_FILE
    earlier = load_eval_results(json.loads(results_file.read_text(encoding="utf-8"))) if results_file.is_file() else []
    results = [r for r in earlier if key(r) not in {key(n) for n in new}] + new

    card = ModelCard(readme.read_text(encoding="utf-8"))
    card.data.eval_results = eval_results_to_model_index(results) or None
    if card.data.model_name is None:
        match = re.search(r'pipeline\(model="([^"]+)"', card.text)
        card.data.model_name = match.group(1) if match else folder.name
    section = _evaluation(results)
    body = card.text
    if _EVALUATION_SECTION.search(body):
        body = _EVALUATION_SECTION.sub(lambda _: section + "\n", body, count=1)
    else:
        body = body.replace(_AFTER_EVALUATION, section + "\n" + _AFTER_EVALUATION, 1)
    readme.write_text(f"---\n{card.data.to_yaml()}\n---\n{body}", encoding="utf-8")
    results_file.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return readme


def save_with_hub_files(model, save: Callable, save_directory, *args, **kwargs):
    """``save_pretrained`` of a Mini-Omni2 model: transformers' save (``save``), with ``custom_pipelines`` in config.json
    (the pipeline's code is copied with the model's), then the card and handler; ``push_to_hub=True`` uploads the folder.

    Keyword arguments of its own: ``repo_id`` (for the card and the upload), ``base_model``, ``origin``,
    ``eval_results``, ``tags`` (see :func:`render_model_card`), ``model_card`` (False: leave README.md alone).
    """
    card_kwargs = {k: kwargs.pop(k) for k in ("base_model", "origin", "eval_results", "tags", "model_card") if k in kwargs}
    push = kwargs.pop("push_to_hub", False)
    repo_id = kwargs.pop("repo_id", None)
    push_kwargs = {k: kwargs.pop(k) for k in _SAVE_PUSH_KEYS if k in kwargs}
    if push and repo_id is None:
        repo_id = Path(save_directory).name
    api = None
    if push:
        from huggingface_hub import HfApi

        api = HfApi(token=push_kwargs.get("token"))
        repo_id = api.create_repo(repo_id, private=push_kwargs.get("private"), exist_ok=True).repo_id
    model.config.custom_pipelines = custom_pipelines_entry()
    result = save(save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        write_hub_files(model, save_directory, repo_id=repo_id, **card_kwargs)
        if push:
            api.upload_folder(
                folder_path=str(save_directory), repo_id=repo_id,
                commit_message=push_kwargs.get("commit_message") or "Upload Mini-Omni2 model",
                commit_description=push_kwargs.get("commit_description"),
                revision=push_kwargs.get("revision"), create_pr=push_kwargs.get("create_pr", False),
            )
    return result


def push_to_hub(
    model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    **card_kwargs,
):
    """``push_to_hub`` of a Mini-Omni2 model: save into a temporary folder (weights, code, card with ``repo_id``,
    handler) and upload it. Unlike transformers' own, the card is the model's, not a blank one.

    ``card_kwargs``: ``base_model``, ``origin``, ``eval_results`` (see :func:`render_model_card`).
    """
    from huggingface_hub import HfApi

    unknown = set(card_kwargs) - {"base_model", "origin", "eval_results"}
    if unknown:
        raise TypeError(f"push_to_hub got unexpected arguments {sorted(unknown)}")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size, repo_id=repo_id, tags=tags, **card_kwargs)
        return api.upload_folder(
            folder_path=folder, repo_id=repo_id, commit_message=commit_message or "Upload Mini-Omni2 model",
            commit_description=commit_description, revision=revision, create_pr=create_pr,
        )


__all__ = [
    "render_model_card",
    "write_hub_files",
    "add_eval_results",
    "save_with_hub_files",
    "push_to_hub",
    "eval_results_to_model_index",
    "load_eval_results",
    "HANDLER_SOURCE",
]
