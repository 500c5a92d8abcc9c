"""condvec's cross-attention on a ComfyUI model, through ``transformer_options`` patches (no ComfyUI import here).

ComfyUI runs every attn2 of its ``UNetModel`` as ``BasicTransformerBlock`` code that calls, in order:

1. each ``patches["attn2_patch"]`` as ``p(n, context, value, extra_options)`` → new ``(n, context, value)``; the
   block then computes ``K = to_k(context)``, ``V = to_v(value)``;
2. ``patches_replace["attn2"][key](q, K, V, extra_options)`` when one is registered for the block, else its own
   attention; ``extra_options`` is the same dict object in both calls.

:class:`CondvecAttn2Patch` (step 1) does exactly what ``unet_patch.CondvecAttnProcessor`` does with the packed
tensor: it reads this layer's key and value sources (vector mode), so ComfyUI's own ``to_k`` / ``to_v`` make K and V.
What the block cannot do by itself — an additive bias on the logits (tag weights, masked padding) and K / V given
directly (key/value tables) — is handed to :class:`CondvecAttention` (step 2) through ``extra_options``. That
replacement chains whatever replacement was registered for the block before it (IP-Adapter and others): calls
without condvec extras go to it unchanged, key/value tables hand it their K and V.

Timestep anchors: the encode node packs the prompt once per anchor, side by side; the patch mixes the anchors for
each sample's timestep, converted from the sigma ComfyUI passes (``extra_options["sigmas"]``) with the model's own
``model_sampling.timestep`` — the same timestep the UNet itself receives.
"""

from __future__ import annotations

import warnings

import torch

from conditioner.encode import anchor_weights
from conditioner.errors import CondvecError
from conditioner.layout import LayerSpec
from conditioner.modes import sources
from conditioner.table import TagTable

EXTRA_KEY = "condvec"  # extra_options key: what the attn2 patch hands to the attention replacement

BlockKey = tuple[str, int, int]  # ComfyUI's (block kind, block id, transformer index): ("input", 4, 0)


def comfy_layers(diffusion_model: torch.nn.Module) -> dict[BlockKey, LayerSpec]:
    """Every attn2 of a ComfyUI ``UNetModel``, keyed by ComfyUI block id, described with diffusers' layer names.

    ComfyUI numbers ``input_blocks`` from 1 after ``conv_in`` (a downsample takes one id after each level but the
    last), the middle block is ``("middle", 0)`` and ``output_blocks`` count from the deepest level; the diffusers
    name of a layer follows from the level and the position inside it, exactly as diffusers' and ComfyUI's own
    checkpoint converters map them. SD1.x gives input 1, 2, 4, 5, 7, 8, middle 0, output 3 … 11 (kohya's IN01 …
    OUT11).

    Args:
        diffusion_model (`torch.nn.Module`): ``model.get_model_object("diffusion_model")`` of a ComfyUI MODEL.

    Returns:
        `dict[tuple[str, int, int], LayerSpec]`: in forward order.

    Raises:
        CondvecError: the model is not a UNet with ``input_blocks`` / ``output_blocks`` (e.g. a DiT).
    """
    needed = ("input_blocks", "output_blocks", "num_res_blocks")
    if not all(hasattr(diffusion_model, name) for name in needed):
        raise CondvecError(f"condvec needs a UNet model (SD1.x / SD2.x / SDXL); this MODEL's diffusion model is a "
                           f"{type(diffusion_model).__name__}")
    res_blocks = list(diffusion_model.num_res_blocks)
    places: dict[tuple[str, int], str] = {}  # (kind, id) → diffusers attention prefix
    block_id = 0
    for level, count in enumerate(res_blocks):
        for j in range(count):
            block_id += 1
            places[("input", block_id)] = f"down_blocks.{level}.attentions.{j}"
        block_id += 1 if level != len(res_blocks) - 1 else 0
    places[("middle", 0)] = "mid_block.attentions.0"
    block_id = 0
    for up, level in enumerate(reversed(range(len(res_blocks)))):
        for j in range(res_blocks[level] + 1):
            places[("output", block_id)] = f"up_blocks.{up}.attentions.{j}"
            block_id += 1

    blocks = [("input", i, b) for i, b in enumerate(diffusion_model.input_blocks)]
    if getattr(diffusion_model, "middle_block", None) is not None:
        blocks.append(("middle", 0, diffusion_model.middle_block))
    blocks += [("output", i, b) for i, b in enumerate(diffusion_model.output_blocks)]
    layers: dict[BlockKey, LayerSpec] = {}
    for kind, block_id, block in blocks:
        for module in block:
            for k, transformer in enumerate(getattr(module, "transformer_blocks", [])):
                attn = getattr(transformer, "attn2", None)
                if attn is None:
                    continue
                prefix = places[(kind, block_id)]
                layers[(kind, block_id, k)] = LayerSpec(
                    name=f"{prefix}.transformer_blocks.{k}.attn2", short=f"{kind}.{block_id}.{k}",
                    block=prefix.rsplit(".attentions.", 1)[0], cross_dim=attn.to_k.in_features,
                    inner_dim=attn.to_k.out_features, heads=attn.heads,
                )
    if not layers:
        raise CondvecError("this MODEL's UNet has no cross-attention layers; condvec needs an SD1.x / SD2.x / "
                           "SDXL UNet")
    return layers


