"""The attn2 processor that reads its layer's slice of the packed conditioning tensor."""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from conditioner.errors import CondvecError
from conditioner.layout import LayerSlice
from conditioner.modes import sources
from unet_patch.kv import layer_key_value


class CondvecAttnProcessor:
    """Cross-attention processor for one layer; stateless apart from where its slice lies.

    Identical to diffusers' ``AttnProcessor2_0`` except for where K and V come from:

    - vector mode: ``K = to_k(key source)``, ``V = to_v(value source)``; the value source is the key source unless
      the packed tensor carries a value part (a split tag is in the batch);
    - key/value mode: K and V are read directly from the packed tensor (``to_k`` / ``to_v`` are bypassed);
    - a bias channel, when present, is added to the attention logits (tag weights, padding mask).

    The packed width tells which extras are present: ``base``, ``base + 1`` (bias), ``2·base`` (value part),
    ``2·base + 1`` (both); in key/value mode only ``base`` and ``base + 1`` occur.

    It composes with two diffusers features by taking over what the processor it replaces did:

    - attention slicing (``set_attention_slice``): attention is computed ``slice_size`` (batch × head) rows at a
      time, as diffusers' ``SlicedAttnProcessor`` does;
    - IP-Adapter (``load_ip_adapter``): the image tokens' attention, through that adapter's own ``to_k_ip`` /
      ``to_v_ip`` and scales, is added to the tags' attention exactly as diffusers' ``IPAdapterAttnProcessor2_0``.

    Args:
        layer_slice (`LayerSlice`): this layer's columns, from ``TagTable.layer_slices()``.
        slice_size (`int`, *optional*): attention slicing, from a ``SlicedAttnProcessor`` it replaces.
        ip_adapter (*optional*): the ``IPAdapterAttnProcessor(2_0)`` it replaces, whose image attention it runs.
    """

    def __init__(self, layer_slice: LayerSlice, slice_size: int | None = None, ip_adapter=None):
        self.slice = layer_slice
        self.slice_size = slice_size
        self.ip_adapter = ip_adapter
        self.cache: dict | None = None  # K and V of constant conditioning, while caching (see cached_kv)

    def _key_value(self, attn, encoder_hidden_states: torch.Tensor, key_src: torch.Tensor,
                   value_src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, N, inner_dim)`` K and V; reused while the same conditioning tensor comes back unchanged."""
        caching = self.cache is not None and not torch.is_grad_enabled()
        if caching and self.cache:
            source, version, key, value = self.cache["entry"]
            if source() is encoder_hidden_states and version == encoder_hidden_states._version:
                return key, value
        if self.slice.direct_kv:
            key, value = key_src, value_src  # given directly
        else:
            key, value = layer_key_value(attn, key_src, None if value_src is key_src else value_src)
        if caching:  # one entry: the conditioning tensor of the current call
            self.cache["entry"] = (weakref.ref(encoder_hidden_states), encoder_hidden_states._version, key, value)
        return key, value

    def _attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
        """SDPA over ``(B, heads, ·, head_dim)``, in slices of ``slice_size`` (batch × head) rows when slicing."""
        if not self.slice_size:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        b, h = query.shape[:2]
        q, k, v = (x.reshape(b * h, *x.shape[2:]) for x in (query, key, value))  # (B·heads, ·, head_dim)
        m = None if mask is None else mask.expand(b, h, *mask.shape[2:]).reshape(b * h, *mask.shape[2:])
        out = [F.scaled_dot_product_attention(q[i:i + self.slice_size], k[i:i + self.slice_size],
                                              v[i:i + self.slice_size],
                                              attn_mask=None if m is None else m[i:i + self.slice_size])
               for i in range(0, b * h, self.slice_size)]
        return torch.cat(out).reshape(query.shape[0], h, *out[0].shape[1:])

    def _add_image_attention(self, hidden_states: torch.Tensor, query: torch.Tensor, ip_hidden_states, heads: int,
                             head_dim: int) -> torch.Tensor:
        """Add the IP-Adapter's image-token attention to ``(B, Q, inner_dim)``, as ``IPAdapterAttnProcessor2_0``."""
        ip = self.ip_adapter
        for states, scale, to_k_ip, to_v_ip in zip(ip_hidden_states, ip.scale, ip.to_k_ip, ip.to_v_ip):
            if (all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0):
                continue
            if isinstance(scale, list):
                raise CondvecError("per-image IP-Adapter scales are not supported with condvec: use one scale")
            to_k_ip.to(query.device, query.dtype), to_v_ip.to(query.device, query.dtype)
            batch = query.shape[0]
            key = to_k_ip(states).view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, heads, I, head_dim)
            value = to_v_ip(states).view(batch, -1, heads, head_dim).transpose(1, 2)
            image = self._attention(query, key, value, None).transpose(1, 2).reshape(batch, -1, heads * head_dim)
            hidden_states = hidden_states + scale * image.to(query.dtype)
        return hidden_states

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_adapter_masks: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise CondvecError("a condvec cross-attention layer needs encoder_hidden_states (the packed conditioning)")
        ip_hidden_states = None
        if isinstance(encoder_hidden_states, tuple):  # (packed conditioning, [image tokens per IP-Adapter])
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states
            if self.ip_adapter is None:
                raise CondvecError("the UNet got IP-Adapter image embeddings, but condvec was installed before the "
                                   "IP-Adapter was loaded: call unet_patch.install(unet, table) again after "
                                   "load_ip_adapter")
            if ip_adapter_masks is not None:
                raise CondvecError("IP-Adapter masks are not supported with condvec: leave ip_adapter_masks unset")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = encoder_hidden_states.shape
        key_src, value_src, bias = sources(self.slice, encoder_hidden_states)

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

        hidden_states = self._attention(query, key, value, attention_mask)  # (B, heads, Q, head_dim)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if ip_hidden_states is not None:
            hidden_states = self._add_image_attention(hidden_states, query, ip_hidden_states, attn.heads, head_dim)

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
