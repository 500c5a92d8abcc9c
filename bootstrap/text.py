"""What a base model's own text encoders compute, exactly as the stock diffusers pipelines compute it.

Two things start a condvec table from a pretrained model:

- :func:`null_sequence`: the encoding of the empty prompt ``""`` at all 77 positions (the attention sink, the
  padding and the unconditional half of CFG), plus SDXL's pooled vector and whether the pipeline zeroes the negative;
- :func:`tag_vectors`: each tag's starting vectors, read from the encoding of the prompt made of that tag alone.

Both run the prompt through the same code path as ``StableDiffusionPipeline.encode_prompt`` /
``StableDiffusionXLPipeline.encode_prompt`` (without ``clip_skip``), so the numbers are bit-identical to what the
stock pipeline would feed the UNet:

- SD1.x and SD2.x: ``text_encoder(input_ids)[0]``, the last hidden state after the final layer norm. For SD2.x that
  *is* OpenCLIP's penultimate layer: diffusers' SD2 repos store a ``text_encoder`` with 23 of OpenCLIP-H's 24 layers,
  and the pipeline takes its last hidden state, exactly as for SD1.x;
- SDXL: ``hidden_states[-2]`` (penultimate layer, no final layer norm) of ``text_encoder`` and of ``text_encoder_2``,
  concatenated on the last dim (768 + 1280 = 2048); pooled: ``text_encoder_2``'s projected ``text_embeds``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from conditioner.errors import CondvecError
from unet_patch.load import BaseModel


@dataclass
class NullEncoding:
    """The stock pipeline's encoding of the empty prompt.

    Attributes:
        sequence (`torch.Tensor`): `(77, D)` float32 on CPU, the pipeline's `prompt_embeds` for `""`; position 0 is
            the attention sink (BOS), position i the padding at position i.
        pooled (`torch.Tensor | None`): `(P,)` SDXL's `pooled_prompt_embeds` for `""` (P = 1280 for SDXL);
            `None` for SD1.x / SD2.x.
        negative_zeros (`bool`): the pipeline uses zeros for `negative_prompt_embeds` and
            `negative_pooled_prompt_embeds` when no negative prompt is given (SDXL `force_zeros_for_empty_prompt`);
            otherwise the negative is `sequence` / `pooled`.
        source (`str`): which encoder(s) and layer the vectors come from, to record in a table.
    """

    sequence: torch.Tensor
    pooled: torch.Tensor | None
    negative_zeros: bool
    source: str

    @property
    def negative_sequence(self) -> torch.Tensor:
        """`(77, D)`: what the pipeline uses as `negative_prompt_embeds` when no negative prompt is given."""
        return torch.zeros_like(self.sequence) if self.negative_zeros else self.sequence

    @property
    def negative_pooled(self) -> torch.Tensor | None:
        """`(P,)` or `None`: the pipeline's `negative_pooled_prompt_embeds` when no negative prompt is given."""
        if self.pooled is None:
            return None
        return torch.zeros_like(self.pooled) if self.negative_zeros else self.pooled


@dataclass
class TagEncoding:
    """Each tag's starting vectors, from the encoding of the prompt made of that tag alone.

    Attributes:
        vectors (`torch.Tensor`): `(T, tokens_per_tag, D)` float32 on CPU (see :func:`tag_vectors` for the positions).
        pooled (`torch.Tensor | None`): `(T, P)` SDXL's `text_embeds` of `text_encoder_2` for each tag; `None` for
            SD1.x / SD2.x.
        positions (`torch.Tensor`): `(T, tokens_per_tag)` int64, the sequence position each vector was read from.
        token_counts (`torch.Tensor`): `(T,)` int64, how many tokens each tag has (after truncation to 75).
        source (`str`): which encoder(s) and layer the vectors come from, to record in a table.
    """

    vectors: torch.Tensor
    pooled: torch.Tensor | None
    positions: torch.Tensor
    token_counts: torch.Tensor
    source: str


def encoding_source(model: BaseModel) -> str:
    """Which encoder(s) and layer the pipeline reads for this model's family, as recorded in a table."""
    if model.family == "sdxl":
        return ("text_encoder.hidden_states[-2] + text_encoder_2.hidden_states[-2] (concatenated); "
                "pooled: text_encoder_2.text_embeds")
    return "text_encoder.last_hidden_state"


def _check_encoders(model: BaseModel) -> None:
    expected = 2 if model.family == "sdxl" else 1
    if len(model.text_encoders) != expected or len(model.tokenizers) != expected:
        raise CondvecError(f"model {model.name!r} ({model.family}) has {len(model.text_encoders)} text encoder(s) "
                           f"loaded, {expected} needed to bootstrap: load it with with_text_encoders=True from a "
                           "folder (or config folder) that has text_encoder/ + tokenizer/"
                           + (" and text_encoder_2/ + tokenizer_2/" if expected == 2 else ""))


