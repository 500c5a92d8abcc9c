"""Concepts that leave condvec: a tag as a textual-inversion embedding for A1111 / Forge / ComfyUI / diffusers.

A textual-inversion embedding is an *input* vector of the text encoder; a condvec tag is an *output* vector (what
the UNet's cross-attention reads). :func:`export_embedding` finds the input embedding whose encoding — the prompt made
of that one new token, through the model's own text encoder(s), exactly the path :func:`bootstrap.text.tag_vectors`
reads tags from — comes closest to the tag's vector, by gradient descent on the embedding alone (the encoder is
frozen), and reports how close it got. A per-layer table's groups are matched on average (one embedding feeds every
layer); SDXL fits the ``clip_l`` and ``clip_g`` halves through their own encoders.

Files: SD1.x / SD2.x ``{"emb_params": (1, H)}`` (the A1111 / kohya safetensors layout that diffusers'
``load_textual_inversion`` reads too), SDXL ``{"clip_l": (1, 768), "clip_g": (1, 1280)}``, kohya XTI
``{"IN01": (1, H), …, "OUT11": (1, H)}`` (one embedding per cross-attention block, fitted to that block's vector);
safetensors with ModelSpec metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from bootstrap.embeddings import XTI_LAYERS
from conditioner.errors import CondvecError
from conditioner.table import MODELSPEC_ARCHITECTURES, TagTable
from unet_patch.load import BaseModel


@dataclass
class ExportReport:
    """How close the exported embedding's encoding is to the tag's vector."""

    relative_error: float  # ||encoding - target|| / ||target||, over every part
    cosine: float  # cosine similarity of encoding and target
    steps: int


def _target(table: TagTable, tag: str) -> torch.Tensor:
    if table.mode_spec.direct_kv:
        raise CondvecError("only vector-mode tables export as textual inversion (a kv row holds each layer's K and "
                           "V, not an encoder output): export from the vector table it was made from")
    name = table.tags[table.row(tag)]
    if table.vectors.get(name, 1) > 1:
        raise CondvecError(f"{tag!r} has {table.vectors[name]} vectors; exporting multi-vector tags is not supported")
    row = table.value_source(name) if table.is_split(name) else table.data[table.row(name)]
    return row.float().mean(0).reshape(len(table.group_names), table.dim)  # anchors averaged: (G, D)


def _encode_one(encoder, ids: torch.Tensor, embedding: torch.Tensor, penultimate: bool) -> torch.Tensor:
    """The encoder's output at position 1 for ``[BOS, <embedding>, EOS, pad…]``."""
    token_embedding = encoder.get_input_embeddings()

    def put(module, args, out):
        out = out.clone()
        out[:, 1] = embedding
        return out

    handle = token_embedding.register_forward_hook(put)
    try:
        out = encoder(ids, output_hidden_states=penultimate)
    finally:
        handle.remove()
    states = out.hidden_states[-2] if penultimate else out[0]
    return states[0, 1]


