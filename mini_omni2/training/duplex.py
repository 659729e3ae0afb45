"""Training and evaluating the listening row of duplex interruption (docs/duplex.md).

- :func:`duplex_tiny_config`: the tiny model the proof trains (a shrunk Qwen2 without vision, features input).
- :func:`prepare_listen_examples`: clips (:mod:`.duplex_data`) -> listening inputs through the model's own front end.
- :func:`train_listener`: ``transformers.Trainer`` on listening examples (and, optionally, any other examples: the
  stage-3 mix), with the collator's listening rows.
- :func:`evaluate_listener`: held-out clips run step by step through :class:`~mini_omni2.duplex_mini_omni2.MiniOmni2Listener`
  exactly as inference runs the row; detection rate, delay and false interrupts.
- :func:`sweep_listen_rules` / :func:`choose_listen_rule`: the decision rule chosen on validation clips, which a
  trained model keeps in ``config.listen_rule`` (sessions and the server use it).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .duplex_data import NEAR_MISSES, is_sound_alike, listen_inputs
from ..configuration_mini_omni2 import LISTEN_ADAPTERS
from ..engine_mini_omni2 import ListenRule
from ..modeling_mini_omni2 import IGNORE_INDEX
from ..tiny import TINY_TEXT
from ..token_layout import LISTEN_FEATURES

#: How late after the end of "stop omni" an ``irq`` still counts as hearing it (seconds): the evaluation's detection
#: window, and how much of a clip's tail training keeps (a row ends at its first ``irq``; later labels go unused).
DETECTION_WINDOW_SECONDS = 2.0

#: Tails of the clips that evaluation scores (validation and held-out): at least the detection window, so that a late
#: ``irq`` is still inside the clip.
EVALUATION_TAIL_SECONDS = (DETECTION_WINDOW_SECONDS, 10.0)

#: The clip fields that evaluation reads (:func:`clip_outcome`, :func:`summarize`), kept beside the listening inputs.
EVALUATION_FIELDS = ("command_start", "command_end", "spoken", "kind", "snr_db")

#: Decision rules tried when one is chosen on validation clips: P(irq) >= threshold on min_frames consecutive frames.
#: Thresholds below 0.5 too: the recipe's rows are cautious (their P(irq) on a command often stays under 0.5, and
#: rarely rises in command-free audio), so a low threshold held for 2-4 frames hears more at about as many false
#: interrupts (docs/duplex.md, runs 99-103).
LISTEN_RULE_GRID = tuple((t, m) for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95) for m in (1, 2, 3, 4))

#: The false interrupts a chosen rule allows on validation clips, per 10 minutes of command-free audio: the goal of
#: the proof (docs/duplex.md).
MAX_FALSE_PER_10MIN = 1.0

#: The recipe's weight averaging (:class:`~.callbacks.WeightAveragingCallback`). Over the proof's 2,000 steps the
#: cap is never reached: 90 % of the average's weight is on the last 450 steps (docs/duplex.md).
LISTEN_WEIGHT_AVERAGING_DECAY = 0.999

#: The recipe's batch: 32 clips a step. Over the proof's 2,000 steps each training clip is seen about 3.6 times. At
#: 16 clips (the recipe before), eight rows from the same seeds missed 81 commands where these miss 66, and
#: interrupted falsely 28 times where these do 19 (docs/duplex.md, runs 123-124).
LISTEN_BATCH_SIZE = 32

#: The recipe's training clips (and the validation clips the rule is chosen on): the shares of positives and of near
#: misses (:func:`~.duplex_data.make_clip`; the rest are background alone). The held-out clips keep make_clip's own.
LISTEN_POSITIVE_FRACTION = 0.5
LISTEN_NEAR_MISS_FRACTION = 0.25
#: ... and their background kinds, drawn evenly from this tuple: the train split's, with one other talker three times
#: and babble twice (speech over speech is where rows miss commands and interrupt falsely; docs/duplex.md, run 99).
LISTEN_TRAIN_KINDS = ("white", "brown", "tones", "speech", "speech", "speech", "babble", "babble")
#: ... and the share of their background talkers' utterances with made-up words (:func:`~.duplex_data.pseudo_word`).
LISTEN_PSEUDO_WORD_FRACTION = 0.0
#: ... and with common English words (:func:`~.duplex_data.common_words`).
LISTEN_COMMON_WORD_FRACTION = 0.0
#: The recipe's share of near misses that are sound-alikes of the command, and of the talkers' utterances with one
#: among their words (options, docs/duplex.md: runs 115-116).
LISTEN_SOUND_ALIKE_FRACTION = 0.0
LISTEN_TALKER_SOUND_ALIKE_FRACTION = 0.0
#: The recipe's share of the clips of background alone that say a distractor (an option, docs/duplex.md: run 118).
LISTEN_DISTRACTOR_FRACTION = 0.0
#: Whether the recipe's training clips add espeak-ng's foreign-language voices to the train split's accents
#: (``make_clip(foreign_accents=)``, :data:`~.duplex_data.FOREIGN_ACCENTS`; docs/duplex.md: runs 120-121).
LISTEN_FOREIGN_ACCENTS = False

#: The recipe's listening adapter (``config.listen_adapter``): a GRU over the row's frames, which detected 4 points
#: more than the MLP at the rule chosen on validation over four clip seeds (docs/duplex.md, runs 84-88). A model's
#: config keeps the MLP as its default, so that saved configs load as they were saved.
LISTEN_ADAPTER = "gru"

#: The tiny language model of the proof (docs/duplex.md): the test models' (~0.2 M parameters), with Qwen2's usual
#: RoPE base of 10,000 (a row of a few hundred positions).
DUPLEX_TINY_TEXT = {**TINY_TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


def duplex_tiny_config(listen_input: str = LISTEN_FEATURES, text: dict | None = None, **overrides):
    """A tiny Mini-Omni config (no vision) for the listening row: features through the recipe's adapter
    (:data:`LISTEN_ADAPTER`) unless told otherwise, or the codec's tokens (``listen_input="codec"``, with a codec)."""
    from ..tiny import tiny_config

    features = listen_input == LISTEN_FEATURES
    return tiny_config(
        vision=False,
        codec=not features,
        listen_input=listen_input,
        text_config={**DUPLEX_TINY_TEXT, **(text or {})},
        **{**({"listen_adapter": LISTEN_ADAPTER} if features else {}), **overrides},
    )


