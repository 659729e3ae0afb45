"""Training Mini-Omni2: the example format and its preprocessing (:mod:`.data`); the collator, the three stages and
LoRA (:mod:`.collator`); what ``transformers.Trainer`` needs (:mod:`.callbacks`)."""

from . import collator as _collator
from .callbacks import MiniOmni2TrainerCallback, WeightAveragingCallback
from .collator import *  # noqa: F401,F403  (the public names of the collator module, listed in its __all__)
from .data import MiniOmni2Preprocessor, prepare_example, synthetic_examples

__all__ = list(_collator.__all__) + [
    "MiniOmni2Preprocessor",
    "MiniOmni2TrainerCallback",
    "WeightAveragingCallback",
    "prepare_example",
    "synthetic_examples",
]
