"""Processor of Mini-Omni2: CLIP image processor + Whisper feature extractor + Qwen2 tokenizer -> 8-stream prompts."""

from __future__ import annotations

import io
import math
import numbers
import os
from typing import Any, Sequence

import numpy as np
import torch
from transformers import BatchFeature, CLIPImageProcessorPil, WhisperFeatureExtractor
from transformers.processing_utils import ProcessorMixin

from .token_layout import OUTPUT_ASR, OUTPUT_SPEECH, OUTPUT_TEXT, OUTPUTS, TASKS, TokenLayout, task_name

SAMPLING_RATE = 16000
MAX_AUDIO_SECONDS = 30
SAMPLES_PER_FRAME = 320  # one Whisper encoder frame = 20 ms at 16 kHz (SPEC §5)

#: A float waveform is nominally in [-1, 1]. A peak above this bound is not a waveform at that scale (unscaled PCM
#: given as floats, or a gain error) and is refused rather than turned into meaningless (or, far above, NaN) features.
MAX_FLOAT_AMPLITUDE = 10.0
#: Images more elongated than this are first cut to their central part of this aspect ratio: CLIP's centre crop
#: keeps only a square of the short side, and resizing the whole strip first would take gigabytes (a 5000x1 image).
MAX_IMAGE_ASPECT_RATIO = 4.0
#: Channel counts of image arrays: grey, grey + alpha, RGB, RGBA.
_IMAGE_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