def prepare_listen_examples(clips: Sequence[dict], front_end, keep: Sequence[str] = ()) -> list[dict]:
    """Clips -> listening examples (``listen_features`` or ``listen_codes``, ``frame_labels``) through ``front_end``,
    keeping the clip fields named in ``keep`` (e.g. ``("command_start", "command_end", "spoken", "kind")``)."""
    return [{**listen_inputs(clip, front_end), **{k: clip[k] for k in keep}} for clip in clips]


def evaluation_examples(front_end, count: int, seed: int = 0, start: int = 0, split: str = "train",
                        **clip_kwargs) -> list[dict]:
    """Clips ``start .. start + count - 1`` of ``split`` made for scoring (``EVALUATION_TAIL_SECONDS`` tails) through
    ``front_end``, with the fields evaluation reads. Validation clips are the train split's after the training ones."""
    from .duplex_data import duplex_generator

    clips = duplex_generator(split, count, seed=seed, start=start, tail_seconds=EVALUATION_TAIL_SECONDS, **clip_kwargs)
    return prepare_listen_examples(list(clips), front_end, keep=EVALUATION_FIELDS)


class FeatureBandMasking:
    """SpecAugment-style frequency masking of the listening features while training: each listening row gets
    ``bands`` random bands of up to ``max_width`` mel bins set to 0 (the running mean) in every frame, so the row
    cannot lean on the few bands where the training voices differ; with ``warp`` > 0 each row's mel axis is first
    stretched by a random factor in ``[1 - warp, 1 + warp]`` (a vocal tract length perturbation: other voices' formants
    sit higher or lower). Wraps a collator; rows without listening features pass unchanged. Deterministic given
    ``seed``."""

    def __init__(self, collator, num_mel_bins: int, bands: int = 2, max_width: int = 8, seed: int = 0,
                 warp: float = 0.0):
        if bands < 0 or not 1 <= max_width <= num_mel_bins:
            raise ValueError(f"need bands >= 0 and 1 <= max_width <= {num_mel_bins}, got {bands}, {max_width}")
        if not 0.0 <= warp < 1.0:
            raise ValueError(f"warp must be in [0, 1), got {warp}")
        self.warp = warp
        self.collator = collator
        self.num_mel_bins = num_mel_bins
        self.bands = bands
        self.max_width = max_width
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, examples):
        batch = self.collator(examples)
        features = batch.get("listen_features")
        if features is None or not (self.bands or self.warp):
            return batch
        rows = features.view(features.shape[0], features.shape[1], -1, self.num_mel_bins)  # (..., columns, mels)
        for row in range(rows.shape[0]):
            if self.warp:
                factor = 1.0 + self.warp * (2 * float(torch.rand(1, generator=self.generator)) - 1)
                rows[row] = _stretch_mels(rows[row], factor)
            for _ in range(self.bands):
                width = int(torch.randint(1, self.max_width + 1, (1,), generator=self.generator))
                start = int(torch.randint(0, self.num_mel_bins - width + 1, (1,), generator=self.generator))
                rows[row, :, :, start : start + width] = 0.0
        return batch


def _stretch_mels(columns: torch.Tensor, factor: float) -> torch.Tensor:
    """Mel bin i takes the value at position i / factor (linear interpolation, the edge bins beyond the axis)."""
    bins = columns.shape[-1]
    source = (torch.arange(bins, dtype=torch.float32) / factor).clamp(max=bins - 1)
    low = source.floor().long()
    high = (low + 1).clamp(max=bins - 1)
    weight = source - low
    return columns[..., low] * (1 - weight) + columns[..., high] * weight


#: The share of the teachers' states in a distilled listening row's targets (:func:`listen_distillation_loss`): each
#: labelled frame's target is ``(1 - w) * its label + w * the teachers' mean P(irq)`` (docs/duplex.md).
LISTEN_DISTILLATION_WEIGHT = 0.5


