"""bootstrap.text computes, from a model's own text encoders, exactly what the stock diffusers pipelines compute."""

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from bootstrap.text import null_sequence, tag_positions, tag_vectors
from conditioner.errors import CondvecError
from tests.standins import make_sd2, make_sd15, make_sdxl
from unet_patch.load import load_model

FAMILIES = {
    "sd1": (make_sd15, StableDiffusionPipeline),
    "sd2-v": (make_sd2, StableDiffusionPipeline),
    "sdxl": (make_sdxl, StableDiffusionXLPipeline),
}
TAGS = ["cat", "red hair", "xyzzy", "a photo of a girl with blue hair", "dog", "glass elephant", "qq"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family, loaded BaseModel, stock pipeline) for one stand-in folder."""
    make, pipeline_cls = FAMILIES[request.param]
    folder = make(tmp_path_factory.mktemp(request.param))
    return request.param, load_model(folder), pipeline_cls.from_pretrained(folder, local_files_only=True)


def _pipeline_encode(pipe, prompt, cfg=False):
    """The stock pipeline's encode_prompt on CPU: (prompt_embeds, negative, pooled | None, negative_pooled | None)."""
    out = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=cfg)
    return tuple(out) + (None, None) if len(out) == 2 else tuple(out)


def test_null_sequence_is_the_pipelines_empty_prompt(family):
    name, model, pipe = family
    null = null_sequence(model)
    embeds, negative, pooled, negative_pooled = _pipeline_encode(pipe, "", cfg=True)
    assert null.sequence.shape == (77, model.unet.config.cross_attention_dim)
    assert torch.equal(null.sequence, embeds[0])  # every one of the 77 positions, bit-identical
    assert torch.equal(null.negative_sequence, negative[0])
    # The padding is position-dependent: a single repeated padding row could not reproduce it.
    assert not torch.equal(null.sequence[2], null.sequence[40])
    if name == "sdxl":
        assert null.pooled.shape == (pipe.text_encoder_2.config.projection_dim,)
        assert torch.equal(null.pooled, pooled[0])
        # force_zeros_for_empty_prompt: the stock negative is zeros, and so is ours.
        assert null.negative_zeros and torch.equal(null.negative_pooled, negative_pooled[0])
        assert not negative[0].any() and not null.negative_sequence.any()
    else:
        assert null.pooled is None and not null.negative_zeros


def test_null_sequence_uses_the_pipelines_layer_and_encoders(family):
    """The stand-ins tell layers and encoders apart, so a wrong layer or a missing encoder fails the test above."""
    name, model, _ = family
    null = null_sequence(model)
    ids = [tok("", padding="max_length", max_length=77, return_tensors="pt").input_ids for tok in model.tokenizers]
    with torch.no_grad():
        outs = [enc(i, output_hidden_states=True) for enc, i in zip(model.text_encoders, ids)]
    if name == "sdxl":
        h1 = outs[0].hidden_states[-2][0]
        assert torch.equal(null.sequence[:, :h1.shape[-1]], h1)  # text_encoder's penultimate layer
        assert torch.equal(null.sequence[:, h1.shape[-1]:], outs[1].hidden_states[-2][0])  # text_encoder_2's
        last = torch.cat([outs[0].last_hidden_state[0], outs[1].last_hidden_state[0]], dim=-1)
        assert not torch.allclose(null.sequence, last, atol=1e-3)
    else:
        assert torch.equal(null.sequence, outs[0].last_hidden_state[0])
        assert not torch.allclose(null.sequence, outs[0].hidden_states[-2][0], atol=1e-3)


