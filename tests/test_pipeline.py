import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler
from testkit import make_unet

from conditioner import TagTable
from conditioner.errors import CondvecError
from unet_patch import TagDiffusionPipeline, is_installed, table_for_unet
from unet_patch.cli import main as generate_main
from unet_patch.pipeline import rescale_noise_cfg


def _tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16,
    ).eval()


def _pipe(vae: bool, scheduler_cls=DDIMScheduler, anchors: int = 1):
    unet = make_unet(in_channels=4 if vae else 3)
    table = table_for_unet(unet, tags=["red circle", "blue square"], init_std=1.0, anchors=anchors)
    return TagDiffusionPipeline(unet=unet, scheduler=scheduler_cls(), vae=_tiny_vae() if vae else None, table=table)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, EulerDiscreteScheduler])
@pytest.mark.parametrize("vae", [False, True])
def test_generates_with_schedulers_in_pixel_and_latent_space(scheduler_cls, vae):
    pipe = _pipe(vae, scheduler_cls)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("red circle", negative_prompt="blue square", num_inference_steps=3, guidance_scale=3.0,
               num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, 16 if vae else 8, 16 if vae else 8, 3)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert not is_installed(pipe.unet), "processors are restored after generation"
    again = pipe("red circle", negative_prompt="blue square", num_inference_steps=3, guidance_scale=3.0,
                 num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.array_equal(out, again), "same seed, same images"


def test_prompt_changes_the_image_and_anchors_reencode_each_step():
    pipe = _pipe(False, anchors=2)
    pipe.set_progress_bar_config(disable=True)
    packed_widths = []
    original = pipe.unet.forward

    def spy(sample, t, encoder_hidden_states=None, **kw):
        packed_widths.append(encoder_hidden_states[0, 1].clone())
        return original(sample, t, encoder_hidden_states=encoder_hidden_states, **kw)

    pipe.unet.forward = spy
    a = pipe("red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    pipe.unet.forward = original
    b = pipe("blue square", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert not np.array_equal(a.images, b.images)
    assert not torch.equal(packed_widths[0], packed_widths[-1]), "conditioning follows the timestep"


def test_guidance_rescale():
    torch.manual_seed(0)
    guided, conditional = torch.randn(2, 3, 8, 8) * 3, torch.randn(2, 3, 8, 8)
    full = rescale_noise_cfg(guided, conditional, 1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), conditional.std(dim=(1, 2, 3)), rtol=1e-5)
    assert torch.allclose(full / guided, (full / guided).flatten(1)[:, :1, None, None].expand_as(full))
    assert torch.equal(rescale_noise_cfg(guided, conditional, 0.0), guided)
    half = rescale_noise_cfg(guided, conditional, 0.5)
    assert torch.allclose(half, 0.5 * full + 0.5 * guided)

    pipe = _pipe(False)
    pipe.set_progress_bar_config(disable=True)

    def run(**kw):
        return pipe("red circle", num_inference_steps=3, guidance_scale=4.0, output_type="np",
                    generator=torch.Generator().manual_seed(0), **kw).images

    assert np.array_equal(run(), run(guidance_rescale=0.0))
    assert not np.array_equal(run(), run(guidance_rescale=0.7))
    with pytest.raises(CondvecError, match="guidance_rescale must be between 0 and 1"):
        run(guidance_rescale=1.5)


def test_callback_and_latent_output():
    pipe = _pipe(False)
    pipe.set_progress_bar_config(disable=True)
    steps = []

    def callback(p, i, t, kwargs):
        steps.append(i)
        return {"latents": kwargs["latents"] * 0}

    out = pipe("red circle", num_inference_steps=4, output_type="latent", callback_on_step_end=callback).images
    assert steps == [0, 1, 2, 3] and torch.count_nonzero(out) == 0


def test_save_load_roundtrip(tmp_path):
    pipe = _pipe(True)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "model")
    loaded = TagDiffusionPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.table.metadata() == pipe.table.metadata() and torch.equal(loaded.table.data, pipe.table.data)
    kwargs = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np")
    assert np.array_equal(pipe("red circle", **kwargs).images,
                          loaded("red circle", **kwargs | {"generator": torch.Generator().manual_seed(3)}).images)


def test_unknown_tag_in_pipeline():
    pipe = _pipe(False)
    with pytest.raises(CondvecError, match="unknown tag 'red circl' \\(did you mean 'red circle'"):
        pipe("red circl", num_inference_steps=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "model"
    _pipe(False).save_pretrained(path)
    return path


def test_generate_cli_writes_grid(model_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert generate_main(["--model", str(model_dir), "--prompt", "red circle", "--num", "3", "--steps", "2",
                          "--scheduler", "euler", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (16, 16)
    assert (tmp_path / "grid-2.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "red circl"], "unknown tag 'red circl'"),
        (["--prompt", "(red circle:x)"], "malformed weight 'x'"),
        (["--prompt", "a", "--table", "/nonexistent.safetensors"], "does not exist"),
        (["--prompt", "a", "--out", "x.jpg"], "--out must be a .png"),
        (["--prompt", "red circle", "--guidance-rescale", "1.5"], "--guidance-rescale must be between 0 and 1"),
    ],
)
def test_generate_cli_errors(model_dir, tmp_path, capsys, args, message):
    assert generate_main(["--model", str(model_dir), "--steps", "1", "--out", str(tmp_path / "o.png"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("condvec-generate: error:") and len(err.splitlines()) == 1


def test_generate_console_script_mismatched_table(model_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(block_out_channels=(8, 8), layers_per_block=1, cross_attention_dim=8,
                                 attention_head_dim=2, norm_num_groups=4, sample_size=8,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    table_path = tmp_path / "other.safetensors"
    table_for_unet(other, tags=["red circle"], base_name="other-base").save(table_path)
    before = TagTable.load(table_path).data.clone()
    result = subprocess.run(
        [sys.executable, "-m", "unet_patch.cli", "--model", str(model_dir), "--table", str(table_path),
         "--prompt", "red circle", "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "does not fit this UNet" in result.stderr and "other-base" in result.stderr
    assert torch.equal(TagTable.load(table_path).data, before)