def check_distillation_weight(weight: float) -> float:
    """The teachers' share of each state's target must be in [0, 1]; returns it."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the distillation weight must be in [0, 1], got {weight:g}")
    return weight


def listen_state_targets(teachers: Sequence[Any], inputs: dict) -> torch.Tensor:
    """The teachers' mean P(irq | irq or n_irq) at every position of a batch (batch, seq): each teacher reads the
    same rows the student does (the batch without its labels), with no gradient."""
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        probabilities = [teacher(**inputs).text_logits for teacher in teachers]
        layout = teachers[0].config.token_layout
        return torch.stack([layout.listen_irq_probability(logits) for logits in probabilities]).mean(0)


def listen_distillation_loss(outputs, labels: torch.Tensor, teacher_irq: torch.Tensor, layout,
                             weight: float = LISTEN_DISTILLATION_WEIGHT) -> torch.Tensor:
    """The model's loss (SPEC §9) with each listening state label replaced by a soft target: ``(1 - weight)`` on the
    label and ``weight`` spread over ``irq``/``n_irq`` as the teachers' ``teacher_irq`` (batch, seq: their P(irq) read
    at the position that predicts the label). Cross-entropy is linear in its target, so this is the model's loss plus
    ``weight`` times (soft minus hard cross-entropy) over those labels, divided by the text stream's label count as
    the text stream's mean is. Other labels (other rows of a stage-3 mix, audio streams) are untouched."""
    check_distillation_weight(weight)
    text = labels[:, layout.num_audio_layers, 1:].to(outputs.text_logits.device)  # shifted as in the model's loss
    states = (text == layout.irq) | (text == layout.n_irq)
    log_probabilities = outputs.text_logits[:, :-1].float().log_softmax(-1)
    hard = -log_probabilities.gather(-1, torch.where(states, text, 0).unsqueeze(-1)).squeeze(-1)
    irq = teacher_irq[:, :-1].to(log_probabilities)
    soft = -(irq * log_probabilities[..., layout.irq] + (1 - irq) * log_probabilities[..., layout.n_irq])
    count = (text != IGNORE_INDEX).sum().clamp(min=1)
    return outputs.loss + weight * ((soft - hard) * states).sum() / count


def _distillation_trainer(teachers: Sequence[Any], weight: float):
    """A ``Trainer`` whose loss is :func:`listen_distillation_loss` against ``teachers``."""
    from transformers import Trainer

    class ListenDistillationTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            targets = listen_state_targets(teachers, inputs)
            loss = listen_distillation_loss(outputs, inputs["labels"], targets, model.config.token_layout, weight)
            return (loss, outputs) if return_outputs else loss

    return ListenDistillationTrainer


def train_listener(
    model,
    processor,
    train_examples,
    output_dir: str,
    max_steps: int = 600,
    batch_size: int = LISTEN_BATCH_SIZE,
    learning_rate: float = 2e-3,
    warmup_steps: int = 50,
    seed: int = 0,
    logging_steps: int = 50,
    mask_bands: int = 0,
    mask_width: int = 8,
    warp: float = 0.0,
    tail_seconds: float | None = DETECTION_WINDOW_SECONDS,
    weight_averaging: float = LISTEN_WEIGHT_AVERAGING_DECAY,
    teachers: Sequence[Any] = (),
    distillation_weight: float = LISTEN_DISTILLATION_WEIGHT,
    **overrides,
):
    """Train ``model`` (stage 3: language model, head and adapters) on ``train_examples`` with ``Trainer``.

    ``train_examples``: a ``datasets.Dataset``, a torch dataset or a list of examples (listening examples, optionally
    mixed with any other examples of docs/training.md). ``mask_bands`` > 0 masks that many random mel bands of up to
    ``mask_width`` bins per listening row, ``warp`` > 0 stretches its mel axis (:class:`FeatureBandMasking`; features
    input). ``tail_seconds`` keeps each listening row only up to that long after its first ``irq`` label
    (``MiniOmni2DataCollator(listen_tail_frames=...)``; None keeps it all): a row ends at its first ``irq``, and one
    later than :data:`DETECTION_WINDOW_SECONDS` after the command is a miss anyway, so labels there only teach the row
    to remember the command, and in the proof they cost it detections and false interrupts (docs/duplex.md). Returns
    the ``TrainOutput``; the model is left in eval mode. ``weight_averaging``: the decay of the moving average of the
    weights that the model ends with (:class:`~.callbacks.WeightAveragingCallback`; 0: the last weights).
    ``teachers``: trained listening models of the same token layout to distil (:func:`listen_distillation_loss`, with
    ``distillation_weight``): one row learns what their average hears.
    """
    from transformers import Trainer

    from .callbacks import WeightAveragingCallback
    from .collator import MiniOmni2DataCollator, configure_stage, training_arguments

    callbacks = [WeightAveragingCallback(weight_averaging)] if weight_averaging else []
    if tail_seconds is not None and not tail_seconds > 0:
        raise ValueError(f"tail_seconds must be > 0 or None, got {tail_seconds!r}")
    configure_stage(model, 3)
    args = training_arguments(
        3,
        output_dir,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        logging_steps=logging_steps,
        save_strategy="no",
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        **overrides,
    )
    tail_frames = None if tail_seconds is None else math.ceil(tail_seconds / model.config.listen_frame_seconds)
    collator = MiniOmni2DataCollator(processor, listen_front_end=model.listen_front_end(), listen_tail_frames=tail_frames)
    if mask_bands or warp:
        bins = model.config.listen_feature_config["num_mel_bins"]
        collator = FeatureBandMasking(collator, bins, mask_bands, mask_width, seed=seed, warp=warp)
    trainer_class = Trainer
    if teachers:
        check_distillation_weight(distillation_weight)
        for k, teacher in enumerate(teachers):
            if teacher.config.token_layout != model.config.token_layout:
                raise ValueError(f"teacher {k} has the token layout {teacher.config.token_layout}, the model "
                                 f"{model.config.token_layout}: distil models of the same sizes")
            teacher.eval().requires_grad_(False).to(args.device)  # where Trainer puts the model
        trainer_class = _distillation_trainer(teachers, distillation_weight)
    model.train()
    trainer = trainer_class(model=model, args=args, train_dataset=train_examples, data_collator=collator, callbacks=callbacks)
    result = trainer.train()
    model.eval()
    return result


