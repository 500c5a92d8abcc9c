"""The miniature SD's pretraining (`python -m demo.pretrain`) resumes exactly and exports an SD1.x folder."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from demo import pretrain

NUM, BATCH = 24, 2


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted(folder.glob("step-*.safetensors"))[-1]))


def _train(work: Path, vae_steps: int, unet_steps: int, resume_at: int | None = None) -> None:
    quiet = lambda *_: None  # noqa: E731
    if resume_at is not None:  # stop part-way, then start again from the checkpoint
        pretrain.train_vae(work, resume_at, BATCH, 1e-3, NUM, save_every=1, log=quiet)
    pretrain.train_vae(work, vae_steps, BATCH, 1e-3, NUM, save_every=1, log=quiet)
    pretrain.finish_vae(work, NUM)
    if resume_at is not None:
        pretrain.train_unet(work, resume_at, BATCH, 1e-3, 5e-4, NUM, save_every=1, snapshot_every=0, log=quiet)
    pretrain.train_unet(work, unet_steps, BATCH, 1e-3, 5e-4, NUM, save_every=1, snapshot_every=0, log=quiet)


def test_pretraining_resumes_bit_identically_and_exports_a_stock_sd_folder(tmp_path):
    """Every step's batch, noise and timesteps come from the step number; optimiser and EMA state are checkpointed."""
    torch.set_num_threads(1)
    _train(tmp_path / "once", 3, 3)
    _train(tmp_path / "twice", 3, 3, resume_at=1)
    for stage in ("vae", "unet"):
        a, b = _state(tmp_path / "once" / stage), _state(tmp_path / "twice" / stage)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{stage}: the resumed run differs"
    out = pretrain.export(tmp_path / "once", tmp_path / "mini")

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("red circle, white background", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    assert pipe.tokenizer("red circle").input_ids == [0, pipe.tokenizer.convert_tokens_to_ids("red</w>"),
                                                      pipe.tokenizer.convert_tokens_to_ids("circle</w>"), 1]