def _fit(tokenizer, encoder, goal: torch.Tensor, steps: int, lr: float, gen: torch.Generator,
         penultimate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The input embedding whose one-token prompt encodes closest to ``goal``, and that encoding."""
    encoder.requires_grad_(False)
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[tokenizer.bos_token_id, pad, tokenizer.eos_token_id] + [pad] * (length - 3)])
    # [BOS, x, EOS, pad…] as the tokenizer writes a one-token prompt; position 1 takes the embedding
    weight = encoder.get_input_embeddings().weight.detach()
    start = weight.mean(0) + 0.01 * weight.std(0) * torch.randn(weight.shape[1], generator=gen)
    embedding = start.clone().requires_grad_(True)
    base_lr = lr * float(weight.std())
    opt = torch.optim.Adam([embedding], lr=base_lr)
    goal = goal.to(weight.dtype)
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay to a tenth
            group["lr"] = base_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        loss = (_encode_one(encoder, ids, embedding, penultimate) - goal).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = _encode_one(encoder, ids, embedding, penultimate)
    return embedding.detach().reshape(1, -1).contiguous(), out


def _report(pairs: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> ExportReport:
    out = torch.cat([o.flatten() for o, _ in pairs])
    goal = torch.cat([g.flatten().to(o.dtype) for o, g in pairs])
    return ExportReport(relative_error=float((out - goal).norm() / goal.norm().clamp_min(1e-12)),
                        cosine=float(torch.nn.functional.cosine_similarity(out, goal, dim=0)), steps=steps)


def export_embedding(model: BaseModel, table: TagTable, tag: str, steps: int = 400, lr: float = 0.05,
                     seed: int = 0, format: str = "ti") -> tuple[dict[str, torch.Tensor], ExportReport]:  # noqa: A002
    """A textual-inversion (``format="ti"``) or kohya XTI (``"xti"``) embedding for ``tag`` of ``table``.

    ``ti``: one embedding for every layer (a per-layer tag is matched on its groups' mean; SDXL fits ``clip_l``
    and ``clip_g``). ``xti``: one embedding per kohya block (``IN01`` … ``OUT11``, SD1.x / SD2.x UNets with kohya's
    16 cross-attention blocks), each fitted to the vector of that block's layer.

    Returns:
        `(tensors, report)`: the file's tensors and how close their encoding is to the tag's vectors.
    """
    if not model.text_encoders:
        raise CondvecError("exporting a tag as textual inversion needs the model's text encoder(s): load the model "
                           "folder with its text_encoder/ and tokenizer/")
    if format not in ("ti", "xti"):
        raise CondvecError(f"export format must be 'ti' or 'xti', got {format!r}")
    groups = _target(table, tag)  # (G, D)
    sdxl = model.family == "sdxl"
    widths = [enc.config.hidden_size for enc in model.text_encoders]
    if sum(widths) != groups.shape[1]:
        raise CondvecError(f"the table's vectors are {groups.shape[1]} wide, the model's encoder(s) give "
                           f"{'+'.join(map(str, widths))}: export with the model the table was built for")
    gen = torch.Generator().manual_seed(seed)
    tensors, pairs = {}, []
    if format == "xti":
        if sdxl:
            raise CondvecError("kohya XTI exists for SD1.x / SD2.x UNets only; export SDXL tags with --format ti")
        blocks = {("MID" if layer.kohya == "M00" else layer.kohya): li for li, layer in enumerate(table.layers)}
        if set(blocks) != set(XTI_LAYERS):
            raise CondvecError("kohya XTI needs kohya's 16 cross-attention blocks (IN01 … OUT11); this UNet has "
                               f"{len(table.layers)} attn2 layers named otherwise: export with --format ti")
        for name in XTI_LAYERS:
            goal = groups[table.layer_group[blocks[name]]]
            tensors[name], out = _fit(model.tokenizers[0], model.text_encoders[0], goal, steps, lr, gen, False)
            pairs.append((out, goal))
        return tensors, _report(pairs, steps)
    target = groups.mean(0)  # one embedding feeds every layer: the groups' mean is what it can match best
    parts = torch.split(target, widths) if sdxl else [target]
    keys = ("clip_l", "clip_g") if sdxl else ("emb_params",)
    for tokenizer, encoder, goal, key in zip(model.tokenizers, model.text_encoders, parts, keys):
        tensors[key], out = _fit(tokenizer, encoder, goal, steps, lr, gen, sdxl)
        pairs.append((out, goal))
    return tensors, _report(pairs, steps)


@dataclass
class DistillReport:
    """How close the stock pipeline's UNet comes, with the embedding in the prompt, to what it predicts with the tag.

    ``relative_error`` is ``||UNet(embedding) - UNet(tag)|| / ||UNet(null) - UNet(tag)||`` on held-out prompts,
    timesteps and noise: 0 is the tag's own prediction, 1 no closer than leaving the concept out.
    """

    relative_error: float
    start_error: float  # the same for the embedding fitted to the tag's vector (where distillation starts)
    steps: int


def _student_ids(tokenizer, others: list[str], vectors: int = 1) -> torch.Tensor:
    """``[BOS, <new token> × vectors, ",", other tags…, EOS, pad…]``: the prompt ``<tag>, other, …`` as the tokenizer
    writes it once the embedding's tokens are added (positions ``1 … vectors`` take the embedding)."""
    rest = tokenizer(", " + ", ".join(others) if others else "", padding="max_length",
                     max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.cat([rest[:1], torch.tensor([pad] * vectors), rest[1:]])[: tokenizer.model_max_length]
    if ids[-1] not in (pad, tokenizer.eos_token_id):
        ids[-1] = tokenizer.eos_token_id
    return ids


def _encode_with(encoder, ids: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden state ``(B, 77, D)`` for ``ids`` with ``embedding`` (``(H,)`` or ``(V, H)``) at
    positions ``1 … V``."""
    rows = embedding.reshape(-1, embedding.shape[-1])  # (V, H)

    def put(module, args, out):
        out = out.clone()
        out[:, 1:1 + rows.shape[0]] = rows
        return out

    handle = encoder.get_input_embeddings().register_forward_hook(put)
    try:
        return encoder(ids)[0]
    finally:
        handle.remove()


def distil_embedding(model: BaseModel, table: TagTable, tag: str, steps: int = 300, lr: float = 0.05,
                     seed: int = 0, batch_size: int = 8, pool: int = 32,
                     vectors: int = 1) -> tuple[dict[str, torch.Tensor], DistillReport]:
    """A textual-inversion embedding for ``tag`` found by matching UNet predictions (SD1.x / SD2.x).

    The teacher is the UNet conditioned on the condvec table (prompt ``tag, other tags…``); the student is the same
    UNet with the stock pipeline's encoding of ``<embedding>, other tags…`` through the model's own text encoder —
    what ``load_textual_inversion`` and a prompt give in diffusers, A1111 or ComfyUI. The other tags are random
    tags of the table (none to two), the inputs the teacher's own samples noised to random timesteps; only the
    embedding learns (Adam, from the embedding :func:`export_embedding` fits to the tag's vector, or for a
    multi-vector tag from the mean token embedding). ``vectors > 1`` learns a multi-vector embedding (textual
    inversion's "vectors per token": the prompt's one token becomes ``vectors`` positions), every vector starting
    from the same point.

    Returns:
        `(tensors, report)`: ``{"emb_params": (vectors, H)}`` and a :class:`DistillReport`.
    """
    from diffusers import DDIMScheduler

    from bootstrap.text import null_sequence
    from conditioner.encode import encode
    from unet_patch.patch import patched

    if model.family == "sdxl":
        raise CondvecError("distilled export is for SD1.x / SD2.x; export SDXL tags with --method fit")
    if not 1 <= vectors <= model.tokenizers[0].model_max_length - 2:
        raise CondvecError(f"an embedding has 1 to {model.tokenizers[0].model_max_length - 2} vectors (the text "
                           f"encoder's positions less BOS and EOS), got {vectors}")
    name = table.normalization.apply(tag)
    if name not in table:
        raise CondvecError(table.unknown_message([name]))
    tokenizer, encoder, unet = model.tokenizers[0], model.text_encoders[0], model.unet
    encoder.requires_grad_(False)
    unet.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    single = table.vectors.get(table.tags[table.row(name)], 1) == 1 and not table.mode_spec.direct_kv
    if single:
        start, _ = export_embedding(model, table, name, steps=200, lr=lr, seed=seed)
        embedding = start["emb_params"][0].clone()
    else:  # a multi-vector or key/value tag has no one vector to fit: start from the mean token embedding
        embedding = encoder.get_input_embeddings().weight.detach().mean(0).clone()
    embedding = embedding.reshape(1, -1).repeat(vectors, 1)  # (V, H)
    others = [t for t in table.tags if t != name and table.vector_owner(t) is None]

    def prompts(count: int) -> list[list[str]]:
        out = []
        for _ in range(count):
            k = int(torch.randint(0, min(2, len(others)) + 1, (1,), generator=gen))
            out.append([others[i] for i in torch.randperm(len(others), generator=gen)[:k].tolist()])
        return out

    def teacher(x, t, contexts):
        with torch.no_grad(), patched(unet, table):
            cond = encode(table, [", ".join([name] + c) for c in contexts], timesteps=t)
            return unet(x, t, encoder_hidden_states=cond).sample

    def student(x, t, contexts, emb):
        ids = torch.stack([_student_ids(tokenizer, c, vectors) for c in contexts])
        return unet(x, t, encoder_hidden_states=_encode_with(encoder, ids, emb)).sample

    # the teacher's own samples (DDIM, guidance 3), noised anew every step
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(10)
    contexts = prompts(pool)
    size = unet.config.sample_size
    x = torch.randn(pool, unet.config.in_channels, size, size, generator=gen)
    null = null_sequence(model).sequence
    texts = [""] * pool + [", ".join([name] + c) for c in contexts]
    with torch.no_grad(), patched(unet, table):
        for t in scheduler.timesteps:
            cond = encode(table, texts, timesteps=t)  # (2·pool, N, W), at this step's timestep anchors
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample
            uncond, text = out.chunk(2)
            x = scheduler.step(uncond + 3.0 * (text - uncond), t, x).prev_sample
    samples = x
    num_t = model.scheduler.config.num_train_timesteps

    def batch(generator, count):
        idx = torch.randint(pool, (count,), generator=generator)
        t = torch.randint(num_t, (count,), generator=generator)
        noise = torch.randn(samples[idx].shape, generator=generator)
        return model.scheduler.add_noise(samples[idx], noise, t), t, [contexts[i] for i in idx.tolist()]

    held = batch(torch.Generator().manual_seed(seed + 7), 16)
    with torch.no_grad():
        want = teacher(*held)
        nothing = unet(held[0], held[1], encoder_hidden_states=null[None].expand(16, -1, -1)).sample
        scale = (nothing - want).norm().clamp_min(1e-12)

    def error(emb) -> float:
        with torch.no_grad():
            return float((student(held[0], held[1], held[2], emb) - want).norm() / scale)

    start_error = error(embedding)
    param = embedding.clone().requires_grad_(True)
    base_lr = lr * float(encoder.get_input_embeddings().weight.detach().std())
    opt = torch.optim.Adam([param], lr=base_lr)
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay to a tenth
            group["lr"] = base_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        xb, tb, cb = batch(gen, batch_size)
        loss = (student(xb, tb, cb, param) - teacher(xb, tb, cb)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = param.detach()
    end_error = error(final)
    if end_error > start_error:  # never worse than where it started
        final, end_error = embedding, start_error
    return {"emb_params": final.reshape(vectors, -1).contiguous()}, DistillReport(end_error, start_error, steps)


def modelspec(model: BaseModel, tag: str) -> dict[str, str]:
    """ModelSpec metadata (``modelspec.*``) for an exported embedding, as model browsers read it."""
    import datetime

    architecture = MODELSPEC_ARCHITECTURES.get(model.family, model.family)
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{architecture}/textual-inversion",
            "modelspec.implementation": "https://github.com/AUTOMATIC1111/stable-diffusion-webui",
            "modelspec.title": tag, "modelspec.date": datetime.date.today().isoformat(),
            "condvec.source": json.dumps({"base": model.name, "tag": tag})}
