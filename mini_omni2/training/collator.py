"""Training Mini-Omni2: the data collator, the three training stages (SPEC §9) and LoRA helpers.

- :class:`MiniOmni2DataCollator` turns examples (``docs/training.md``; raw or preprocessed by
  :mod:`mini_omni2.training.data`) into ``input_ids``/``labels`` of shape (batch, 8, seq) plus the feature inputs. A row is
  the prompt of :meth:`TokenLayout.build_prompt` followed by the answer streams of
  :meth:`TokenLayout.delay_answer`; labels are the same ids where the answer is learned and -100 elsewhere, so
  that the targets are exactly what delayed parallel decoding (SPEC §6) generates and feeds back.
- Listening rows of duplex interruption (``task="LISTEN"``, docs/duplex.md): :func:`build_listen_training_row`; their
  labels are the frames' states (``irq``/``n_irq``) on the text stream and nothing else.
- :func:`configure_stage` freezes the model for stage 1, 2 or 3 and reports the trainable parameters per part.
- :func:`training_arguments` gives ``transformers.TrainingArguments`` with the paper's schedule and per-stage rates.
- :func:`lora_config`, :func:`apply_lora`, :func:`load_lora`: PEFT LoRA on the language model only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from transformers.utils import logging

from .data import _as_features, _as_ids, _codec_of, _present, prepare_example
from .duplex_data import listen_inputs
from ..modeling_mini_omni2 import IGNORE_INDEX
from ..token_layout import LISTEN_TASK, OUTPUT_SPEECH, TASKS, TokenLayout

logger = logging.get_logger(__name__)


# ----- one row -------------------------------------------------------------------------------------------------
@dataclass
class TrainingRow:
    """The 8 input streams of one training sequence, its 8 label streams and where the features go."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    audio_positions: list[int]
    image_positions: list[int]
    prompt_length: int
    listen_positions: list[int] = field(default_factory=list)
    #: a features-input listening row's vectors (frames, dim), one per ``listen_positions`` entry
    listen_features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.input_ids[0])


