"""Shared test helpers (importable: ``from testkit import make_unet``); fixtures live in ``conftest.py``."""

import torch
from diffusers import UNet2DConditionModel


def make_unet(in_channels: int = 3, cross_attention_dim: int = 16, sample_size: int = 8, seed: int = 0,
              layers_per_block: int = 1) -> UNet2DConditionModel:
    """A tiny SD-shaped UNet: cross-attention in two down blocks, the mid block and two up blocks."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16, 16),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def capture_kv_inputs(unet):
    """Forward hooks on every attn2's to_k / to_v, recording their inputs by (layer name, projection)."""
    from unet_patch import discover

    seen, handles = {}, []
    for layer in discover(unet):
        attn = unet.get_submodule(layer.name)
        for proj in ("to_k", "to_v"):
            def hook(module, args, out, key=(layer.name, proj)):
                seen[key] = args[0].detach().clone()
            handles.append(getattr(attn, proj).register_forward_hook(hook))
    return seen, handles


def micro_run(data, out, *extra: str, steps: int = 4, save_every: int = 2) -> list[str]:
    """``condvec-train`` overrides of a micro run: the built-in ``micro`` UNet on ``data`` at 16 px, batch 4, no
    samples or progress bars, writing to ``out``; ``extra`` overrides come last and win."""
    return ["model.builtin=micro", f"data.path={data}", "data.resolution=16", "data.bucketing=false",
            f"training.steps={steps}", "training.batch_size=4", f"output.dir={out}", f"output.save_every={save_every}",
            "output.sample_every=0", "output.progress=false", *extra]


def micro_config(data, out, *extra: str, steps: int = 4, save_every: int = 2):
    """The resolved config of :func:`micro_run`."""
    from train.config import load_config

    return load_config(None, micro_run(data, out, *extra, steps=steps, save_every=save_every))


def run_until_killed(trainer, step: int) -> None:
    """Run ``trainer`` and interrupt it (``KeyboardInterrupt``, as a kill would) just before optimiser step
    ``step + 1``; checkpoints saved up to then stay."""
    import pytest

    original = trainer.train_step

    def dying_step():
        if trainer.state.step == step:
            raise KeyboardInterrupt
        return original()

    trainer.train_step = dying_step
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