# ----- the command-line options of the scripts that train a listening row (examples/, benchmarks/) -----------------
def argument_type(check):
    """An ``argparse`` type from a parser that raises ``ValueError``: argparse then names the option in its error."""
    import argparse

    def parse(text: str):
        try:
            return check(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = check.__name__
    return parse


def _integer_at_least(text: str, minimum: int) -> int:
    value = int(text)
    if value < minimum:
        raise ValueError(f"must be >= {minimum}, got {value}")
    return value


def parse_count(text: str) -> int:
    """A count option (clips, teachers): an integer >= 0."""
    return _integer_at_least(text, 0)


def parse_width(text: str) -> int:
    """A width, or a count that cannot be 0 (``--gru-size``, ``--hard-example-clips``): an integer >= 1."""
    return _integer_at_least(text, 1)


#: The shares of :func:`~.duplex_data.make_clip` that the training scripts take as options (``--positive-fraction``
#: for ``positive_fraction``, ...): each keyword's recipe default and help. :func:`clip_kwargs` passes them all on.
LISTEN_CLIP_SHARES = {
    "positive_fraction": (LISTEN_POSITIVE_FRACTION, "share of those clips with the command"),
    "near_miss_fraction": (LISTEN_NEAR_MISS_FRACTION,
                           "share of those clips with a near miss instead (with --positive-fraction: <= 1 in all)"),
    "pseudo_word_fraction": (LISTEN_PSEUDO_WORD_FRACTION,
                             "share of those clips' background utterances with made-up words (docs/duplex.md)"),
    "common_word_fraction": (LISTEN_COMMON_WORD_FRACTION, "share of them with common English words, needs wordfreq "
                                                          "(with --pseudo-word-fraction: <= 1 in all)"),
    "sound_alike_fraction": (LISTEN_SOUND_ALIKE_FRACTION, "share of those clips' near misses that are sound-alikes "
                                                          "of the command: one or two of its phonemes changed "
                                                          "(docs/duplex.md)"),
    "talker_sound_alike_fraction": (LISTEN_TALKER_SOUND_ALIKE_FRACTION,
                                    "share of those clips' background utterances with a sound-alike of the command "
                                    "among their words (docs/duplex.md)"),
    "distractor_fraction": (LISTEN_DISTRACTOR_FRACTION, "share of those clips of background alone that say a "
                                                        "distractor at the command's level: a short phrase of "
                                                        "background words (docs/duplex.md)"),
}


def add_listen_training_arguments(parser) -> None:
    """The recipe's training options, with its defaults, for ``argparse`` parsers: ``--tail-seconds``,
    ``--weight-averaging``, ``--train-kinds``, ``--mixture-fraction``, ``--positive-fraction``,
    ``--near-miss-fraction``, ``--pseudo-word-fraction``, ``--common-word-fraction``, ``--sound-alike-fraction``,
    ``--talker-sound-alike-fraction``, ``--distractor-fraction``, ``--foreign-accents`` and ``--distillation-weight``.
    Their values are checked while parsing (:func:`argument_type`), so a bad one is refused before any clip is made;
    :func:`listen_training_kwargs` and :func:`clip_kwargs` turn them into keywords."""
    parser.add_argument("--tail-seconds", type=argument_type(parse_tail_seconds), default=DETECTION_WINDOW_SECONDS,
                        help="train on each row up to this long after its first irq label (default: the detection "
                             "window, 2 s; 0: the whole tail)")
    parser.add_argument("--weight-averaging", type=argument_type(parse_decay), default=LISTEN_WEIGHT_AVERAGING_DECAY,
                        help="decay of the moving average of the weights the model ends with (0: the last weights)")
    parser.add_argument("--train-kinds", type=argument_type(parse_kinds), default=LISTEN_TRAIN_KINDS,
                        help="background kinds of the training (and validation) clips, comma-separated, drawn evenly "
                             "(a kind named twice is drawn twice as often; default: the recipe's, "
                             f"{','.join(LISTEN_TRAIN_KINDS)}; EXTRA_KINDS adds hum, sweeps, clatter)")
    parser.add_argument("--mixture-fraction", type=argument_type(parse_mixture_fraction), default=0.0,
                        help="fraction of those clips whose background mixes two kinds")
    for keyword, (default, text) in LISTEN_CLIP_SHARES.items():
        parser.add_argument("--" + keyword.replace("_", "-"), type=argument_type(parse_fraction), default=default,
                            help=text)
    parser.add_argument("--foreign-accents", action=argparse.BooleanOptionalAction, default=LISTEN_FOREIGN_ACCENTS,
                        help="add espeak-ng's voices of other languages reading the English words to the training "
                             "(and validation) clips' accents (docs/duplex.md)")
    parser.add_argument("--distillation-weight", type=argument_type(parse_distillation_weight),
                        default=LISTEN_DISTILLATION_WEIGHT,
                        help="with teachers: their mean P(irq)'s share of each frame's target (the label's: the rest)")


def add_listen_adapter_argument(parser, default: str | None) -> None:
    """``--listen-adapter``: the listening adapter of a model the script builds (``config.listen_adapter``);
    ``default`` None keeps a loaded model's (and gives a tiny one the recipe's, :data:`LISTEN_ADAPTER`)."""
    fallback = f"a loaded model keeps its own; a tiny one gets the recipe's, {LISTEN_ADAPTER}"
    parser.add_argument("--listen-adapter", choices=LISTEN_ADAPTERS, default=default,
                        help="the listening adapter on the features: an MLP over the flattened frame, convolutions "
                             "over its columns x mel bins, or a GRU over the row's frames (docs/duplex.md; default: "
                             f"{default or fallback})")


def check_listen_training_arguments(parser, args) -> None:
    """What one option's type cannot check: the shares of positives and near misses, and the talkers' shares (made-up
    words, common words, sound-alikes), each sum to <= 1 (else ``parser.error``, before any clip or model is made)."""
    try:
        clip_kwargs(args)
    except ValueError as error:
        parser.error(str(error))


def parse_tail_seconds(text: str) -> float | None:
    """``--tail-seconds``: seconds > 0, or 0 for the whole tail (None)."""
    seconds = float(text)
    if not seconds >= 0:
        raise ValueError(f"tail seconds must be > 0, or 0 for the whole tail, got {text}")
    return seconds or None


def parse_distillation_weight(text: str) -> float:
    """``--distillation-weight``: the teachers' share of each state's target (:func:`check_distillation_weight`)."""
    return check_distillation_weight(float(text))


def parse_decay(text: str) -> float:
    """``--weight-averaging``: a decay in [0, 1) (:func:`~.callbacks.check_decay`)."""
    from .callbacks import check_decay

    return check_decay(float(text))


def parse_kinds(text: str) -> tuple[str, ...]:
    """``--train-kinds``: comma-separated background kinds (:func:`~.duplex_data.check_kinds`)."""
    from .duplex_data import check_kinds

    return check_kinds([kind for kind in text.split(",") if kind])


def parse_mixture_fraction(text: str) -> float:
    """``--mixture-fraction``: a fraction in [0, 1] (:func:`~.duplex_data.check_mixture_fraction`)."""
    from .duplex_data import check_mixture_fraction

    fraction = float(text)
    check_mixture_fraction(fraction)
    return fraction


def parse_fraction(text: str) -> float:
    """``--positive-fraction``, ``--near-miss-fraction``: a share in [0, 1] (their sum: :func:`clip_kwargs`)."""
    fraction = float(text)
    if not 0 <= fraction <= 1:
        raise ValueError(f"must be a fraction in [0, 1], got {text}")
    return fraction


def listen_training_kwargs(args) -> dict[str, Any]:
    """The keywords of :func:`train_listener` that :func:`add_listen_training_arguments` parsed."""
    return {"tail_seconds": args.tail_seconds, "weight_averaging": args.weight_averaging,
            "distillation_weight": args.distillation_weight}


def clip_kwargs(args) -> dict[str, Any]:
    """The keywords of :func:`~.duplex_data.make_clip` that :func:`add_listen_training_arguments` parsed; a ValueError
    if the shares of positives and near misses, or the talkers' shares, sum to more than 1 (called before any clip is
    made)."""
    from .duplex_data import check_clip_fractions, check_talk_fractions

    check_clip_fractions(args.positive_fraction, args.near_miss_fraction)
    check_talk_fractions(args.pseudo_word_fraction, args.common_word_fraction, args.talker_sound_alike_fraction)
    return {"kinds": args.train_kinds, "mixture_fraction": args.mixture_fraction,
            "foreign_accents": args.foreign_accents,
            **{keyword: getattr(args, keyword) for keyword in LISTEN_CLIP_SHARES}}


# ----- evaluation --------------------------------------------------------------------------------------------------
@dataclass
class ClipOutcome:
    """What the listening row did on one held-out clip (one speaking turn: the row ends at its first ``irq``)."""

    spoken: str
    kind: str
    has_command: bool
    first_irq_frame: int | None  # the frame at which the row committed to irq, None if never
    detected: bool  # positives: irq from the command's start to command_end + max_delay
    false_interrupt: bool  # irq in command-free audio (before the command, or anywhere in a negative)
    delay: float | None  # seconds from the end of the command to the end of the irq frame (detected clips)
    command_free_seconds: float  # command-free audio the row listened to before its first irq


def first_irq(probabilities: np.ndarray, threshold: float = 0.5, min_frames: int = 1) -> int | None:
    """The frame at which a row commits to ``irq``: the engine's rule (:class:`~mini_omni2.engine_mini_omni2.ListenRule`)."""
    return ListenRule(threshold, min_frames).first_irq(probabilities)


def clip_outcome(
    example: dict, probabilities: np.ndarray, frame_seconds: float, threshold: float, min_frames: int, max_delay: float
) -> ClipOutcome:
    """Score one clip: frame k covers ``[k, k + 1) * frame_seconds``; a decision is known at the end of its frame."""
    fired = first_irq(probabilities, threshold, min_frames)
    end = None if fired is None else (fired + 1) * frame_seconds
    total = len(probabilities) * frame_seconds
    has_command = float(example["command_end"]) >= 0
    if not has_command:
        return ClipOutcome(example.get("spoken", ""), example.get("kind", ""), False, fired, False, fired is not None,
                           None, total if end is None else end)
    start, stop = float(example["command_start"]), float(example["command_end"])
    early = end is not None and end <= start
    detected = end is not None and not early and end - stop <= max_delay
    return ClipOutcome(
        example.get("spoken", ""), example.get("kind", ""), True, fired, detected, early,
        end - stop if detected else None, end if early else start,
    )


def listener_probabilities(model, examples: Sequence[dict], batch_size: int = 32, **listener_kwargs) -> list[np.ndarray]:
    """P(irq) of every frame of every example, each run step by step from a fresh listening row with a cache
    (:class:`MiniOmni2Listener`); clips of similar length share a batch, padded at the end (rows are causal)."""
    from ..duplex_mini_omni2 import MiniOmni2Listener

    key = "listen_features" if model.config.listen_input == LISTEN_FEATURES else "listen_codes"
    frames = [torch.as_tensor(np.asarray(e[key])) for e in examples]
    order = sorted(range(len(frames)), key=lambda i: frames[i].shape[0])
    listener = MiniOmni2Listener(model, **listener_kwargs)
    out: list[np.ndarray | None] = [None] * len(frames)
    for s in range(0, len(order), batch_size):
        ids = order[s : s + batch_size]
        length = max(frames[i].shape[0] for i in ids)
        batch = frames[ids[0]].new_zeros((len(ids), length) + tuple(frames[ids[0]].shape[1:]))
        for j, i in enumerate(ids):
            batch[j, : frames[i].shape[0]] = frames[i]
        probabilities = listener.run(batch)
        for j, i in enumerate(ids):
            out[i] = probabilities[j, : frames[i].shape[0]].numpy()
    return out


#: Confidence of the intervals :func:`summarize` reports. The held-out counts are small (one command of 190 is half a
#: point of detection; one false interrupt in 28 minutes is 0.35 per 10 minutes), so a figure alone overstates what a
#: run shows.
INTERVAL_CONFIDENCE = 0.95


def detection_interval(
    detected: int, commands: int, confidence: float = INTERVAL_CONFIDENCE
) -> tuple[float, float] | None:
    """The Wilson score interval of a detection rate of ``detected`` in ``commands`` (None without commands)."""
    from scipy.stats import binomtest

    if commands == 0:
        return None
    interval = binomtest(detected, commands).proportion_ci(confidence, method="wilson")
    return float(interval.low), float(interval.high)


def per_10min(count: float, minutes: float) -> float | None:
    """``count`` events in ``minutes`` of audio as a rate per 10 minutes (None without audio)."""
    return None if minutes <= 0 else count * 10.0 / minutes


def false_rate_interval(
    false_interrupts: int, command_free_minutes: float, confidence: float = INTERVAL_CONFIDENCE
) -> tuple[float, float] | None:
    """The exact (Garwood) Poisson interval of a rate of false interrupts per 10 minutes: ``false_interrupts`` in
    ``command_free_minutes`` (None without command-free audio)."""
    from scipy.stats import chi2

    if command_free_minutes <= 0:
        return None
    tail = (1 - confidence) / 2
    low = 0.0 if false_interrupts == 0 else chi2.ppf(tail, 2 * false_interrupts) / 2
    high = chi2.ppf(1 - tail, 2 * false_interrupts + 2) / 2
    return float(per_10min(low, command_free_minutes)), float(per_10min(high, command_free_minutes))


#: The names under which :func:`summarize` counts the near misses that are sound-alikes of the command, and the
#: distractors (``make_clip(distractor_fraction=...)``), each kind together.
SOUND_ALIKE_GROUP = "sound-alikes"
DISTRACTOR_GROUP = "distractors"


def _phrase_group(spoken: str) -> str:
    """The group of a clip's phrase: a near miss's own phrase, :data:`SOUND_ALIKE_GROUP` or :data:`DISTRACTOR_GROUP`."""
    if spoken in NEAR_MISSES:
        return spoken
    return SOUND_ALIKE_GROUP if is_sound_alike(spoken) else DISTRACTOR_GROUP


def _near_miss_groups(near: Sequence[ClipOutcome]) -> dict[str, list[ClipOutcome]]:
    """Outcomes of the clips with a phrase but no command, by :func:`_phrase_group`."""
    groups: dict[str, list[ClipOutcome]] = {}
    for outcome in near:
        groups.setdefault(_phrase_group(outcome.spoken), []).append(outcome)
    return groups


def summarize(outcomes: Sequence[ClipOutcome]) -> dict[str, Any]:
    """Detection rate, delays and false interrupts of clip outcomes, overall and per background kind / near miss.

    False interrupts are counted per turn (a clip; the row ends at its first irq) over the command-free audio it
    listened to: all of it without near misses (``false_per_10min``), and with them (``false_per_10min_all``);
    ``near_miss_interrupted`` is the share of near-miss clips that interrupted, per phrase (the sound-alikes together).
    ``detection_interval`` and ``false_per_10min_interval`` are their :data:`INTERVAL_CONFIDENCE` intervals
    (:func:`detection_interval`, :func:`false_rate_interval`).
    """
    positives = [o for o in outcomes if o.has_command]
    delays = np.array([o.delay for o in positives if o.detected], dtype=np.float64)
    ordinary = [o for o in outcomes if o.has_command or not o.spoken]
    near = [o for o in outcomes if not o.has_command and o.spoken]

    def rate(items) -> float | None:
        return per_10min(sum(o.false_interrupt for o in items), sum(o.command_free_seconds for o in items) / 60)

    by_kind = {}
    for kind in sorted({o.kind for o in outcomes}):
        items = [o for o in ordinary if o.kind == kind]
        pos = [o for o in items if o.has_command]
        by_kind[kind] = {
            "detection": None if not pos else sum(o.detected for o in pos) / len(pos),
            "false_per_10min": rate(items),
            "clips": len(items),
        }
    detected = sum(o.detected for o in positives)
    false_interrupts = sum(o.false_interrupt for o in ordinary)
    command_free_minutes = sum(o.command_free_seconds for o in ordinary) / 60
    return {
        "clips": len(outcomes),
        "positives": len(positives),
        "detected": detected,
        "detection": None if not positives else detected / len(positives),
        "detection_interval": detection_interval(detected, len(positives)),
        "median_delay_ms": None if delays.size == 0 else float(np.median(delays) * 1000),
        "p90_delay_ms": None if delays.size == 0 else float(np.percentile(delays, 90) * 1000),
        "false_interrupts": false_interrupts,
        "command_free_minutes": command_free_minutes,
        "false_per_10min": per_10min(false_interrupts, command_free_minutes),
        "false_per_10min_interval": false_rate_interval(false_interrupts, command_free_minutes),
        "false_per_10min_all": rate(outcomes),
        "near_miss_interrupted": {
            phrase: sum(o.false_interrupt for o in group) / len(group)
            for phrase, group in sorted(_near_miss_groups(near).items())
        },
        "by_kind": by_kind,
    }


def evaluate_listener(
    model,
    examples: Sequence[dict],
    threshold: float = 0.5,
    min_frames: int = 1,
    max_delay: float = DETECTION_WINDOW_SECONDS,
    batch_size: int = 32,
    probabilities: Sequence[np.ndarray] | None = None,
    **listener_kwargs,
) -> dict[str, Any]:
    """Run held-out listening examples (with ``command_start``/``command_end``, ``spoken``, ``kind``) step by step
    and :func:`summarize` them. ``probabilities`` reuses a previous run (e.g. to sweep the threshold)."""
    if probabilities is None:
        probabilities = listener_probabilities(model, examples, batch_size, **listener_kwargs)
    frame_seconds = model.config.listen_frame_seconds
    outcomes = [
        clip_outcome(e, p, frame_seconds, threshold, min_frames, max_delay) for e, p in zip(examples, probabilities)
    ]
    return {**summarize(outcomes), "threshold": threshold, "min_frames": min_frames, "max_delay_s": max_delay}


def sweep_listen_rules(model, examples: Sequence[dict], probabilities: Sequence[np.ndarray] | None = None,
                       rules: Sequence[tuple[float, int]] = LISTEN_RULE_GRID) -> list[dict]:
    """Detection, false interrupts and median delay of each rule on ``examples`` (one run of the rows, then each
    rule scored on the same probabilities)."""
    if probabilities is None:
        probabilities = listener_probabilities(model, examples)
    sweep = []
    for threshold, min_frames in rules:
        r = evaluate_listener(model, examples, threshold, min_frames, probabilities=probabilities)
        sweep.append({"threshold": threshold, "min_frames": min_frames, "detection": r["detection"],
                      "false_per_10min": r["false_per_10min"], "median_delay_ms": r["median_delay_ms"]})
    return sweep


def choose_listen_rule(sweep: Sequence[dict], max_false_per_10min: float = MAX_FALSE_PER_10MIN) -> ListenRule:
    """The rule of a :func:`sweep_listen_rules` with the most detections among those with at most
    ``max_false_per_10min`` false interrupts (ties: fewer false interrupts), else the one with the fewest."""
    if not sweep:
        raise ValueError("choose_listen_rule needs a non-empty sweep")
    if any(r["detection"] is None or r["false_per_10min"] is None for r in sweep):
        raise ValueError("the validation clips need commands and command-free audio to choose a rule on")
    within = [r for r in sweep if r["false_per_10min"] <= max_false_per_10min]
    if within:
        best = max(within, key=lambda r: (r["detection"], -r["false_per_10min"]))
    else:
        best = min(sweep, key=lambda r: (r["false_per_10min"], -r["detection"]))
    return ListenRule(best["threshold"], best["min_frames"])


# ----- the hard-example round -------------------------------------------------------------------------------------
#: The hard-example round (an option, not the recipe: docs/duplex.md, run 119). After training, the row scores the
#: first ``HARD_EXAMPLE_CLIPS`` of its own training clips at a rule more eager than any it is used with
#: (``HARD_EXAMPLE_RULE``: P(irq) >= 0.2 on 2 frames, so clips it almost got wrong count too); the clips it gets wrong
#: are added ``HARD_EXAMPLE_REPEAT`` times more, and it trains on for its steps at ``HARD_EXAMPLE_LEARNING_RATE``:
#: the hard-example mining of keyword spotting, with the training clips as the pool.
HARD_EXAMPLE_RULE = ListenRule(0.2, 2)
HARD_EXAMPLE_CLIPS = 3000
HARD_EXAMPLE_REPEAT = 16
HARD_EXAMPLE_LEARNING_RATE = 5e-4
HARD_EXAMPLE_WARMUP_STEPS = 20


def hard_examples(model, examples: Sequence[dict], rule: ListenRule = HARD_EXAMPLE_RULE,
                  batch_size: int = 32) -> list[int]:
    """Indices of the listening ``examples`` (with the clip fields of :data:`EVALUATION_FIELDS`) that the row gets
    wrong at ``rule``, scored as the proof scores: a command missed, or an interrupt in command-free audio. Near
    misses are not counted: the evaluation counts them apart, and espeak-ng says some almost as the command."""
    probabilities = listener_probabilities(model, examples, batch_size)  # half-precision features score the same
    frame_seconds = model.config.listen_frame_seconds
    hard = []
    for index, (example, p) in enumerate(zip(examples, probabilities)):
        outcome = clip_outcome(example, p, frame_seconds, rule.threshold, rule.min_frames, DETECTION_WINDOW_SECONDS)
        near_miss = bool(outcome.spoken) and not outcome.has_command
        if (outcome.has_command and not outcome.detected) or (outcome.false_interrupt and not near_miss):
            hard.append(index)
    return hard


def train_on_hard_examples(model, processor, train_examples: Sequence[dict], output_dir: str, steps: int,
                           clips: int = HARD_EXAMPLE_CLIPS, repeat: int = HARD_EXAMPLE_REPEAT,
                           learning_rate: float = HARD_EXAMPLE_LEARNING_RATE, seed: int = 0, **train_kwargs):
    """The hard-example round of a trained row (constants above): :func:`hard_examples` among the first ``clips`` of
    ``train_examples``, then :func:`train_listener` for ``steps`` on all of them with those added ``repeat`` times
    more. Returns the ``TrainOutput`` and the hard examples' indices."""
    hard = hard_examples(model, train_examples[:clips])
    data = list(train_examples) + [train_examples[i] for i in hard] * repeat
    output = train_listener(model, processor, data, output_dir, max_steps=steps, learning_rate=learning_rate,
                            warmup_steps=HARD_EXAMPLE_WARMUP_STEPS, seed=seed, **train_kwargs)
    return output, hard


__all__ = [
    "DETECTION_WINDOW_SECONDS",
    "EVALUATION_TAIL_SECONDS",
    "EVALUATION_FIELDS",
    "evaluation_examples",
    "DUPLEX_TINY_TEXT",
    "LISTEN_WEIGHT_AVERAGING_DECAY",
    "LISTEN_DISTILLATION_WEIGHT",
    "check_distillation_weight",
    "listen_state_targets",
    "listen_distillation_loss",
    "duplex_tiny_config",
    "LISTEN_ADAPTER",
    "prepare_listen_examples",
    "train_listener",
    "hard_examples",
    "train_on_hard_examples",
    "FeatureBandMasking",
    "ClipOutcome",
    "first_irq",
    "clip_outcome",
    "listener_probabilities",
    "INTERVAL_CONFIDENCE",
    "detection_interval",
    "false_rate_interval",
    "per_10min",
    "summarize",
    "evaluate_listener",
    "LISTEN_RULE_GRID",
    "MAX_FALSE_PER_10MIN",
    "sweep_listen_rules",
    "choose_listen_rule",
]