def test_sdxl_without_force_zeros_uses_the_empty_prompt_as_negative(tmp_path):
    folder = make_sdxl(tmp_path, force_zeros_for_empty_prompt=False)
    model = load_model(folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    null = null_sequence(model)
    _, negative, _, negative_pooled = _pipeline_encode(pipe, "", cfg=True)
    assert not null.negative_zeros
    assert torch.equal(null.negative_sequence, negative[0]) and negative[0].abs().sum() > 0
    assert torch.equal(null.negative_pooled, negative_pooled[0])


@pytest.mark.parametrize("tokens_per_tag", [1, 2, 3])
def test_tag_vectors_are_the_pipelines_encoding_at_the_documented_positions(family, tokens_per_tag):
    name, model, pipe = family
    tags = tag_vectors(model, TAGS, tokens_per_tag=tokens_per_tag, batch_size=len(TAGS), progress=False)
    embeds, _, pooled, _ = _pipeline_encode(pipe, TAGS)
    width = model.unet.config.cross_attention_dim
    assert tags.vectors.shape == (len(TAGS), tokens_per_tag, width)
    for i, tag in enumerate(TAGS):
        ids = model.tokenizers[0](tag).input_ids  # [BOS, tokens…, EOS]
        assert tags.token_counts[i] == len(ids) - 2
        positions = tag_positions(len(ids) - 2, tokens_per_tag)
        assert tags.positions[i].tolist() == positions
        for slot, position in enumerate(positions):
            assert torch.equal(tags.vectors[i, slot], embeds[i, position])
    if name == "sdxl":
        assert torch.equal(tags.pooled, pooled)  # text_encoder_2's text_embeds of each prompt `tag`
    else:
        assert tags.pooled is None


def test_tag_positions_rule():
    # Exactly as many tokens as slots: the tag's own token positions.
    assert tag_positions(1, 1) == [1]
    assert tag_positions(3, 3) == [1, 2, 3]
    # Fewer tokens than slots: EOS (position k + 1) fills the rest.
    assert tag_positions(1, 3) == [1, 2, 2]
    assert tag_positions(0, 2) == [1, 1]
    # More tokens than slots: the last token of each consecutive chunk; one slot → the tag's last token.
    assert tag_positions(5, 1) == [5]
    assert tag_positions(5, 2) == [3, 5]
    assert tag_positions(8, 3) == [3, 6, 8]
    with pytest.raises(CondvecError, match="tokens_per_tag"):
        tag_positions(2, 0)


def test_one_vector_of_a_multi_token_tag_is_its_last_token_not_eos_nor_first(family):
    _, model, pipe = family
    tags = tag_vectors(model, ["red hair", "xyzzy"], progress=False)
    embeds, *_ = _pipeline_encode(pipe, ["red hair", "xyzzy"])
    assert tags.token_counts.tolist() == [2, 5]
    assert torch.equal(tags.vectors[0, 0], embeds[0, 2]) and torch.equal(tags.vectors[1, 0], embeds[1, 5])
    assert not torch.equal(tags.vectors[0, 0], embeds[0, 1]) and not torch.equal(tags.vectors[0, 0], embeds[0, 3])


def test_tag_vectors_do_not_depend_on_batching(family):
    name, model, _ = family
    whole = tag_vectors(model, TAGS, tokens_per_tag=2, batch_size=256, progress=False)
    one_by_one = tag_vectors(model, TAGS, tokens_per_tag=2, batch_size=1, progress=False)
    assert torch.equal(whole.vectors, one_by_one.vectors)
    if name == "sdxl":
        # The pooled projection is a matrix product whose CPU kernel changes with the batch size: float rounding only.
        torch.testing.assert_close(whole.pooled, one_by_one.pooled, rtol=0, atol=1e-5)


def test_long_tags_are_truncated_like_the_pipeline(family):
    _, model, pipe = family
    long_tag = " ".join(["cat"] * 100)
    tags = tag_vectors(model, [long_tag], tokens_per_tag=1, progress=False)
    embeds, *_ = _pipeline_encode(pipe, long_tag)
    assert tags.token_counts.tolist() == [75] and tags.positions.tolist() == [[75]]
    assert torch.equal(tags.vectors[0, 0], embeds[0, 75])


def test_bootstrap_needs_the_text_encoders(tmp_path):
    model = load_model(make_sd15(tmp_path), with_text_encoders=False)
    with pytest.raises(CondvecError, match="with_text_encoders=True") as err:
        null_sequence(model)
    assert "\n" not in str(err.value)
    with pytest.raises(CondvecError, match="text encoder"):
        tag_vectors(model, ["cat"], progress=False)
