"""Registration with the Auto classes, in-process (``import mini_omni2``) and in saved folders (``auto_map``)."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForMultimodalLM, AutoProcessor

from .configuration_mini_omni2 import MiniOmni2Config
from .modeling_mini_omni2 import MiniOmni2ForConditionalGeneration, MiniOmni2Model
from .pipeline_mini_omni2 import register_pipeline
from .processing_mini_omni2 import MiniOmni2Processor

_done = False


def register() -> None:
    """Register the classes with AutoConfig/AutoModel/AutoModelForMultimodalLM/AutoProcessor and mark them for
    ``auto_map``, so that ``save_pretrained`` writes the code files and a folder loads with
    ``trust_remote_code=True`` where this package is not installed; register the pipeline for ``any-to-any``."""
    global _done
    if _done:
        return
    AutoConfig.register(MiniOmni2Config.model_type, MiniOmni2Config, exist_ok=True)
    AutoModel.register(MiniOmni2Config, MiniOmni2Model, exist_ok=True)
    AutoModelForMultimodalLM.register(MiniOmni2Config, MiniOmni2ForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(MiniOmni2Config, MiniOmni2Processor, exist_ok=True)
    MiniOmni2Config.register_for_auto_class()
    MiniOmni2Model.register_for_auto_class("AutoModel")
    MiniOmni2ForConditionalGeneration.register_for_auto_class("AutoModelForMultimodalLM")
    MiniOmni2Processor.register_for_auto_class("AutoProcessor")
    register_pipeline()
    _done = True
