"""Bootstrapped tables on tiny SD1.5 / SD2.x / SDXL stand-ins: exact null sequence, tags at the documented
positions, stock diffusers pipelines (txt2img, img2img, SDXL) fed condvec encodings, and condvec's own pipeline."""

import numpy as np
import pytest
import torch
from standins import make_sd2, make_sd15, make_sdxl

from bootstrap.table import bootstrap_table
from bootstrap.text import null_sequence, tag_vectors
from conditioner import encode, encode_pooled
from unet_patch import TagDiffusionPipeline, install, patched, remove
from unet_patch.load import load_model

FAMILIES = {"sd1": make_sd15, "sd2-v": make_sd2, "sdxl": make_sdxl}
TAGS = ["red", "blue hair", "elephant", "zqxv"]  # one-token words, a two-word tag, a rare word split into pieces


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    folder = FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    model = load_model(folder)
    table = bootstrap_table(model, TAGS, progress=False)
    return request.param, folder, model, table


def test_null_prompt_is_the_pipelines_null_embedding_at_every_position(family):
    name, _, model, table = family
    null = null_sequence(model)
    assert table.special.shape[0] == 77
    assert torch.equal(encode(table, [""])[0], null.sequence)
    if name == "sdxl":
        assert torch.equal(encode_pooled(table, [""])[0], null.pooled)
        assert table.negative_zeros
    assert table.base_model["bootstrap"]["encoder"] == null.source


def test_one_tag_packs_to_the_encoder_output_at_its_positions(family):
    _, _, model, table = family
    enc = tag_vectors(model, TAGS, progress=False)
    for i, tag in enumerate(TAGS):
        out = encode(table, [tag])[0]
        assert torch.equal(out[1], enc.vectors[i, 0]), tag
        assert torch.equal(out[2:], table.special[2:, 0])
        if table.pooled is not None:
            assert torch.equal(encode_pooled(table, [tag])[0], enc.pooled[i])


def test_patched_unet_equals_stock_unet_fed_the_same_sequence(family):
    name, _, model, table = family
    unet = model.unet
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = encode(table, ["red, blue hair", ""])
    added = None
    if name == "sdxl":
        added = {"text_embeds": encode_pooled(table, ["red, blue hair", ""]), "time_ids": torch.tensor(
            [[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}
    with torch.no_grad():
        stock = unet(x, 500, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        with patched(unet, table):
            ours = unet(x, 500, encoder_hidden_states=cond, added_cond_kwargs=added).sample
    assert torch.equal(ours, stock)


def _stock_pipe(name, folder, img2img=False):
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )

    cls = {("sdxl", False): StableDiffusionXLPipeline, ("sdxl", True): StableDiffusionXLImg2ImgPipeline}.get(
        (name, img2img), StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline)
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(name, table, prompt, negative):
    kwargs = {"prompt_embeds": encode(table, [prompt]), "negative_prompt_embeds": encode(table, [negative])}
    if name == "sdxl":
        kwargs["pooled_prompt_embeds"] = encode_pooled(table, [prompt])
        kwargs["negative_pooled_prompt_embeds"] = encode_pooled(table, [negative])
    return kwargs


@pytest.mark.parametrize("img2img", [False, True])
def test_stock_pipelines_accept_condvec_encodings(family, img2img):
    """Single group: the patched stock pipeline gives the same image as the unpatched one fed the same sequences.
    Per-layer: the sequences are packed wider than any text encoder's and run only patched."""
    from conditioner import regroup

    name, folder, _, table = family
    pipe = _stock_pipe(name, folder, img2img)
    extra = {"image": torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)), "strength": 0.6} \
        if img2img else {"height": 64, "width": 64}
    kwargs = dict(num_inference_steps=2, guidance_scale=4.0, output_type="latent", **extra,
                  **_embeds(name, table, "red, blue hair", "elephant"))
    stock = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images.numpy()
    install(pipe.unet, table)
    try:
        patched_out = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images.numpy()
    finally:
        remove(pipe.unet)
    np.testing.assert_array_equal(patched_out, stock)

    layers = regroup(table, "layers")
    layers.data[:, :, :layers.dim] += 0.5  # change only the first layer's vectors: output must change
    kwargs.update(_embeds(name, layers, "red, blue hair", "elephant"))
    assert kwargs["prompt_embeds"].shape[-1] == len(layers.group_names) * table.dim
    install(pipe.unet, layers)
    try:
        per_layer = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images.numpy()
    finally:
        remove(pipe.unet)
    assert per_layer.shape == stock.shape and np.isfinite(per_layer).all()
    assert not np.array_equal(per_layer, stock)


def test_condvec_pipeline_matches_the_stock_pipeline(family):
    """TagDiffusionPipeline, single-group bootstrapped table == the stock pipeline fed the same encodings
    (for SDXL with force-zeros, an absent negative prompt is zeros in both)."""
    name, folder, model, table = family
    stock = _stock_pipe(name, folder)
    ours = TagDiffusionPipeline(unet=stock.unet, scheduler=stock.scheduler, vae=stock.vae, table=table)
    ours.set_progress_bar_config(disable=True)
    got = ours("red, blue hair", num_inference_steps=3, guidance_scale=4.0, output_type="np", height=64, width=64,
               generator=torch.Generator().manual_seed(0)).images
    kwargs = {"prompt_embeds": encode(table, ["red, blue hair"])}
    if name == "sdxl":
        kwargs["pooled_prompt_embeds"] = encode_pooled(table, ["red, blue hair"])
    else:
        kwargs["negative_prompt_embeds"] = encode(table, [""])
    want = stock(num_inference_steps=3, guidance_scale=4.0, output_type="np", height=64, width=64,
                 generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(got, want, atol=1e-5)

    img = ours("elephant", image=torch.rand(1, 3, 64, 64), strength=0.5, num_inference_steps=4,
               guidance_scale=3.0, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


def test_timestep_anchors_in_the_stock_pipeline_through_the_callback(tmp_path):
    """A table with anchors: the stock pipeline + AnchorCallback gives the same image as TagDiffusionPipeline."""
    from unet_patch.pipeline import AnchorCallback

    folder = make_sd15(tmp_path)
    model = load_model(folder, with_text_encoders=True)
    table = bootstrap_table(model, ["red", "elephant"], groups="blocks", anchors=3, progress=False)
    gen = torch.Generator().manual_seed(5)
    table.data += torch.randn(table.data.shape, generator=gen) * 0.3  # anchors now differ
    stock = _stock_pipe("sd1", folder)
    ours = TagDiffusionPipeline(unet=stock.unet, scheduler=stock.scheduler, vae=stock.vae, table=table)
    ours.set_progress_bar_config(disable=True)
    want = ours("red, elephant", negative_prompt="", num_inference_steps=3, guidance_scale=4.0,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images
    callback = AnchorCallback(table, "red, elephant")
    stock.scheduler.set_timesteps(3)
    with patched(stock.unet, table):
        got = stock(**callback.embeds(stock.scheduler.timesteps[0]), num_inference_steps=3, guidance_scale=4.0,
                    output_type="latent", height=64, width=64, generator=torch.Generator().manual_seed(0),
                    callback_on_step_end=callback, callback_on_step_end_tensor_inputs=callback.tensor_inputs).images
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    static = AnchorCallback(table, "red, elephant").embeds(stock.scheduler.timesteps[0])
    with patched(stock.unet, table):
        other = stock(**static, num_inference_steps=3, guidance_scale=4.0, output_type="latent", height=64,
                      width=64, generator=torch.Generator().manual_seed(0)).images
    assert not torch.allclose(other, want)  # without the callback the anchors would not move