def check_table(table: TagTable, layers: dict[BlockKey, LayerSpec]) -> None:
    """Refuse a table that does not fit the model, in one line (layer count, names, dims).

    Raises:
        TableMismatchError: (a ``CondvecError``) saying what differs.
    """
    table.check_layers(list(layers.values()))


def mix_anchors(packed: torch.Tensor, num_anchors: int, base_width: int, timesteps: torch.Tensor,
                anchors: list[float]) -> torch.Tensor:
    """``(B, N, A·W')`` anchor-wise packed conditioning → ``(B, N, W')`` at each sample's timestep.

    Packing is linear in the anchor weights, so packing each anchor and mixing afterwards equals packing at the
    timestep (to float rounding). The bias channel does not depend on the anchor and is taken from the first one
    (``0 · -inf`` would be NaN).
    """
    batch, n, width = packed.shape
    per_anchor = width // num_anchors
    parts = packed.view(batch, n, num_anchors, per_anchor)  # (B, N, A, W')
    if timesteps.numel() != batch:  # ComfyUI passes one sigma per latent; cond chunks are stacked along the batch
        timesteps = timesteps.reshape(-1).repeat(batch // max(timesteps.numel(), 1))
    weights = anchor_weights(anchors, timesteps).to(packed.device, packed.dtype)  # (B, A)
    has_bias = per_anchor in (base_width + 1, 2 * base_width + 1)
    data = parts[..., : per_anchor - 1] if has_bias else parts
    mixed = torch.einsum("bnaw,ba->bnw", data, weights)  # (B, N, W' [- 1])
    if has_bias:
        mixed = torch.cat([mixed, parts[:, :, 0, -1:]], -1)
    return mixed


class CondvecAttn2Patch:
    """The ``attn2_patch``: each layer reads its slice of the packed conditioning.

    Args:
        table (`TagTable`): the table (only its layout and anchors are kept).
        layers (`dict`): from :func:`comfy_layers`, already checked against the table.
        model_sampling (`torch.nn.Module`): the model's ``model_sampling`` (sigma → timestep for anchors).
    """

    def __init__(self, table: TagTable, layers: dict[BlockKey, LayerSpec], model_sampling):
        slices = table.layer_slices()
        self.slices = {key: slices[spec.name] for key, spec in layers.items()}
        self.cross_dims = {key: spec.cross_dim for key, spec in layers.items()}
        self.anchors = list(table.anchors)
        self.model_sampling = model_sampling

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; this object never changes
        return self

    def _timesteps(self, extra_options: dict) -> torch.Tensor:
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            raise CondvecError("this condvec table has timestep anchors, but ComfyUI passed no sigmas to the "
                               "attention: sample through a KSampler (or pass transformer_options['sigmas'])")
        return self.model_sampling.timestep(sigmas).float()

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict):
        key = (extra_options["block"][0], int(extra_options["block"][1]), int(extra_options.get("block_index", 0)))
        layer_slice = self.slices.get(key)
        if layer_slice is None:
            raise CondvecError(f"condvec: ComfyUI attention block {key} is not in the table's layers; "
                               "re-apply condvec to this model")
        packed = context
        if len(self.anchors) > 1:
            packed = mix_anchors(packed, len(self.anchors), layer_slice.base_width, self._timesteps(extra_options),
                                 self.anchors)
        key_src, value_src, bias = sources(layer_slice, packed)  # the processor's own slicing: the same math
        if layer_slice.direct_kv:
            # K and V are given: hand them to the replacement; the block's to_k / to_v run on one zero token only
            extra_options[EXTRA_KEY] = {"key": key_src, "value": value_src, "bias": bias}
            dummy = n.new_zeros(n.shape[0], 1, self.cross_dims[key])
            return n, dummy, dummy
        if bias is not None:
            extra_options[EXTRA_KEY] = {"bias": bias}
        return n, key_src, value_src


