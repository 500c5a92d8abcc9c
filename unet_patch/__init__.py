"""attn2 processors that read their layer's slice of the packed conditioning; install/remove; generation."""

from unet_patch.discover import base_model_identity, discover, table_for_unet
from unet_patch.kv import kv_table
from unet_patch.patch import install, is_installed, patched, remove
from unet_patch.pipeline import TagDiffusionPipeline, load_components
from unet_patch.processor import CondvecAttnProcessor

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
