"""``MiniOmni2Pipeline``: Mini-Omni2 as a transformers ``Pipeline`` (``any-to-any``, and ASR on request).

``pipeline(model="owner/mini-omni2-hf", trust_remote_code=True)`` builds it from a saved folder or Hub repo where the
``mini_omni2`` package is not installed: ``save_pretrained`` writes this file beside the model's code and names it in
``config.json`` (``custom_pipelines``). A request is text, audio and/or an image plus the output kind; the answer is
``{"text": ...}`` and, for spoken answers, ``"audio"`` (float32 numpy, mono) and ``"sampling_rate"`` (24,000), as
transformers' audio pipelines return them. See ``docs/pipeline.md``.

This file is shipped as remote code with saved models: it imports only torch, transformers, their dependencies and
sibling modules.
"""

from __future__ import annotations

import base64
import collections.abc
import io
import logging
import os
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForMultimodalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .modeling_mini_omni2 import resolve_dtype as hardware_dtype
from .processing_mini_omni2 import SAMPLING_RATE, check_sampling_rate, load_audio, load_image
from .token_layout import OUTPUT_ASR, OUTPUT_SPEECH, OUTPUTS, task_name

#: The task the pipeline is registered for, and the one written into saved folders' ``custom_pipelines``.
TASK = "any-to-any"
#: Built with this task (``pipeline("automatic-speech-recognition", ..., pipeline_class=MiniOmni2Pipeline)``) the
#: pipeline transcribes by default and a string input is an audio file, as in transformers' ASR pipeline.
ASR_TASK = "automatic-speech-recognition"
MODEL_TYPE = "mini_omni2"

_REQUEST_KEYS = {"text", "audio", "image", "images", "output", "sampling_rate"}
_AUDIO_DICT_KEYS = {"array", "raw", "sampling_rate", "path", "bytes"}
_ENDPOINT_PARAMETERS = {"output", "max_new_tokens", "generate_kwargs", "batch_size", "truncate_audio"}


def custom_pipelines_entry() -> dict[str, dict]:
    """The ``custom_pipelines`` field of ``config.json``: ``pipeline(model=folder, trust_remote_code=True)`` reads it."""
    return {
        TASK: {
            "impl": f"{__name__.rsplit('.', 1)[-1]}.{MiniOmni2Pipeline.__name__}",
            "pt": ["AutoModelForMultimodalLM"],
            "type": "multimodal",
        }
    }


def resolve_dtype(dtype: Any, model) -> torch.dtype:
    """The dtype to run ``model`` in. ``None`` and ``"auto"`` (``pipeline()``'s default) are the hardware's choice,
    as for ``chat`` and ``serve``: bfloat16 where the model's device computes it natively, float32 otherwise
    (:func:`~mini_omni2.modeling_mini_omni2.resolve_dtype`); a torch dtype or its name is taken as given."""
    device = getattr(model, "device", None) or "cpu"
    if dtype is None or dtype == "auto":
        return hardware_dtype("auto", device)
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; give a torch dtype or its name (e.g. 'bfloat16') or 'auto'")
        return resolved
    if isinstance(dtype, torch.dtype):
        return dtype
    raise TypeError(f"dtype must be a torch.dtype, its name or 'auto', got {type(dtype).__name__}")


def _is_mini_omni2(model: Any) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPE


def _collate_requests(items: list) -> list:
    """Batches stay lists of requests: the processor pads them (left, per stream) in ``_forward``."""
    return list(items)