# ----- audio ------------------------------------------------------------------------------------------------------
def check_sampling_rate(rate: Any, what: str = "sampling_rate") -> int:
    """A sampling rate as a positive whole number of Hz (``16000``, ``np.int64(16000)`` or ``16000.0``)."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise TypeError(f"{what} must be a positive whole number of Hz, got {rate!r} ({type(rate).__name__})")
    if not math.isfinite(rate) or rate <= 0 or rate != int(rate):
        raise ValueError(f"{what} must be a positive whole number of Hz, got {rate!r}")
    return int(rate)


def _kept_samples(num_samples: int, rate: int, max_seconds: float | None, truncate: bool) -> int:
    """How many leading samples to keep under the ``max_seconds`` window; refuses longer audio unless ``truncate``."""
    if max_seconds is None or num_samples <= max_seconds * rate:
        return num_samples
    if not truncate:
        raise ValueError(
            f"audio is {num_samples / rate:.1f} s, over the {max_seconds:g} s the encoder sees; pass "
            f"truncate_audio=True to keep the first {max_seconds:g} s"
        )
    return int(max_seconds * rate)


def _read_sound_file(source: Any, name: str, max_seconds: float | None, truncate: bool) -> tuple[np.ndarray, int]:
    """A sound file (path, bytes buffer or file object) -> ((channels, samples) float32 in [-1, 1], rate).

    Only the samples kept under ``max_seconds`` are read, so a long file costs no more memory than the window.
    """
    import soundfile

    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise ValueError(f"audio file not found: {source}")
    try:
        with soundfile.SoundFile(source) as handle:
            rate = int(handle.samplerate)
            keep = _kept_samples(int(handle.frames), rate, max_seconds, truncate)
            data = handle.read(frames=keep, dtype="float32", always_2d=True)
    except (RuntimeError, TypeError, soundfile.SoundFileError) as error:
        raise ValueError(
            f"cannot decode {name} as audio ({error}); expected a sound file that libsndfile reads (WAV, FLAC, OGG, "
            "MP3 ...)"
        ) from None
    return data.T, rate


def _audio_dict(audio: dict, max_seconds: float | None, truncate: bool) -> tuple[Any, int | None]:
    """A ``datasets`` audio value: decoded ``{"array", "sampling_rate"}`` or encoded ``{"path", "bytes"}``."""
    if audio.get("array") is not None:
        rate = audio.get("sampling_rate")
        return audio["array"], (check_sampling_rate(rate, "the audio dict's sampling_rate") if rate is not None else None)
    if audio.get("bytes"):
        name = f"the audio bytes of {audio['path']!r}" if audio.get("path") else "the audio bytes"
        return _read_sound_file(io.BytesIO(audio["bytes"]), name, max_seconds, truncate)
    if audio.get("path"):
        return _read_sound_file(audio["path"], str(audio["path"]), max_seconds, truncate)
    raise ValueError(
        f"an audio dict needs 'array' (+ 'sampling_rate'), 'bytes' or 'path' (datasets' Audio values), got keys "
        f"{sorted(audio)}"
    )


def _audio_source(audio: Any, max_seconds: float | None, truncate: bool) -> tuple[Any, int | None]:
    """Any accepted audio value -> (samples, the rate the value carries or None)."""
    if isinstance(audio, (str, os.PathLike)):
        return _read_sound_file(audio, str(audio), max_seconds, truncate)
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return _read_sound_file(io.BytesIO(bytes(audio)), "the audio bytes", max_seconds, truncate)
    if isinstance(audio, dict):
        return _audio_dict(audio, max_seconds, truncate)
    if isinstance(audio, tuple):
        if len(audio) != 2:
            raise ValueError(f"audio tuples must be (array, sampling_rate), got a tuple of {len(audio)}")
        return audio[0], check_sampling_rate(audio[1], "the rate of an (array, sampling_rate) tuple")
    if callable(getattr(audio, "get_all_samples", None)):
        # a torchcodec AudioDecoder: what a datasets Audio column decodes to when torchcodec is installed
        samples = audio.get_all_samples()
        return samples.data, check_sampling_rate(samples.sample_rate, "the decoder's sample_rate")
    if callable(getattr(audio, "read", None)):  # an open file
        return _read_sound_file(audio, str(getattr(audio, "name", "the audio file object")), max_seconds, truncate)
    return audio, None


def _numeric_array(data: Any, what: str) -> np.ndarray:
    """Samples or pixels as a numpy array of real numbers (bool, complex, strings and objects are refused)."""
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu()
        data = (data.float() if data.dtype == torch.bfloat16 else data).numpy()
    elif not isinstance(data, np.ndarray):
        if isinstance(data, (str, bytes)) or data is None:
            raise TypeError(f"{what} must be an array of numbers, got {type(data).__name__}")
        try:
            data = np.asarray(data)
        except (ValueError, TypeError) as error:
            raise TypeError(f"{what} must be an array of numbers, got {type(data).__name__} ({error})") from None
    if data.dtype.kind not in "biuf":
        raise TypeError(f"{what} must hold real numbers, got dtype {data.dtype}")
    return data


def _pcm_to_float(data: np.ndarray) -> np.ndarray:
    """Samples -> float32 in [-1, 1]: integer PCM divided by its full scale (int16 by 32768; unsigned centred)."""
    kind = data.dtype.kind
    if kind == "b":
        raise TypeError("audio samples must be numbers, got dtype bool")
    if kind in "iu":
        bits = 8 * data.dtype.itemsize
        if bits > 32:
            raise TypeError(
                f"integer audio must be 8, 16 or 32-bit PCM (scaled by its full scale), got {data.dtype}; give "
                "int16/int32 PCM or floats in [-1, 1] (a list of Python ints becomes int64)"
            )
        full_scale = float(2 ** (bits - 1))
        offset = full_scale if kind == "u" else 0.0  # unsigned PCM (8-bit WAV) is centred on half its range
        return ((data.astype(np.float64) - offset) / full_scale).astype(np.float32)
    if not np.isfinite(data).all():
        raise ValueError("audio contains NaN or infinite samples")
    peak = float(np.abs(data).max())
    if peak > MAX_FLOAT_AMPLITUDE:
        raise ValueError(
            f"float audio must be a waveform in [-1, 1], but its peak is {peak:.4g} (over {MAX_FLOAT_AMPLITUDE:g}); "
            "divide PCM values by their full scale (32768 for 16-bit) or pass the integer array itself"
        )
    return data.astype(np.float32)


def load_audio(
    audio: Any,
    sampling_rate: int | None = None,
    *,
    target_rate: int = SAMPLING_RATE,
    default_rate: int | None = None,
    max_seconds: float | None = None,
    truncate: bool = False,
) -> np.ndarray:
    """Any accepted audio value -> a mono float32 waveform at ``target_rate`` (16 kHz), the one loader of the package.

    Accepted (``docs/inputs.md``): a path; ``bytes`` or an open file of a sound file; ``(array, rate)``; an array or
    tensor with ``sampling_rate=``; a ``datasets`` audio value (``{"array", "sampling_rate"}``,
    ``{"path", "bytes"}``, or the torchcodec ``AudioDecoder`` an ``Audio`` column decodes to). Arrays are mono
    ``(samples,)`` or multi-channel with the channel axis the shorter one (averaged). Integer PCM is divided by its
    full scale; floats must lie within +-``MAX_FLOAT_AMPLITUDE``. ``default_rate`` is the rate of bare arrays when
    ``sampling_rate`` is not given. Audio longer than ``max_seconds`` is refused, or cut with ``truncate``, before
    it is decoded or resampled.

    Raises:
        ValueError: a missing or undecodable file, no or a conflicting rate, empty, NaN/inf or too loud samples,
            more than 2 dimensions, audio over ``max_seconds``.
        TypeError: samples that are not real numbers (bool, complex, strings, objects) or 64-bit integers.
    """
    if sampling_rate is not None:
        sampling_rate = check_sampling_rate(sampling_rate)
    data, rate = _audio_source(audio, max_seconds, truncate)
    if rate is not None and sampling_rate is not None and rate != sampling_rate:
        raise ValueError(f"the audio says its rate is {rate} Hz but sampling_rate={sampling_rate} was passed")
    rate = rate or sampling_rate or (check_sampling_rate(default_rate, "default_rate") if default_rate else None)
    if rate is None:
        raise ValueError("give audio arrays as (array, sampling_rate) or pass sampling_rate=")
    data = _numeric_array(data, "audio samples")
    if data.ndim not in (1, 2):
        raise ValueError(f"audio must be 1-D (mono) or 2-D (multi-channel), got shape {data.shape}")
    if data.size == 0:
        raise ValueError(f"audio is empty (shape {data.shape})")
    if data.ndim == 2 and data.shape[0] > data.shape[1]:  # the channel axis is the shorter one
        data = data.T
    data = data[..., : _kept_samples(data.shape[-1], rate, max_seconds, truncate)]
    data = _pcm_to_float(data)
    if data.ndim == 2:
        data = data.mean(axis=0)
    if rate != target_rate:
        import librosa

        data = librosa.resample(data, orig_sr=rate, target_sr=target_rate).astype(np.float32)
        if max_seconds is not None:
            data = data[: int(max_seconds * target_rate)]
        if data.size == 0:
            raise ValueError(f"audio of {len(data)} samples at {rate} Hz is empty at {target_rate} Hz")
    return np.ascontiguousarray(data, dtype=np.float32)


# ----- images -----------------------------------------------------------------------------------------------------
def _central_box(width: int, height: int) -> tuple[int, int, int, int] | None:
    """The central part of an image more elongated than ``MAX_IMAGE_ASPECT_RATIO`` (left, top, right, bottom)."""
    if width == 0 or height == 0:
        raise ValueError(f"image is empty ({width}x{height} pixels)")
    short, long = min(width, height), max(width, height)
    if long <= MAX_IMAGE_ASPECT_RATIO * short:
        return None
    keep = int(math.ceil(MAX_IMAGE_ASPECT_RATIO * short))
    start = (long - keep) // 2
    return (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Pixel values -> uint8: uint8 as is, uint16 / 257, other integers in [0, 255] as is or [0, 65535] / 257,
    bool 0/255, floats in [0, 1] x 255 or in [0, 255] as is. Anything else is refused."""
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint8:
        return array
    if kind == "f" and not np.isfinite(array).all():
        raise ValueError("image contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if kind == "f":
        if low >= 0 and high <= 1:
            scaled = array.astype(np.float32) * 255
        elif low >= 0 and high <= 255:
            scaled = array.astype(np.float32)
        else:
            raise ValueError(
                f"float images must hold values in [0, 1] or [0, 255], got [{low:.4g}, {high:.4g}] (already "
                "normalised pixels go to the model as pixel_values, not through the processor)"
            )
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if (kind == "u" and array.dtype.itemsize == 2) or (low >= 0 and 255 < high <= 65535):
        return np.rint(array.astype(np.float32) / 257).astype(np.uint8)  # 16-bit: 65535 -> 255
    if low >= 0 and high <= 255:
        return array.astype(np.uint8)
    raise ValueError(
        f"integer images must hold 8-bit [0, 255] or 16-bit [0, 65535] values, got [{low:.0f}, {high:.0f}] "
        f"({array.dtype})"
    )


def _array_to_image(array: np.ndarray, channels_first: bool):
    """An image array (H, W), (H, W, C) or (C, H, W) with C in 1..4 -> PIL image (elongated ones cut first)."""
    from PIL import Image

    if array.ndim == 3:
        first, last = array.shape[0] in _IMAGE_MODES, array.shape[-1] in _IMAGE_MODES
        if not (first or last):
            raise ValueError(
                f"a 3-D image must be (H, W, C) or (C, H, W) with 1 to 4 channels, got shape {array.shape}"
            )
        if first and (channels_first or not last):
            array = np.moveaxis(array, 0, -1)
    elif array.ndim != 2:
        raise ValueError(
            f"an image array must be (H, W), (H, W, C) or (C, H, W), got shape {array.shape} (give a batch as a list)"
        )
    box = _central_box(array.shape[1], array.shape[0])
    if box is not None:
        left, top, right, bottom = box
        array = array[top:bottom, left:right]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(np.ascontiguousarray(_to_uint8(array)))  # L, LA, RGB or RGBA by the channel count


def _open_image(source: Any, name: str):
    """Decode an image file (path, bytes buffer or file object) with PIL, fully, or raise a ValueError naming it."""
    from PIL import Image

    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise ValueError(f"image file not found: {source}")
    try:
        image = Image.open(source)
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot decode {name} as an image ({error})") from None
    return image


def _pil_to_rgb(image):
    """Any PIL mode and bit depth -> RGB (alpha dropped, as the release's CLIP preprocessing does)."""
    box = _central_box(*image.size)
    if box is not None:
        image = image.crop(box)
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _array_to_image(np.asarray(image), channels_first=False).convert("RGB")
    try:
        if image.mode in ("P", "PA"):  # palette transparency goes through RGBA, as PIL asks
            image = image.convert("RGBA")
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"cannot convert a PIL image of mode {image.mode!r} to RGB ({error})") from None


