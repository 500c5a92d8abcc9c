"""Cross-attention layer descriptions and the packed-width layout shared by the table and the UNet patch."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LayerSpec:
    """One cross-attention (``attn2``) layer of a UNet.

    Args:
        name (`str`): diffusers module name, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``.
        short (`str`): short name used in layer specs, e.g. ``down.0.0`` (``down.0.0.1`` for a second
            transformer block), ``mid.0``, ``up.1.2``.
        block (`str`): the UNet block that holds it, e.g. ``down_blocks.0`` or ``mid_block``.
        cross_dim (`int`): input width of ``to_k`` / ``to_v`` (``cross_attention_dim``).
        inner_dim (`int`): output width of ``to_k`` / ``to_v``.
        heads (`int`): attention heads.
        kohya (`str`, *optional*): the kohya block name (``IN01`` … ``OUT11``) for SD1.x-shaped UNets.
    """

    name: str
    short: str
    block: str
    cross_dim: int
    inner_dim: int
    heads: int
    kohya: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LayerSpec:
        return cls(**{k: data[k] for k in ("name", "short", "block", "cross_dim", "inner_dim", "heads")},
                   kohya=data.get("kohya"))


@dataclass(frozen=True)
class LayerSlice:
    """Where one layer finds its inputs inside a packed conditioning tensor.

    The packed tensor's last dimension is laid out as ``[key part | value part (only when split) | bias (optional)]``
    with ``base_width`` columns in the key part. In vector mode the layer reads ``[key_start, key_end)`` as key
    source and, when the tensor is split, ``[base_width + key_start, base_width + key_end)`` as value source
    (otherwise the key source is the value source too). In key/value mode it reads K from ``[key_start, key_end)``
    and V from ``[value_start, value_start + (key_end - key_start))`` directly.
    """

    mode: str  # the table's mode name (conditioner.modes)
    key_start: int
    key_end: int
    value_start: int
    base_width: int
    direct_kv: bool = False  # K and V are given (key/value mode), not sources for to_k / to_v