def _tokenize(tokenizer, prompts: list[str]) -> dict:
    # As the pipelines do: pad to the tokenizer's max length (77), truncate longer prompts.
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")


@torch.no_grad()
def _encode(model: BaseModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """`(B, 77, D)` prompt_embeds, `(B, P)` pooled or None, and each tokenizer's input ids — the pipeline's path."""
    if model.family != "sdxl":
        tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
        inputs = _tokenize(tokenizer, prompts)
        attention_mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            attention_mask = inputs.attention_mask.to(encoder.device)
        embeds = encoder(inputs.input_ids.to(encoder.device), attention_mask=attention_mask)[0]
        return embeds.to(dtype=encoder.dtype), None, [inputs.input_ids]
    states, ids, pooled = [], [], None
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
        inputs = _tokenize(tokenizer, prompts)
        out = encoder(inputs.input_ids.to(encoder.device), output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:  # text_embeds of the encoder with a projection
            pooled = out[0]
        states.append(out.hidden_states[-2])
        ids.append(inputs.input_ids)
    if pooled is None:
        raise CondvecError(f"model {model.name!r}: neither SDXL text encoder has a projection (text_embeds); "
                           "text_encoder_2 must be a CLIPTextModelWithProjection")
    embeds = torch.cat(states, dim=-1).to(dtype=model.text_encoders[-1].dtype)
    return embeds, pooled, ids


def null_sequence(model: BaseModel) -> NullEncoding:
    """The stock pipeline's `prompt_embeds` (and SDXL `pooled_prompt_embeds`) for the empty prompt `""`.

    Equal (`torch.equal`, CPU) to `StableDiffusionPipeline.encode_prompt("")[0][0]` for SD1.x / SD2.x and to
    `StableDiffusionXLPipeline.encode_prompt("")[0][0]` / `[2][0]` for SDXL, at all 77 positions; see the module
    docstring for the layers.

    Args:
        model (`BaseModel`): a model loaded with its text encoders.

    Returns:
        `NullEncoding`; `.negative_zeros` mirrors the pipeline's `force_zeros_for_empty_prompt` (SDXL): then the
        negative conditioning for an absent negative prompt is zeros, not this encoding.
    """
    _check_encoders(model)
    embeds, pooled, _ = _encode(model, [""])
    return NullEncoding(
        sequence=embeds[0].float().cpu(),
        pooled=pooled[0].float().cpu() if pooled is not None else None,
        negative_zeros=bool(model.force_zeros_for_empty_prompt),
        source=encoding_source(model),
    )


def tag_positions(token_count: int, tokens_per_tag: int) -> list[int]:
    """The sequence positions a tag's vectors are read from (BOS at 0, the tag's tokens at 1…k, EOS at k + 1).

    With `k = token_count` and `n = tokens_per_tag`:

    - `k == n`: the tag's own token positions `1 … k`;
    - `k < n`: the token positions `1 … k`, then the EOS position `k + 1` for the remaining `n - k` slots;
    - `k > n`: the tokens are split into `n` consecutive chunks as equal as possible, and slot `i` takes the
      position of the *last* token of chunk `i`, `ceil((i + 1) · k / n)`. For `n = 1` that is the tag's last token.

    Why: a token position's output carries its word, and CLIP's attention is causal, so the last token of a chunk
    has read the whole chunk and everything before it: "blue hair" at the position of "hair" is hair that is blue,
    and a rare word split into pieces is complete only at its last piece (its first piece alone knows nothing of the
    rest). Taking that position keeps a real encoder output, with the norm and statistics the UNet saw at word
    positions; a mean of positions would shrink the norm and mix in incomplete prefixes. EOS summarises the whole
    prompt (it is what CLIP pools), so it fills slots for which the tag has no token of its own.

    Args:
        token_count (`int`): the tag's token count without BOS / EOS (0 to 75).
        tokens_per_tag (`int`): how many vectors the tag owns (≥ 1).
    """
    if tokens_per_tag < 1:
        raise CondvecError(f"tokens_per_tag must be ≥ 1, got {tokens_per_tag}")
    k, n = token_count, tokens_per_tag
    if k > n:
        return [math.ceil((i + 1) * k / n) for i in range(n)]
    return list(range(1, k + 1)) + [k + 1] * (n - k)


def _context_positions(eos: int, count: int, length: int) -> list[int]:
    """``count`` positions from the EOS at ``eos`` on (EOS, then padding), the last one repeated past the end."""
    return [min(eos + i, length - 1) for i in range(count)]


def tag_vectors(model: BaseModel, tags: list[str], tokens_per_tag: int = 1, batch_size: int = 256,
                progress: bool = True, context_rows: int = 0) -> TagEncoding:
    """Each tag's starting vectors: the pipeline's encoding of the prompt `tag`, read at the tag's token positions.

    Each tag is encoded alone, as the prompt `tag`, through exactly the pipeline's path (same tokenizer padding and
    truncation, same encoder(s) and layer, SDXL's concatenation); the vectors are that `prompt_embeds` row at the
    positions given by :func:`tag_positions`: the tag's own token positions when it has `tokens_per_tag` tokens, EOS
    for the slots a shorter tag cannot fill, and for a longer tag the last token of each of `tokens_per_tag`
    consecutive chunks (with one vector per tag: its last token, which has read the whole tag through CLIP's causal
    attention). Tags longer than 75 tokens are truncated as the pipeline truncates them.

    Args:
        model (`BaseModel`): a model loaded with its text encoders.
        tags (`list[str]`): tag texts, each encoded as written (normalise them before, as the table does).
        tokens_per_tag (`int`, *optional*, defaults to 1): vectors per tag.
        batch_size (`int`, *optional*, defaults to 256): prompts per encoder forward.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm progress bar.
        context_rows (`int`, *optional*, defaults to 0): after the token vectors, this many more from the tag's EOS
            position and the padding positions after it (``k + 1, k + 2, …``): the tag as a block, the way CLIP
            spreads a prompt over EOS and padding (A1111's ``BREAK`` gives each chunk its own).

    Returns:
        `TagEncoding` with `vectors (T, tokens_per_tag + context_rows, D)`, SDXL `pooled (T, P)`
        (`text_encoder_2`'s `text_embeds` of the prompt `tag`, else `None`), and the positions read.
    """
    from tqdm.auto import tqdm

    _check_encoders(model)
    if batch_size < 1:
        raise CondvecError(f"batch_size must be ≥ 1, got {batch_size}")
    length = min(tokenizer.model_max_length for tokenizer in model.tokenizers)
    if not 1 <= tokens_per_tag <= length - 2:
        raise CondvecError(f"tokens_per_tag must be between 1 and {length - 2} (the tokenizer's {length} positions "
                           f"less BOS and EOS), got {tokens_per_tag}")
    if not 0 <= context_rows <= length - 1:
        raise CondvecError(f"context_rows must be between 0 and {length - 1} (EOS and the padding after it), got "
                           f"{context_rows}")
    tags = list(tags)
    eos_ids = [tokenizer.eos_token_id for tokenizer in model.tokenizers]
    vectors, pooled, positions, counts = [], [], [], []
    bar = tqdm(total=len(tags), desc="encoding tags", unit="tag", disable=not progress)
    for start in range(0, len(tags), batch_size):
        batch = tags[start:start + batch_size]
        embeds, batch_pooled, ids = _encode(model, batch)
        # The EOS position in each tokenizer's ids (first EOS after BOS; padding may also be EOS).
        eos = [(tok_ids[:, 1:] == eos_id).int().argmax(dim=1) + 1 for tok_ids, eos_id in zip(ids, eos_ids)]
        if any(not torch.equal(eos[0], other) for other in eos[1:]):
            raise CondvecError(f"model {model.name!r}: its two tokenizers split some of these tags into different "
                               "numbers of tokens; the SDXL tokenizers must share a vocabulary")
        batch_positions = torch.tensor([tag_positions(int(e) - 1, tokens_per_tag)
                                        + _context_positions(int(e), context_rows, embeds.shape[1]) for e in eos[0]],
                                       dtype=torch.long).reshape(len(batch), tokens_per_tag + context_rows)
        rows = torch.arange(len(batch)).unsqueeze(1)  # (B, 1)
        vectors.append(embeds.float().cpu()[rows, batch_positions])  # (B, n, D)
        positions.append(batch_positions)
        counts.append(eos[0] - 1)
        if batch_pooled is not None:
            pooled.append(batch_pooled.float().cpu())
        bar.update(len(batch))
    bar.close()
    width = model.unet.config.cross_attention_dim if not vectors else vectors[0].shape[-1]
    return TagEncoding(
        vectors=torch.cat(vectors) if vectors else torch.zeros(0, tokens_per_tag + context_rows, width),
        pooled=(torch.cat(pooled) if pooled else torch.zeros(0, model.text_encoders[-1].config.projection_dim))
        if model.family == "sdxl" else None,
        positions=torch.cat(positions) if positions else torch.zeros(0, tokens_per_tag + context_rows,
                                                                         dtype=torch.long),
        token_counts=torch.cat(counts).long() if counts else torch.zeros(0, dtype=torch.long),
        source=encoding_source(model),
    )
