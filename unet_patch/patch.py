"""Install and remove condvec processors on a UNet's attn2 layers (through ``set_attn_processor`` only).

Each attn2 ``Attention`` module keeps its own original processor (in its ``__dict__``, so it is neither a
submodule nor in the ``state_dict``). Removal restores a layer only while that layer still runs a condvec
processor: a processor someone set after :func:`install` (``unet.set_attn_processor(...)``) is never overwritten by
a stale original.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import (
    FusedAttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    SlicedAttnProcessor,
)

from conditioner.errors import CondvecError
from conditioner.table import TagTable
from unet_patch.discover import discover
from unet_patch.processor import CondvecAttnProcessor

_ORIGINAL = "_condvec_original_processor"
_GUARD = "_condvec_guard"


def _attn2_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``{layer name: Attention module}`` of every attn2 layer, in forward order."""
    return {layer.name: unet.get_submodule(layer.name) for layer in discover(unet)}


def _is_condvec(attn: torch.nn.Module) -> bool:
    return isinstance(getattr(attn, "processor", None), CondvecAttnProcessor)


def _set(unet: torch.nn.Module, replacements: dict[str, object]) -> None:
    """Set some layers' processors, every other processor kept as it is (the same objects)."""
    processors = dict(unet.attn_processors)
    processors.update({f"{name}.processor": processor for name, processor in replacements.items()})
    unet.set_attn_processor(processors)  # set_attn_processor consumes the dict it is given: this one is ours


def is_installed(unet: torch.nn.Module) -> bool:
    """Whether every attn2 layer of this UNet currently runs a condvec processor."""
    modules = _attn2_modules(unet)
    return bool(modules) and all(_is_condvec(attn) for attn in modules.values())


def install(unet: torch.nn.Module, table: TagTable) -> None:
    """Replace every attn2 processor with one that reads its slice of the packed conditioning.

    Each layer's current processor is kept (the same object) on its ``Attention`` module, and :func:`remove` puts
    it back, so removal is exact by construction. Installing again (e.g. another table) replaces the condvec
    processors and keeps the originals; a layer whose processor was replaced since (not a condvec processor) has
    that processor kept as its new original.

    Args:
        unet (`torch.nn.Module`): a diffusers ``UNet2DConditionModel``.
        table (`TagTable`): the table whose layout the processors follow.

    Raises:
        TableMismatchError: the table was built for other layers or dims; the message says what differs.
    """
    layers = discover(unet)
    table.check_layers(layers)
    slices = table.layer_slices()
    processors = {}
    for layer in layers:
        attn = unet.get_submodule(layer.name)
        if not _is_condvec(attn):
            attn.__dict__[_ORIGINAL] = attn.processor
        processors[layer.name] = CondvecAttnProcessor(slices[layer.name], **_taken_over(attn.processor))
    _set(unet, processors)
    if _GUARD not in unet.__dict__:
        unet.__dict__[_GUARD] = unet.register_forward_pre_hook(_guard, with_kwargs=True)
        # diffusers' own method refuses unknown processors with a message that names AttnProcessor2_0; say why
        unet.__dict__["set_default_attn_processor"] = _refuse_default


def _refuse_default(*args, **kwargs):
    raise CondvecError("condvec is installed on this UNet: call unet_patch.remove(unet) first (it restores the "
                       "processors that were there before), then set_default_attn_processor()")


def _taken_over(processor) -> dict:
    """What condvec's processor takes over from the one it replaces: slice size, IP-Adapter; else refuse."""
    if isinstance(processor, CondvecAttnProcessor):
        return {"slice_size": processor.slice_size, "ip_adapter": processor.ip_adapter}
    if isinstance(processor, SlicedAttnProcessor):
        return {"slice_size": processor.slice_size}
    if isinstance(processor, IPAdapterAttnProcessor | IPAdapterAttnProcessor2_0):
        return {"ip_adapter": processor}
    if isinstance(processor, FusedAttnProcessor2_0):
        raise CondvecError("fused QKV projections (fuse_qkv_projections) cannot carry condvec's key and value "
                           "sources: "
                           "call unet.unfuse_qkv_projections() first")
    return {}


