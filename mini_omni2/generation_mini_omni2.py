"""Generation for Mini-Omni2: delayed parallel and batch parallel decoding (SPEC §6-7). Filled in by issue 3."""

from __future__ import annotations


class MiniOmni2GenerationMixin:
    """Adds Mini-Omni2's ``generate`` to the model class."""
