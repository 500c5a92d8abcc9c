"""Images and models out of a run: sample grids (prompts × seeds) and the trained model as a diffusers folder."""

from __future__ import annotations

import os

import torch
from diffusers import DDIMScheduler

from conditioner.fileio import atomic_dir
from conditioner.table import TagTable
from train.model import diffusers_config
from unet_patch.grid import labelled_grid
from unet_patch.patch import install, remove
from unet_patch.pipeline import TagDiffusionPipeline


def _pipeline(unet, vae, table: TagTable, noise_scheduler) -> TagDiffusionPipeline:
    pipe = TagDiffusionPipeline(unet=unet, scheduler=DDIMScheduler.from_config(diffusers_config(noise_scheduler)),
                                vae=vae, table=table)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_grid(cfg, unet, vae, table: TagTable, noise_scheduler, tag: str,
                prompts: list[str] | None = None) -> str | None:
    """Generate ``output.sample_prompts`` × ``output.sample_seeds`` with the current table; returns the PNG path.

    Each prompt is one pipeline call with all seeds as a batch (a generator per seed, so a column's image is the one
    that seed gives alone). The UNet is put in eval mode for sampling and back as it was after; its condvec processors
    stay installed.

    Args:
        cfg (`DictConfig`): the run config (``output.*`` is used).
        unet (`UNet2DConditionModel`): the (unwrapped) UNet.
        vae (`AutoencoderKL`, *optional*): the VAE, `None` for pixel-space models.
        table (`TagTable`): the table.
        noise_scheduler: the training scheduler (its config makes the DDIM sampler).
        tag (`str`): file name stem, e.g. ``step-0000500``.
        prompts (`list[str]`, *optional*): the grid's rows; default ``output.sample_prompts``.

    Returns:
        `str | None`: ``OUTPUT/samples/TAG.png``, or `None` when no sample prompts are set.
    """
    o = cfg.output
    prompts = list(o.sample_prompts) if prompts is None else prompts
    if not prompts:
        return None
    was_training = unet.training
    unet.eval()
    pipe = _pipeline(unet, vae, table, noise_scheduler)
    rows = []
    for prompt in prompts:  # one call per prompt: every seed in one batch, one generator per image
        generators = [torch.Generator().manual_seed(int(seed)) for seed in o.sample_seeds]
        rows.append(pipe(prompt, num_inference_steps=o.sample_steps, guidance_scale=o.sample_guidance,
                         num_images_per_prompt=len(generators), generator=generators).images)
    install(unet, table)  # the pipeline restored the processors it found; keep ours
    unet.train(was_training)
    path = os.path.join(o.dir, "samples", f"{tag}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    labelled_grid(rows, list(prompts), [f"seed {s}" for s in o.sample_seeds],
                  title=f"{os.path.basename(o.dir)} - {tag}", upscale=o.sample_upscale).save(path)
    return path


def save_model(path: str, unet, vae, table: TagTable, noise_scheduler) -> str:
    """Save the trained UNet (stock processors), a DDIM scheduler, the VAE and the table as a diffusers folder.

    Args:
        path (`str`): the folder to write.
        unet (`UNet2DConditionModel`): the (unwrapped) UNet; its condvec processors are reinstalled afterwards.
        vae (`AutoencoderKL`, *optional*): the VAE.
        table (`TagTable`): the table, saved as ``table/table.safetensors``.
        noise_scheduler: the training scheduler.
    """
    remove(unet)
    try:
        with atomic_dir(path) as tmp:  # a kill while saving leaves the previous model/ folder complete
            _pipeline(unet, vae, table, noise_scheduler).save_pretrained(tmp)
    finally:
        install(unet, table)
    return path
