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

from conditioner.table import TagTable
from unet_patch.discover import discover
from unet_patch.processor import CondvecAttnProcessor

_ORIGINAL = "_condvec_original_processor"


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
    for layer in layers:
        attn = unet.get_submodule(layer.name)
        if not _is_condvec(attn):
            attn.__dict__[_ORIGINAL] = attn.processor
    _set(unet, {layer.name: CondvecAttnProcessor(slices[layer.name]) for layer in layers})


def remove(unet: torch.nn.Module) -> None:
    """Put back the exact processors that were there before :func:`install`. No-op if nothing is installed.

    A layer whose processor was replaced after :func:`install` (it no longer runs a condvec processor) keeps that
    processor, with a warning naming it: its saved original would be stale.
    """
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