_HINTS = {
    SlicedAttnProcessor: "attention slicing: call unet_patch.install(unet, table) again after enabling it (condvec "
                         "then slices its own attention)",
    IPAdapterAttnProcessor2_0: "an IP-Adapter was loaded: call unet_patch.install(unet, table) again after "
                               "load_ip_adapter (condvec then runs the image attention too)",
    FusedAttnProcessor2_0: "fuse_qkv_projections: call unet.unfuse_qkv_projections() and install again",
}


def _guard(unet: torch.nn.Module, args, kwargs=None) -> None:
    """Refuse to run condvec-packed conditioning through layers whose condvec processor was replaced since install.

    Only what would be misread is refused: conditioning exactly ``cross_attention_dim`` wide (a single-group, tied
    table without a bias channel, or any plain sequence) means the same to any processor, so the user's own
    processors just run it (and :func:`is_installed` says false); wider, packed conditioning (per-layer groups, a
    value part, the bias channel) is one line saying what to do.
    """
    replaced = [(name, attn) for name, attn in _attn2_modules(unet).items() if not _is_condvec(attn)]
    if not replaced:
        return
    hidden = (kwargs or {}).get("encoder_hidden_states", args[2] if len(args) > 2 else None)
    if isinstance(hidden, tuple):
        hidden = hidden[0]
    if torch.is_tensor(hidden) and all(hidden.shape[-1] == attn.to_k.in_features for _, attn in replaced):
        return
    replaced = [(name, attn.processor) for name, attn in replaced]
    name, processor = replaced[0]
    hint = next((h for cls, h in _HINTS.items() if isinstance(processor, cls)),
                "set_attn_processor / set_default_attn_processor replaced them: call unet_patch.remove(unet) to use "
                "the UNet without condvec, or unet_patch.install(unet, table) again")
    raise CondvecError(f"condvec's processors were replaced on {len(replaced)} attn2 layer(s) (first: {name} → "
                       f"{type(processor).__name__}), which cannot read this packed conditioning — {hint}")


def remove(unet: torch.nn.Module) -> None:
    """Put back the exact processors that were there before :func:`install`. No-op if nothing is installed.

    A layer whose processor was replaced after :func:`install` (it no longer runs a condvec processor) keeps that
    processor, with a warning naming it: its saved original would be stale.
    """
    guard = unet.__dict__.pop(_GUARD, None)
    if guard is not None:
        guard.remove()
        unet.__dict__.pop("set_default_attn_processor", None)
    restore, replaced = {}, []
    for name, attn in _attn2_modules(unet).items():
        original = attn.__dict__.pop(_ORIGINAL, None)
        if original is None:
            continue
        if _is_condvec(attn):
            restore[name] = original
        else:
            replaced.append(name)
    if restore:
        _set(unet, restore)
    if replaced:
        warnings.warn(
            f"condvec remove: {len(replaced)} attn2 layer(s) got another processor after install (e.g. through "
            f"set_attn_processor) and keep it: {', '.join(replaced[:3])}{' …' if len(replaced) > 3 else ''}",
            stacklevel=2,
        )


@contextmanager
def patched(unet: torch.nn.Module, table: TagTable):
    """Context manager: install for the duration of the block, then restore what was there before.

    Nested use restores the outer table's processors on exit; layers whose processor was replaced inside the block
    keep it (see :func:`remove`).

    Example:
        ```py
        >>> with patched(unet, table):
        ...     out = unet(x, t, encoder_hidden_states=encode(table, ["red circle"])).sample
        ```
    """
    outer = {name: attn.processor for name, attn in _attn2_modules(unet).items() if _is_condvec(attn)}
    install(unet, table)
    try:
        yield unet
    finally:
        if not outer:
            remove(unet)
        else:  # nested: put the outer table's processors (or a layer's original) back where ours still run
            back = {}
            for name, attn in _attn2_modules(unet).items():
                if _is_condvec(attn):
                    back[name] = outer[name] if name in outer else attn.__dict__.pop(_ORIGINAL)
            _set(unet, back)
