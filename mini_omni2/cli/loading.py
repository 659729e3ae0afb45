"""Loading a model for the command line (``chat``, ``serve``): a Hub id or folder, or the offline ``tiny-random``."""

from __future__ import annotations

import os
import sys

import torch

TINY_RANDOM = "tiny-random"
#: Steps a tiny-random answer is cut at by default: random weights rarely stop on their own.
TINY_RANDOM_MAX_NEW_TOKENS = 128


class ModelLoadError(ValueError):
    """The model could not be loaded; the message says why and, for an original release, how to convert it."""


def warn_tiny_random(purpose: str = "") -> None:
    """Tell the user on stderr that ``tiny-random`` answers noise."""
    print(
        "WARNING: --model tiny-random is a tiny model with RANDOM weights: it runs offline, but its answers are "
        f"noise{purpose}.",
        file=sys.stderr,
        flush=True,
    )


def default_device(device: str | None = None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load(model_id: str, device: str | None = None, dtype: str | None = None):
    """Model (eval mode, on ``device``) and processor: the random tiny ones for ``tiny-random``, else
    ``from_pretrained``. ``dtype``: ``None`` keeps the checkpoint's loading default, ``"auto"`` picks bfloat16 where
    the device computes it natively and float32 otherwise (:func:`resolve_dtype`), or a dtype name."""
    from ..modeling_mini_omni2 import resolve_dtype

    device = default_device(device)
    torch_dtype = resolve_dtype(dtype, device) if dtype is not None else None
    if model_id == TINY_RANDOM:
        from ..tiny import tiny_model, tiny_processor

        model, processor = tiny_model(), tiny_processor()
        if torch_dtype is not None:
            model = model.to(torch_dtype)
            if model.codec is not None:  # SNAC decodes in float32 whatever the backbone dtype (as from_pretrained)
                model.codec.float()
    else:
        from ..modeling_mini_omni2 import MiniOmni2ForConditionalGeneration
        from ..processing_mini_omni2 import MiniOmni2Processor

        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        try:
            model = MiniOmni2ForConditionalGeneration.from_pretrained(model_id, **kwargs)
            processor = MiniOmni2Processor.from_pretrained(model_id)
        except (OSError, ValueError) as error:
            message = f"cannot load {model_id!r}: {error}"
            if os.path.isfile(os.path.join(model_id, "lit_model.pth")):
                message += (
                    f"\nhint: {model_id} is an original release; convert it first: "
                    f"mini-omni2 convert --source {model_id} --output {model_id.rstrip('/')}-hf"
                )
            raise ModelLoadError(message) from error
    return model.to(device).eval(), processor


__all__ = ["load", "warn_tiny_random", "default_device", "ModelLoadError", "TINY_RANDOM", "TINY_RANDOM_MAX_NEW_TOKENS"]
