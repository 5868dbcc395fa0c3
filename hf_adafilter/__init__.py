"""AdaFilter: adaptive per-example filter fine-tuning for Hugging Face vision backbones.

Importing the package registers the model with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .hub.model_card import push_model_card
from .hub.prediction import classify_with_gate_fractions
from .modeling.backbone_sources import REGISTERED_RESOLVERS
from .modeling.checkpointing import MODEL_CARD_WRITERS
from .modeling.configuration_adafilter import AdaFilterConfig
from .modeling.modeling_adafilter import (
    AdaFilterForImageClassification,
    AdaFilterModel,
    AdaFilterPreTrainedModel,
)
from .modeling.outputs import AdaFilterImageClassifierOutput, AdaFilterModelOutput
from .packaged.pretrained import is_packaged_backbone, packaged_backbone_path, resolve_packaged_backbone

__version__ = "0.1.0"

AutoConfig.register(AdaFilterConfig.model_type, AdaFilterConfig, exist_ok=True)
AutoModel.register(AdaFilterConfig, AdaFilterModel, exist_ok=True)
AutoModelForImageClassification.register(AdaFilterConfig, AdaFilterForImageClassification, exist_ok=True)


if resolve_packaged_backbone not in REGISTERED_RESOLVERS:
    REGISTERED_RESOLVERS.append(resolve_packaged_backbone)
# `model.push_to_hub` then writes the AdaFilter model card (remote code, without this package, keeps transformers').
if push_model_card not in MODEL_CARD_WRITERS:
    MODEL_CARD_WRITERS.append(push_model_card)
# Saving then also writes the remote-code files, so the checkpoint loads where this package is not installed.
AdaFilterConfig.register_for_auto_class("AutoConfig")
AdaFilterModel.register_for_auto_class("AutoModel")
AdaFilterForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "AdaFilterConfig",
    "AdaFilterForImageClassification",
    "AdaFilterImageClassifierOutput",
    "AdaFilterModel",
    "AdaFilterModelOutput",
    "AdaFilterPreTrainedModel",
    "classify_with_gate_fractions",
    "is_packaged_backbone",
    "packaged_backbone_path",
]
