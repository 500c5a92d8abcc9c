"""Encoding prompts into ONE packed conditioning tensor ``C: (batch, tokens, width)``.

Every sequence is ``[sink] + tags (+ padding)``; the last dimension holds, for every layer group, the key source
(vector mode) or K and V (key/value mode). Two optional extras travel in the same tensor, and only when needed:

- a *value part* (a second ``width`` columns) when a split tag — one whose key and value sources differ — is in
  the batch; tied tags and special rows copy their key source there;
- a *bias channel* (one last column) when a tag has a weight ≠ 1 or padding must be masked: an additive bias on
  that token's attention logits, ``log(weight)`` for tags and ``-inf`` for masked padding.

Without either, a single-group vector table gives a plain ``(batch, tokens, cross_attention_dim)`` tensor that even
an unpatched UNet accepts.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from conditioner.parse import Tag, parse_prompt
from conditioner.table import PAD, SINK, TagTable

SINK_ID, PAD_ID = -1, -2


@dataclass
class TokenBatch:
    """Prompts resolved to table rows, before any tensor is gathered.

    Attributes:
        ids (`torch.LongTensor`): ``(B, N)`` tag row, or ``-1`` for the sink and ``-2`` for padding.
        weights (`torch.Tensor`): ``(B, N)`` attention weights (1 for special rows).
        masked (`torch.BoolTensor`): ``(B, N)`` positions masked out of attention (padding in dynamic length).
        rows (`torch.LongTensor`): ``(K,)`` sorted unique tag rows present in the batch.
        split (`bool`): whether a split tag is present (the packed tensor then carries a value part).
        tags (`list[list[Tag]]`): the parsed tags per prompt (after unknown tags were dropped in lenient mode).
    """

    ids: torch.Tensor
    weights: torch.Tensor
    masked: torch.Tensor
    rows: torch.Tensor
    split: bool
    tags: list[list[Tag]]

    @property
    def needs_bias(self) -> bool:
        return bool(self.masked.any()) or bool((self.weights != 1).any())


def tokenize(
    table: TagTable,
    prompts: list[str] | list[list[Tag]] | str,
    lenient: bool = False,
    pad_to: int | None | str = "table",
) -> TokenBatch:
    """Resolve prompts to table rows.

    Args:
        table (`TagTable`): the table.
        prompts (`list[str] | list[list[Tag]] | str`): prompt strings (parsed with the table's normalisation) or
            already-parsed tags.
        lenient (`bool`, defaults to `False`): skip unknown tags with a warning instead of raising.
        pad_to (`int | None`, defaults to the table's `pad_to`): fixed sequence length; sequences longer than it
            are not cut (there is no tag limit), the batch then pads to the longest. `None` = dynamic length,
            padding masked.

    Raises:
        ValueError: unknown tags (listing them with close matches) or an unparsable prompt.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass at least one prompt ('' is the null prompt)")
    if pad_to == "table":
        pad_to = table.pad_to
    parsed: list[list[Tag]] = []
    unknown: list[str] = []
    for prompt in prompts:
        tags = parse_prompt(prompt, table.normalization) if isinstance(prompt, str) else list(prompt)
        kept = []
        for tag in tags:
            if tag.name in table._index:
                kept.append(tag)
            elif tag.name not in unknown:
                unknown.append(tag.name)
        parsed.append(kept)
    if unknown:
        message = table.unknown_message(unknown)
        if not lenient:
            raise ValueError(message + " (pass lenient=True / --lenient to skip unknown tags)")
        warnings.warn("skipping " + message, stacklevel=2)
    lead = 1 if table.use_sink else 0
    lengths = [lead + len(tags) for tags in parsed]
    n = max(max(lengths), 1)
    if pad_to is not None:
        n = max(n, int(pad_to))
    batch = len(parsed)
    ids = torch.full((batch, n), PAD_ID, dtype=torch.long)
    weights = torch.ones(batch, n)
    masked = torch.zeros(batch, n, dtype=torch.bool)
    split = False
    for b, tags in enumerate(parsed):
        if lead:
            ids[b, 0] = SINK_ID
        for i, tag in enumerate(tags):
            ids[b, lead + i] = table._index[tag.name]
            weights[b, lead + i] = tag.weight
            split = split or tag.name in table.values
        if pad_to is None:
            # dynamic length: padding is masked out, except that a sequence never ends up with nothing to attend to
            start = max(lengths[b], 1)
            masked[b, start:] = True
    rows = torch.unique(ids[ids >= 0])
    return TokenBatch(ids=ids, weights=weights, masked=masked, rows=rows, split=split, tags=parsed)


def anchor_weights(anchors: list[float], timesteps: torch.Tensor) -> torch.Tensor:
    """Linear interpolation weights ``(B, A)`` of each timestep between the two nearest anchors (clamped)."""
    a = torch.tensor(anchors, dtype=torch.float64)
    t = timesteps.detach().to("cpu", torch.float64).reshape(-1).clamp(float(a[0]), float(a[-1]))
    hi = torch.searchsorted(a, t, right=False).clamp(1, len(anchors) - 1)
    lo = hi - 1
    frac = (t - a[lo]) / (a[hi] - a[lo])
    out = torch.zeros(t.shape[0], len(anchors), dtype=torch.float64)
    out.scatter_(1, lo[:, None], (1 - frac)[:, None])
    out.scatter_add_(1, hi[:, None], frac[:, None])
    return out


def _interp(rows: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``rows (..., A, W)`` with per-item weights ``w (..., A)`` → ``(..., W)``."""
    if w is None:
        return rows[..., 0, :]
    return (rows * w.to(rows.dtype)[..., None]).sum(-2)


def pack(
    table: TagTable,
    tokens: TokenBatch,
    timesteps: torch.Tensor | float | None = None,
    rows: torch.Tensor | None = None,
    value_rows: torch.Tensor | None = None,
    special: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather and interpolate a :class:`TokenBatch` into the packed tensor.

    Args:
        table (`TagTable`): the table the tokens came from.
        tokens (`TokenBatch`): from :func:`tokenize`.
        timesteps (`torch.Tensor | float`, *optional*): one timestep per sample (or one for all); required when the
            table has more than one anchor.
        rows (`torch.Tensor`, *optional*): ``(K, A, W)`` data for ``tokens.rows`` to use instead of the table's
            (the trainer passes its differentiable copy of the touched rows).
        value_rows (`torch.Tensor`, *optional*): ``(K, A, W)`` value sources for ``tokens.rows`` when split.
        special (`torch.Tensor`, *optional*): ``(2, A, W)`` sink and padding rows to use instead of the table's.

    Returns:
        `torch.Tensor`: ``(B, N, width [+ width] [+ 1])`` on the table's device and dtype (or ``rows``').
    """
    batch, n = tokens.ids.shape
    source = table.data if rows is None else rows
    device, dtype = source.device, source.dtype
    if rows is None:
        rows = table.data.index_select(0, tokens.rows.to(table.data.device))
    if table.num_anchors > 1:
        if timesteps is None:
            raise ValueError(f"this table has {table.num_anchors} timestep anchors: pass the timesteps to encode")
        t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"got {t.numel()} timesteps for a batch of {batch}")
        w = anchor_weights(table.anchors, t).to(device)  # (B, A)
    else:
        w = None

    ids = tokens.ids.to(device)
    is_tag = ids >= 0
    b_idx, n_idx = is_tag.nonzero(as_tuple=True)
    local = torch.searchsorted(tokens.rows.to(device), ids[b_idx, n_idx])  # index into rows
    special = (table.special if special is None else special).to(device=device, dtype=dtype)

    def assemble(tag_rows: torch.Tensor) -> torch.Tensor:
        tag_vals = _interp(tag_rows[local], None if w is None else w[b_idx])  # (T, W)
        spec = _interp(special[None].expand(batch, -1, -1, -1), None if w is None else w[:, None, :])  # (B, 2, W)
        out = spec[:, PAD, None, :].expand(batch, n, -1)  # (B, N, W)
        if table.use_sink:
            sink = (ids == SINK_ID)[..., None]
            out = torch.where(sink, spec[:, SINK, None, :], out)
        return out.index_put((b_idx, n_idx), tag_vals)

    parts = [assemble(rows)]
    if tokens.split:
        if value_rows is None:
            names = [table.tags[r] for r in tokens.rows.tolist()]
            value_rows = torch.stack(
                [table.values[nm].to(device, dtype) if nm in table.values else rows[i] for i, nm in enumerate(names)]
            )
        parts.append(assemble(value_rows))
    if tokens.needs_bias:
        bias = tokens.weights.to(device=device, dtype=torch.float32).log()
        bias = bias.masked_fill(tokens.masked.to(device), -math.inf)
        parts.append(bias.to(dtype)[..., None])
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0]


def encode(
    table: TagTable,
    prompts: list[str] | str,
    timesteps: torch.Tensor | float | None = None,
    lenient: bool = False,
    pad_to: int | None | str = "table",
) -> torch.Tensor:
    """Encode prompts into one packed conditioning tensor.

    Args:
        table (`TagTable`): the tag table.
        prompts (`list[str] | str`): comma-separated tag prompts; ``""`` is the null (unconditional) prompt.
        timesteps (`torch.Tensor | float`, *optional*): per-sample (or shared) timesteps; needed when the table has
            more than one anchor.
        lenient (`bool`, defaults to `False`): skip unknown tags with a warning instead of raising.
        pad_to (`int | None`, defaults to the table's `pad_to`): fixed length, or `None` for dynamic length.

    Returns:
        `torch.Tensor`: ``(B, N, packed_width)``; feed it as ``encoder_hidden_states`` to a patched UNet.

    Example:
        ```py
        >>> C = encode(table, ["red circle, (large circle:1.5)", ""])
        ```
    """
    return pack(table, tokenize(table, prompts, lenient=lenient, pad_to=pad_to), timesteps)
