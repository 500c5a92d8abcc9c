"""Tables bootstrapped from a model's own text encoder(s), and embeddings imported as tags.

A bootstrapped table starts where the base model is: its special rows hold the model's whole null sequence (the
encoding of ``""``, position by position: the sink is position 0, padding at position ``i`` is position ``i``), so
for a single-group table with ``pad_to: 77`` ``encode(table, [""])`` is exactly the stock pipeline's null
``prompt_embeds``; each tag starts from the encoder's encoding of the prompt made of that tag alone, read at the
positions :func:`bootstrap.text.tag_positions` documents; SDXL tables also get each tag's pooled vector and the null
prompt's. Per-layer tables start from the same vectors in every group; key/value tables from each layer's
``to_k`` / ``to_v`` of them. After bootstrap the text encoders are not needed again.
"""

from __future__ import annotations

import torch

from bootstrap.embeddings import Embedding, encode_input_embedding
from bootstrap.text import null_sequence, tag_vectors
from conditioner.errors import CondvecError
from conditioner.modes import VECTOR, table_mode
from conditioner.parse import TagNormalization
from conditioner.regroup import regroup
from conditioner.table import TagTable
from conditioner.table_layout import BOOTSTRAP_GROUPS, Layout, layout_from
from unet_patch.discover import discover
from unet_patch.kv import kv_table
from unet_patch.load import BaseModel

#: kohya XTI block names that differ from condvec's kohya layer names.
_XTI_ALIASES = {"MID": "M00"}


def bootstrap_table(
    model: BaseModel,
    tags: list[str],
    layout: Layout | None = None,
    batch_size: int = 256,
    progress: bool = True,
    normalization: TagNormalization | None = None,
    **layout_fields,
) -> TagTable:
    """A table for ``model`` with ``tags``, every vector taken from the model's own text encoder(s).

    Args:
        model (`BaseModel`): from ``unet_patch.load_model`` with its text encoders.
        tags (`list[str]`): tag names (normalised with the default normalisation; duplicates dropped).
        layout (`Layout`, *optional*, defaults to ``Layout.pretrained()``: one group, 77 positions, one vector per
            tag): every group starts from the same vectors; a kv layout gets each layer's K and V of them;
            ``tokens_per_tag`` vectors from the tag's tokens, then ``context_rows`` from its EOS and padding
            positions (see :func:`bootstrap.text.tag_vectors`) — the tag's own share of what CLIP spreads over EOS
            and padding, which ``--distill`` then teaches to compose.
        batch_size (`int`, defaults to 256): tags per encoder forward.
        progress (`bool`, defaults to `True`): show progress bars.
        normalization (`TagNormalization`, *optional*): tag-name normalisation (default: lower case, `_` → space).
        **layout_fields: single layout fields (``groups="layers"``, ``tokens_per_tag=4``, …) replacing ``layout``'s.
    """
    layout = layout_from(layout, Layout.pretrained(), layout_fields)
    null = null_sequence(model)
    layers = discover(model.unet)
    boot = {"encoder": null.source, "tokens_per_tag": layout.tokens_per_tag}
    table = TagTable.create(layers, layout=layout.replace(groups=BOOTSTRAP_GROUPS, mode=VECTOR),
                            num_train_timesteps=model.scheduler.config.num_train_timesteps,
                            normalization=normalization,
                            base_model={"name": model.name, "path": model.path, "family": model.family,
                                        "bootstrap": boot | ({"context_rows": layout.context_rows}
                                                             if layout.context_rows else {})})
    table.special = null.sequence[:, None, :].expand(-1, table.num_anchors, -1).clone()  # (77, A, D)
    if null.pooled is not None:
        table.pooled, table.null_pooled = null.pooled.new_zeros(0, null.pooled.shape[0]), null.pooled.clone()
    table.negative_zeros = null.negative_zeros
    add_bootstrapped_tags(table, model, tags, batch_size=batch_size, progress=progress)
    if layout.groups != BOOTSTRAP_GROUPS:
        table = regroup(table, layout.groups)
    return kv_table(table, model.unet) if table_mode(layout.mode).direct_kv else table


