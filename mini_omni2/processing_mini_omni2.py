"""Processor of Mini-Omni2: CLIP image processor + Whisper feature extractor + Qwen2 tokenizer -> 8-stream prompts."""

from __future__ import annotations

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


def load_audio(audio: Any, sampling_rate: int | None = None) -> np.ndarray:
    """Audio as a path, an array (with ``sampling_rate``) or ``(array, sampling_rate)`` -> mono float32 at 16 kHz."""
    if isinstance(audio, (str, os.PathLike)):
        import soundfile

        if not os.path.exists(audio):
            raise ValueError(f"audio file not found: {audio}")
        data, sampling_rate = soundfile.read(str(audio), dtype="float32", always_2d=True)
        data = data.T  # (channels, samples)
    elif isinstance(audio, tuple):
        if len(audio) != 2:
            raise ValueError("audio tuples must be (array, sampling_rate)")
        data, sampling_rate = audio
    else:
        data = audio
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    data = np.asarray(data, dtype=np.float32)
    if sampling_rate is None:
        raise ValueError("give audio arrays as (array, sampling_rate) or pass sampling_rate=")
    if data.ndim == 2:  # stereo or multi-channel -> mono; the channel axis is the short one
        channel_axis = 0 if data.shape[0] <= data.shape[1] else 1
        data = data.mean(axis=channel_axis)
    if data.ndim != 1:
        raise ValueError(f"audio must be 1-D (mono) or 2-D (multi-channel), got shape {data.shape}")
    if data.size == 0:
        raise ValueError("audio is empty")
    if not np.isfinite(data).all():
        raise ValueError("audio contains NaN or infinite samples")
    if int(sampling_rate) != SAMPLING_RATE:
        import librosa

        data = librosa.resample(data, orig_sr=int(sampling_rate), target_sr=SAMPLING_RATE).astype(np.float32)
    return data


def load_image(image: Any):
    """An image as a PIL image, a path or an array -> RGB PIL image."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        if not os.path.exists(image):
            raise ValueError(f"image file not found: {image}")
        image = Image.open(image)
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        array = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image)
        image = Image.fromarray(array.astype(np.uint8))
    if not isinstance(image, Image.Image):
        raise ValueError(f"images must be PIL images, paths or arrays, got {type(image).__name__}")
    return image.convert("RGB")


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
                waveform = load_audio(request["audio"], sampling_rate)
                waveform = self._check_length(waveform, truncate_audio)
            image = load_image(request["images"]) if "image" in inputs else None
            text_ids = self._encode_text(request["text"]) if "text" in inputs else None
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
            features = self.feature_extractor(
                audios, sampling_rate=SAMPLING_RATE, return_tensors="pt", padding="max_length"
            )
            data["input_features"] = features["input_features"]
            data["audio_lengths"] = torch.tensor(
                [num_audio_frames(len(a), self.max_audio_frames) for a in audios], dtype=torch.long
            )
        if pixel_images:
            data["pixel_values"] = self.image_processor(pixel_images, return_tensors="pt")["pixel_values"]
        return BatchFeature(data=data)

    def _check_inputs_match(self, name: str, inputs: frozenset, request: dict) -> None:
        given = {n for n, key in (("text", "text"), ("audio", "audio"), ("image", "images")) if request[key] is not None}
        if given != set(inputs):
            raise ValueError(f"task {name} takes {sorted(inputs)} but the request has {sorted(given)}")
        if "image" in inputs and not self.has_vision:
            raise ValueError("this model has no vision encoder (Mini-Omni): it cannot take images")

    def _check_length(self, waveform: np.ndarray, truncate: bool) -> np.ndarray:
        limit = MAX_AUDIO_SECONDS * SAMPLING_RATE
        if len(waveform) > limit:
            if not truncate:
                raise ValueError(
                    f"audio is {len(waveform) / SAMPLING_RATE:.1f} s, over the {MAX_AUDIO_SECONDS} s the encoder sees; "
                    "pass truncate_audio=True to keep the first 30 s"
                )
            waveform = waveform[:limit]
        return waveform

    def _encode_text(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text prompts must be non-empty strings")
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


__all__ = ["MiniOmni2Processor", "load_audio", "load_image", "num_audio_frames", "OUTPUT_ASR", "OUTPUT_TEXT"]
