"""condvec for ComfyUI: drop (or symlink) this folder into ``ComfyUI/custom_nodes/`` with condvec installed in
ComfyUI's Python (``pip install condvec``). Nodes: Load condvec table, condvec Encode, Apply condvec to model."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
