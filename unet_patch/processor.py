"""The attn2 processor that reads its layer's slice of the packed conditioning tensor."""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from conditioner.layout import LayerSlice


class CondvecAttnProcessor:
    """Cross-attention processor for one layer; stateless apart from where its slice lies.

    Identical to diffusers' ``AttnProcessor2_0`` except for where K and V come from:

    - vector mode: ``K = to_k(key source)``, ``V = to_v(value source)``; the value source is the key source unless
      the packed tensor carries a value part (a split tag is in the batch);
    - key/value mode: K and V are read directly from the packed tensor (``to_k`` / ``to_v`` are bypassed);
    - a bias channel, when present, is added to the attention logits (tag weights, padding mask).

    The packed width tells which extras are present: ``base``, ``base + 1`` (bias), ``2·base`` (value part),
    ``2·base + 1`` (both); in key/value mode only ``base`` and ``base + 1`` occur.

    Args:
        layer_slice (`LayerSlice`): this layer's columns, from ``TagTable.layer_slices()``.
    """

    def __init__(self, layer_slice: LayerSlice):
        self.slice = layer_slice
        self.cache: dict | None = None  # K and V of constant conditioning, while caching (see cached_kv)

    def _key_value(self, attn, encoder_hidden_states: torch.Tensor, key_src: torch.Tensor,
                   value_src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, N, inner_dim)`` K and V; reused while the same conditioning tensor comes back unchanged."""
        caching = self.cache is not None and not torch.is_grad_enabled()
        if caching and self.cache:
            source, version, key, value = self.cache["entry"]
            if source() is encoder_hidden_states and version == encoder_hidden_states._version:
                return key, value
        if self.slice.mode == "kv":
            key, value = key_src, value_src  # given directly
        else:
            tied = value_src is key_src
            if attn.norm_cross:
                key_src = attn.norm_encoder_hidden_states(key_src)
                value_src = key_src if tied else attn.norm_encoder_hidden_states(value_src)
            key = attn.to_k(key_src)
            value = attn.to_v(value_src)
        if caching:  # one entry: the conditioning tensor of the current call
            self.cache["entry"] = (weakref.ref(encoder_hidden_states), encoder_hidden_states._version, key, value)
        return key, value

    def _sources(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        s = self.slice
        width = packed.shape[-1]
        base = s.base_width
        if width == base:
            split, bias = False, None
        elif width == base + 1:
            split, bias = False, packed[..., -1]
        elif s.mode == "vector" and width == 2 * base:
            split, bias = True, None
        elif s.mode == "vector" and width == 2 * base + 1:
            split, bias = True, packed[..., -1]
        else:
            raise ValueError(
                f"packed conditioning has width {width}, but this {s.mode}-mode table packs {base} columns "
                f"(+{base} for split tags, +1 for the bias channel): encode prompts with the table that was installed"
            )
        key_src = packed[..., s.key_start : s.key_end]
        if s.mode == "kv":
            value_src = packed[..., s.value_start : s.value_start + (s.key_end - s.key_start)]
        elif split:
            value_src = packed[..., base + s.key_start : base + s.key_end]
        else:
            value_src = key_src
        return key_src, value_src, bias

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("a condvec cross-attention layer needs encoder_hidden_states (the packed conditioning)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = encoder_hidden_states.shape
        key_src, value_src, bias = self._sources(encoder_hidden_states)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if bias is not None:
            bias = bias[:, None, None, :].to(hidden_states.dtype)  # (B, 1, 1, N), broadcast over heads and queries
            attention_mask = bias if attention_mask is None else attention_mask + bias

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        key, value = self._key_value(attn, encoder_hidden_states, key_src, value_src)  # (B, N, inner_dim) each

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, Q, head_dim)
        key = key.reshape(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N, head_dim)
        value = value.reshape(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N, head_dim)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )  # (B, heads, Q, head_dim)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


@contextmanager
def cached_kv(unet: torch.nn.Module):
    """Within the block, every condvec layer projects a conditioning tensor to K and V once and reuses them.

    Constant conditioning — the sink, the padding, the null prompt, and any prompt of a table without timestep
    anchors — gives the same K and V at every denoising step; the stock UNet re-projects them each step. A cache
    entry is used only for the very tensor it was made from, unmodified (same object, same version counter), and
    only without autograd; the cache is dropped when the block ends, so a table edited between calls is re-read.

    Example:
        ```py
        >>> with patched(unet, table), cached_kv(unet):
        ...     for t in timesteps:
        ...         noise = unet(latents, t, encoder_hidden_states=cond).sample  # K, V projected once
        ```
    """
    processors = [p for p in unet.attn_processors.values() if isinstance(p, CondvecAttnProcessor)]
    for processor in processors:
        processor.cache = {}
    try:
        yield unet
    finally:
        for processor in processors:
            processor.cache = None