def add_bootstrapped_tags(table: TagTable, model: BaseModel, tags: list[str], layout: Layout | None = None,
                          batch_size: int = 256, progress: bool = True, **layout_fields) -> list[str]:
    """Add the tags not yet in ``table``, each from the encoder's encoding of the tag; returns them.

    Every group of a vector table gets the same vectors; a key/value table gets each layer's K and V of them; SDXL
    tables also get each tag's pooled vector. Each new tag gets ``layout.tokens_per_tag`` token vectors and
    ``layout.context_rows`` context rows; ``layout`` defaults to the table's own (``Layout.of(table)``: what it
    was bootstrapped with), so tags added to a distilled table are blocks like its own.
    """
    layout = layout_from(layout, Layout.of(table), layout_fields)
    if table.mode_spec.direct_kv:
        names = [n for n in dict.fromkeys(table.normalization.apply(t) for t in tags) if n and n not in table]
        if not names:
            return []
        staging = kv_table(bootstrap_table(model, names, layout=layout.replace(groups=BOOTSTRAP_GROUPS, mode=VECTOR),
                                           batch_size=batch_size, progress=progress,
                                           normalization=table.normalization), model.unet)
        rows = table.add_tags(names, vectors=layout.vectors)
        source = [r for n in names for r in staging.expand(n)]
        table.data[rows] = staging.data[source].to(**_like(table.data))
        if table.pooled is not None and staging.pooled is not None:
            table.pooled[rows] = staging.pooled[source].to(**_like(table.pooled))
        return names
    names = list(dict.fromkeys(table.normalization.apply(t) for t in tags if table.normalization.apply(t)))
    names = [n for n in names if n not in table]
    if not names:
        return []
    _check_distinct_ids(model, names)
    encoded = tag_vectors(model, names, tokens_per_tag=layout.tokens_per_tag, batch_size=batch_size,
                          progress=progress, context_rows=layout.context_rows)
    rows = table.add_tags(names, vectors=layout.vectors)
    vectors = encoded.vectors.reshape(-1, encoded.vectors.shape[-1])  # (T·n, D), rows in add order
    _set_rows(table, rows, vectors)
    if table.pooled is not None and encoded.pooled is not None:  # every vector of a tag carries the tag's pooled
        table.pooled[rows] = encoded.pooled.repeat_interleave(layout.vectors, 0).to(**_like(table.pooled))
    return names


def _like(rows) -> dict:
    """``Tensor.to`` arguments for ``rows``' device and dtype (row tensors and disk-backed rows alike)."""
    return {"device": rows.device, "dtype": rows.dtype}


def _check_distinct_ids(model: BaseModel, names: list[str]) -> None:
    """Refuse tags the model's tokenizer cannot tell apart: they would all get the same vector."""
    tokenizer = model.tokenizers[0]
    seen: dict[tuple[int, ...], str] = {}
    for name in names:
        ids = tuple(tokenizer(name, truncation=True, max_length=tokenizer.model_max_length).input_ids)
        if ids in seen:
            raise CondvecError(f"the model's tokenizer gives {seen[ids]!r} and {name!r} the same token ids "
                               f"{list(ids)}: they would get the same vector; is the tokenizer (vocab.json, "
                               "merges.txt) the model's own?")
        seen[ids] = name


def _set_rows(table: TagTable, rows: list[int], vectors: torch.Tensor) -> None:
    """Give rows ``(K,)`` the same vector ``(K, D)`` in every group and anchor."""
    width = vectors.shape[-1]
    if width != table.dim:
        raise CondvecError(f"vectors of width {width} do not fit this table (cross_attention_dim {table.dim})")
    tiled = vectors.repeat(1, len(table.group_names))  # (K, G·D)
    table.data[rows] = tiled[:, None, :].expand(-1, table.num_anchors, -1).to(**_like(table.data))


