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

from conditioner.errors import CondvecError
from conditioner.parse import Tag, parse_prompt
from conditioner.safefile import check_finite
from conditioner.table import TagTable

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

    def select(self, index: slice | list[int]) -> TokenBatch:
        """The prompts at ``index`` (e.g. one process's share of a global batch), same length and row set."""
        picked = range(len(self.tags))[index] if isinstance(index, slice) else index
        return TokenBatch(ids=self.ids[index], weights=self.weights[index], masked=self.masked[index], rows=self.rows,
                          split=self.split, tags=[self.tags[i] for i in picked])


@dataclass
class Rows:
    """The row set :func:`pack` reads: a subset of the table's tag rows, plus its special rows.

    Attributes:
        ids (`torch.LongTensor`): ``(K,)`` sorted unique table rows; must include every row of the tokens packed.
        data (`torch.Tensor`): ``(K, A, W)`` their data (the trainer passes a differentiable copy).
        special (`torch.Tensor`): ``(S, A, W)`` sink (row 0) and padding rows (row ``i`` pads position ``i``; the
            last one pads every later position).
        pooled (`torch.Tensor`, *optional*): ``(K, P)`` the rows' pooled vectors (SDXL tables).
        null_pooled (`torch.Tensor`, *optional*): ``(P,)`` the null prompt's pooled vector (SDXL tables).
    """

    ids: torch.Tensor
    data: torch.Tensor
    special: torch.Tensor
    pooled: torch.Tensor | None = None
    null_pooled: torch.Tensor | None = None

    @classmethod
    def from_table(cls, table: TagTable, ids: torch.Tensor) -> Rows:
        """The table's own data for rows ``ids`` (sorted, unique)."""
        ids = ids.to(table.data.device)
        # advanced indexing: on CPU, index_select over (R, A, W) rows is ~10× slower for wide rows
        pooled = None if table.pooled is None else table.pooled[ids.to(table.pooled.device)]
        data = table.data[ids]
        if table.lazy:  # memory-mapped rows (TagTable.open): checked and made fp32 as they are read
            data, pooled = data.float(), None if pooled is None else pooled.float()
            check_finite(table.source, "data", data, [table.tags[i] for i in ids.tolist()])
        return cls(ids=ids, data=data, special=table.special, pooled=pooled, null_pooled=table.null_pooled)


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
        CondvecError: unknown tags (listing them with close matches) or an unparsable prompt.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise CondvecError("no prompts given: pass at least one prompt ('' is the null prompt)")
    if pad_to == "table":
        pad_to = table.pad_to
    index = table.index
    parsed: list[list[Tag]] = []
    unknown: dict[str, None] = {}
    for prompt in prompts:
        tags = parse_prompt(prompt, table.normalization) if isinstance(prompt, str) else list(prompt)
        kept = [tag for tag in tags if tag.name in index]
        if len(kept) != len(tags):
            unknown.update((t.name, None) for t in tags if t.name not in index)
        parsed.append(kept)
    if unknown:
        message = table.unknown_message(list(unknown))
        if not lenient:
            raise CondvecError(message + " (pass lenient=True / --lenient to skip unknown tags)")
        warnings.warn("skipping " + message, stacklevel=2)
    lead = [SINK_ID] if table.use_sink else []
    rows_of = table.expand if table.vectors else (lambda name: [index[name]])  # multi-vector tags: n positions
    lengths = [len(lead) + sum(len(rows_of(tag.name)) for tag in tags) for tags in parsed]
    n = max(max(lengths), 1)
    if pad_to is not None:
        n = max(n, int(pad_to))
    # build plain lists, then one tensor each (no per-element tensor writes)
    id_lists, weight_lists, splits = [], [], table.values
    for tags, length in zip(parsed, lengths):
        id_lists.append(lead + [row for tag in tags for row in rows_of(tag.name)] + [PAD_ID] * (n - length))
        weight_lists.append([1.0] * len(lead) + [tag.weight for tag in tags for _ in rows_of(tag.name)]
                            + [1.0] * (n - length))
    ids = torch.tensor(id_lists, dtype=torch.long)  # (B, N)
    weights = torch.tensor(weight_lists)  # (B, N)
    if pad_to is None:
        # dynamic length: padding is masked out, except that a sequence never ends up with nothing to attend to
        starts = torch.tensor([max(length, 1) for length in lengths])
        masked = torch.arange(n)[None, :] >= starts[:, None]
    else:
        masked = torch.zeros(len(parsed), n, dtype=torch.bool)
    split = bool(splits) and any(tag.name in splits for tags in parsed for tag in tags)
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


def special_sequence(special: torch.Tensor, num_positions: int, use_sink: bool) -> torch.Tensor:
    """``(N, A, W)`` the special rows a sequence reads where no tag stands.

    The sink (when used) reads special row 0; padding at position ``i`` reads row ``min(i, S - 1)`` (at least 1), so a
    table with one padding row pads every position alike and a table holding a base model's whole null sequence
    reproduces it position by position. Built from slices (no index gather: the rows are wide).
    """
    count = special.shape[0]
    head = special[:min(num_positions, count)] if use_sink else torch.cat([special[1:2], special[1:num_positions]])
    if num_positions > head.shape[0]:
        head = torch.cat([head, special[-1:].expand(num_positions - head.shape[0], -1, -1)])
    return head[:num_positions]


