"""Finding a UNet's cross-attention layers, their dims, blocks, short names and kohya names."""

from __future__ import annotations

import hashlib
import json
import re

import torch

from conditioner.errors import CondvecError
from conditioner.layout import LayerSpec
from conditioner.table import TagTable

_NAME = re.compile(
    r"^(?P<part>down_blocks\.(?P<di>\d+)|mid_block|up_blocks\.(?P<ui>\d+))\.attentions\.(?P<j>\d+)"
    r"\.transformer_blocks\.(?P<k>\d+)\.attn2$"
)


def discover(unet: torch.nn.Module) -> list[LayerSpec]:
    """List every cross-attention (``attn2``) layer of a ``UNet2DConditionModel``, in forward order.

    Args:
        unet (`torch.nn.Module`): a diffusers ``UNet2DConditionModel`` (or a module with the same layer names).

    Returns:
        `list[LayerSpec]`: one entry per layer. SD1.5 gives 16 layers in 7 blocks, with kohya names
        ``IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03 … OUT11``.

    Raises:
        CondvecError: the module has no cross-attention layers.
    """
    found = []
    for name, module in unet.named_modules():
        match = _NAME.match(name)
        if match is None:
            continue
        if not getattr(module, "is_cross_attention", True):
            continue
        found.append((name, match, module))
    def forward_order(item):
        m = item[1]
        part = 0 if m["di"] is not None else (2 if m["ui"] is not None else 1)
        return (part, int(m["di"] or m["ui"] or 0), int(m["j"]), int(m["k"]))

    found.sort(key=forward_order)
    if not found:
        raise CondvecError(
            f"{type(unet).__name__} has no cross-attention layers (modules named '…transformer_blocks.N.attn2'); "
            "condvec needs a UNet2DConditionModel with cross-attention"
        )
    # how many transformer blocks each attention holds: kohya names exist only when it is one everywhere
    per_attention: dict[str, int] = {}
    for name, _match, _ in found:
        key = name.rsplit(".transformer_blocks.", 1)[0]
        per_attention[key] = per_attention.get(key, 0) + 1
    multi = any(count > 1 for count in per_attention.values())
    down_attn = [int(m["j"]) for _, m, _ in found if m["di"] is not None]
    per_block = max(down_attn) + 1 if down_attn else 1

    layers = []
    for name, match, module in found:
        j, k = int(match["j"]), int(match["k"])
        if match["di"] is not None:
            block, short = f"down_blocks.{match['di']}", f"down.{match['di']}.{j}"
            kohya = f"IN{1 + int(match['di']) * (per_block + 1) + j:02d}"
        elif match["ui"] is not None:
            block, short = f"up_blocks.{match['ui']}", f"up.{match['ui']}.{j}"
            kohya = f"OUT{int(match['ui']) * (per_block + 1) + j:02d}"
        else:
            block, short, kohya = "mid_block", f"mid.{j}", f"M{j:02d}"
        if multi:
            short, kohya = f"{short}.{k}", None
        layers.append(
            LayerSpec(
                name=name, short=short, block=block, cross_dim=module.to_k.in_features,
                inner_dim=module.to_k.out_features, heads=module.heads, kohya=kohya,
            )
        )
    return layers


def takes_pooled(unet: torch.nn.Module) -> bool:
    """Whether a UNet takes SDXL's pooled text vector and size/crop time ids (``addition_embed_type: text_time``):
    the one test of "is this SDXL-shaped?" for UNets (a table's answer is ``table.pooled is not None``)."""
    return getattr(unet, "config", {}).get("addition_embed_type") == "text_time"


def base_model_identity(unet: torch.nn.Module, name: str | None = None) -> dict:
    """A small description of a base UNet recorded in tables: a name and a hash of its cross-attention layout."""
    layers = discover(unet)
    digest = hashlib.sha256(json.dumps([layer.to_dict() for layer in layers], sort_keys=True).encode()).hexdigest()
    identity = {"layout_sha256": digest[:16], "num_layers": len(layers)}
    if name:
        identity["name"] = name
    config = getattr(unet, "config", None)
    if config is not None and "sample_size" in config:
        identity["sample_size"] = config["sample_size"]
        identity["in_channels"] = config["in_channels"]
    return identity


def table_for_unet(unet: torch.nn.Module, tags: list[str] | None = None, base_name: str | None = None, **kwargs):
    """Create an empty :class:`conditioner.TagTable` that fits a UNet.

    Args:
        unet (`torch.nn.Module`): the base UNet.
        tags (`list[str]`, *optional*): initial tags.
        base_name (`str`, *optional*): a name for the base model, recorded in the table.
        **kwargs: passed to :meth:`conditioner.TagTable.create` (``mode``, ``groups``, ``anchors``, ``pad_to`` …).
    """
    kwargs.setdefault("num_train_timesteps", 1000)
    return TagTable.create(discover(unet), tags=tags, base_model=base_model_identity(unet, base_name), **kwargs)
