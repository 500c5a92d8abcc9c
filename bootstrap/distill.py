"""Data-free distillation of a table from the model's own text encoder, through the frozen UNet.

A bootstrapped table encodes every tag alone; the UNet learnt from whole prompts, which CLIP spreads over every
later position (EOS and padding included). Distillation teaches the table to give the UNet what CLIP gives it:

- teacher: the frozen UNet conditioned on the model's own pipeline encoding of a prompt (SD1.x / SD2.x: CLIP's last
  hidden state; SDXL: both encoders' penultimate states and the pooled vector);
- student: the same frozen UNet conditioned on the table's encoding of the same tags;
- prompts: random combinations of the vocabulary's tags (1 to ``max_tags`` of them, in random order), or tags of
  real prompts (``prompts=``);
- inputs: the teacher's own samples (DDIM with classifier-free guidance, computed once into a pool), noised to a
  random timestep each step — no image dataset;
- loss: the mean squared difference of the two UNet predictions; only the table's tag rows (and SDXL pooled rows)
  learn, with the row-sparse AdamW of ``condvec-train``: a step moves only the rows of the batch's tags.

Every step's randomness is a function of ``(seed, step)`` and the pool is saved once, so a run killed at any moment
resumes (``resume=True``) to the same table. Under ``torchrun`` each process takes its share of every batch and
only the batch's rows' gradients are all-reduced.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bootstrap.text import _encode, null_sequence
from conditioner.encode import Rows, pack, pack_pooled, tokenize
from conditioner.errors import CondvecError
from conditioner.fileio import atomic_dir
from conditioner.parse import parse_prompt
from conditioner.rows import RowSparseAdamW
from conditioner.table import TagTable
from unet_patch.load import BaseModel
from unet_patch.patch import patched


class DistillError(CondvecError):
    """A distillation that cannot run as asked (bad settings, a work folder of another run)."""


@dataclass
class DistillConfig:
    """Settings of a distillation run; every field has a default.

    Attributes:
        steps (`int`, defaults to 1500): optimiser steps.
        batch_size (`int`, defaults to 32): prompts per step (all processes together).
        lr (`float`, defaults to 2e-2): AdamW learning rate of the table rows (after a 5% warm-up; of 5e-3, 2e-2
            and 5e-2, 2e-2 reached the lowest loss in 130 steps on `models/mini-sd`).
        schedule (`str`, defaults to ``"constant"``): the rate after warm-up, ``"constant"`` or ``"cosine"`` (down
            to a tenth of ``lr`` at the last step).
        high_noise (`float`, defaults to 0.0): share of each batch whose timesteps are drawn from the noisiest
            half (where the layout of a scene is decided) instead of uniformly.
        pool (`int`, defaults to 1024): teacher samples computed once and noised anew every step.
        sample_steps (`int`, defaults to 10): DDIM steps of each teacher sample.
        guidance (`float`, defaults to 3.0): classifier-free guidance of the teacher samples.
        max_tags (`int`, defaults to 8): most tags in a random prompt.
        seed (`int`, defaults to 0): seed of prompts, samples, timesteps and noise.
        save_every (`int`, defaults to 100): steps between checkpoints (and at the end).
    """

    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-2
    pool: int = 1024
    sample_steps: int = 10
    guidance: float = 3.0
    max_tags: int = 8
    seed: int = 0
    save_every: int = 100
    schedule: str = "constant"
    high_noise: float = 0.0
    prompts: list[str] = field(default_factory=list)

    def __post_init__(self):
        for name in ("steps", "batch_size", "pool", "sample_steps", "max_tags", "save_every"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise DistillError(f"distillation {name.replace('_', '-')} must be a whole number ≥ 1, got "
                                   f"{getattr(self, name)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise DistillError(f"distillation lr must be a positive number, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise DistillError(f"distillation schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 <= self.high_noise <= 1.0:
            raise DistillError(f"distillation high-noise share must be between 0 and 1, got {self.high_noise!r}")

    def rate(self, step: int) -> float:
        """The learning rate of (0-based) ``step``: linear warm-up over 5% of the steps, then the schedule."""
        warmup = max(1, self.steps // 20)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        if self.schedule == "constant":
            return self.lr
        progress = (step - warmup) / max(1, self.steps - 1 - warmup)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


#: Learning-rate schedules of :class:`DistillConfig`.
SCHEDULES = ("constant", "cosine")


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def random_prompts(tags: list[str], num: int, max_tags: int, seed: int, prompts: list[str] | None = None) -> list[str]:
    """``num`` prompts: random sets of 1 … ``max_tags`` distinct tags in random order, or real prompts' tags shuffled.

    Lengths are drawn uniformly, so short prompts (one or two tags, as users write a subject alone) are as common as
    long ones.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        if prompts:
            chosen = [t.strip() for t in prompts[int(torch.randint(len(prompts), (1,), generator=g))].split(",")]
            chosen = [t for t in chosen if t]
            chosen = [chosen[i] for i in torch.randperm(len(chosen), generator=g).tolist()]
        else:
            length = int(torch.randint(1, min(max_tags, len(tags)) + 1, (1,), generator=g))
            chosen = [tags[i] for i in torch.randperm(len(tags), generator=g)[:length].tolist()]
        out.append(", ".join(chosen))
    return out


