"""Conversion of the original Mini-Omni / Mini-Omni2 releases into Hub-ready transformers folders."""

from .convert import convert_checkpoint
from .mapping import ConversionError

__all__ = ["convert_checkpoint", "ConversionError"]