def pack(
    table: TagTable,
    tokens: TokenBatch,
    timesteps: torch.Tensor | float | None = None,
    rows: Rows | None = None,
) -> torch.Tensor:
    """Gather and interpolate a :class:`TokenBatch` into the packed tensor.

    The output is written once: every prompt starts as the special rows' sequence (sink, then padding at each
    position), and the tags' rows are written into their positions.

    Args:
        table (`TagTable`): the table the tokens came from (layout, value sources of split tags).
        tokens (`TokenBatch`): from :func:`tokenize`.
        timesteps (`torch.Tensor | float`, *optional*): one timestep per sample (or one for all); required when the
            table has more than one anchor.
        rows (`Rows`, *optional*): the rows to read; defaults to the table's own rows for ``tokens.rows``. The
            trainer passes its differentiable copies (``Rows(ids, data, special)``); ``ids`` may be a superset.

    Returns:
        `torch.Tensor`: ``(B, N, width [+ width] [+ 1])`` on the rows' device and dtype.
    """
    batch, n = tokens.ids.shape
    # an in-memory table read directly: each tag row is copied once, straight from the table into the output
    direct = rows is None and type(table.data) is torch.Tensor and not table.lazy and not tokens.split
    if rows is None and not direct:
        rows = Rows.from_table(table, tokens.rows)
    source = table.data if direct else rows.data
    device, dtype = source.device, source.dtype
    if table.num_anchors > 1:
        if timesteps is None:
            raise CondvecError(f"this table has {table.num_anchors} timestep anchors: pass the timesteps to encode")
        t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise CondvecError(f"got {t.numel()} timesteps for a batch of {batch}")
        w = anchor_weights(table.anchors, t).to(device, dtype)  # (B, A)
    else:
        w = None
    special = (table.special if direct else rows.special).to(device=device, dtype=dtype)
    base = special_sequence(special, n, table.use_sink) if w is not None else None  # (N, A, W)
    ids = tokens.ids.to(device)
    b_idx, n_idx = (ids >= 0).nonzero(as_tuple=True)  # (T,) each: where the tags stand
    # (T,) each tag's row: in the table itself, or its place in rows.ids
    local = ids[b_idx, n_idx] if direct else torch.searchsorted(rows.ids.to(device), ids[b_idx, n_idx])

    def gather(data: torch.Tensor) -> torch.Tensor:
        """The special rows' sequence for every prompt, tag rows written in: one copy of the output's bytes."""
        if w is None:  # the special rows written straight into the output (as special_sequence orders them)
            out = special.new_empty(batch, n, special.shape[-1])  # (B, N, W)
            count = min(n, special.shape[0])
            out[:, 0] = special[0 if table.use_sink else 1, 0]
            if count > 1:
                out[:, 1:count] = special[1:count, 0]
            if n > count:
                out[:, count:] = special[-1, 0]
            return out.index_put_((b_idx, n_idx), data[local, 0])
        out = torch.einsum("naw,ba->bnw", base, w)  # (B, N, W)
        return out.index_put_((b_idx, n_idx), torch.einsum("taw,ta->tw", data[local], w[b_idx]))

    parts = [gather(source)]
    if tokens.split:
        names = [table.tags[r] for r in rows.ids.tolist()]
        values = [table.values[nm].to(device, dtype) if nm in table.values else rows.data[k]
                  for k, nm in enumerate(names)]
        parts.append(gather(torch.stack(values) if values else rows.data))
    if tokens.needs_bias:
        bias = tokens.weights.to(device=device, dtype=torch.float32).log()
        bias = bias.masked_fill(tokens.masked.to(device), -math.inf)
        parts.append(bias.to(dtype)[..., None])
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0]


def encode_pooled(table: TagTable, prompts: list[str] | str, lenient: bool = False) -> torch.Tensor:
    """The pooled vector of each prompt (SDXL's ``text_embeds``): the weighted mean of its tags' pooled vectors.

    A prompt's tags combine by their weights (``(tag:1.5)`` counts 1.5×); a prompt without tags (``""``) gets the
    table's null pooled vector, exactly what the base model's pipeline computed for ``""`` at bootstrap.

    Args:
        table (`TagTable`): a table with pooled vectors (SDXL family).
        prompts (`list[str] | str`): tag prompts.
        lenient (`bool`, defaults to `False`): skip unknown tags with a warning instead of raising.

    Returns:
        `torch.Tensor`: ``(B, P)``; pass it as ``pooled_prompt_embeds`` / ``added_cond_kwargs["text_embeds"]``.
    """
    if table.pooled is None:
        raise CondvecError("this table has no pooled vectors: only SDXL-family tables (bootstrapped from an SDXL "
                           "model or built for an SDXL UNet) carry them")
    return pack_pooled(tokenize(table, prompts, lenient=lenient, pad_to=None), table=table)


def pack_pooled(tokens: TokenBatch, rows: Rows | None = None, table: TagTable | None = None) -> torch.Tensor:
    """``(B, P)`` pooled vectors of tokenised prompts from ``rows`` (differentiable; see :func:`encode_pooled`)."""
    if rows is None:
        rows = Rows.from_table(table, tokens.rows)
    device = rows.pooled.device
    ids = tokens.ids.to(device)
    is_tag = ids >= 0
    weights = torch.where(is_tag, tokens.weights.to(device), 0.0).to(rows.pooled.dtype)  # (B, N)
    local = torch.searchsorted(rows.ids.to(device), ids.clamp(min=0)).clamp(max=max(len(rows.ids) - 1, 0))
    source = rows.pooled[local] if len(rows.ids) else rows.pooled.new_zeros(*ids.shape, rows.null_pooled.shape[0])
    summed = torch.einsum("bn,bnp->bp", weights, source)  # (B, P)
    total = weights.sum(1, keepdim=True)  # (B, 1)
    return torch.where(total > 0, summed / total.clamp(min=1e-12), rows.null_pooled.to(summed).expand_as(summed))


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