def _pixels(model: BaseModel) -> tuple[int, int]:
    """The image size the UNet's sample size stands for (SDXL's time ids are in pixels)."""
    scale = 1 if model.vae is None else 2 ** (len(model.vae.config.block_out_channels) - 1)
    return (model.unet.config.sample_size * scale,) * 2


def _added(model: BaseModel, pooled: torch.Tensor | None, size: tuple[int, int]) -> dict | None:
    """SDXL's ``added_cond_kwargs`` for a batch (pooled vectors, time ids of an uncropped ``size`` image)."""
    if pooled is None:
        return None
    time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=pooled.dtype, device=pooled.device)
    return {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], -1)}


@torch.no_grad()
def teacher_pool(model: BaseModel, prompts: list[str], config: DistillConfig, progress: bool = True) -> dict:
    """The teacher's own samples for ``prompts``: latents, its conditioning, the null conditioning.

    Returns:
        `dict` of tensors: ``latents (P, C, H, W)`` (DDIM, ``config.sample_steps`` steps, guidance
        ``config.guidance``), ``embeds (P, 77, D)`` and SDXL ``pooled (P, P')``.
    """
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    unet = model.unet
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(config.sample_steps)
    null = null_sequence(model)
    size = unet.config.sample_size
    shape = (unet.config.in_channels, size, size)
    pixels = _pixels(model)
    g = torch.Generator().manual_seed(config.seed + 1)
    latents, embeds, pooled = [], [], []
    chunk = 64
    bar = tqdm(total=len(prompts), desc="teacher samples", unit="sample", disable=not progress)
    for start in range(0, len(prompts), chunk):
        batch = prompts[start:start + chunk]
        cond, cond_pooled, _ = _encode(model, batch)
        cond = cond.float().cpu()
        n = len(batch)
        neg = null.negative_sequence[None].expand(n, -1, -1)
        neg_pooled = None if null.pooled is None else null.negative_pooled[None].expand(n, -1)
        both = torch.cat([neg, cond]).to(unet.device, unet.dtype)
        both_pooled = None if cond_pooled is None else torch.cat([neg_pooled, cond_pooled.float().cpu()]).to(
            unet.device, unet.dtype)
        x = torch.randn((n, *shape), generator=g).to(unet.device, unet.dtype) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=both,
                       added_cond_kwargs=_added(model, both_pooled, pixels)).sample
            uncond, text = out.chunk(2)
            x = scheduler.step(uncond + config.guidance * (text - uncond), t, x).prev_sample
        latents.append(x.float().cpu())
        embeds.append(cond)
        if cond_pooled is not None:
            pooled.append(cond_pooled.float().cpu())
        bar.update(n)
    bar.close()
    out = {"latents": torch.cat(latents), "embeds": torch.cat(embeds)}
    if pooled:
        out["pooled"] = torch.cat(pooled)
    return out