class MiniOmni2Pipeline(Pipeline):
    r"""
    Answers text, speech and image prompts of a Mini-Omni2 / Mini-Omni model in text and speech.

    A request (the pipeline's input) is one of:

    - a string: a written prompt (with the ``automatic-speech-recognition`` task: an audio file);
    - audio: a file path (``os.PathLike``), encoded bytes (wav, flac, ogg, mp3), a 1-D array at 16 kHz (as transformers'
      ASR pipeline assumes; pass ``sampling_rate=`` otherwise), ``(array, sampling_rate)``, a ``{"array"|"raw",
      "sampling_rate"}`` or ``{"path", "bytes"}`` dict (a ``datasets`` ``Audio`` value), a torchcodec decoder; audio
      longer than the encoder's 30 s is refused unless ``truncate_audio=True``;
    - a PIL image;
    - a dict with any of ``text``, ``audio``, ``image`` (or ``images``), ``output`` and ``sampling_rate``.

    A list of requests gives a list of answers; ``batch_size=`` answers them in batches of one ``generate`` call each.
    ``output`` is ``"speech"`` (default; ``"asr"`` for the ASR task), ``"text"`` or ``"asr"``. Answers: ``{"text":
    str}`` and, for spoken answers, ``"audio"`` (float32 numpy at ``"sampling_rate"``, 24,000).

    Generation: ``max_new_tokens=`` and ``generate_kwargs={...}`` (any argument of ``model.generate``: ``do_sample``,
    ``temperature``, ``codec_noise``, ``batch_parallel``, ...), at construction or per call.
    """

    _load_processor = True
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    # generate's arguments are taken here (``generate_kwargs``), not collected by the base class
    _pipeline_calls_generate = False

    def __new__(cls, *args, **kwargs):
        # Registered for "any-to-any", this class is what pipeline("any-to-any", ...) builds for every model in the
        # process; models that are not Mini-Omni2 keep transformers' own AnyToAnyPipeline.
        model = kwargs.get("model", args[0] if args else None)
        if cls is MiniOmni2Pipeline and model is not None and not _is_mini_omni2(model):
            from transformers.pipelines.any_to_any import AnyToAnyPipeline

            return AnyToAnyPipeline(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, model, *args, dtype: Any = None, **kwargs):
        if not _is_mini_omni2(model):
            raise ValueError(f"MiniOmni2Pipeline takes a Mini-Omni2 model, got {type(model).__name__}")
        super().__init__(model, *args, **kwargs)
        if self.processor is None:
            raise ValueError("MiniOmni2Pipeline needs the model's processor: pass processor=MiniOmni2Processor(...)")
        target = resolve_dtype(dtype, self.model)
        if target != self.model.dtype:
            self.model.to(target)
            if getattr(self.model, "codec", None) is not None:
                self.model.codec.float()  # SNAC decodes in float32 whatever the backbone's dtype
        self.model.eval()

    # ----- calling ------------------------------------------------------------------------------------------------
    def __call__(self, inputs: Any = None, *, text: Any = None, audio: Any = None, images: Any = None, **kwargs):
        """Answer one request or a list of them (see the class docstring); ``text=``/``audio=``/``images=`` keywords
        build the request(s) the way the processor takes them (lists: one entry per request, ``None`` where absent)."""
        keywords = {"text": text, "audio": audio, "images": images}
        if any(v is not None for v in keywords.values()):
            if inputs is not None:
                raise ValueError("give the request either as the first argument or as text=/audio=/images=, not both")
            inputs = self._requests_from_keywords(keywords)
        elif inputs is None:
            raise ValueError("give a request: text, audio and/or an image (see MiniOmni2Pipeline's docstring)")
        return super().__call__(inputs, **kwargs)

    @staticmethod
    def _requests_from_keywords(keywords: dict) -> dict | list[dict]:
        lengths = {len(v) for v in keywords.values() if isinstance(v, list)}
        if len(lengths) > 1:
            raise ValueError(f"text, audio and images lists must have one entry per request, got lengths {sorted(lengths)}")
        if not lengths:
            return {k: v for k, v in keywords.items() if v is not None}
        size = lengths.pop()
        columns = {k: (v if isinstance(v, list) else [v] * size) for k, v in keywords.items() if v is not None}
        return [{k: column[i] for k, column in columns.items() if column[i] is not None} for i in range(size)]

    def _sanitize_parameters(
        self,
        output: str | None = None,
        sampling_rate: int | None = None,
        truncate_audio: bool | None = None,
        max_new_tokens: int | None = None,
        generate_kwargs: dict | None = None,
        **unknown,
    ):
        if unknown:
            raise TypeError(
                f"MiniOmni2Pipeline got unexpected arguments {sorted(unknown)}; accepted: output, sampling_rate, "
                "truncate_audio, max_new_tokens, generate_kwargs, batch_size, num_workers (generate's own arguments "
                "go in generate_kwargs)"
            )
        preprocess: dict[str, Any] = {}
        if output is not None:
            preprocess["output"] = self._check_output(output)
        if sampling_rate is not None:
            preprocess["sampling_rate"] = check_sampling_rate(sampling_rate)
        if truncate_audio is not None:
            preprocess["truncate_audio"] = bool(truncate_audio)
        forward: dict[str, Any] = {}
        if generate_kwargs is not None:
            if not isinstance(generate_kwargs, dict):
                raise TypeError(f"generate_kwargs must be a dict, got {type(generate_kwargs).__name__}")
            forward.update(generate_kwargs)
        if max_new_tokens is not None:
            if "max_new_tokens" in forward:
                raise ValueError("max_new_tokens is given both directly and in generate_kwargs; give it once")
            forward["max_new_tokens"] = max_new_tokens
        return preprocess, forward, {}

    @staticmethod
    def _check_output(output: Any) -> str:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        return output

    # ----- preprocess: one request -> checked, loaded inputs ----------------------------------------------------------
    @property
    def default_output(self) -> str:
        return OUTPUT_ASR if self.task == ASR_TASK else OUTPUT_SPEECH

    def preprocess(
        self, inputs: Any, output: str | None = None, sampling_rate: int | None = None, truncate_audio: bool = False
    ) -> dict:
        request = self._as_request(inputs)
        kind = self._check_output(request.get("output") or output or self.default_output)
        rate = request.get("sampling_rate", sampling_rate)
        loaded: dict[str, Any] = {"text": None, "audio": None, "images": None, "output": kind}
        if request.get("text") is not None:
            if not isinstance(request["text"], str):
                raise TypeError(f"text must be a string, got {type(request['text']).__name__}")
            loaded["text"] = request["text"]
        if request.get("audio") is not None:
            loaded["audio"] = (self._load_audio(request["audio"], rate, truncate_audio), SAMPLING_RATE)
        image = request.get("image", request.get("images"))
        if image is not None:
            loaded["images"] = load_image(image)
        modalities = {name for name, key in (("text", "text"), ("audio", "audio"), ("image", "images")) if loaded[key] is not None}
        if not modalities:
            raise ValueError("the request has no text, audio or image")
        task_name(modalities, kind)  # a clear error now for combinations without a layout (e.g. text + audio)
        if "image" in modalities and not self.processor.has_vision:
            raise ValueError("this model has no vision encoder (Mini-Omni): it cannot take images")
        return loaded

    def _as_request(self, inputs: Any) -> dict:
        """Any accepted input form -> a dict with some of text/audio/image/output/sampling_rate."""
        if isinstance(inputs, str):
            return {"audio": inputs} if self.task == ASR_TASK else {"text": inputs}
        if isinstance(inputs, dict):
            keys = set(inputs)
            if keys & _AUDIO_DICT_KEYS and not keys & (_REQUEST_KEYS - {"sampling_rate"}):
                return {"audio": inputs}
            unknown = keys - _REQUEST_KEYS
            if unknown:
                raise ValueError(
                    f"unknown request keys {sorted(unknown)}; a request dict takes {sorted(_REQUEST_KEYS)}, an audio "
                    "dict {'array' or 'raw', 'sampling_rate'} or {'path', 'bytes'}"
                )
            return dict(inputs)
        if _is_pil_image(inputs):
            return {"image": inputs}
        if isinstance(inputs, (bytes, bytearray, os.PathLike, np.ndarray, torch.Tensor, tuple)) or hasattr(
            inputs, "get_all_samples"
        ):
            return {"audio": inputs}
        raise TypeError(
            f"cannot make a request of a {type(inputs).__name__}: give text, audio (path, bytes, array, (array, rate), "
            "datasets Audio dict), a PIL image, or a dict of them"
        )

    def _load_audio(self, audio: Any, sampling_rate: int | None, truncate: bool) -> np.ndarray:
        """Audio in any form of the processor's ``load_audio`` -> mono float32 at 16 kHz, within the encoder's window.

        As in transformers' ASR pipeline, a bare array is at 16 kHz unless ``sampling_rate`` says otherwise, and
        ``{"raw", "sampling_rate"}`` dicts are accepted.
        """
        if isinstance(audio, dict) and "raw" in audio:
            audio = {"array": audio["raw"], "sampling_rate": audio.get("sampling_rate")}
        return load_audio(audio, sampling_rate, default_rate=SAMPLING_RATE,
                          max_seconds=self.processor.max_audio_seconds, truncate=truncate)

    # ----- forward: a batch of requests -> one generate call ---------------------------------------------------------
    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        """As the base class's, with batches collated as lists of requests (the processor pads them)."""
        from torch.utils.data import DataLoader
        from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

        if isinstance(inputs, collections.abc.Sized):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:
            num_workers = min(num_workers, 1)  # an iterable cannot be split between workers
            dataset = PipelineIterator(inputs, self.preprocess, preprocess_params)
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=_collate_requests)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _forward(self, model_inputs: dict | list[dict], **generate_kwargs) -> dict:
        requests = model_inputs if isinstance(model_inputs, list) else [model_inputs]
        columns = {}
        for key in ("text", "audio", "images"):
            values = [r[key] for r in requests]
            columns[key] = values if any(v is not None for v in values) else None
        batch = self.processor(**columns, output=[r["output"] for r in requests])
        batch.pop("request_index")
        out = self.model.generate(**batch.to(self.device), **generate_kwargs)
        results = []
        for k in range(len(requests)):
            results.append(
                {
                    "output": out.output_kinds[k],
                    "text_ids": out.text_ids[k],
                    "waveform": out.waveforms[k],
                    "sampling_rate": out.sampling_rate,
                }
            )
        return {"results": results}

    def postprocess(self, model_outputs: dict) -> dict:
        result = model_outputs["results"]
        if isinstance(result, list):  # unbatched: a batch of one
            (result,) = result
        answer: dict[str, Any] = {"text": self.processor.decode(result["text_ids"])}
        if result["output"] == OUTPUT_SPEECH:
            waveform = result["waveform"]
            answer["audio"] = None if waveform is None else waveform.detach().float().cpu().numpy()
            answer["sampling_rate"] = result["sampling_rate"]
        return answer

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save the model (with this pipeline's code and ``custom_pipelines``) and the processor."""
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)

    # ----- Inference Endpoints: JSON in, JSON out ------------------------------------------------------------------
    def handle_endpoint_request(self, data: dict) -> dict | list[dict]:
        """Answer an Inference Endpoints request, as ``handler.py``'s ``EndpointHandler`` receives it.

        ``data["inputs"]``: a string (a written prompt), encoded audio bytes (a binary request body), a dict with
        ``text``, ``audio`` (base64 of an audio file), ``image`` (base64 of an image file) and ``output``, or a list of
        those. ``data["parameters"]``: ``output``, ``max_new_tokens``, ``generate_kwargs``, ``batch_size``,
        ``truncate_audio``. Returns
        ``{"text": ...}`` (+ ``"audio"``: base64 of a 16-bit wav, ``"sampling_rate"``) per request.
        """
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('an endpoint request is a JSON object {"inputs": ..., "parameters": {...}}')
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError(f"parameters must be a JSON object, got {type(parameters).__name__}")
        unknown = set(parameters) - _ENDPOINT_PARAMETERS
        if unknown:
            raise ValueError(f"unknown parameters {sorted(unknown)}; accepted: {sorted(_ENDPOINT_PARAMETERS)}")
        inputs = data["inputs"]
        requests = [_endpoint_request(x) for x in inputs] if isinstance(inputs, list) else _endpoint_request(inputs)
        answers = self(requests, **parameters)
        if isinstance(answers, list):
            return [_endpoint_answer(a) for a in answers]
        return _endpoint_answer(answers)