def build_training_row(
    layout: TokenLayout,
    task: str,
    answer_text_ids: Sequence[int],
    answer_codes: Any = None,
    prompt_text_ids: Sequence[int] | None = None,
    num_audio_frames: int | None = None,
) -> TrainingRow:
    """Prompt (``build_prompt``) + answer (``delay_answer``) of one example, with its labels.

    Labels are -100 on the prompt and wherever ``delay_answer`` marks a position as not learned (the ``pad_a``
    audio streams of text answers, which generation feeds itself); elsewhere they equal the input ids. The model
    shifts them, so the prompt's last position (``answer_t``/``asr``) predicts the answer's first tokens.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    speech = TASKS[task][1] == OUTPUT_SPEECH
    codes = None
    if _present(answer_codes):
        codes = torch.from_numpy(_as_ids(answer_codes, "answer_codes", 2))
    if speech and codes is None:
        raise ValueError(f"task {task} has a speech answer and needs answer codes (T, {layout.num_audio_layers})")
    if not speech and codes is not None:
        raise ValueError(f"task {task} has a text answer; it takes no answer codes")
    text_ids = _as_ids(answer_text_ids, "answer_text_ids", 1).tolist() if _present(answer_text_ids) else []
    if not speech and not text_ids:
        raise ValueError(f"task {task} has a text answer; it needs answer text ids")
    bad = [t for t in text_ids if not 0 <= t < layout.tokenizer_vocab_size]
    if bad:
        raise ValueError(f"answer text ids must be tokenizer ids in [0, {layout.tokenizer_vocab_size}), got {bad[:5]}")
    prompt_ids = _as_ids(prompt_text_ids, "prompt_text_ids", 1).tolist() if _present(prompt_text_ids) else None
    prompt = layout.build_prompt(task, text_ids=prompt_ids, num_audio_frames=num_audio_frames or None)
    answer, learned = layout.delay_answer(text_ids, codes)
    if speech and len(text_ids) + 1 > codes.shape[0] + layout.num_audio_layers + 1:
        logger.warning(
            "a speech answer's text (%d tokens) outlasts its speech (%d frames): generation stops at the last layer's "
            "eoa and would cut the text",
            len(text_ids),
            codes.shape[0],
        )
    input_ids = [p + a for p, a in zip(prompt.streams, answer)]
    labels = [
        [IGNORE_INDEX] * len(prompt) + [t if keep else IGNORE_INDEX for t, keep in zip(a, flags)]
        for a, flags in zip(answer, learned)
    ]
    return TrainingRow(input_ids, labels, prompt.audio_positions, prompt.image_positions, len(prompt))


def build_listen_training_row(
    layout: TokenLayout, frame_labels: Sequence[int], codes: Any = None, num_frames: int | None = None
) -> TrainingRow:
    """A listening row (:meth:`TokenLayout.build_listen_row`) with its labels: the state of every frame.

    ``frame_labels`` (T,): 1 where the frame's state is ``irq``, 0 for ``n_irq``. ``codes`` (T, 7) for codec input;
    without them the row takes feature vectors at its ``listen_positions``. The state of frame k is read from the
    logits at position k + 1, so with the model's shift its label sits at position k + 2; the row ends with one
    position (``listen_step()`` with no frame, no features) that only holds the last frame's label. Every other label
    is -100: the row learns its states and nothing else.
    """
    labels = np.asarray(frame_labels, dtype=np.int64).reshape(-1)
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"frame_labels must be 0 (n_irq) or 1 (irq), got {sorted(set(labels.tolist()) - {0, 1})}")
    if codes is not None and np.asarray(codes).size > 0:
        codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)
        if codes.shape[0] != len(labels):
            raise ValueError(f"{codes.shape[0]} frames of codes but {len(labels)} frame labels")
        row = layout.build_listen_row(frames=codes)
    else:
        if num_frames is not None and num_frames != len(labels):
            raise ValueError(f"{num_frames} feature frames but {len(labels)} frame labels")
        row = layout.build_listen_row(num_frames=len(labels))
    holder = layout.listen_step(None)
    input_ids = [stream + [holder[s]] for s, stream in enumerate(row.streams)]
    label_streams = [[IGNORE_INDEX] * len(input_ids[0]) for _ in input_ids]
    prompt = len(layout.build_listen_prompt())
    states = [layout.irq if label else layout.n_irq for label in labels.tolist()]
    label_streams[layout.text_stream][prompt + 1 :] = states
    return TrainingRow(input_ids, label_streams, [], [], prompt, listen_positions=row.listen_positions)


def listen_row_length(frame_labels: Sequence[int], tail_frames: int | None) -> int:
    """How many frames of a listening example a training row keeps: all of them, or, with ``tail_frames``, up to
    ``tail_frames`` after the first ``irq`` label (frames are causal: cutting the end changes nothing before it)."""
    labels = np.asarray(frame_labels).reshape(-1)
    irq = np.flatnonzero(labels == 1)
    if tail_frames is None or irq.size == 0:
        return len(labels)
    return min(len(labels), int(irq[0]) + tail_frames)


#: The columns of a built training row (``MiniOmni2Preprocessor(training_rows=True)``). Every one is an argument of the
#: model's ``forward``, so transformers' ``Trainer`` keeps them with its default ``remove_unused_columns=True``.
ROW_FIELDS = (
    "input_ids",
    "labels",
    "audio_feature_mask",
    "image_feature_mask",
    "input_features",
    "audio_lengths",
    "pixel_values",
)


def is_training_row(example: Any) -> bool:
    """Whether an example is a built training row (``input_ids`` and ``labels``) rather than a raw example."""
    return isinstance(example, Mapping) and "input_ids" in example and "labels" in example


def _positions(value: Any, length: int, what: str) -> list[int]:
    """A row's feature mask (length,) of 0/1 or bools -> the masked positions."""
    if not _present(value):
        return []
    mask = np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value)
    if mask.shape != (length,) or mask.dtype.kind not in "biuf" or not np.isin(mask, (0, 1)).all():
        raise ValueError(f"{what} must be {length} zeros and ones (one per position), got shape {mask.shape}")
    return np.flatnonzero(mask).tolist()