class CondvecAttention:
    """The ``patches_replace["attn2"]`` entry: applies the bias channel and direct K / V, chaining ``previous``.

    Args:
        previous (`callable`, *optional*): the replacement registered for this block before condvec was applied.
    """

    _warned = False

    def __init__(self, previous=None):
        self.previous = previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        extras = extra_options.get(EXTRA_KEY)
        if extras is not None:
            k = extras.get("key", k)  # (B, N, inner_dim) in key/value mode
            v = extras.get("value", v)
            bias = extras.get("bias")
        else:
            bias = None
        if self.previous is not None:
            if bias is not None and not CondvecAttention._warned:
                CondvecAttention._warned = True
                warnings.warn("condvec: another node replaces cross-attention in some blocks; tag weights and "
                              "padding masks are not applied there (apply condvec after it to chain it)",
                              stacklevel=2)
            return self.previous(q, k, v, extra_options)
        from comfy.ldm.modules.attention import optimized_attention, optimized_attention_masked

        heads, precision = extra_options["n_heads"], extra_options.get("attn_precision")
        if bias is None:
            return optimized_attention(q, k, v, heads, attn_precision=precision, transformer_options=extra_options)
        mask = bias[:, None, None, :].to(q.dtype)  # (B, 1, 1, N): one additive bias per token, all heads and queries
        return optimized_attention_masked(q, k, v, heads, mask, attn_precision=precision,
                                          transformer_options=extra_options)


def apply(model, table: TagTable):
    """A clone of a ComfyUI ``ModelPatcher`` that reads condvec conditioning; ``model`` itself is left untouched.

    Args:
        model (`comfy.model_patcher.ModelPatcher`): a MODEL.
        table (`TagTable`): the table the prompts are encoded with.

    Raises:
        TableMismatchError: the table was built for other layers or dims (one line saying what differs).
    """
    layers = comfy_layers(model.get_model_object("diffusion_model"))
    check_table(table, layers)
    patched = model.clone()
    patched.set_model_attn2_patch(CondvecAttn2Patch(table, layers, model.get_model_object("model_sampling")))
    existing = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    blocks = sorted({(kind, block_id) for kind, block_id, _ in layers}, key=lambda b: (b[0] != "input", b))
    for kind, block_id in blocks:  # a block-wide replacement; an existing per-transformer one is wrapped in place
        patched.set_model_attn2_replace(CondvecAttention(existing.get((kind, block_id))), kind, block_id)
    for kind, block_id, index in layers:
        if (kind, block_id, index) in existing:
            patched.set_model_attn2_replace(CondvecAttention(existing[(kind, block_id, index)]), kind, block_id,
                                            index)
    return patched