def _is_pil_image(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL is a dependency of the processor
        return False
    return isinstance(value, Image.Image)


def _b64decode(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):  # a data URI: data:audio/wav;base64,....
        value = value.split(",", 1)[-1]
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as error:
        raise ValueError(f"{what} is not valid base64: {error}") from None


def _endpoint_request(value: Any) -> Any:
    """One JSON request -> a pipeline request (base64 audio -> bytes, base64 image -> PIL image)."""
    if isinstance(value, (str, bytes, bytearray)):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"each input must be a string or an object, got {type(value).__name__}")
    unknown = set(value) - {"text", "audio", "image", "output"}
    if unknown:
        raise ValueError(f"unknown input keys {sorted(unknown)}; accepted: text, audio (base64), image (base64), output")
    request = {k: v for k, v in value.items() if k in ("text", "output") and v is not None}
    if value.get("audio") is not None:
        request["audio"] = _b64decode(value["audio"], "audio")
    if value.get("image") is not None:
        from PIL import Image

        request["image"] = Image.open(io.BytesIO(_b64decode(value["image"], "image")))
    return request


def _endpoint_answer(answer: dict) -> dict:
    """A pipeline answer -> JSON: the spoken answer as base64 of a 16-bit PCM wav."""
    encoded: dict[str, Any] = {"text": answer["text"]}
    if "audio" in answer:
        encoded["sampling_rate"] = answer["sampling_rate"]
        encoded["audio"] = None
        if answer["audio"] is not None:
            import soundfile

            buffer = io.BytesIO()
            soundfile.write(buffer, np.clip(answer["audio"], -1.0, 1.0), answer["sampling_rate"], format="WAV", subtype="PCM_16")
            encoded["audio"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return encoded


def register_pipeline() -> None:
    """Register :class:`MiniOmni2Pipeline` with ``PIPELINE_REGISTRY`` for ``any-to-any`` in this process.

    ``pipeline("any-to-any", model=model, processor=processor)`` then builds it for Mini-Omni2 models given as
    objects; other models still get transformers' ``AnyToAnyPipeline`` (see ``__new__``), and the task's default
    model is kept.
    """
    current = PIPELINE_REGISTRY.supported_tasks.get(TASK, {})
    if current.get("impl") is MiniOmni2Pipeline:
        return
    base_logger = logging.getLogger("transformers.pipelines.base")
    level = base_logger.level
    base_logger.setLevel(logging.ERROR)  # "any-to-any is already registered. Overwriting ...": intended
    try:
        PIPELINE_REGISTRY.register_pipeline(
            TASK,
            pipeline_class=MiniOmni2Pipeline,
            pt_model=AutoModelForMultimodalLM,
            default=current.get("default"),
            type="multimodal",
        )
    finally:
        base_logger.setLevel(level)


__all__ = ["MiniOmni2Pipeline", "register_pipeline", "custom_pipelines_entry", "resolve_dtype", "TASK", "ASR_TASK"]
