"""attn2 processors that read their layer's slice of the packed conditioning; install/remove; generation."""

from __future__ import annotations

from conditioner.lazy import lazy_exports

# Exported names and their modules, imported on first use (conditioner.lazy): --help stays fast.
_EXPORTS = {
    "base_model_identity": "unet_patch.discover",
    "discover": "unet_patch.discover",
    "table_for_unet": "unet_patch.discover",
    "kv_table": "unet_patch.kv",
    "install": "unet_patch.patch",
    "is_installed": "unet_patch.patch",
    "patched": "unet_patch.patch",
    "remove": "unet_patch.patch",
    "TagDiffusionPipeline": "unet_patch.pipeline",
    "load_components": "unet_patch.pipeline",
    "CondvecAttnProcessor": "unet_patch.processor",
}

__all__ = [
    "CondvecAttnProcessor",
    "TagDiffusionPipeline",
    "base_model_identity",
    "discover",
    "install",
    "is_installed",
    "load_components",
    "patched",
    "remove",
    "table_for_unet",
    "kv_table",
]


lazy_exports(__name__, _EXPORTS)
