"""Read the embedding files Stable Diffusion users already have, safely, and encode input-space vectors.

Two kinds of vectors live in these files, and they must not be confused:

- *input-space* vectors (textual inversion as A1111, kohya, diffusers and OneTrainer train it) are rows of the text
  encoder's token-embedding matrix. The UNet never sees them: they become conditioning only after the text encoder
  has run over them, with position embeddings and causal attention. :func:`encode_input_embedding` does that run,
  exactly as the stock pipeline does after ``load_textual_inversion``.
- *output-space* vectors (OneTrainer's ``emp_params_out`` / ``clip_l_out`` / ``clip_g_out``) replace the encoder's
  output at the token's positions; they are already in the UNet's conditioning space.

kohya's XTI files hold one set of input-space vectors per UNet cross-attention block (``IN01`` … ``OUT11``): kohya
trains token embeddings per block and runs the text encoder once per block, so each block's vectors go through
:func:`encode_input_embedding` on their own; :data:`XTI_DIFFUSERS_BLOCKS` names the diffusers attention module
of each block.

Files are read without unpickling anything: ``.safetensors`` through safetensors; PyTorch files (``.pt``, ``.bin``,
…) only through ``torch.load(weights_only=True)``, whose restricted unpickler admits tensors, containers, numbers and
strings and refuses any other class before running it.

Example:
    ```py
    >>> emb = read_embedding("embeddings/my_style.safetensors")
    >>> emb.kind, emb.format, emb.clip_l.shape
    ('input', 'A1111 textual inversion (string_to_param)', torch.Size([4, 768]))
    >>> vectors = encode_input_embedding(text_encoder, tokenizer, emb.clip_l)  # (4, 768), SD1.x last hidden state
    ```
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from torch import Tensor

from conditioner.errors import CondvecError

__all__ = [
    "MAX_EMBEDDING_BYTES",
    "XTI_DIFFUSERS_BLOCKS",
    "XTI_LAYERS",
    "Embedding",
    "EmbeddingFormatError",
    "encode_input_embedding",
    "read_embedding",
]

# kohya sd-scripts' XTI block names, in the order its train_textual_inversion_XTI.py saves them.
XTI_LAYERS = ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
              "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")

# Each XTI block → the diffusers module holding that block's cross-attention (SD1.x / SD2.x UNets; the attn2 layer is
# ``<module>.transformer_blocks.0.attn2``). kohya numbers the LDM input / output blocks: IN01 is input block 1,
# the first down block's first attention; OUT03 … OUT11 are the nine attentions of up blocks 1–3.
XTI_DIFFUSERS_BLOCKS = {
    "IN01": "down_blocks.0.attentions.0", "IN02": "down_blocks.0.attentions.1",
    "IN04": "down_blocks.1.attentions.0", "IN05": "down_blocks.1.attentions.1",
    "IN07": "down_blocks.2.attentions.0", "IN08": "down_blocks.2.attentions.1",
    "MID": "mid_block.attentions.0",
    "OUT03": "up_blocks.1.attentions.0", "OUT04": "up_blocks.1.attentions.1", "OUT05": "up_blocks.1.attentions.2",
    "OUT06": "up_blocks.2.attentions.0", "OUT07": "up_blocks.2.attentions.1", "OUT08": "up_blocks.2.attentions.2",
    "OUT09": "up_blocks.3.attentions.0", "OUT10": "up_blocks.3.attentions.1", "OUT11": "up_blocks.3.attentions.2",
}

# An embedding is a few KB (75 vectors of 2048 floats is 600 KB); anything near this size is something else.
MAX_EMBEDDING_BYTES = 64 * 2**20

SUPPORTED_FORMATS = (
    "kohya XTI (IN01 … OUT11), A1111 (string_to_param), SDXL (clip_l + clip_g), kohya (emb_params), "
    "OneTrainer (emp_params / emp_params_out, clip_l_out / clip_g_out), diffusers (one key named after the token)"
)


class EmbeddingFormatError(CondvecError):
    """An embedding file that cannot be read: unsafe, too large, an unknown layout or wrongly shaped vectors."""


@dataclass
class Embedding:
    """The vectors of one embedding file, in one normalised form.

    Every tensor is a detached, contiguous float32 CPU tensor of shape ``(N, D)`` (``N`` vectors per token).

    Args:
        kind (`str`): ``"input"`` (token-embedding space: run :func:`encode_input_embedding` before use),
            ``"output"`` (already in the conditioning space: ``clip_l_out`` / ``clip_g_out`` are set, and the input
            vectors the file also carries may be set in ``clip_l`` / ``clip_g``) or ``"xti"`` (kohya XTI: ``layers``
            holds input-space vectors per UNet block, each to be encoded on its own).
        format (`str`): the layout recognised, for messages (e.g. ``"kohya XTI"``).
        clip_l (`Tensor` or `None`): input-space vectors for the first (or only) text encoder, ``(N, 768)`` for
            SD1.x / SDXL CLIP-L, ``(N, 1024)`` for SD2.x.
        clip_g (`Tensor` or `None`): input-space vectors for SDXL's second text encoder, ``(N, 1280)``.
        clip_l_out (`Tensor` or `None`): output-space vectors for the first (or only) text encoder.
        clip_g_out (`Tensor` or `None`): output-space vectors for SDXL's second text encoder.
        layers (`dict[str, Tensor]` or `None`): kohya XTI block name (see :data:`XTI_LAYERS`) → ``(N, D)``
            input-space vectors, all of one shape.
        name (`str` or `None`): the token name stored in the file (A1111 ``name``, the diffusers key), if any.
    """

    kind: str
    format: str
    clip_l: Tensor | None = None
    clip_g: Tensor | None = None
    clip_l_out: Tensor | None = None
    clip_g_out: Tensor | None = None
    layers: dict[str, Tensor] | None = None
    name: str | None = None

    @property
    def output(self) -> Tensor | None:
        """The output-space vectors of the first (or only) text encoder: ``clip_l_out``."""
        return self.clip_l_out

    @property
    def num_vectors(self) -> int:
        """``N``, the number of vectors per token."""
        for tensor in (self.clip_l, self.clip_g, self.clip_l_out, self.clip_g_out, *(self.layers or {}).values()):
            if tensor is not None:
                return tensor.shape[0]
        raise AssertionError("an Embedding always holds at least one tensor")


def read_embedding(path: str | os.PathLike, max_bytes: int = MAX_EMBEDDING_BYTES) -> Embedding:
    """Read a textual-inversion / XTI embedding file into an :class:`Embedding`, never unpickling anything.

    Recognised layouts (checked in this order):

    - kohya XTI: the 16 keys of :data:`XTI_LAYERS` → ``kind="xti"``;
    - OneTrainer: ``emp_params`` and/or ``emp_params_out`` (SD1.x / SD2.x), ``clip_l_out`` / ``clip_g_out`` next to
      ``clip_l`` / ``clip_g`` (SDXL) → ``kind="output"`` when output vectors are present, else ``"input"``;
    - SDXL (A1111 and kohya): ``clip_l`` and ``clip_g`` → ``kind="input"``;
    - A1111: ``string_to_param`` → ``{"*": (N, D)}`` (plus ``name``, ``step``, … which are ignored but ``name``),
      or, in a safetensors file, the flattened ``string_to_param.*``;
    - kohya: ``emb_params``;
    - diffusers: a single tensor whose key is the token (``{"<cat-toy>": (D,) or (N, D)}``).

    A 1-D vector ``(D,)`` is read as ``(1, D)``; anything that is not 1-D or 2-D is refused.

    Args:
        path (`str` or `os.PathLike`): the file. Safetensors files are recognised by content, whatever their
            extension; everything else is read as a PyTorch file with ``torch.load(weights_only=True)``.
        max_bytes (`int`, defaults to 64 MiB): larger files are refused before being read (an embedding is KBs).

    Returns:
        [`Embedding`]: the vectors, as float32 CPU tensors.

    Raises:
        EmbeddingFormatError: the file is missing, too large, a PyTorch file that needs arbitrary unpickling (with
            how to convert it), corrupt, of an unknown layout (the message lists the keys found and the layouts
            supported) or holds vectors of the wrong rank or inconsistent shapes.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EmbeddingFormatError(f"embedding file {path!r} does not exist")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise EmbeddingFormatError(
            f"{path}: {size / 2**20:.1f} MiB is too large for an embedding (limit {max_bytes / 2**20:.0f} MiB; "
            "embeddings are a few KB): is this a model checkpoint or a LoRA?"
        )
    data = _load_safetensors(path) if _is_safetensors(path) else _load_torch(path)
    if not isinstance(data, dict):
        raise EmbeddingFormatError(
            f"{path}: holds a {type(data).__name__}, not a dict of tensors; supported layouts: {SUPPORTED_FORMATS}"
        )
    return _parse(path, data)


