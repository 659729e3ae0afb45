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


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The torch device of ``--device`` (default: cuda if available, else cpu), refused if this torch cannot use it."""
    if isinstance(name, torch.device):
        return name
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a torch device ({error})") from None
    if device.type == "cpu":
        return device
    backends = {
        "cuda": (torch.cuda.is_available, torch.cuda.device_count),
        "mps": (torch.backends.mps.is_available, lambda: 1),
        "xpu": (lambda: hasattr(torch, "xpu") and torch.xpu.is_available(), lambda: torch.xpu.device_count()),
    }
    if device.type not in backends:
        raise ValueError(f"--device {name!r}: use cpu, cuda, cuda:N, mps or xpu")
    available, count = backends[device.type]
    if not available():
        raise ValueError(
            f"--device {name!r}: this torch ({torch.__version__}) cannot use {device.type} here; use --device cpu"
        )
    if device.index is not None and device.index >= count():
        raise ValueError(f"--device {name!r}: there are only {count()} {device.type} devices")
    return device


def _cannot_load(model_id: str, error: Exception) -> ModelLoadError:
    message = f"cannot load {model_id!r}: {error}"
    if os.path.isfile(os.path.join(model_id, "lit_model.pth")):
        message += (
            f"\nhint: {model_id} is an original release; convert it first: "
            f"mini-omni2 convert --source {model_id} --output {model_id.rstrip('/')}-hf"
        )
    return ModelLoadError(message)


def load_processor(model_id: str):
    """The processor: the tiny one for ``tiny-random``, else ``from_pretrained`` (cheap: commands load it first, to
    check the prompt before the model)."""
    if model_id == TINY_RANDOM:
        from ..tiny import tiny_processor

        return tiny_processor()
    from ..processing_mini_omni2 import MiniOmni2Processor

    try:
        return MiniOmni2Processor.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        raise _cannot_load(model_id, error) from error


def load_model(model_id: str, device: str | torch.device | None = None, dtype: str | None = "auto"):
    """The model on ``device`` in eval mode: the random tiny one for ``tiny-random``, else ``from_pretrained``.
    ``dtype``: ``"auto"`` picks bfloat16 where the device computes it natively and float32 otherwise
    (:func:`resolve_dtype`), or a dtype name; ``None`` keeps the loading default. The codec stays float32."""
    from ..modeling_mini_omni2 import resolve_dtype

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device) if dtype is not None else None
    if model_id == TINY_RANDOM:
        from ..tiny import tiny_model

        model = tiny_model()
        if torch_dtype is not None:
            model = model.to(torch_dtype)
            if model.codec is not None:  # SNAC decodes in float32 whatever the backbone dtype (as from_pretrained)
                model.codec.float()
    else:
        from ..modeling_mini_omni2 import MiniOmni2ForConditionalGeneration

        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        try:
            model = MiniOmni2ForConditionalGeneration.from_pretrained(model_id, **kwargs)
        except (OSError, ValueError) as error:
            raise _cannot_load(model_id, error) from error
    return model.to(device).eval()


def load(model_id: str, device: str | torch.device | None = None, dtype: str | None = "auto"):
    """Model (eval mode, on ``device``) and processor; see :func:`load_model` and :func:`load_processor`."""
    return load_model(model_id, device, dtype), load_processor(model_id)


def describe(model) -> str:
    """Where and in which dtype the model runs, for the start-up line of ``chat`` and ``serve``."""
    param = next(model.parameters())
    return f"model on {param.device} in {str(param.dtype).replace('torch.', '')} (codec in float32)"


__all__ = [
    "load",
    "load_model",
    "load_processor",
    "resolve_device",
    "describe",
    "warn_tiny_random",
    "ModelLoadError",
    "TINY_RANDOM",
    "TINY_RANDOM_MAX_NEW_TOKENS",
]
