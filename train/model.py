"""The base model of a run: loaded through ``unet_patch.load`` (folders, single files), or built (built-ins)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr

from conditioner.errors import CondvecError
from conditioner.table import TagTable
from unet_patch.load import BaseModel, load_model

# A small pixel-space UNet: 32 px images, cross-attention at 16 and 8 px only (attention at 32 px costs ~3×).
TINY_UNET = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=8,
)

# A very small pixel-space UNet for tests: 16 px, cross-attention in every block.
MICRO_UNET = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=4,
    norm_num_groups=4,
)
BUILTIN = {"tiny": TINY_UNET, "micro": MICRO_UNET}

# SD's noise schedule, for single-file SD checkpoints (their folders carry no scheduler config).
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
# Built-ins (trained from scratch) use SD's schedule rescaled to zero terminal SNR, with v-prediction and trailing
# timesteps (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed"): SD's own schedule leaves ~7%
# of the signal at the last step, so sampling from pure noise drifts every flat background towards grey.
PIXEL_SCHEDULE = dict(SD_SCHEDULE, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                      prediction_type="v_prediction")


def diffusers_config(configured) -> dict:
    """The config of a diffusers scheduler or model without bookkeeping keys (``_class_name`` …).

    Ready for ``SchedulerClass.from_config`` and stable for hashing (no paths or versions).

    Args:
        configured: a diffusers scheduler or model (anything with a ``config`` mapping).
    """
    return {key: value for key, value in dict(configured.config).items() if not key.startswith("_")}


def build_builtin(name: str, seed: int = 0) -> UNet2DConditionModel:
    """A built-in UNet, freshly initialised (seeded)."""
    if name not in BUILTIN:
        raise CondvecError(f"unknown built-in model {name!r}; available: {', '.join(BUILTIN)}")
    torch.manual_seed(seed)
    return UNet2DConditionModel(**BUILTIN[name])


@dataclass
class Base:
    """The base model of a run.

    Attributes:
        unet: the denoiser. vae: its VAE, or `None` in pixel space. noise_scheduler: the training scheduler (DDPM).
        table: the base's own condvec table, if it ships one. name: recorded in the table.
        text: the model with its text encoders (``unet_patch.load.BaseModel``) when it has them: new tables and tags
            start from its CLIP encoding; free it after.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL | None
    noise_scheduler: DDPMScheduler
    table: TagTable | None
    name: str
    text: BaseModel | None = None


def load_base(model_cfg, seed: int = 0) -> Base:
    """Load a run's base model from its ``model`` section.

    Folders and single files load through :func:`unet_patch.load.load_model` (the one loader: offline, pickles
    refused, family detected, unsupported architectures named); built-ins and ``model.unet_config`` are built here,
    freshly initialised. A model with text encoders keeps them in ``text`` (new tables and tags start from its CLIP).

    Raises:
        CondvecError / FileNotFoundError: with a one-line message saying which path or field is wrong.
    """
    vae, table, scheduler, text = None, None, None, None
    if model_cfg.builtin:
        unet = build_builtin(model_cfg.builtin, seed)
        name = model_cfg.name or f"builtin:{model_cfg.builtin}"
    elif model_cfg.unet_config:
        unet = build_from_config(model_cfg.unet_config, seed)
        name = model_cfg.name or os.path.splitext(os.path.basename(model_cfg.unet_config))[0]
    else:
        if model_cfg.pretrained:
            loaded = load_model(model_cfg.pretrained)
        else:
            if not os.path.isfile(model_cfg.single_file):
                raise FileNotFoundError(f"model.single_file {model_cfg.single_file!r} does not exist")
            loaded = load_model(model_cfg.single_file, config=model_cfg.single_file_config)
        unet, vae, table, name = loaded.unet, loaded.vae, loaded.table, model_cfg.name or loaded.name
        scheduler = loaded.scheduler if loaded.has_scheduler else None
        text = loaded if loaded.text_encoders else None
        if scheduler is None:
            print(f"model: {loaded.path!r} has no scheduler/: using Stable Diffusion's noise schedule", flush=True)
    if scheduler is None:
        from_scratch = model_cfg.builtin or model_cfg.unet_config
        schedule = PIXEL_SCHEDULE if from_scratch else SD_SCHEDULE
        noise_scheduler = DDPMScheduler(num_train_timesteps=model_cfg.num_train_timesteps, **schedule)
    else:
        noise_scheduler = DDPMScheduler.from_config(diffusers_config(scheduler))
    if model_cfg.prediction_type:
        noise_scheduler.register_to_config(prediction_type=str(model_cfg.prediction_type))
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise CondvecError(f"prediction_type {noise_scheduler.config.prediction_type!r} of the scheduler config "
                           "is not supported: set model.prediction_type to epsilon or v_prediction")
    return Base(unet, vae, noise_scheduler, table, name, text)


def build_from_config(path: str, seed: int = 0) -> UNet2DConditionModel:
    """A freshly initialised (seeded) UNet from a ``UNet2DConditionModel`` config file (.json)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.unet_config {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise CondvecError(f"model.unet_config {path!r} is not a readable JSON file: {err}") from err
    if not isinstance(config, dict):
        raise CondvecError(f"model.unet_config {path!r} must hold a JSON object of UNet2DConditionModel arguments")
    torch.manual_seed(seed)
    try:
        return UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError) as err:
        raise CondvecError(f"model.unet_config {path!r}: {str(err).splitlines()[0]}") from err


def describe(unet: torch.nn.Module) -> str:
    """One line: parameter count and cross-attention layout."""
    params = sum(p.numel() for p in unet.parameters())
    config = json.loads(json.dumps(dict(unet.config), default=str))
    return f"UNet {params / 1e6:.2f}M params, {config.get('sample_size')} px, in_channels={config.get('in_channels')}"


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) per sample, finite for every schedule and prediction type.

    Epsilon prediction: ``min(snr, γ) / snr``, written as ``min(1, γ / snr)`` so that a zero-terminal-SNR schedule
    (``snr = 0`` at the last timestep) gives 1 instead of 0/0. v-prediction: ``min(snr, γ) / (snr + 1)``.

    Args:
        noise_scheduler: the training scheduler (``alphas_cumprod`` and ``config.prediction_type`` are used).
        timesteps (`torch.LongTensor`): ``(B,)`` the samples' timesteps.
        gamma (`float`): γ; `0` turns the weighting off (all ones).

    Returns:
        `torch.Tensor`: ``(B,)`` float32 weights.
    """
    if gamma <= 0:
        return torch.ones(timesteps.shape, device=timesteps.device)
    snr = compute_snr(noise_scheduler, timesteps)  # (B,), in [0, inf]
    if noise_scheduler.config.prediction_type == "v_prediction":
        return torch.clamp(snr, max=gamma) / (snr + 1)
    return torch.clamp(gamma / snr, max=1.0)
