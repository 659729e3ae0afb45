"""What ``transformers.Trainer`` needs to know about this model, as a callback (docs/training.md)."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

logger = logging.get_logger(__name__)

SPECIAL_TOKENS = ("eos_token_id", "bos_token_id", "pad_token_id")


def remove_tokenizer_special_tokens(model: Any, tokenizer: Any) -> dict[str, int]:
    """Take the tokenizer's eos/bos/pad ids back out of the model's text and generation configs.

    ``Trainer(processing_class=...)`` copies them in (``transformers.trainer_utils.align_special_tokens``). This model
    ends its text stream with the token layout's ``eot`` and pads with ``pad_t``, not with the tokenizer's
    ``<|endoftext|>``; and a ``pad_token_id`` in the text config would become the embedding's ``padding_idx`` (a row
    that gets no gradient) when the checkpoint is loaded again. Returns what was removed.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    configs = [base.config.get_text_config()]
    if getattr(base, "generation_config", None) is not None:
        configs.append(base.generation_config)
    removed = {}
    for name in SPECIAL_TOKENS:
        token = getattr(tokenizer, name, None)
        if token is None:
            continue
        for config in configs:
            value = getattr(config, name, None)
            if value == token:
                setattr(config, name, None)
                removed[name] = token
            elif isinstance(value, list) and token in value:
                setattr(config, name, [t for t in value if t != token] or None)
                removed[name] = token
    return removed


class MiniOmni2TrainerCallback(TrainerCallback):
    """``Trainer(..., callbacks=[MiniOmni2TrainerCallback(processor)])``:

    - every checkpoint (``checkpoint-N``) and, at the end of training, ``output_dir`` get the processor's files, so
      that ``AutoProcessor.from_pretrained(checkpoint)`` works (with or without ``processing_class``);
    - with ``processing_class=processor``, the tokenizer's eos/bos/pad ids that ``Trainer`` writes into the model's
      configs when training starts are taken out again (:func:`remove_tokenizer_special_tokens`).
    """

    def __init__(self, processor: Any):
        if not hasattr(processor, "save_pretrained") or not hasattr(processor, "tokenizer"):
            raise TypeError(f"MiniOmni2TrainerCallback takes the model's processor, got {type(processor).__name__}")
        self.processor = processor

    def _restore_configs(self, model: Any) -> None:
        if model is None:
            return
        removed = remove_tokenizer_special_tokens(model, self.processor.tokenizer)
        if removed:
            logger.info("took the tokenizer's special tokens %s back out of the model's configs", removed)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._restore_configs(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._restore_configs(model)  # Trainer aligns the special tokens when train() starts

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            self.processor.save_pretrained(folder)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and args.output_dir:
            self.processor.save_pretrained(args.output_dir)


def check_decay(decay: float) -> float:
    """``decay`` if it is a weight-averaging decay in [0, 1); else a ValueError."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay!r}")
    return decay


class WeightAveragingCallback(TrainerCallback):
    """An exponential moving average of the trainable weights, put into the model when training ends.

    After optimizer step ``n`` (1, 2, ...): ``average <- d * average + (1 - d) * weights`` with
    ``d = min(decay, (1 + n) / (10 + n))``. Until ``d`` reaches ``decay`` (step 8,990 for 0.999), step ``k`` weighs
    about as ``k**8``: the average is mostly of the last quarter of the steps so far (90 % of its weight), and the
    random initialisation is gone. After it, it is an ordinary moving average over about ``1 / (1 - decay)`` steps.
    Averaging weights is a cheap stand-in for averaging models (docs/duplex.md). Only parameters that require
    gradients are averaged (``torch.optim.swa_utils.AveragedModel`` would copy the frozen encoders as well).
    Checkpoints saved during training hold the raw weights; the averaged ones are in the model after ``train()``.
    ``decay=0`` keeps the last weights (no averaging).
    """

    def __init__(self, decay: float):
        self.decay = check_decay(decay)
        self.average: dict[str, torch.Tensor] = {}
        self.model: Any = None

    def _trainable(self, model: Any) -> dict[str, torch.Tensor]:
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("WeightAveragingCallback needs the model from Trainer")
        self.model = model
        self.average = {name: p.detach().clone() for name, p in self._trainable(model).items()}

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        steps = state.global_step  # this step included
        keep = min(self.decay, (1 + steps) / (10 + steps))
        for name, p in self._trainable(self.model).items():
            self.average[name].lerp_(p.detach(), 1.0 - keep)

    @torch.no_grad()
    def on_train_end(self, args, state, control, **kwargs):
        for name, p in self._trainable(self.model).items():
            p.copy_(self.average[name])
        self.average = {}


__all__ = ["MiniOmni2TrainerCallback", "WeightAveragingCallback", "remove_tokenizer_special_tokens"]
