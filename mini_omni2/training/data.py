"""Training data for Mini-Omni2: the example format, its preprocessing (``datasets``-mappable) and synthetic examples.

An example is a plain dict (see ``docs/training.md``). Raw fields:

- ``task`` (a key of :data:`~mini_omni2.token_layout.TASKS`) or ``output`` (``"speech"``, ``"text"``, ``"asr"``;
  the inputs present then pick the layout);
- inputs: ``text`` (str), ``audio`` (path, array with ``sampling_rate``, ``(array, rate)``, a ``datasets`` audio
  dict ``{"array", "sampling_rate"}`` or ``{"path", "bytes"}``), ``image`` (PIL image, path or array);
- answers: ``answer_text`` (str) and, for speech answers, ``answer_codes`` (codec frames, shape (T, 7)) or
  ``answer_audio`` (a waveform, 24 kHz unless ``answer_sampling_rate`` or the value says otherwise).

:func:`prepare_example` turns an example into the *processed* fields below (numpy arrays that are empty where a
part is absent, so that ``datasets`` keeps one column type across rows):

- ``task`` (str), ``prompt_text_ids`` (n,), ``answer_text_ids`` (m,), ``answer_codes`` (T, 7) or (0, 7);
- ``input_features`` (80, 3000) log-mel, or ``audio_waveform`` (samples at 16 kHz) to compute the log-mel later,
  with ``audio_num_frames`` (L, 0 without audio);
- ``pixel_values`` (3, 224, 224), or empty to process the raw ``image`` later.

It is idempotent: processed fields that are present are kept, so the collator can take raw examples, fully
processed ones, or anything between. :class:`MiniOmni2Preprocessor` is the batched form for ``Dataset.map`` and
``IterableDataset.map``.
"""

from __future__ import annotations

import random
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..processing_mini_omni2 import SAMPLING_RATE, load_audio, num_audio_frames
from ..token_layout import OUTPUT_SPEECH, OUTPUTS, TASKS, task_name

#: Raw input fields of the example format.
RAW_FIELDS = (
    "task",
    "output",
    "text",
    "audio",
    "sampling_rate",
    "image",
    "answer_text",
    "answer_codes",
    "answer_audio",
    "answer_sampling_rate",
)
#: Fields written by :func:`prepare_example` (``answer_codes`` is both raw and processed: the same format).
PROCESSED_FIELDS = (
    "task",
    "prompt_text_ids",
    "answer_text_ids",
    "answer_codes",
    "input_features",
    "audio_waveform",
    "audio_num_frames",
    "pixel_values",
)
AUDIO_MODES = ("features", "waveform")
IMAGE_MODES = ("pixels", "keep")


# ----- small helpers -----------------------------------------------------------------------------------------
def _present(value: Any) -> bool:
    """Whether a field holds something: not None, not an empty string/list/array."""
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value)
    if isinstance(value, (list, tuple)):
        return len(value) > 0
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.numel() > 0 if isinstance(value, torch.Tensor) else value.size > 0
    return True