# ----- the collator ----------------------------------------------------------------------------------------------
class MiniOmni2DataCollator:
    """Examples -> a training batch for :class:`~mini_omni2.MiniOmni2ForConditionalGeneration`.

    Args:
        processor: the model's :class:`~mini_omni2.MiniOmni2Processor`.
        codec: the model's codec (or the model), to encode ``answer_audio`` of examples not preprocessed.
        padding_side: ``"right"`` (default; training) or ``"left"`` (as the processor's prompts). Padded positions
            get ``pad_a``/``pad_t`` ids, attention 0 and label -100; the model derives the positions from the
            attention mask, so both give the same loss.
        pad_to_multiple_of: round the sequence length up.
        max_length: refuse longer rows (default: the processor's ``model_max_length``).
        batch_parallel_twins: for every speech-answer example also add its text-out twin row (``A1T2`` for
            ``A1A2``, ``T1T2`` for ``T1A2``, ...), with the same text answer: batch parallel decoding (SPEC §6)
            takes the text of a speech answer from that twin row, so training it makes the default
            ``generate(batch_parallel=True)`` reproduce what the speech example teaches.
        truncate_audio: keep the first 30 s of longer input audio instead of refusing it.
        listen_front_end: the model's :class:`~mini_omni2.duplex_mini_omni2.MiniOmni2ListenFrontEnd`
            (``model.listen_front_end()``), for listening examples (``task="LISTEN"``) given as raw audio; those given
            as ``listen_features``/``listen_codes`` with ``frame_labels`` need none.
        listen_tail_frames: keep a listening row's frames only up to this many after its first ``irq`` label
            (:func:`listen_row_length`; None keeps them all). A row ends at its first committed ``irq``, so what it
            would say long after the command is never used; labels there only teach it to remember the command.

    Listening examples become listening rows (:func:`build_listen_training_row`), and may be mixed with any other
    examples in a batch. Their feature vectors come as ``listen_features`` (batch, seq, dim) with
    ``listen_feature_mask`` (batch, seq).

    Examples are raw or processed (:mod:`mini_omni2.training.data`), or training rows built ahead of time
    (:meth:`training_rows`, ``MiniOmni2Preprocessor(training_rows=True)``), which are padded as they are.

    Returns a dict: ``input_ids`` and ``labels`` (batch, 8, seq), ``attention_mask`` and ``audio_feature_mask``
    (batch, seq), and when present ``input_features`` (n_audio, 80, frames) and ``audio_lengths`` (n_audio,),
    ``pixel_values`` (n_images, 3, 224, 224) and ``image_feature_mask`` (batch, seq); features are in row order.
    """

    def __init__(
        self,
        processor,
        codec: Any = None,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        max_length: int | None = None,
        batch_parallel_twins: bool = False,
        truncate_audio: bool = False,
        listen_front_end: Any = None,
        listen_tail_frames: int | None = None,
    ):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        positive = (("pad_to_multiple_of", pad_to_multiple_of), ("max_length", max_length),
                    ("listen_tail_frames", listen_tail_frames))
        for name, value in positive:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self.processor = processor
        self.codec = _codec_of(codec)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length if max_length is not None else getattr(processor, "model_max_length", None)
        self.batch_parallel_twins = batch_parallel_twins
        self.truncate_audio = truncate_audio
        self.listen_front_end = listen_front_end
        self.listen_tail_frames = listen_tail_frames

    @property
    def layout(self) -> TokenLayout:
        return self.processor.layout

    def listen_row(self, example: dict) -> tuple[TrainingRow, dict]:
        """The listening row of a ``task="LISTEN"`` example: preprocessed (``listen_features`` or ``listen_codes``,
        and ``frame_labels``) or raw (``audio``, ``sampling_rate``, ``command_end``) through ``listen_front_end``."""
        prepared = example
        if not _present(example.get("frame_labels")):
            if self.listen_front_end is None:
                raise ValueError(
                    "a raw listening example (audio + command_end) needs listen_front_end=model.listen_front_end()"
                )
            if not _present(example.get("audio")) or example.get("command_end") is None:
                raise ValueError("a listening example needs frame_labels, or audio, sampling_rate and command_end")
            prepared = listen_inputs(example, self.listen_front_end)
        codes = prepared.get("listen_codes")
        features = prepared.get("listen_features")
        has_codes, has_features = _present(codes), _present(features)
        if has_codes == has_features:
            raise ValueError("a listening example needs exactly one of listen_features or listen_codes")
        frame_labels = np.asarray(prepared["frame_labels"]).reshape(-1)
        frames = codes if has_codes else features
        if len(frames) == len(frame_labels):  # a mismatch is left to build_listen_training_row to refuse
            keep = listen_row_length(frame_labels, self.listen_tail_frames)
            frame_labels = frame_labels[:keep]
            if has_codes:
                codes = np.asarray(codes)[:keep]
            else:
                features = np.asarray(features)[:keep]
        num_frames = len(features) if has_features else None
        row = build_listen_training_row(self.layout, frame_labels, codes if has_codes else None, num_frames)
        if has_features:
            vectors = torch.as_tensor(np.asarray(features, dtype=np.float32))
            if vectors.ndim != 2:
                raise ValueError(f"listen_features must be (frames, dim), got shape {tuple(vectors.shape)}")
            row.listen_features = vectors
        return row, prepared

    def rows(self, example: dict) -> list[tuple[TrainingRow, dict]]:
        """The training rows of one example (two with ``batch_parallel_twins`` for a speech answer)."""
        if isinstance(example, Mapping) and example.get("task") == LISTEN_TASK:
            return [self.listen_row(example)]
        prepared = prepare_example(
            example, self.processor, codec=self.codec, audio="waveform", images="keep", truncate_audio=self.truncate_audio
        )
        task = prepared["task"]
        common = dict(
            answer_text_ids=prepared["answer_text_ids"],
            prompt_text_ids=prepared["prompt_text_ids"],
            num_audio_frames=prepared["audio_num_frames"],
        )
        rows = [(build_training_row(self.layout, task, answer_codes=prepared["answer_codes"], **common), prepared)]
        if self.batch_parallel_twins and TASKS[task][1] == OUTPUT_SPEECH:
            twin = self.layout.text_output_task(task)
            if len(prepared["answer_text_ids"]) == 0:
                raise ValueError("batch_parallel_twins needs the text of every speech answer (answer_text)")
            rows.append((build_training_row(self.layout, twin, answer_codes=None, **common), prepared))
        return rows

    def training_rows(self, example: dict) -> list[dict[str, Any]]:
        """One example -> its built training rows as numpy fields (:data:`ROW_FIELDS`; empty where absent), for
        ``datasets``: the collator pads them as they are."""
        built = []
        for row, features, pixels in self._items(example):
            if row.listen_positions:
                raise ValueError("listening examples (task='LISTEN') are collated as they are; they have no built rows")
            audio_mask, image_mask = np.zeros(len(row), bool), np.zeros(len(row), bool)
            audio_mask[row.audio_positions] = True
            image_mask[row.image_positions] = True
            built.append({
                "input_ids": np.asarray(row.input_ids, dtype=np.int64),
                "labels": np.asarray(row.labels, dtype=np.int64),
                "audio_feature_mask": audio_mask,
                "image_feature_mask": image_mask,
                "input_features": features.numpy() if features is not None else np.zeros((0, 0), np.float32),
                "audio_lengths": len(row.audio_positions),
                "pixel_values": pixels.numpy() if pixels is not None else np.zeros((0, 0, 0), np.float32),
            })
        return built

    def _items(self, example: Any) -> list[tuple[TrainingRow, torch.Tensor | None, torch.Tensor | None]]:
        """The rows of one example with their audio features and pixels (None where the row has none)."""
        if is_training_row(example):
            return [self._built_row(example)]
        return [
            (
                row,
                self._features(prepared) if row.audio_positions else None,
                self._pixels(prepared) if row.image_positions else None,
            )
            for row, prepared in self.rows(example)
        ]

    def _built_row(self, example: Mapping) -> tuple[TrainingRow, torch.Tensor | None, torch.Tensor | None]:
        """A row built ahead of time (:meth:`training_rows`), checked for shape."""
        layout = self.layout
        input_ids = _as_ids(example["input_ids"], "input_ids", 2)
        labels = _as_ids(example["labels"], "labels", 2)
        if input_ids.shape[0] != layout.num_streams or input_ids.shape[1] < 1 or labels.shape != input_ids.shape:
            raise ValueError(
                f"a built row's input_ids and labels must both be ({layout.num_streams}, seq >= 1), got "
                f"{input_ids.shape} and {labels.shape}"
            )
        length = input_ids.shape[1]
        audio = _positions(example.get("audio_feature_mask"), length, "audio_feature_mask")
        image = _positions(example.get("image_feature_mask"), length, "image_feature_mask")
        features = pixels = None
        for kind, positions, name in (("audio", audio, "input_features"), ("image", image, "pixel_values")):
            if bool(positions) != _present(example.get(name)):
                raise ValueError(f"a built row has {len(positions)} {kind} positions: {name} must be given with them")
        if audio:
            extractor = self.processor.feature_extractor
            shape = (extractor.feature_size, extractor.nb_max_frames)
            features = torch.from_numpy(_as_features(example["input_features"], "input_features", shape))
            given = example.get("audio_lengths")
            if given is not None and int(_as_ids(given, "audio_lengths", 0)) != len(audio):
                raise ValueError(f"audio_lengths {given} disagrees with the {len(audio)} audio positions")
        if image:
            crop = self.processor.image_processor.crop_size
            shape = (3, crop["height"], crop["width"])
            pixels = torch.from_numpy(_as_features(example["pixel_values"], "pixel_values", shape))
        learned = np.flatnonzero((labels != IGNORE_INDEX).any(axis=0))
        prompt_length = int(learned[0]) if learned.size else length
        row = TrainingRow(input_ids.tolist(), labels.tolist(), audio, image, prompt_length)
        return row, features, pixels

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if isinstance(examples, (Mapping, str)) or not isinstance(examples, Sequence):
            raise TypeError(f"the collator takes a list of examples, got {type(examples).__name__}")
        if not examples:
            raise ValueError("empty batch")
        items = [item for example in examples for item in self._items(example)]
        layout = self.layout
        length = max(len(r) for r, _, _ in items)
        if self.max_length is not None and length > self.max_length:
            raise ValueError(f"a training row has {length} positions, more than max_length={self.max_length}")
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(items)
        input_ids = layout.pad_ids()[None, :, None].repeat(batch, 1, length)
        labels = torch.full((batch, layout.num_streams, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        audio_mask = torch.zeros(batch, length, dtype=torch.bool)
        image_mask = torch.zeros(batch, length, dtype=torch.bool)
        features, audio_lengths, pixels = [], [], []
        listen_features, listen_mask = self._listen_inputs(items, length)
        for b, (row, row_features, row_pixels) in enumerate(items):
            shift = length - len(row) if self.padding_side == "left" else 0
            span = slice(shift, shift + len(row))
            input_ids[b, :, span] = torch.tensor(row.input_ids, dtype=torch.long)
            labels[b, :, span] = torch.tensor(row.labels, dtype=torch.long)
            attention_mask[b, span] = 1
            if row.audio_positions:
                audio_mask[b, [shift + p for p in row.audio_positions]] = True
                features.append(row_features)
                audio_lengths.append(len(row.audio_positions))
            if row.image_positions:
                image_mask[b, [shift + p for p in row.image_positions]] = True
                pixels.append(row_pixels)
            if row.listen_features is not None:
                positions = [shift + p for p in row.listen_positions]
                listen_features[b, positions] = row.listen_features
                listen_mask[b, positions] = True
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "audio_feature_mask": audio_mask,
        }
        if features:
            out["input_features"] = torch.stack(features)
            out["audio_lengths"] = torch.tensor(audio_lengths, dtype=torch.long)
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
            out["image_feature_mask"] = image_mask
        if listen_features is not None:
            out["listen_features"] = listen_features
            out["listen_feature_mask"] = listen_mask
        return out

    @staticmethod
    def _listen_inputs(items: list, length: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Zeroed ``listen_features`` (batch, length, dim) and ``listen_feature_mask`` when a row takes feature
        vectors (features-input listening rows), else ``(None, None)``."""
        widths = {row.listen_features.shape[1] for row, _, _ in items if row.listen_features is not None}
        if not widths:
            return None, None
        if len(widths) > 1:
            raise ValueError(f"listen_features of one batch must share one width, got widths {sorted(widths)}")
        return torch.zeros(len(items), length, widths.pop()), torch.zeros(len(items), length, dtype=torch.bool)

    def _features(self, prepared: dict) -> torch.Tensor:
        if _present(prepared["input_features"]):
            return torch.as_tensor(np.asarray(prepared["input_features"], dtype=np.float32))
        return torch.from_numpy(self.processor.audio_features([prepared["audio_waveform"]])[0])

    def _pixels(self, prepared: dict) -> torch.Tensor:
        if _present(prepared["pixel_values"]):
            return torch.as_tensor(np.asarray(prepared["pixel_values"], dtype=np.float32))
        return torch.from_numpy(self.processor.image_pixels([prepared["image"]])[0])


# ----- stages (SPEC §9) ---------------------------------------------------------------------------------------------
#: The parts of the model, by the attribute path of their module.
PARTS = {
    "language_model": "model.language_model",
    "lm_head": "lm_head",
    "audio_projector": "model.audio_projector",
    "vision_projector": "model.vision_projector",
    "listen_projector": "model.listen_projector",
    "audio_tower": "model.audio_tower",
    "vision_tower": "model.vision_tower",
    "codec": "codec",
}
ADAPTERS = ("audio_projector", "vision_projector", "listen_projector")
ENCODERS = ("audio_tower", "vision_tower")

#: Trainable parts per stage (SPEC §9): 1 adapters only; 2 the language model (with its head), adapters frozen, on
#: text answers; 3 everything but the encoders. The codec is always frozen.
STAGE_PARTS = {
    1: ADAPTERS,
    2: ("language_model", "lm_head"),
    3: ("language_model", "lm_head") + ADAPTERS,
}

#: Default peak and final learning rates per stage, inside the paper's ranges (adapters 2e-5..1e-3, language
#: model 2e-6..2e-4): cosine decay from the peak to the final rate after 1,500 warm-up steps.
STAGE_LEARNING_RATES = {1: (1e-3, 2e-5), 2: (2e-4, 2e-6), 3: (2e-4, 2e-6)}
WARMUP_STEPS = 1500
GLOBAL_BATCH_SIZE = 192


def _unwrap(model):
    """The MiniOmni2ForConditionalGeneration inside a PEFT wrapper (or the model itself)."""
    base = model
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    return base


def _part_of(name: str) -> str:
    parts = name.split(".")
    for part in PARTS:
        if part in parts:
            return part
    return "other"


def parameter_counts(model) -> dict[str, dict[str, int]]:
    """Per part (``language_model``, ``lm_head``, adapters, encoders, ``codec``): trainable and total parameters.

    Works on the model and on a PEFT-wrapped one (LoRA weights count in the part they adapt).
    """
    counts: dict[str, dict[str, int]] = {part: {"trainable": 0, "total": 0} for part in PARTS}
    for name, param in model.named_parameters():
        part = counts.setdefault(_part_of(name), {"trainable": 0, "total": 0})
        part["total"] += param.numel()
        if param.requires_grad:
            part["trainable"] += param.numel()
    return counts


def configure_stage(model, stage: int, train_encoders: bool = False) -> dict[str, int]:
    """Freeze ``model`` for training stage 1, 2 or 3 (SPEC §9); return the trainable parameters per part.

    Stage 1 trains the adapters only; stage 2 the language model and its head (adapters frozen; train it on
    text answers); stage 3 all but the encoders. ``train_encoders=True`` also trains the Whisper and CLIP
    encoders. The codec is always frozen. The returned dict maps each part to its trainable parameter count,
    plus ``"trainable"`` (their sum) and ``"total"`` (all parameters).
    """
    if stage not in STAGE_PARTS:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    base = _unwrap(model)
    trainable = set(STAGE_PARTS[stage]) | (set(ENCODERS) if train_encoders else set())
    base.requires_grad_(False)
    for part, path in PARTS.items():
        module = base
        for attr in path.split("."):
            module = getattr(module, attr, None) if module is not None else None
        if module is not None and part in trainable:
            module.requires_grad_(True)
    if getattr(base, "codec", None) is not None:
        base.codec.requires_grad_(False)
    counts = parameter_counts(base)
    report = {part: c["trainable"] for part, c in counts.items()}
    report["trainable"] = sum(c["trainable"] for c in counts.values())
    report["total"] = sum(c["total"] for c in counts.values())
    return report


def stage_parameter_groups(
    model, learning_rate: float, adapter_learning_rate: float | None = None, weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters: the adapters at ``adapter_learning_rate`` (when
    given), the rest at ``learning_rate``; no weight decay on biases and norms."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_adapter = adapter_learning_rate is not None and _part_of(name) in ADAPTERS
        decay = param.ndim >= 2
        groups.setdefault((is_adapter, decay), []).append(param)
    return [
        {
            "params": params,
            "lr": adapter_learning_rate if is_adapter else learning_rate,
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (is_adapter, decay), params in groups.items()
    ]


def training_arguments(stage: int, output_dir: str, **overrides):
    """``TrainingArguments`` for ``stage`` with the paper's schedule (SPEC §9) and what this model's batches need.

    Defaults: the stage's peak learning rate (:data:`STAGE_LEARNING_RATES`), cosine decay to the stage's final rate
    (``cosine_with_min_lr``), 1,500 warm-up steps, ``remove_unused_columns=False`` (the collator reads the raw
    columns) and ``label_names=["labels"]``. Any keyword overrides them (e.g. ``warmup_steps=0`` for tiny runs).
    """
    from transformers import TrainingArguments

    if stage not in STAGE_LEARNING_RATES:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    peak, final = STAGE_LEARNING_RATES[stage]
    learning_rate = overrides.pop("learning_rate", peak)
    kwargs = dict(
        output_dir=output_dir,
        learning_rate=learning_rate,
        warmup_steps=WARMUP_STEPS,
        weight_decay=0.0,
        remove_unused_columns=False,
        label_names=["labels"],
        report_to="none",
    )
    if "lr_scheduler_type" not in overrides:  # the final rate is a ratio of the peak: keep the stage's range
        kwargs.update(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": final / peak})
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# ----- LoRA ----------------------------------------------------------------------------------------------------------
#: Module names LoRA adapts: the attention and MLP projections of the language model's layers only (the Whisper
#: and CLIP encoders have q/k/v/out projections of their own, which this regex leaves alone).
LORA_TARGET_MODULES = (
    r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)


def lora_config(
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    train_projectors: bool = True,
    modules_to_save: Sequence[str] | None = None,
    **kwargs,
):
    """A ``peft.LoraConfig`` on the language model's q/k/v/o/gate/up/down projections (:data:`LORA_TARGET_MODULES`).

    ``train_projectors`` trains full copies of the audio/vision adapters (``modules_to_save``), saved with the
    LoRA weights; ``modules_to_save`` adds other modules (e.g. ``["lm_head"]``).
    """
    from peft import LoraConfig

    save = list(ADAPTERS) if train_projectors else []
    save += [m for m in (modules_to_save or []) if m not in save]
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=LORA_TARGET_MODULES,
        modules_to_save=save or None,
        bias="none",
        **kwargs,
    )


def _base_class_for_auto_peft(is_prompt_tuning: bool = False):
    """The class a saved adapter names as its base (``auto_mapping``): transformers' ``AutoModelForMultimodalLM``.

    PEFT writes the base model's own class and module there, and ``AutoPeftModel.from_pretrained`` imports only
    modules of its ``import_allowlist`` (transformers, diffusers ...), so an adapter naming ``mini_omni2`` would need
    ``import_allowlist=["mini_omni2"]``. The Auto class resolves to this model through its config (``import
    mini_omni2``, or ``trust_remote_code=True`` with a Hub folder).
    """
    from transformers import AutoModelForMultimodalLM

    return AutoModelForMultimodalLM


def _name_the_auto_class(peft_model):
    # PeftModel.save_pretrained asks this method which class to write into adapter_config.json's auto_mapping
    peft_model._get_base_model_class = _base_class_for_auto_peft
    return peft_model


def apply_lora(model, config=None, **kwargs):
    """Wrap ``model`` in a PEFT model with LoRA (``config`` or :func:`lora_config` of ``kwargs``); encoders, codec
    and everything not adapted stay frozen. A model without vision skips the vision adapter. Saved adapters load
    with ``peft.AutoPeftModel.from_pretrained`` (their ``auto_mapping`` names ``AutoModelForMultimodalLM``)."""
    from peft import get_peft_model

    config = config if config is not None else lora_config(**kwargs)
    if config.modules_to_save:  # a model without vision or listening features lacks those adapters
        absent = {m for m in ADAPTERS if getattr(model.model, m, None) is None}
        config.modules_to_save = [m for m in config.modules_to_save if m not in absent] or None
    return _name_the_auto_class(get_peft_model(model, config))


def load_lora(model, path: str, is_trainable: bool = False):
    """Load a saved LoRA adapter onto ``model`` (the same base it was trained on)."""
    from peft import PeftModel

    return _name_the_auto_class(PeftModel.from_pretrained(model, path, is_trainable=is_trainable))


__all__ = [
    "IGNORE_INDEX",
    "ROW_FIELDS",
    "is_training_row",
    "TrainingRow",
    "build_training_row",
    "build_listen_training_row",
    "listen_row_length",
    "MiniOmni2DataCollator",
    "PARTS",
    "STAGE_PARTS",
    "STAGE_LEARNING_RATES",
    "WARMUP_STEPS",
    "GLOBAL_BATCH_SIZE",
    "parameter_counts",
    "configure_stage",
    "stage_parameter_groups",
    "training_arguments",
    "LORA_TARGET_MODULES",
    "lora_config",
    "apply_lora",
    "load_lora",
]