def encode_input_embedding(
    text_encoder: torch.nn.Module,
    tokenizer,
    vectors: Tensor,
    hidden_layer: int | None = None,
    final_layer_norm: bool = False,
    return_pooled: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Encode textual-inversion input vectors through a CLIP text encoder, as the stock pipeline does.

    The prompt is the new token alone, as the tokenizer pads it: ``[BOS, v_1 … v_N, EOS, pad …]``
    (``tokenizer.model_max_length`` long). The input ids are exactly those a tokenizer extended by
    ``load_textual_inversion`` produces (the N new tokens get ids ``len(tokenizer)`` … ``len(tokenizer) + N - 1``),
    and the token-embedding rows at those positions are the vectors, so every output, including CLIP's pooled
    ``argmax`` pick, is the stock pipeline's, bit for bit. The stock ``text_encoder`` forward runs unchanged; its
    token-embedding layer gets two hooks for the duration of the call only (the tokenizer and every weight are
    left untouched; not safe to run concurrently with another call on the same encoder).

    Which output to take, per family (as diffusers' pipelines do):

    - SD1.x / SD2.x: ``hidden_layer=None`` → ``last_hidden_state`` (after the final layer norm);
    - SD1.x with CLIP skip ``k``: ``hidden_layer=-(k + 1), final_layer_norm=True``;
    - SDXL, both encoders: ``hidden_layer=-2`` (the penultimate layer, without the final layer norm), and
      ``return_pooled=True`` on the second encoder for its pooled (projected) vector.

    Args:
        text_encoder (`torch.nn.Module`): a transformers ``CLIPTextModel`` or ``CLIPTextModelWithProjection``.
        tokenizer (`CLIPTokenizer`): its tokenizer (gives BOS / EOS / padding ids and the sequence length).
        vectors (`Tensor`): ``(N, E)`` or ``(E,)`` input vectors, ``E`` the encoder's token-embedding width.
        hidden_layer (`int` or `None`, defaults to `None`): `None` for ``last_hidden_state``, else an index into
            ``hidden_states`` (``-2`` the penultimate layer).
        final_layer_norm (`bool`, defaults to `False`): apply the encoder's final layer norm to
            ``hidden_states[hidden_layer]`` (diffusers' CLIP skip for SD1.x); ignored when ``hidden_layer`` is None.
        return_pooled (`bool`, defaults to `False`): also return the pooled vector ``(P,)``: ``text_embeds`` of a
            ``CLIPTextModelWithProjection`` (SDXL's ``pooled_prompt_embeds``), else ``pooler_output``.

    Returns:
        `Tensor` of shape ``(N, D)``: the encoder's output at the N token positions (detached, in the encoder's
        dtype and device); with ``return_pooled`` the tuple ``(vectors, pooled)``.

    Raises:
        EmbeddingFormatError: ``vectors`` is not 1-D / 2-D, has the wrong width for this encoder, or is too long
            for the tokenizer's sequence length.
    """
    embedding_layer = text_encoder.get_input_embeddings()
    width = embedding_layer.embedding_dim
    vectors = _as_matrix(vectors, "vectors")
    if vectors.shape[1] != width:
        raise EmbeddingFormatError(
            f"vectors are {vectors.shape[1]} wide but this text encoder's token embeddings are {width} wide: "
            "the embedding was trained for another model (SD1.x / SDXL CLIP-L: 768, SD2.x: 1024, SDXL CLIP-G: 1280)"
        )
    num_vectors, length = vectors.shape[0], tokenizer.model_max_length
    if num_vectors + 2 > length:
        raise EmbeddingFormatError(
            f"{num_vectors} vectors do not fit in a {length}-token prompt with BOS and EOS (at most {length - 2})"
        )

    # The tokenizer's own padding of the empty prompt, [BOS, EOS, pad …], with the new tokens inserted after BOS.
    empty = tokenizer("", padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    first_new_id = max(len(tokenizer), embedding_layer.num_embeddings)
    new_ids = torch.arange(first_new_id, first_new_id + num_vectors)
    input_ids = torch.cat([empty.input_ids[0, :1], new_ids, empty.input_ids[0, 1:length - num_vectors]])[None]
    input_ids = input_ids.to(embedding_layer.weight.device)  # (1, L)
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):  # as diffusers' pipelines pass it
        attention_mask = torch.cat([empty.attention_mask[0, :1], torch.ones(num_vectors, dtype=torch.long),
                                    empty.attention_mask[0, 1:length - num_vectors]])[None].to(input_ids.device)
    rows = vectors.to(device=embedding_layer.weight.device, dtype=embedding_layer.weight.dtype)

    def look_up_known_ids(module, args):
        # The new ids are past the end of the matrix: look up a valid id there, overwritten by the hook below.
        (ids,) = args
        return (torch.where(ids >= first_new_id, 0, ids),)

    def write_new_rows(module, args, output):
        output = output.clone()  # (B, L, E)
        output[input_ids.expand(output.shape[0], -1) >= first_new_id] = rows.repeat(output.shape[0], 1)
        return output

    handles = [embedding_layer.register_forward_pre_hook(look_up_known_ids),
               embedding_layer.register_forward_hook(write_new_rows)]
    try:
        with torch.no_grad():
            outputs = text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()

    if hidden_layer is None:
        hidden = outputs.last_hidden_state
    else:
        hidden = outputs.hidden_states[hidden_layer]
        if final_layer_norm:
            with torch.no_grad():
                hidden = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)
    encoded = hidden[0, 1:1 + num_vectors].detach().clone()  # (N, D)
    if not return_pooled:
        return encoded
    pooled = getattr(outputs, "text_embeds", None)
    if pooled is None:
        pooled = outputs.pooler_output
    return encoded, pooled[0].detach().clone()


def _is_safetensors(path: str) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length followed by a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _load_safetensors(path: str) -> dict[str, Tensor]:
    try:
        return load_file(path, device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError / OSError for corrupt files
        raise EmbeddingFormatError(f"{path}: not a readable safetensors file ({_first_line(error)})") from error


def _load_torch(path: str) -> object:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        # torch's message is a page long; keep the one fact that matters: which Python object the file asks for.
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsafe:
            raise EmbeddingFormatError(
                f"{path}: refused, this PyTorch file needs arbitrary unpickling (it stores the Python object "
                f"{unsafe.group(1)}, not only tensors); re-save its tensors as .safetensors in a tool you trust"
            ) from error
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        raise EmbeddingFormatError(
            f"{path}: neither a safetensors nor a readable PyTorch file "
            f"({detail.group(1).strip() if detail else _first_line(error)})"
        ) from error
    except Exception as error:  # a torch.load of a truncated or foreign file raises RuntimeError, EOFError, ...
        raise EmbeddingFormatError(
            f"{path}: neither a safetensors nor a readable PyTorch file ({type(error).__name__}: "
            f"{_first_line(error)})"
        ) from error


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _parse(path: str, data: dict) -> Embedding:
    keys = set(data)
    if keys >= set(XTI_LAYERS):
        layers = {name: _as_matrix(data[name], f"{path}: {name}") for name in XTI_LAYERS}
        shapes = {tuple(tensor.shape) for tensor in layers.values()}
        if len(shapes) != 1:
            raise EmbeddingFormatError(f"{path}: kohya XTI blocks differ in shape ({sorted(shapes)}); expected one")
        return Embedding(kind="xti", format="kohya XTI", layers=layers)

    if "emp_params" in keys or "emp_params_out" in keys:
        emb = Embedding(kind="output" if "emp_params_out" in keys else "input", format="OneTrainer",
                        clip_l=_optional(data, "emp_params", path), clip_l_out=_optional(data, "emp_params_out", path))
        _check_same_count(path, emb)
        return emb

    if keys & {"clip_l", "clip_g", "clip_l_out", "clip_g_out"}:
        tensors = {key: _optional(data, key, path) for key in ("clip_l", "clip_g", "clip_l_out", "clip_g_out")}
        has_output = tensors["clip_l_out"] is not None or tensors["clip_g_out"] is not None
        if not has_output and (tensors["clip_l"] is None or tensors["clip_g"] is None):
            raise EmbeddingFormatError(
                f"{path}: an SDXL embedding needs both clip_l and clip_g; found {_describe(data)}"
            )
        emb = Embedding(kind="output" if has_output else "input",
                        format="OneTrainer SDXL" if has_output else "SDXL (clip_l + clip_g)", **tensors)
        _check_same_count(path, emb)
        return emb

    if "string_to_param" in keys:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingFormatError(
                f"{path}: A1111 string_to_param must map one token to its vectors; found {_describe(params)}"
            )
        name = data.get("name")
        return Embedding(kind="input", format="A1111 textual inversion (string_to_param)",
                         clip_l=_as_matrix(next(iter(params.values())), f"{path}: string_to_param"),
                         name=name if isinstance(name, str) else None)

    flattened = [key for key in keys if isinstance(key, str) and key.startswith("string_to_param.")]
    if flattened:
        if len(flattened) != 1:
            raise EmbeddingFormatError(f"{path}: several string_to_param tokens ({sorted(flattened)}); expected one")
        return Embedding(kind="input", format="A1111 textual inversion (string_to_param, flattened)",
                         clip_l=_as_matrix(data[flattened[0]], f"{path}: {flattened[0]}"))

    if "emb_params" in keys:
        return Embedding(kind="input", format="kohya textual inversion (emb_params)",
                         clip_l=_as_matrix(data["emb_params"], f"{path}: emb_params"))

    if len(data) == 1:
        ((key, value),) = data.items()
        if isinstance(key, str) and isinstance(value, Tensor):
            return Embedding(kind="input", format="diffusers textual inversion (single key)",
                             clip_l=_as_matrix(value, f"{path}: {key}"), name=key)

    raise EmbeddingFormatError(
        f"{path}: unknown embedding layout, found {_describe(data)}; supported layouts: {SUPPORTED_FORMATS}"
    )


def _optional(data: dict, key: str, path: str) -> Tensor | None:
    return _as_matrix(data[key], f"{path}: {key}") if key in data else None


def _as_matrix(value: object, what: str) -> Tensor:
    """``(N, D)`` float32 contiguous CPU copy of a tensor; ``(D,)`` becomes ``(1, D)``; other ranks are refused."""
    if not isinstance(value, Tensor):
        raise EmbeddingFormatError(f"{what} is a {type(value).__name__}, expected a tensor of vectors")
    if value.ndim == 1:
        value = value[None]  # (1, D)
    if value.ndim != 2 or value.shape[0] == 0 or value.shape[1] == 0:
        raise EmbeddingFormatError(
            f"{what} has shape {tuple(value.shape)}; expected (vectors, width) or (width,)"
        )
    if not value.is_floating_point():
        raise EmbeddingFormatError(f"{what} has dtype {value.dtype}; expected floating-point vectors")
    return value.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


def _check_same_count(path: str, emb: Embedding) -> None:
    counts = {key: tensor.shape[0] for key, tensor in
              (("clip_l", emb.clip_l), ("clip_g", emb.clip_g), ("clip_l_out", emb.clip_l_out),
               ("clip_g_out", emb.clip_g_out)) if tensor is not None}
    if len(set(counts.values())) > 1:
        raise EmbeddingFormatError(f"{path}: the tensors hold different numbers of vectors ({counts}); expected one")


def _describe(data: object, limit: int = 6) -> str:
    """``"emb (1, 768), step (int)"``: the first few keys with their shapes or types, for error messages."""
    if not isinstance(data, dict):
        return type(data).__name__
    if not data:
        return "no keys"
    items = []
    for key, value in list(data.items())[:limit]:
        kind = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        items.append(f"{key} {kind}")
    more = f" and {len(data) - limit} more" if len(data) > limit else ""
    return "keys " + ", ".join(items) + more
