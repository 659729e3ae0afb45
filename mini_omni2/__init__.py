"""mini-omni2: Mini-Omni2 and Mini-Omni as transformers-native models."""

from .configuration_mini_omni2 import MiniOmni2Config
from .modeling_mini_omni2 import (
    MiniOmni2Codec,
    MiniOmni2ForConditionalGeneration,
    MiniOmni2Model,
    MiniOmni2PreTrainedModel,
)
from .duplex_mini_omni2 import DuplexEvent, DuplexSession, MiniOmni2ListenFrontEnd, MiniOmni2Listener
from .generation_mini_omni2 import MiniOmni2GenerateOutput, release_generation_config
from .processing_mini_omni2 import MiniOmni2Processor
from .pipeline_mini_omni2 import MiniOmni2Pipeline
from .streaming_mini_omni2 import MiniOmni2IteratorStreamer, MiniOmni2Streamer
from .training import MiniOmni2DataCollator, configure_stage
from .token_layout import TASKS, PromptLayout, TokenLayout
from .registration import register

register()

__version__ = "0.1.0"

__all__ = [
    "MiniOmni2Config",
    "MiniOmni2Model",
    "MiniOmni2PreTrainedModel",
    "MiniOmni2ForConditionalGeneration",
    "MiniOmni2Codec",
    "MiniOmni2Processor",
    "MiniOmni2Pipeline",
    "MiniOmni2GenerateOutput",
    "MiniOmni2Streamer",
    "MiniOmni2IteratorStreamer",
    "MiniOmni2ListenFrontEnd",
    "MiniOmni2Listener",
    "DuplexSession",
    "DuplexEvent",
    "MiniOmni2DataCollator",
    "configure_stage",
    "release_generation_config",
    "TokenLayout",
    "PromptLayout",
    "TASKS",
]