def _as_numpy(value: Any, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def load_input_audio(processor, value: Any, sampling_rate: int | None = None, truncate: bool = False) -> np.ndarray:
    """An input audio in any form the processor takes -> mono float32 at 16 kHz (the processor's own loading)."""
    return processor.prepare_audio(value, sampling_rate, truncate_audio=truncate)


def load_answer_audio(value: Any, target_rate: int, sampling_rate: int | None = None) -> np.ndarray:
    """An answer waveform (any form of :func:`~mini_omni2.processing_mini_omni2.load_audio`) -> mono float32 at the
    codec's rate; bare arrays are taken to be at ``target_rate``."""
    return load_audio(value, sampling_rate, target_rate=target_rate, default_rate=target_rate)


def _codec_of(codec: Any):
    """A :class:`MiniOmni2Codec`, given it or a model that has one."""
    if codec is None:
        return None
    inner = getattr(codec, "codec", None)
    if inner is not None and hasattr(inner, "encode"):
        return inner
    if not hasattr(codec, "encode"):
        raise ValueError("codec must be a MiniOmni2Codec or a model with a .codec")
    return codec


def encode_answer_audio(codec: Any, waveform: np.ndarray) -> np.ndarray:
    """A 24 kHz waveform -> codec frames (T, 7) of local codes, with the model's codec."""
    codec = _codec_of(codec)
    frames = codec.encode(torch.as_tensor(waveform, dtype=torch.float32)[None])
    return frames[0].cpu().numpy().astype(np.int64)


def resolve_task(example: dict) -> str:
    """The layout name of an example: its ``task``, else the one for its inputs and ``output`` (default speech)."""
    task = example.get("task")
    if _present(task):
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; known tasks: {', '.join(TASKS)}")
        return task
    output = example.get("output") or OUTPUT_SPEECH
    if output not in OUTPUTS:
        raise ValueError(f"Unknown output {output!r}; choose one of {OUTPUTS}")
    inputs = set()
    if _present(example.get("text")) or _present(example.get("prompt_text_ids")):
        inputs.add("text")
    if any(_present(example.get(k)) for k in ("audio", "input_features", "audio_waveform")):
        inputs.add("audio")
    if _present(example.get("image")) or _present(example.get("pixel_values")):
        inputs.add("image")
    return task_name(inputs, output)


def _encode_text(processor, text: Any, what: str) -> np.ndarray:
    return np.asarray(processor.encode_text(text, what), dtype=np.int64)


# ----- one example -------------------------------------------------------------------------------------------
def prepare_example(
    example: dict,
    processor,
    codec: Any = None,
    audio: str = "features",
    images: str = "pixels",
    truncate_audio: bool = False,
) -> dict:
    """One example (raw or partly processed) -> the processed fields (module docstring).

    Args:
        processor: a :class:`~mini_omni2.MiniOmni2Processor` (tokenizer, feature extractor, image processor, layout).
        codec: the model (or its ``.codec``) to encode ``answer_audio``; not needed when ``answer_codes`` are given.
        audio: ``"features"`` computes the Whisper log-mel now; ``"waveform"`` keeps the 16 kHz waveform, so that
            the collator computes the log-mel (much less storage).
        images: ``"pixels"`` runs the CLIP image processor now; ``"keep"`` leaves the raw ``image`` to the collator.
        truncate_audio: keep the first window (30 s) of longer input audio instead of refusing it.
    """
    if audio not in AUDIO_MODES:
        raise ValueError(f"audio must be one of {AUDIO_MODES}, got {audio!r}")
    if images not in IMAGE_MODES:
        raise ValueError(f"images must be one of {IMAGE_MODES}, got {images!r}")
    layout = processor.layout
    task = resolve_task(example)
    inputs, output = TASKS[task]
    out: dict[str, Any] = {"task": task}

    # text prompt
    if "text" in inputs:
        if _present(example.get("prompt_text_ids")):
            out["prompt_text_ids"] = _as_numpy(example["prompt_text_ids"], np.int64)
        else:
            out["prompt_text_ids"] = _encode_text(processor, example.get("text"), f"task {task}: text")
    elif _present(example.get("text")) or _present(example.get("prompt_text_ids")):
        raise ValueError(f"task {task} takes no text prompt, but the example has one")
    else:
        out["prompt_text_ids"] = np.zeros(0, dtype=np.int64)

    # audio input
    out["input_features"] = np.zeros((0, 0), dtype=np.float32)
    out["audio_waveform"] = np.zeros(0, dtype=np.float32)
    out["audio_num_frames"] = 0
    if "audio" in inputs:
        if _present(example.get("input_features")):
            frames = int(example.get("audio_num_frames") or 0)
            if frames < 1:
                raise ValueError("precomputed input_features need audio_num_frames (the L of SPEC §5)")
            out["input_features"] = _as_numpy(example["input_features"], np.float32)
            out["audio_num_frames"] = frames
        else:
            if _present(example.get("audio_waveform")):
                waveform = _as_numpy(example["audio_waveform"], np.float32)
            elif _present(example.get("audio")):
                waveform = load_input_audio(processor, example["audio"], example.get("sampling_rate"), truncate_audio)
            else:
                raise ValueError(f"task {task} needs an audio input")
            out["audio_num_frames"] = num_audio_frames(len(waveform), processor.max_audio_frames)
            if audio == "features":
                out["input_features"] = processor.audio_features([waveform])[0]
            else:
                out["audio_waveform"] = waveform
    elif any(_present(example.get(k)) for k in ("audio", "input_features", "audio_waveform")):
        raise ValueError(f"task {task} takes no audio, but the example has some")

    # image input
    out["pixel_values"] = np.zeros((0, 0, 0), dtype=np.float32)
    if "image" in inputs:
        if not processor.has_vision:
            raise ValueError("this model has no vision encoder (Mini-Omni): it cannot take images")
        if _present(example.get("pixel_values")):
            out["pixel_values"] = _as_numpy(example["pixel_values"], np.float32)
        elif not _present(example.get("image")):
            raise ValueError(f"task {task} needs an image")
        elif images == "pixels":
            out["pixel_values"] = processor.image_pixels([example["image"]])[0]
        else:
            out["image"] = example["image"]
    elif _present(example.get("image")) or _present(example.get("pixel_values")):
        raise ValueError(f"task {task} takes no image, but the example has one")

    # answers
    if _present(example.get("answer_text_ids")):
        out["answer_text_ids"] = _as_numpy(example["answer_text_ids"], np.int64)
    elif _present(example.get("answer_text")):
        out["answer_text_ids"] = _encode_text(processor, example["answer_text"], "answer_text")
    elif output == OUTPUT_SPEECH:
        out["answer_text_ids"] = np.zeros(0, dtype=np.int64)
    else:
        raise ValueError(f"task {task} has a text answer: give answer_text")
    bad = out["answer_text_ids"][(out["answer_text_ids"] < 0) | (out["answer_text_ids"] >= layout.tokenizer_vocab_size)]
    if bad.size:
        raise ValueError(f"answer_text_ids must be tokenizer ids in [0, {layout.tokenizer_vocab_size}), got {bad[:5]}")

    width = layout.num_audio_layers
    if output == OUTPUT_SPEECH:
        if _present(example.get("answer_codes")):
            codes = _as_numpy(example["answer_codes"], np.int64)
        elif _present(example.get("answer_audio")):
            codec_module = _codec_of(codec)
            if codec_module is None:
                raise ValueError(
                    "answer_audio needs the model's codec to become answer_codes: pass codec=model (a bare "
                    "model.codec cannot be sent to datasets' worker processes)"
                )
            waveform = load_answer_audio(
                example["answer_audio"], codec_module.sampling_rate, example.get("answer_sampling_rate")
            )
            codes = encode_answer_audio(codec_module, waveform)
        else:
            raise ValueError(f"task {task} has a speech answer: give answer_codes (T, {width}) or answer_audio")
        if codes.ndim != 2 or codes.shape[1] != width or codes.shape[0] < 1:
            raise ValueError(f"answer_codes must have shape (T >= 1, {width}), got {codes.shape}")
        if codes.min() < 0 or codes.max() >= layout.audio_codebook_size:
            raise ValueError(f"answer_codes must be codec codes in [0, {layout.audio_codebook_size})")
        out["answer_codes"] = codes
    else:
        if _present(example.get("answer_codes")) or _present(example.get("answer_audio")):
            raise ValueError(f"task {task} has a text answer, but the example has answer speech")
        out["answer_codes"] = np.zeros((0, width), dtype=np.int64)
    return out


# ----- batched, for datasets -----------------------------------------------------------------------------------
class MiniOmni2Preprocessor:
    """A batched ``.map`` function: raw examples -> processed fields, for ``Dataset`` and ``IterableDataset``.

    Example:

    ```python
    >>> prep = MiniOmni2Preprocessor(processor, codec=model, audio="waveform")
    >>> dataset = dataset.map(prep, batched=True, remove_columns=prep.removable_columns(dataset.column_names))
    ```

    The output columns are type-stable (empty arrays where absent), so mixed tasks map in any batch order; pass
    ``features=prep.features()`` to ``map`` to fix the column types up front (useful for ``IterableDataset``).
    """

    def __init__(
        self,
        processor,
        codec: Any = None,
        audio: str = "features",
        images: str = "pixels",
        truncate_audio: bool = False,
    ):
        if audio not in AUDIO_MODES:
            raise ValueError(f"audio must be one of {AUDIO_MODES}, got {audio!r}")
        if images not in IMAGE_MODES:
            raise ValueError(f"images must be one of {IMAGE_MODES}, got {images!r}")
        self.processor = processor
        self.codec = _codec_of(codec)
        # with the model's codec config the codec can be rebuilt after pickling (num_proc > 1, fingerprinting)
        self._codec_config = getattr(getattr(codec, "config", None), "codec_config", None)
        self.audio = audio
        self.images = images
        self.truncate_audio = truncate_audio

    def __getstate__(self) -> dict:
        # SNAC's weight-normed convolutions do not pickle: send the codec as its config and state dict. This also
        # gives datasets a stable fingerprint (the codec weights are part of it).
        state = self.__dict__.copy()
        codec = state.pop("codec")
        state["codec"] = None
        if codec is not None and self._codec_config is not None:
            state["_codec_state"] = {k: v.detach().cpu() for k, v in codec.state_dict().items()}
        return state

    def __setstate__(self, state: dict) -> None:
        codec_state = state.pop("_codec_state", None)
        self.__dict__.update(state)
        if codec_state is not None:
            from ..modeling_mini_omni2 import MiniOmni2Codec

            codec = MiniOmni2Codec(self._codec_config, self.processor.layout)
            codec.load_state_dict(codec_state)
            self.codec = codec.eval()

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if not batch:
            return {}
        size = len(next(iter(batch.values())))
        rows = [
            prepare_example(
                {k: v[i] for k, v in batch.items()},
                self.processor,
                codec=self.codec,
                audio=self.audio,
                images=self.images,
                truncate_audio=self.truncate_audio,
            )
            for i in range(size)
        ]
        return {name: [row[name] for row in rows] for name in PROCESSED_FIELDS}

    def removable_columns(self, column_names: Iterable[str] | None) -> list[str]:
        """Columns that the processed ones replace (all of them, except ``image`` when images are kept raw)."""
        keep = {"image"} if self.images == "keep" else set()
        return [c for c in (column_names or []) if c not in keep and c not in PROCESSED_FIELDS]

    def features(self, extra: dict | None = None):
        """The ``datasets.Features`` of the processed columns (plus ``extra`` ones, e.g. a kept ``image``)."""
        from datasets import Features, List, Value

        feats = {
            "task": Value("string"),
            "prompt_text_ids": List(Value("int64")),
            "answer_text_ids": List(Value("int64")),
            "answer_codes": List(List(Value("int64"))),
            "input_features": List(List(Value("float32"))),
            "audio_waveform": List(Value("float32")),
            "audio_num_frames": Value("int64"),
            "pixel_values": List(List(List(Value("float32")))),
        }
        feats.update(extra or {})
        return Features(feats)


# ----- synthetic data --------------------------------------------------------------------------------------------
_WORDS = (
    "hello world name omni cat dog red blue one two three four five the quick brown fox small model "
    "sunny day fine thank you story town friends quiet image audio"
).split()


def synthetic_examples(
    processor,
    num_examples: int = 16,
    tasks: Sequence[str] = ("T1A2", "A1T2", "A1T1", "T1T2", "A1A2"),
    seed: int = 0,
    answer_frames: tuple[int, int] = (2, 4),
    answer_words: tuple[int, int] = (1, 3),
    prompt_words: tuple[int, int] = (1, 4),
    audio_seconds: tuple[float, float] = (0.2, 0.5),
) -> list[dict]:
    """Random examples in the raw format, cycling through ``tasks``: for smoke tests and the example scripts.

    Text is drawn from a small word list, input audio is a sine tone with a little noise (16 kHz), images are
    flat random colours, speech answers are random codec codes of ``answer_frames`` frames. Every example has the
    same keys (``None`` where absent), as ``datasets.Dataset.from_list`` needs.
    """
    rng = random.Random(seed)
    layout = processor.layout
    examples = []
    for k in range(num_examples):
        task = tasks[k % len(tasks)]
        inputs, output = TASKS[task]
        # every example has every key (None where absent): Dataset.from_list takes its columns from the first one
        example: dict[str, Any] = {"task": task, "text": None, "audio": None, "answer_codes": None}
        if processor.has_vision:
            example["image"] = None
        if "text" in inputs:
            example["text"] = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*prompt_words)))
        if "audio" in inputs:
            seconds = rng.uniform(*audio_seconds)
            t = np.arange(int(seconds * SAMPLING_RATE), dtype=np.float32) / SAMPLING_RATE
            tone = 0.5 * np.sin(2 * np.pi * rng.uniform(150.0, 2000.0) * t)
            noise = np.random.default_rng(rng.randrange(2**31)).normal(0.0, 0.01, t.shape)
            example["audio"] = {"array": (tone + noise).astype(np.float32), "sampling_rate": SAMPLING_RATE}
        if "image" in inputs:
            from PIL import Image

            example["image"] = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
        example["answer_text"] = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*answer_words)))
        if output == OUTPUT_SPEECH:
            frames = rng.randint(*answer_frames)
            example["answer_codes"] = [
                [rng.randrange(layout.audio_codebook_size) for _ in range(layout.num_audio_layers)]
                for _ in range(frames)
            ]
        examples.append(example)
    return examples


__all__ = [
    "RAW_FIELDS",
    "PROCESSED_FIELDS",
    "MiniOmni2Preprocessor",
    "prepare_example",
    "resolve_task",
    "load_input_audio",
    "load_answer_audio",
    "encode_answer_audio",
    "synthetic_examples",
]