def _fingerprint(model: BaseModel, table: TagTable, config: DistillConfig) -> dict:
    """What a resumed run must share with the interrupted one."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("steps", "save_every")}
    return {"model": os.path.abspath(model.path) if model.path else model.name, "tags": list(table.tags),
            "width": table.width, "config": settings}


def work_dir(output: str) -> str:
    """The folder beside ``output`` holding a distillation's pool, checkpoint and loss log."""
    return os.fspath(output) + ".distill"


def distill(model: BaseModel, table: TagTable, config: DistillConfig, output: str, resume: bool = False,
            progress: bool = True) -> dict:
    """Teach ``table`` (in place) to condition ``model``'s UNet as the model's own text encoder does.

    Args:
        model (`BaseModel`): the model, loaded with its text encoder(s) (the teacher); UNet and encoders stay frozen.
        table (`TagTable`): a vector-mode table bootstrapped from ``model`` (the student); its tag rows (and SDXL
            pooled rows) learn, its special rows (the null sequence) stay exact.
        config (`DistillConfig`): the run's settings.
        output (`str`): where the caller will write the table; the work folder is ``output + ".distill"``.
        resume (`bool`, defaults to `False`): continue from the work folder's checkpoint.
        progress (`bool`, defaults to `True`): show progress bars (main process).

    Returns:
        `dict`: ``losses`` (one per step), ``seconds``, ``steps``, and ``first`` / ``last`` (mean loss of the first and
        last 5% of steps).
    """
    if table.mode_spec.direct_kv:
        raise DistillError("distil a vector-mode table, then convert it to key/value (condvec-merge kv)")
    if table.num_anchors != 1:
        raise DistillError("distillation needs a table with one timestep anchor")
    rank, world = _world()
    if config.batch_size % world:
        raise DistillError(f"distillation batch size {config.batch_size} does not split over {world} processes")
    work = work_dir(output)
    state_dir, pool_path = os.path.join(work, "checkpoint"), os.path.join(work, "pool.safetensors")
    fingerprint = _fingerprint(model, table, config)
    step, losses = 0, []
    states = {"data": RowSparseAdamW(table.data.shape[0], tuple(table.data.shape[1:]))}
    if table.pooled is not None:
        states["pooled"] = RowSparseAdamW(table.pooled.shape[0], tuple(table.pooled.shape[1:]))
    if resume:
        if not os.path.isfile(os.path.join(state_dir, "state.json")):
            raise DistillError(f"nothing to resume: {work} holds no checkpoint (run without --resume)")
        saved = json.loads(open(os.path.join(state_dir, "state.json")).read())
        if saved["fingerprint"] != fingerprint:
            raise DistillError(f"{work} is the checkpoint of another distillation (other model, tags or settings): "
                               "pass the same arguments, or --force to start over")
        resumed = TagTable.load(os.path.join(state_dir, "table.safetensors"))
        table.data.copy_(resumed.data)
        if table.pooled is not None:
            table.pooled.copy_(resumed.pooled)
        tensors = load_file(os.path.join(state_dir, "optim.safetensors"))
        for name, opt in states.items():
            opt.load_state_tensors(tensors, name)
        step, losses = saved["step"], saved["losses"]
    elif rank == 0:
        if os.path.exists(work):
            shutil.rmtree(work)
        os.makedirs(work)
    if world > 1:
        torch.distributed.barrier()

    if os.path.isfile(pool_path):
        pool = load_file(pool_path)
        prompts = json.loads(open(pool_path + ".json").read())["prompts"]
    else:
        prompts = random_prompts(table.names, config.pool, config.max_tags, config.seed, config.prompts)
        pool = teacher_pool(model, prompts, config, progress=progress and rank == 0)
        if rank == 0:  # the prompts first: a pool file on disk always has its prompts beside it
            with open(pool_path + ".json", "w") as f:
                json.dump({"prompts": prompts}, f)
            save_file(pool, pool_path + ".tmp")
            os.replace(pool_path + ".tmp", pool_path)
    parsed = [parse_prompt(p, table.normalization) for p in prompts]
    unet, scheduler = model.unet.requires_grad_(False).eval(), model.scheduler
    device, dtype = unet.device, unet.dtype
    pixels = _pixels(model)
    num_t = scheduler.config.num_train_timesteps

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=step, desc="distilling", unit="step", disable=not (progress and rank == 0))
    began = time.perf_counter()
    share = slice(rank, None, world)
    while step < config.steps:
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        idx = torch.randint(len(prompts), (config.batch_size,), generator=g)
        t = torch.randint(num_t, (config.batch_size,), generator=g)
        noise = torch.randn((config.batch_size, *pool["latents"].shape[1:]), generator=g)
        if config.high_noise:
            t = torch.where(torch.rand(config.batch_size, generator=g) < config.high_noise, num_t // 2 + t // 2, t)
        mine = idx[share]
        x0, t_mine, n_mine = pool["latents"][mine], t[share], noise[share]
        noisy = scheduler.add_noise(x0, n_mine, t_mine).to(device, dtype)
        t_dev = t_mine.to(device)
        pooled = pool.get("pooled")
        with torch.no_grad():
            target = unet(noisy, t_dev, encoder_hidden_states=pool["embeds"][mine].to(device, dtype),
                          added_cond_kwargs=_added(model, None if pooled is None else pooled[mine].to(device, dtype),
                                                   pixels)).sample.float()
        tokens = tokenize(table, [parsed[i] for i in idx.tolist()])
        ids = tokens.rows
        live = {"data": table.data[ids].to(device).requires_grad_(True)}
        if table.pooled is not None:
            live["pooled"] = table.pooled[ids].to(device).requires_grad_(True)
        rows = Rows(ids=ids.to(device), data=live["data"], special=table.special.to(device),
                    pooled=live.get("pooled"), null_pooled=None if table.null_pooled is None
                    else table.null_pooled.to(device))
        mine_tokens = tokens.select(share)
        cond = pack(table, mine_tokens, rows=rows).to(dtype)
        added = None if table.pooled is None else _added(model, pack_pooled(mine_tokens, rows).to(dtype), pixels)
        with patched(unet, table):
            pred = unet(noisy, t_dev, encoder_hidden_states=cond, added_cond_kwargs=added).sample.float()
        loss = F.mse_loss(pred, target)
        loss.backward()
        value = loss.detach().clone()
        grads = {name: tensor.grad for name, tensor in live.items()}
        if world > 1:  # only the batch's rows travel
            for grad in grads.values():
                torch.distributed.all_reduce(grad)
                grad /= world
            torch.distributed.all_reduce(value)
            value /= world
        lr = config.rate(step)
        states["data"].step(table.data, ids, grads["data"], lr)
        if "pooled" in states:
            states["pooled"].step(table.pooled, ids, grads["pooled"], lr)
        step += 1
        losses.append(float(value))
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if (step % config.save_every == 0 or step == config.steps) and rank == 0:
            _save_checkpoint(state_dir, table, states, step, losses, fingerprint)
        if world > 1:
            torch.distributed.barrier()
    bar.close()
    tail = max(1, len(losses) // 20)
    return {"losses": losses, "steps": step, "seconds": round(time.perf_counter() - began, 1),
            "first": sum(losses[:tail]) / tail, "last": sum(losses[-tail:]) / tail}


def _save_checkpoint(state_dir: str, table: TagTable, states: dict, step: int, losses: list[float],
                     fingerprint: dict) -> None:
    """Table, optimiser state and progress, replaced as one folder (a kill leaves the old or the new one)."""
    with atomic_dir(state_dir) as tmp:
        table.save(os.path.join(tmp, "table.safetensors"))
        tensors = {}
        for name, opt in states.items():
            tensors |= {k: v.contiguous() for k, v in opt.state_tensors(name).items()}
        save_file(tensors, os.path.join(tmp, "optim.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "losses": losses, "fingerprint": fingerprint}, f)


def plot_losses(losses: list[float], path: str, title: str = "distillation") -> str:
    """A PNG of the teacher–student loss per step (and its 50-step mean); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(losses, lw=0.5, alpha=0.4, label="step")
    k = 50
    if len(losses) >= k:
        mean = [sum(losses[i - k:i]) / k for i in range(k, len(losses) + 1)]
        ax.plot(range(k - 1, len(losses)), mean, lw=1.5, label=f"{k}-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE(student, teacher)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
