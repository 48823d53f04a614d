"""Backbones by name: ``build_model(ModelConfig)`` builds one with its selected convs converted to SCConv."""

# The backbone modules are imported for their side effect: each registers its builders.
from ablate.models import densenet, resnet  # noqa: F401
from ablate.models.registry import build_model, list_models, register_model

__all__ = ["build_model", "list_models", "register_model"]