def load_image(image: Any):
    """Any accepted image value -> an RGB PIL image, the one image loader of the package.

    Accepted (``docs/inputs.md``): a PIL image of any mode; a path, ``bytes`` or an open file of an image file; a
    ``datasets`` image value ``{"path", "bytes"}``; a numpy array or torch tensor (H, W), (H, W, C) or (C, H, W) with
    1 to 4 channels (numpy arrays are read channels-last, tensors channels-first when both fit) of uint8, uint16, bool,
    other integers in [0, 255] or [0, 65535], or floats in [0, 1] or [0, 255]. Images more elongated than 4:1 are
    cut to their central 4:1 part first (everything CLIP's centre crop keeps).

    Raises:
        ValueError: a missing or undecodable file, an empty image, values outside the ranges above, a bad shape.
        TypeError: anything else (complex, strings, objects ...).
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return _pil_to_rgb(_open_image(image, str(image)))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _pil_to_rgb(_open_image(io.BytesIO(bytes(image)), "the image bytes"))
    if isinstance(image, dict):
        if image.get("bytes"):
            return _pil_to_rgb(_open_image(io.BytesIO(image["bytes"]), "the image bytes"))
        if image.get("path"):
            return _pil_to_rgb(_open_image(image["path"], str(image["path"])))
        raise ValueError(f"an image dict needs 'bytes' or 'path' (datasets' Image values), got keys {sorted(image)}")
    if callable(getattr(image, "read", None)):
        return _pil_to_rgb(_open_image(image, str(getattr(image, "name", "the image file object"))))
    if isinstance(image, (np.ndarray, torch.Tensor, list)):
        array = _numeric_array(image, "an image array")
        return _array_to_image(array, channels_first=isinstance(image, torch.Tensor)).convert("RGB")
    raise TypeError(
        f"images must be PIL images, paths, bytes, datasets image dicts or arrays, got {type(image).__name__}"
    )


def num_audio_frames(num_samples: int, max_frames: int) -> int:
    """Encoder frames kept for an audio of ``num_samples`` at 16 kHz: ``min(n // 320 + 1, max)`` (SPEC §5)."""
    return min(num_samples // SAMPLES_PER_FRAME + 1, max_frames)


class MiniOmni2Processor(ProcessorMixin):
    r"""
    Builds the 8-stream prompts of Mini-Omni2 (SPEC §4) from text, speech and images, batched with left padding.

    Args:
        image_processor (`CLIPImageProcessorPil`): CLIP preprocessing (224 px, bicubic, center crop, CLIP mean/std).
        feature_extractor (`WhisperFeatureExtractor`): 80-bin log-mel of 30 s windows at 16 kHz.
        tokenizer (`Qwen2Tokenizer`): the text tokenizer; prompts are its plain encoding (no BOS, no template).
        text_vocab_size, num_text_special_tokens, audio_codebook_size, audio_vocab_size, num_audio_layers,
        num_image_tokens: the token layout (must match the model's config).
        max_audio_frames (`int`): encoder frames per request (1,500).
        model_max_length (`int`): the context length; longer prompts are refused.
        has_vision (`bool`): whether the model takes images (False for Mini-Omni).
    """

    def __init__(
        self,
        image_processor=None,
        feature_extractor=None,
        tokenizer=None,
        text_vocab_size: int = 152000,
        num_text_special_tokens: int = 64,
        audio_codebook_size: int = 4096,
        audio_vocab_size: int = 4160,
        num_audio_layers: int = 7,
        num_image_tokens: int = 50,
        max_audio_frames: int = 1500,
        model_max_length: int = 32768,
        has_vision: bool = True,
        **kwargs,
    ):
        self.text_vocab_size = text_vocab_size
        self.num_text_special_tokens = num_text_special_tokens
        self.audio_codebook_size = audio_codebook_size
        self.audio_vocab_size = audio_vocab_size
        self.num_audio_layers = num_audio_layers
        self.num_image_tokens = num_image_tokens
        self.max_audio_frames = max_audio_frames
        self.model_max_length = model_max_length
        self.has_vision = has_vision
        # PIL backend: OpenAI CLIP's own preprocessing resizes with PIL bicubic, and it needs no torchvision
        image_processor = image_processor if image_processor is not None else CLIPImageProcessorPil()
        feature_extractor = feature_extractor if feature_extractor is not None else WhisperFeatureExtractor()
        super().__init__(image_processor, feature_extractor, tokenizer, **kwargs)
        if len(self.tokenizer) > self.layout.tokenizer_vocab_size:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} ids but the layout reserves only "
                f"{self.layout.tokenizer_vocab_size} before the text specials"
            )

    @classmethod
    def from_config(cls, config, tokenizer, image_processor=None, feature_extractor=None) -> "MiniOmni2Processor":
        """A processor whose layout, limits and vision flag follow a :class:`MiniOmni2Config`."""
        return cls(
            image_processor=image_processor,
            feature_extractor=feature_extractor or WhisperFeatureExtractor(feature_size=config.audio_config.num_mel_bins),
            tokenizer=tokenizer,
            **config.token_layout.sizes(),
            max_audio_frames=config.max_audio_frames,
            model_max_length=config.text_config.max_position_embeddings,
            has_vision=config.has_vision,
        )

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout.of(self)

    # ----- requests ------------------------------------------------------------------------------------
    @staticmethod
    def _as_batch(value: Any, name: str, size: int | None) -> list | None:
        if value is None:
            return None
        if isinstance(value, list):
            if size is not None and len(value) != size:
                raise ValueError(f"{name} has {len(value)} entries but the batch has {size} requests")
            return value
        return [value] * size if size is not None else [value]

    def _requests(self, text, audio, images, output, task) -> list[dict]:
        lists = [v for v in (text, audio, images, output, task) if isinstance(v, list)]
        if text is None and audio is None and images is None:
            raise ValueError("give at least one of text, audio or images")
        size = len(lists[0]) if lists else 1
        if size == 0:
            raise ValueError("empty batch")
        columns = {
            name: self._as_batch(value, name, size)
            for name, value in (("text", text), ("audio", audio), ("images", images), ("output", output), ("task", task))
        }
        if columns["audio"] is not None and not isinstance(audio, list) and size > 1:
            raise ValueError("pass one audio per request as a list when batching")
        requests = []
        for k in range(size):
            requests.append({name: (col[k] if col is not None else None) for name, col in columns.items()})
        return requests

    def _task_of(self, request: dict) -> str:
        if request["task"] is not None:
            if request["task"] not in TASKS:
                raise ValueError(f"Unknown task {request['task']!r}; known tasks: {', '.join(TASKS)}")
            return request["task"]
        output = request["output"] or OUTPUT_SPEECH
        if output not in OUTPUTS:
            raise ValueError(f"Unknown output {output!r}; choose one of {OUTPUTS}")
        inputs = {name for name, key in (("text", "text"), ("audio", "audio"), ("image", "images")) if request[key] is not None}
        return task_name(inputs, output)

    # ----- __call__ --------------------------------------------------------------------------------------
    def __call__(
        self,
        text: str | list[str | None] | None = None,
        audio: Any = None,
        images: Any = None,
        output: str | list[str] | None = None,
        task: str | list[str] | None = None,
        sampling_rate: int | None = None,
        truncate_audio: bool = False,
        batch_parallel: bool = False,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Prompts for one request or a batch (lists, ``None`` where a request lacks an input).

        ``output`` is ``"speech"`` (default), ``"text"`` or ``"asr"``; ``task`` names a layout of
        :data:`~mini_omni2.token_layout.TASKS` directly. With ``batch_parallel=True`` every speech request gives two
        rows, the speech row then its text-out twin (SPEC §6); ``request_index`` maps rows to requests. Rows are
        left padded. Audio over 30 s is refused unless ``truncate_audio=True``.
        """
        if kwargs:
            raise ValueError(f"unexpected arguments: {', '.join(kwargs)}")
        if return_tensors != "pt":
            raise ValueError("only return_tensors='pt' is supported")
        layout = self.layout
        rows, audios, pixel_images, request_index = [], [], [], []
        for k, request in enumerate(self._requests(text, audio, images, output, task)):
            name = self._task_of(request)
            inputs, out = TASKS[name]
            self._check_inputs_match(name, inputs, request)
            waveform = None
            if "audio" in inputs:
                waveform = self.prepare_audio(request["audio"], sampling_rate, truncate_audio)
            image = load_image(request["images"]) if "image" in inputs else None
            text_ids = self.encode_text(request["text"]) if "text" in inputs else None
            frames = num_audio_frames(len(waveform), self.max_audio_frames) if waveform is not None else None
            names = [name]
            if batch_parallel and out == OUTPUT_SPEECH:
                names.append(layout.text_output_task(name))
            for row_task in names:
                prompt = layout.build_prompt(row_task, text_ids=text_ids, num_audio_frames=frames)
                if len(prompt) > self.model_max_length:
                    raise ValueError(
                        f"request {k}: the prompt has {len(prompt)} positions, more than the context of "
                        f"{self.model_max_length}"
                    )
                rows.append(prompt)
                request_index.append(k)
                if waveform is not None:
                    audios.append(waveform)
                if image is not None:
                    pixel_images.append(image)
        data = self._pad(rows)
        data["request_index"] = torch.tensor(request_index, dtype=torch.long)
        if audios:
            data["input_features"] = torch.from_numpy(self.audio_features(audios))
            data["audio_lengths"] = torch.tensor(
                [num_audio_frames(len(a), self.max_audio_frames) for a in audios], dtype=torch.long
            )
        if pixel_images:
            data["pixel_values"] = torch.from_numpy(self.image_pixels(pixel_images))
        return BatchFeature(data=data)

    def _check_inputs_match(self, name: str, inputs: frozenset, request: dict) -> None:
        given = {n for n, key in (("text", "text"), ("audio", "audio"), ("image", "images")) if request[key] is not None}
        if given != set(inputs):
            raise ValueError(f"task {name} takes {sorted(inputs)} but the request has {sorted(given)}")
        if "image" in inputs and not self.has_vision:
            raise ValueError("this model has no vision encoder (Mini-Omni): it cannot take images")

    # ----- the inputs, one owner each (the training data and the collator use these too) -----------------------
    @property
    def max_audio_seconds(self) -> float:
        """The window the audio encoder sees (30 s): the feature extractor's chunk."""
        extractor = self.feature_extractor
        return extractor.n_samples / extractor.sampling_rate

    def prepare_audio(self, audio: Any, sampling_rate: int | None = None, truncate_audio: bool = False) -> np.ndarray:
        """One audio value (any form of :func:`load_audio`) -> mono float32 at 16 kHz within the encoder's window."""
        return load_audio(audio, sampling_rate, max_seconds=self.max_audio_seconds, truncate=truncate_audio)

    def audio_features(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        """16 kHz waveforms -> Whisper log-mel (n, 80, 3000) float32; non-finite features are refused."""
        features = self.feature_extractor(
            list(waveforms), sampling_rate=SAMPLING_RATE, return_tensors="np", padding="max_length"
        )["input_features"]
        features = np.asarray(features, dtype=np.float32)
        if not np.isfinite(features).all():
            raise ValueError("the audio gives non-finite log-mel features; check its samples")
        return features

    def image_pixels(self, images: Sequence[Any]) -> np.ndarray:
        """Images (any form of :func:`load_image`) -> CLIP pixel values (n, 3, 224, 224) float32."""
        rgb = [load_image(image) for image in images]
        pixels = np.asarray(self.image_processor(rgb, return_tensors="np")["pixel_values"], dtype=np.float32)
        if not np.isfinite(pixels).all():
            raise ValueError("the image gives non-finite pixel values")
        return pixels

    def encode_text(self, text: Any, what: str = "text prompts") -> list[int]:
        """A prompt or answer text -> tokenizer ids (plain encoding, no specials); refuses what is not text."""
        if not isinstance(text, str):
            raise TypeError(f"{what} must be strings, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{what} must be non-empty strings, got {text!r}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"{what} must be valid Unicode: {error.reason} {text[error.start:error.end]!r} at position "
                f"{error.start} (a lone surrogate cannot be encoded)"
            ) from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _pad(self, rows: Sequence) -> dict[str, torch.Tensor]:
        """Left-pad prompts to one length: pad ids (``pad_a`` per layer, ``pad_t``), mask 0, no features."""
        layout = self.layout
        length = max(len(r) for r in rows)
        input_ids = layout.pad_ids()[None, :, None].repeat(len(rows), 1, length)
        attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
        audio_mask = torch.zeros(len(rows), length, dtype=torch.bool)
        image_mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for b, row in enumerate(rows):
            shift = length - len(row)
            input_ids[b, :, shift:] = torch.tensor(row.streams, dtype=torch.long)
            attention_mask[b, shift:] = 1
            audio_mask[b, [shift + p for p in row.audio_positions]] = True
            image_mask[b, [shift + p for p in row.image_positions]] = True
        data = {"input_ids": input_ids, "attention_mask": attention_mask, "audio_feature_mask": audio_mask}
        if bool(image_mask.any()):
            data["image_feature_mask"] = image_mask
        return data

    # ----- decoding --------------------------------------------------------------------------------------
    def decode(self, token_ids: Sequence[int] | torch.Tensor, **kwargs) -> str:
        """Text of generated text-stream ids; the layout's specials (eot, pad_t, ...) are dropped."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        limit = self.layout.tokenizer_vocab_size
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.decode([t for t in token_ids if 0 <= t < limit], **kwargs)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(s, **kwargs) for s in sequences]

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "input_features",
            "audio_feature_mask",
            "audio_lengths",
            "pixel_values",
            "image_feature_mask",
        ]


__all__ = [
    "MiniOmni2Processor",
    "load_audio",
    "load_image",
    "check_sampling_rate",
    "num_audio_frames",
    "OUTPUT_ASR",
    "OUTPUT_TEXT",
]
