"""The shared backbone: loading open_clip models from every source, and their saved form."""

from vlkit.backbone.core import (
    Backbone,
    BackboneError,
    TextTruncatedWarning,
    load_backbone,
    read_state_dict,
    register_vlkit_configs,
)

__all__ = ["Backbone", "BackboneError", "TextTruncatedWarning", "load_backbone", "read_state_dict", "register_vlkit_configs"]
