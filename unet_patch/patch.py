"""Install and remove condvec processors on a UNet's attn2 layers (through ``set_attn_processor`` only)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from conditioner.table import TagTable
from unet_patch.discover import discover
from unet_patch.processor import CondvecAttnProcessor

_ORIGINALS = "_condvec_original_processors"


def is_installed(unet: torch.nn.Module) -> bool:
    """Whether condvec processors are installed on this UNet."""
    return _ORIGINALS in unet.__dict__


def install(unet: torch.nn.Module, table: TagTable) -> None:
    """Replace every attn2 processor with one that reads its slice of the packed conditioning.

    The original processors are kept (the same objects) and :func:`remove` puts them back, so removal is exact by
    construction. Installing again (e.g. another table) replaces the condvec processors and keeps the originals.

    Args:
        unet (`torch.nn.Module`): a diffusers ``UNet2DConditionModel``.
        table (`TagTable`): the table whose layout the processors follow.

    Raises:
        TableMismatchError: the table was built for other layers or dims; the message says what differs.
    """
    layers = discover(unet)
    table.check_layers(layers)
    slices = table.layer_slices()
    originals = unet.__dict__.get(_ORIGINALS) or dict(unet.attn_processors)
    processors = dict(originals)
    for layer in layers:
        processors[f"{layer.name}.processor"] = CondvecAttnProcessor(slices[layer.name])
    unet.set_attn_processor(dict(processors))  # set_attn_processor consumes the dict it is given
    unet.__dict__[_ORIGINALS] = originals


def remove(unet: torch.nn.Module) -> None:
    """Put back the exact processors that were there before :func:`install`. No-op if nothing is installed."""
    originals = unet.__dict__.pop(_ORIGINALS, None)
    if originals is not None:
        unet.set_attn_processor(dict(originals))


@contextmanager
def patched(unet: torch.nn.Module, table: TagTable):
    """Context manager: install for the duration of the block, then restore what was there before.

    Example:
        ```py
        >>> with patched(unet, table):
        ...     out = unet(x, t, encoder_hidden_states=encode(table, ["red circle"])).sample
        ```
    """
    previous = unet.__dict__.get(_ORIGINALS)
    previous_processors = dict(unet.attn_processors) if previous is not None else None
    install(unet, table)
    try:
        yield unet
    finally:
        if previous_processors is None:
            remove(unet)
        else:  # nested use: restore the outer table's processors
            unet.set_attn_processor(dict(previous_processors))
