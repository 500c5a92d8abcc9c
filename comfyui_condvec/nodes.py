"""The three ComfyUI nodes: Load condvec table, condvec Encode, Apply condvec to model.

ComfyUI is imported only inside the functions that need it (``folder_paths`` for the table list), so this module
imports anywhere condvec is installed.
"""

from __future__ import annotations

import os

import torch

from conditioner.encode import encode_pooled, pack, tokenize
from conditioner.table import TagTable

from . import patch as condvec_patch

FOLDER = "condvec"  # tables live in ComfyUI/models/condvec/
CATEGORY = "conditioning/condvec"


def _register_folder() -> None:
    import folder_paths

    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)


def load_table(name: str) -> TagTable:
    """A table by file name in ``models/condvec`` (or by an existing path).

    Raises:
        FileNotFoundError: no such table.
        TableFileError: (a ``CondvecError``) the file is not a valid condvec table.
    """
    if os.path.isfile(name):
        return TagTable.load(name)
    _register_folder()
    import folder_paths

    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"condvec table {name!r} not found in {folder_paths.get_folder_paths(FOLDER)}: "
                                "put the .safetensors file in ComfyUI/models/condvec/")
    return TagTable.load(path)


def encode_conditioning(table: TagTable, prompt: str, lenient: bool = False, zeros: bool = False) -> list:
    """One prompt as ComfyUI CONDITIONING: ``[[packed (1, N, A·W'), {"pooled_output": …, …}]]``.

    With timestep anchors the prompt is packed once per anchor, side by side along the last dimension; the model
    patch mixes them at each step's timestep. SDXL tables add ``pooled_output``. When the packed tensor is not a
    plain ``(1, N, cross_attention_dim)`` sequence, ControlNets get one through ``cross_attn_controlnet``: the mean
    of the groups' key sources (vector mode) or zeros (key/value mode, which has no such vectors).

    Args:
        table (`TagTable`): the table.
        prompt (`str`): comma-separated tags; ``""`` is the null prompt.
        lenient (`bool`, defaults to `False`): skip unknown tags with a warning instead of refusing the prompt.
        zeros (`bool`, defaults to `False`): zeros instead of the encoding (SDXL's empty negative prompt).
    """
    tokens = tokenize(table, [prompt], lenient=lenient)
    packed = torch.cat([pack(table, tokens, anchor) for anchor in table.anchors], -1)  # (1, N, A·W')
    if zeros:
        packed = torch.zeros_like(packed)
    extras: dict = {}
    if table.pooled is not None:
        pooled = encode_pooled(table, [prompt], lenient=lenient)  # (1, P)
        extras["pooled_output"] = torch.zeros_like(pooled) if zeros else pooled
    if packed.shape[-1] != table.dim or table.mode_spec.direct_kv:
        extras["cross_attn_controlnet"] = _plain(table, packed)
    return [[packed, extras]]


def _plain(table: TagTable, packed: torch.Tensor) -> torch.Tensor:
    """A ``(B, N, cross_attention_dim)`` sequence for models that read plain text conditioning (ControlNets)."""
    batch, n, width = packed.shape
    dim = table.layers[0].cross_dim
    if table.mode_spec.direct_kv:
        return packed.new_zeros(batch, n, dim)
    per_anchor = packed.view(batch, n, table.num_anchors, width // table.num_anchors)  # (B, N, A, W')
    keys = per_anchor[..., : table.width].reshape(batch, n, table.num_anchors, len(table.group_names), dim)
    return keys.mean(dim=(2, 3))  # (B, N, D)


class LoadCondvecTable:
    """Load a condvec tag table (``.safetensors``) from ``ComfyUI/models/condvec``."""

    @classmethod
    def INPUT_TYPES(cls):
        _register_folder()
        import folder_paths

        return {"required": {"table_name": (folder_paths.get_filename_list(FOLDER),)}}

    RETURN_TYPES = ("CONDVEC_TABLE",)
    RETURN_NAMES = ("table",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, table_name: str):
        return (load_table(table_name),)


class CondvecEncode:
    """Tags → positive and negative CONDITIONING (tag weights ``(tag:1.3)``, SDXL pooled, timestep anchors)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "table": ("CONDVEC_TABLE",),
                "positive": ("STRING", {"multiline": True, "default": ""}),
                "negative": ("STRING", {"multiline": True, "default": ""}),
            },
            "optional": {"lenient": ("BOOLEAN", {"default": False})},
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, table: TagTable, positive: str, negative: str, lenient: bool = False):
        # an empty negative is the null prompt, or zeros where the base model's pipeline forces them (SDXL)
        zero_negative = not negative.strip() and table.negative_zeros
        return (encode_conditioning(table, positive, lenient),
                encode_conditioning(table, negative, lenient, zeros=zero_negative))


class ApplyCondvec:
    """Patch a MODEL's cross-attention to read condvec conditioning (per-layer, key/value, split, weights, anchors).

    Returns a patched clone; the input MODEL is not changed, so bypassing the node restores the plain model.
    """

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "table": ("CONDVEC_TABLE",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, table: TagTable):
        return (condvec_patch.apply(model, table),)


NODE_CLASS_MAPPINGS = {
    "CondvecLoadTable": LoadCondvecTable,
    "CondvecEncode": CondvecEncode,
    "CondvecApply": ApplyCondvec,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CondvecLoadTable": "Load condvec table",
    "CondvecEncode": "condvec Encode",
    "CondvecApply": "Apply condvec to model",
}