def import_embedding(table: TagTable, embedding: Embedding, name: str, model: BaseModel | None = None) -> list[int]:
    """Add an embedding file's vectors to ``table`` as tag ``name`` (one vector per token of the embedding).

    - output-space vectors (OneTrainer ``*_out``) go in directly (SDXL: ``clip_l_out`` and ``clip_g_out``
      concatenated);
    - input-space vectors (A1111, kohya, diffusers, OneTrainer textual inversion) go through the model's text
      encoder(s) exactly as the stock pipeline encodes the token after ``load_textual_inversion`` (SD1.x / SD2.x:
      last hidden state; SDXL: both encoders' penultimate states, concatenated);
    - kohya XTI: each block's vectors through the encoder on their own, into that block's layers (the table must
      group by layer, or by groups whose layers all share one XTI block).

    SDXL tags imported this way take the null prompt's pooled vector (the file has none).

    Returns:
        `list[int]`: the rows of the new tag.
    """
    if table.mode_spec.direct_kv:
        raise CondvecError("import embeddings into a vector-mode table, then convert it with unet_patch.kv_table")
    name = table.normalization.apply(name)
    if name in table:
        raise CondvecError(f"tag {name!r} is already in the table: choose another --name or drop it first")
    if embedding.kind == "output":
        parts = [embedding.clip_l_out, embedding.clip_g_out]
        vectors = torch.cat([p for p in parts if p is not None], -1)
        rows = table.add_tags([name], vectors=vectors.shape[0])
        _set_rows(table, rows, vectors)
        return rows
    if model is None:
        raise CondvecError(f"{embedding.format} holds input-space vectors: they must go through the model's text "
                           "encoder (pass the model, --model MODEL)")
    if embedding.kind == "input":
        vectors = _through_encoders(model, [embedding.clip_l, embedding.clip_g])
        rows = table.add_tags([name], vectors=vectors.shape[0])
        _set_rows(table, rows, vectors)
        return rows
    return _import_xti(table, embedding, name, model)


def _through_encoders(model: BaseModel, inputs: list[torch.Tensor | None]) -> torch.Tensor:
    """Input-space vectors → output space, per encoder as the model's pipeline reads it; ``(N, D)``."""
    sdxl = model.family == "sdxl"
    needed = 2 if sdxl else 1
    if len(model.text_encoders) < needed:
        raise CondvecError(f"model {model.name!r} was loaded without its text encoder(s): they are needed to import "
                           "input-space embeddings")
    if sum(v is not None for v in inputs[:needed]) != needed:
        raise CondvecError("an SDXL model needs both clip_l and clip_g vectors" if sdxl else
                           "this embedding has no vectors for the model's text encoder (clip_l)")
    outs = [encode_input_embedding(enc, tok, vec, hidden_layer=-2 if sdxl else None)
            for enc, tok, vec in zip(model.text_encoders, model.tokenizers, inputs[:needed])]
    return torch.cat(outs, -1).float()


def _import_xti(table: TagTable, embedding: Embedding, name: str, model: BaseModel) -> list[int]:
    by_kohya = {_XTI_ALIASES.get(k, k): v for k, v in embedding.layers.items()}
    per_layer = []
    for layer in table.layers:
        if layer.kohya not in by_kohya:
            raise CondvecError(f"XTI file has no vectors for layer {layer.short} (kohya {layer.kohya}); it fits "
                               "SD1.x UNets, whose 16 layers are IN01 … OUT11")
        per_layer.append(_through_encoders(model, [by_kohya[layer.kohya], None]))  # (N, D)
    count = per_layer[0].shape[0]
    rows = table.add_tags([name], vectors=count)
    for g in range(len(table.group_names)):
        members = [li for li, group in enumerate(table.layer_group) if group == g]
        vectors = torch.stack([per_layer[li] for li in members]).double().mean(0).to(table.data)  # (N, D)
        table.data[rows, :, table.group_columns(g)] = vectors[:, None, :].expand(-1, table.num_anchors, -1)
    return rows
