"""Loading the base model for a run: a diffusers folder, a single-file UNet, or a built-in config."""

from __future__ import annotations

import json
import os

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

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


def build_builtin(name: str, seed: int = 0) -> UNet2DConditionModel:
    """A built-in UNet, freshly initialised (seeded)."""
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in model {name!r}; available: {', '.join(BUILTIN)}")
    torch.manual_seed(seed)
    return UNet2DConditionModel(**BUILTIN[name])


def load_base(model_cfg, seed: int = 0):
    """Load ``(unet, vae | None, noise_scheduler, table | None, base_name)`` for a run's ``model`` section.

    Raises:
        FileNotFoundError / ValueError: with a one-line message saying which path or field is wrong.
    """
    vae, table = None, None
    scheduler_config: dict | None = None
    if model_cfg.builtin:
        unet = build_builtin(model_cfg.builtin, seed)
        name = model_cfg.name or f"builtin:{model_cfg.builtin}"
    elif model_cfg.pretrained:
        from unet_patch.pipeline import load_components

        unet, scheduler, vae, table = load_components(model_cfg.pretrained)
        scheduler_config = dict(scheduler.config)
        name = model_cfg.name or os.path.basename(os.path.normpath(model_cfg.pretrained))
    else:
        path, config = model_cfg.single_file, model_cfg.single_file_config
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model.single_file {path!r} does not exist")
        config_dir = os.path.dirname(config) if config.endswith(".json") else config
        if not os.path.isfile(os.path.join(config_dir, "config.json")):
            raise FileNotFoundError(f"model.single_file_config {config!r} has no config.json")
        unet = load_single_file(path, config_dir)
        name = model_cfg.name or os.path.basename(path)
    if scheduler_config is None:
        schedule = PIXEL_SCHEDULE if model_cfg.builtin else SD_SCHEDULE
        noise_scheduler = DDPMScheduler(num_train_timesteps=model_cfg.num_train_timesteps, **schedule)
    else:
        keep = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        noise_scheduler = DDPMScheduler.from_config(keep)
    if model_cfg.prediction_type:
        noise_scheduler.register_to_config(prediction_type=model_cfg.prediction_type)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {noise_scheduler.config.prediction_type!r} of the scheduler config is not "
                         "supported: set model.prediction_type to epsilon or v_prediction")
    return unet, vae, noise_scheduler, table, name


def load_single_file(path: str, config_dir: str) -> UNet2DConditionModel:
    """A UNet from one ``.safetensors`` file plus a local ``config.json``.

    Files with diffusers key names (``conv_in.weight`` …) are loaded directly into a UNet built from the config;
    original LDM/kohya-format checkpoints (``model.diffusion_model.…``) go through diffusers' converter.
    """
    from safetensors import safe_open

    if not path.endswith(".safetensors"):
        raise ValueError(f"model.single_file {path!r} must be a .safetensors file (pickled checkpoints are refused)")
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    if "conv_in.weight" in keys:
        from safetensors.torch import load_file

        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir))
        try:
            missing, unexpected = unet.load_state_dict(load_file(path), strict=False)
        except RuntimeError as err:
            raise ValueError(f"{path!r} does not match {config_dir}/config.json: "
                             f"{str(err).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise ValueError(f"{path!r} does not match {config_dir}/config.json: {len(missing)} missing and "
                             f"{len(unexpected)} unexpected keys (first: {(missing or unexpected)[0]})")
        return unet
    return UNet2DConditionModel.from_single_file(path, config=config_dir, local_files_only=True)


def describe(unet: torch.nn.Module) -> str:
    """One line: parameter count and cross-attention layout."""
    params = sum(p.numel() for p in unet.parameters())
    config = json.loads(json.dumps(dict(unet.config), default=str))
    return f"UNet {params / 1e6:.2f}M params, {config.get('sample_size')} px, in_channels={config.get('in_channels')}"
