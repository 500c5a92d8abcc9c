"""Embedding import: each layout SD users have, read without unpickling; input vectors encoded as the pipeline does."""

import copy
import json
import os

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from bootstrap.embeddings import (
    MAX_EMBEDDING_BYTES,
    XTI_LAYERS,
    EmbeddingFormatError,
    encode_input_embedding,
    read_embedding,
)

WIDTH_L, WIDTH_G = 8, 12  # tiny stand-ins for 768 (CLIP-L) and 1280 (CLIP-G)


def vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def save(tmp_path, name: str, data: dict) -> str:
    """Write ``data`` as the file ``name``: safetensors by extension, else ``torch.save`` (a weights-only pickle)."""
    path = str(tmp_path / name)
    if name.endswith(".safetensors"):
        save_file(data, path)
    else:
        torch.save(data, path)
    return path


# --------------------------------------------------------------------------------------------------- reading files

L1, L3, G3 = vectors(1, WIDTH_L, 1), vectors(3, WIDTH_L, 2), vectors(3, WIDTH_G, 3)
L3_OUT, G3_OUT = vectors(3, WIDTH_L, 4), vectors(3, WIDTH_G, 5)
XTI = {name: vectors(2, WIDTH_L, 10 + i) for i, name in enumerate(XTI_LAYERS)}

# (file name, content, expected kind, expected tensors by field, expected stored name)
CASES = [
    ("xti.safetensors", XTI, "xti", {"layers": XTI}, None),
    ("xti.pt", XTI, "xti", {"layers": XTI}, None),  # kohya's default --save_model_as pt
    ("a1111.pt",
     {"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": L3}, "name": "my-style", "step": 3000,
      "sd_checkpoint": "e1441589", "sd_checkpoint_name": "v1-5-pruned"},
     "input", {"clip_l": L3}, "my-style"),
    ("a1111_parameter.pt",  # A1111 saves the trained nn.Parameter itself
     {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(L3.clone())}, "name": "p"},
     "input", {"clip_l": L3}, "p"),
    ("a1111.safetensors", {"string_to_param.*": L3}, "input", {"clip_l": L3}, None),
    ("a1111_sdxl.safetensors", {"clip_l": L3, "clip_g": G3}, "input", {"clip_l": L3, "clip_g": G3}, None),
    ("kohya.safetensors", {"emb_params": L3}, "input", {"clip_l": L3}, None),
    ("kohya.pt", {"emb_params": L1}, "input", {"clip_l": L1}, None),
    ("kohya_sdxl.safetensors", {"clip_g": G3, "clip_l": L3}, "input", {"clip_l": L3, "clip_g": G3}, None),
    ("onetrainer.safetensors", {"emp_params": L3}, "input", {"clip_l": L3, "clip_l_out": None}, None),
    ("onetrainer_out.safetensors", {"emp_params": L3, "emp_params_out": L3_OUT}, "output",
     {"clip_l": L3, "clip_l_out": L3_OUT}, None),
    ("onetrainer_out_only.safetensors", {"emp_params_out": L3_OUT}, "output",
     {"clip_l": None, "clip_l_out": L3_OUT}, None),
    ("onetrainer_sdxl_out.safetensors", {"clip_l": L3, "clip_g": G3, "clip_l_out": L3_OUT, "clip_g_out": G3_OUT},
     "output", {"clip_l": L3, "clip_g": G3, "clip_l_out": L3_OUT, "clip_g_out": G3_OUT}, None),
    ("diffusers.safetensors", {"<cat-toy>": L1[0]}, "input", {"clip_l": L1}, "<cat-toy>"),  # (D,) → (1, D)
    ("learned_embeds.bin", {"<cat-toy>": L3}, "input", {"clip_l": L3}, "<cat-toy>"),
    ("fp16.safetensors", {"emb_params": L3.half()}, "input", {"clip_l": L3.half().float()}, None),
]


@pytest.mark.parametrize("name, content, kind, expected, stored_name", CASES, ids=[case[0] for case in CASES])
def test_each_layout_gives_exactly_its_vectors(tmp_path, name, content, kind, expected, stored_name):
    emb = read_embedding(save(tmp_path, name, content))
    assert emb.kind == kind
    assert emb.name == stored_name
    for field in ("clip_l", "clip_g", "clip_l_out", "clip_g_out", "layers"):
        want, got = expected.get(field), getattr(emb, field)
        if want is None:
            assert got is None, field
        elif field == "layers":
            assert list(got) == list(XTI_LAYERS)
            for layer in XTI_LAYERS:
                assert got[layer].dtype == torch.float32 and torch.equal(got[layer], want[layer]), layer
        else:
            assert got.dtype == torch.float32 and torch.equal(got, want), field
    assert emb.output is emb.clip_l_out
    first = next(iter(value for value in expected.values() if value is not None))
    assert emb.num_vectors == (2 if field == "layers" and "layers" in expected else first.shape[0])


def test_safetensors_is_recognised_by_content_not_extension(tmp_path):
    path = save(tmp_path, "renamed.safetensors", {"emb_params": L3})
    os.rename(path, tmp_path / "renamed.pt")
    assert torch.equal(read_embedding(tmp_path / "renamed.pt").clip_l, L3)


def _write_marker(path):
    """Runs only if an unpickler executes the file's code."""
    with open(path, "w") as f:
        f.write("code ran")
    return torch.zeros(1, WIDTH_L)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _write_marker, (self.marker,)


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker.txt"
    path = save(tmp_path, "evil.pt", {"string_to_param": {"*": _Payload(str(marker))}, "name": "evil"})
    refused = r"arbitrary unpickling \(it stores the Python object .*_write_marker.*safetensors"
    with pytest.raises(EmbeddingFormatError, match=refused) as error:
        read_embedding(path)
    assert "\n" not in str(error.value)
    assert not marker.exists()
    # The file really carries code: a full unpickle runs it (so the assertion above can fail).
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_unknown_layout_lists_keys_and_formats(tmp_path):
    path = save(tmp_path, "lora.safetensors", {"lora_unet_down.alpha": torch.ones(()), "lora_te_up": torch.ones(4, 2)})
    with pytest.raises(EmbeddingFormatError) as error:
        read_embedding(path)
    message = str(error.value)
    assert "\n" not in message
    assert "lora_te_up (4, 2)" in message and "lora_unet_down.alpha ()" in message
    assert "emb_params" in message and "string_to_param" in message and "IN01" in message


def test_oversize_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(b"\0" * 4096)  # not even a valid file: the size check must come first
    with pytest.raises(EmbeddingFormatError, match="too large for an embedding"):
        read_embedding(path, max_bytes=1024)
    assert MAX_EMBEDDING_BYTES == 64 * 2**20


@pytest.mark.parametrize("content, match", [
    ({"emb_params": torch.zeros(1, 2, WIDTH_L)}, r"shape \(1, 2, 8\)"),
    ({"<tok>": torch.zeros(())}, r"shape \(\)"),
    ({"emb_params": torch.zeros(2, WIDTH_L, dtype=torch.int32)}, "dtype"),
    ({**XTI, "OUT11": vectors(3, WIDTH_L, 0)}, "XTI blocks differ"),
    ({"clip_l": L3}, "needs both clip_l and clip_g"),
    ({"clip_l": L3, "clip_g": G3[:2].clone()}, "different numbers of vectors"),
    ({"string_to_param.a": L3, "string_to_param.b": L3.clone()}, "several string_to_param"),
])
def test_wrong_shapes_are_refused_with_one_line(tmp_path, content, match):
    with pytest.raises(EmbeddingFormatError, match=match) as error:
        read_embedding(save(tmp_path, "bad.safetensors", content))
    assert "\n" not in str(error.value)


def test_a1111_with_several_tokens_and_garbage_are_refused(tmp_path):
    path = save(tmp_path, "two.pt", {"string_to_param": {"*": L3, "+": L3}})
    with pytest.raises(EmbeddingFormatError, match="one token"):
        read_embedding(path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a tensor file at all")
    with pytest.raises(EmbeddingFormatError, match="neither a safetensors nor a readable PyTorch file"):
        read_embedding(garbage)
    with pytest.raises(EmbeddingFormatError, match="does not exist"):
        read_embedding(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------- encoding input vectors

WORDS = ("a", "photo", "of", "cat")


def make_tokenizer(folder, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP tokenizer over a few words: "!" is id 0 (SD2 / SDXL's padding), BOS and EOS the two highest ids."""
    os.makedirs(folder, exist_ok=True)
    vocab = {"!": 0}
    for letter in sorted({c for word in WORDS for c in word}):
        vocab[letter] = len(vocab)
    for word in WORDS:
        vocab[word + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(vocab=os.path.join(folder, "vocab.json"), merges=os.path.join(folder, "merges.txt"),
                         pad_token=pad_token, model_max_length=77)


def make_encoder(tokenizer, width: int, projection: bool = False, legacy_eos: bool = False, seed: int = 0):
    """A 3-layer CLIP text encoder; ``legacy_eos`` keeps SDXL's ``eos_token_id: 2`` (argmax pooling)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
                            hidden_act="gelu" if projection else "quick_gelu", projection_dim=6,
                            bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=2 if legacy_eos else tokenizer.eos_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def snapshot(text_encoder, tokenizer):
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        output = text_encoder(ids).last_hidden_state
    state = {key: value.clone() for key, value in text_encoder.state_dict().items()}
    return state, output, len(tokenizer), dict(tokenizer.get_vocab())


def assert_unchanged(text_encoder, tokenizer, before):
    state, output, length, vocab = snapshot(text_encoder, tokenizer)
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
    assert torch.equal(output, before[1]) and length == before[2] and vocab == before[3]
    embedding = text_encoder.get_input_embeddings()
    assert not embedding._forward_hooks and not embedding._forward_pre_hooks


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_sd1_encoding_equals_stock_pipeline_after_load_textual_inversion(tmp_path, num_vectors):
    tokenizer = make_tokenizer(tmp_path / "tok")
    text_encoder = make_encoder(tokenizer, WIDTH_L)
    path = save(tmp_path, "learned_embeds.safetensors", {"<cat-toy>": vectors(num_vectors, WIDTH_L, 7)})
    emb = read_embedding(path)

    pipe = StableDiffusionPipeline(vae=None, unet=None, text_encoder=copy.deepcopy(text_encoder),
                                   tokenizer=copy.deepcopy(tokenizer), scheduler=DDIMScheduler(clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_textual_inversion(path)
    prompt_embeds, _ = pipe.encode_prompt("<cat-toy>", device="cpu", num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)  # (1, 77, D)

    before = snapshot(text_encoder, tokenizer)
    encoded = encode_input_embedding(text_encoder, tokenizer, emb.clip_l)
    assert encoded.shape == (num_vectors, WIDTH_L)
    assert torch.equal(encoded, prompt_embeds[0, 1:1 + num_vectors])
    assert not torch.equal(encoded, emb.clip_l)  # really went through the encoder
    assert_unchanged(text_encoder, tokenizer, before)


def test_sdxl_encoding_equals_stock_pipeline_both_encoders_and_pooled(tmp_path):
    tokenizer_1 = make_tokenizer(tmp_path / "tok1")
    tokenizer_2 = make_tokenizer(tmp_path / "tok2", pad_token="!")
    encoder_1 = make_encoder(tokenizer_1, WIDTH_L, seed=1)
    encoder_2 = make_encoder(tokenizer_2, WIDTH_G, projection=True, legacy_eos=True, seed=2)
    emb = read_embedding(save(tmp_path, "sdxl.safetensors", {"clip_l": vectors(2, WIDTH_L, 8),
                                                             "clip_g": vectors(2, WIDTH_G, 9)}))

    pipe = StableDiffusionXLPipeline(vae=None, unet=None, scheduler=DDIMScheduler(clip_sample=False),
                                     text_encoder=copy.deepcopy(encoder_1), tokenizer=copy.deepcopy(tokenizer_1),
                                     text_encoder_2=copy.deepcopy(encoder_2), tokenizer_2=copy.deepcopy(tokenizer_2))
    pipe.load_textual_inversion(emb.clip_l, token="<s>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(emb.clip_g, token="<s>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    prompt_embeds, _, pooled, _ = pipe.encode_prompt("<s>", device="cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=False)

    before_1, before_2 = snapshot(encoder_1, tokenizer_1), snapshot(encoder_2, tokenizer_2)
    encoded_1 = encode_input_embedding(encoder_1, tokenizer_1, emb.clip_l, hidden_layer=-2)
    encoded_2, pooled_2 = encode_input_embedding(encoder_2, tokenizer_2, emb.clip_g, hidden_layer=-2,
                                                 return_pooled=True)
    assert torch.equal(torch.cat([encoded_1, encoded_2], dim=-1), prompt_embeds[0, 1:3])
    assert torch.equal(pooled_2, pooled[0])
    assert_unchanged(encoder_1, tokenizer_1, before_1)
    assert_unchanged(encoder_2, tokenizer_2, before_2)


def test_clip_skip_takes_an_earlier_layer_through_the_final_layer_norm(tmp_path):
    # diffusers' SD1.x clip_skip: hidden_states[-(k + 1)], then the final layer norm. Compared with the encoder run
    # on a tokenizer and embedding matrix extended by hand, as load_textual_inversion does.
    tokenizer = make_tokenizer(tmp_path / "tok")
    text_encoder = make_encoder(tokenizer, WIDTH_L)
    new = vectors(2, WIDTH_L, 11)
    extended_tokenizer, extended_encoder = copy.deepcopy(tokenizer), copy.deepcopy(text_encoder)
    extended_tokenizer.add_tokens(["<t>", "<t>_1"])
    extended_encoder.resize_token_embeddings(len(extended_tokenizer))
    with torch.no_grad():
        extended_encoder.get_input_embeddings().weight[-2:] = new
    ids = extended_tokenizer("<t> <t>_1", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = extended_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = extended_encoder.final_layer_norm(hidden)[0, 1:3]

    got = encode_input_embedding(text_encoder, tokenizer, new, hidden_layer=-2, final_layer_norm=True)
    assert torch.equal(got, expected)
    assert not torch.equal(got, encode_input_embedding(text_encoder, tokenizer, new, hidden_layer=-2))


def test_encoding_refuses_wrong_width_and_too_many_vectors(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok")
    text_encoder = make_encoder(tokenizer, WIDTH_L)
    with pytest.raises(EmbeddingFormatError, match="12 wide but this text encoder's token embeddings are 8 wide"):
        encode_input_embedding(text_encoder, tokenizer, vectors(1, WIDTH_G, 0))
    with pytest.raises(EmbeddingFormatError, match="76 vectors do not fit in a 77-token prompt"):
        encode_input_embedding(text_encoder, tokenizer, vectors(76, WIDTH_L, 0))
    assert encode_input_embedding(text_encoder, tokenizer, vectors(75, WIDTH_L, 0)).shape == (75, WIDTH_L)


def test_xti_blocks_name_every_attn2_of_an_sd15_unet_in_order():
    from diffusers import UNet2DConditionModel

    from bootstrap.embeddings import XTI_DIFFUSERS_BLOCKS

    unet = UNet2DConditionModel(  # SD1.5's block structure, tiny channels
        sample_size=8, block_out_channels=(8, 16, 16, 16), layers_per_block=2, cross_attention_dim=WIDTH_L,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=4, norm_num_groups=4)
    attn2 = [name for name, _ in unet.named_modules() if name.endswith("attn2")]
    assert list(XTI_DIFFUSERS_BLOCKS) == list(XTI_LAYERS)
    # Forward order of the UNet (down, mid, up) — named_modules lists mid_block last, so sort it into place.
    forward_order = [n for n in attn2 if n.startswith("down")] + [n for n in attn2 if n.startswith("mid")] + [
        n for n in attn2 if n.startswith("up")]
    assert [f"{block}.transformer_blocks.0.attn2" for block in XTI_DIFFUSERS_BLOCKS.values()] == forward_order


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_exported_tag_loads_with_stock_load_textual_inversion(tmp_path, family, capsys):
    """condvec-bootstrap export → diffusers' own load_textual_inversion → the encoder's output at the new token's
    position is within the reported error of the tag's vector."""
    import re

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file
    from standins import make_sd15, make_sdxl

    from bootstrap.cli import main
    from bootstrap.table import bootstrap_table
    from unet_patch.load import load_model

    folder = (make_sd15 if family == "sd15" else make_sdxl)(tmp_path / "model")
    table = bootstrap_table(load_model(folder), ["red", "blue hair"], groups="layers", progress=False)
    table.save(tmp_path / "t.safetensors")
    out = tmp_path / "blue.safetensors"
    assert main(["export", str(tmp_path / "t.safetensors"), "blue hair", "--model", str(folder), "-o", str(out),
                 "--steps", "300", "--method", "fit"]) == 0
    line = capsys.readouterr().out
    error = float(re.search(r"within ([\d.]+)% of the tag's vector", line).group(1)) / 100
    tensors = load_file(out)
    assert set(tensors) == ({"emb_params"} if family == "sd15" else {"clip_l", "clip_g"})
    cls = StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(folder, local_files_only=True, **({"safety_checker": None} if family == "sd15" else {}))
    if family == "sd15":
        pipe.load_textual_inversion(str(out), token="<blue>")
    else:
        pipe.load_textual_inversion(tensors["clip_l"], token="<blue>", text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(tensors["clip_g"], token="<blue>", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    embeds = pipe.encode_prompt("<blue>", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    got, want = embeds[0, 1].float(), table.data[table.row("blue hair"), 0].reshape(len(table.group_names), -1)[0]
    relative = float((got - want).norm() / want.norm())
    assert relative <= error + 1e-3, (relative, error)
    assert error < 0.5, f"the export got only within {error:.0%}"


def test_exported_xti_imports_back_within_the_reported_error(tmp_path, capsys):
    """--format xti writes kohya's 16 blocks; importing that file back through the same encoder gives each layer's
    vector within the reported error of the tag's own."""
    import re

    from standins import make_sd15

    from bootstrap.cli import main
    from bootstrap.table import bootstrap_table
    from conditioner.table import TagTable
    from unet_patch.load import load_model

    folder = make_sd15(tmp_path / "model")
    table = bootstrap_table(load_model(folder), ["red", "blue hair"], groups="layers", progress=False)
    rows = table.row("blue hair")
    table.data[rows] += 0.3 * torch.randn(table.data[rows].shape, generator=torch.Generator().manual_seed(0))
    table.save(tmp_path / "t.safetensors")
    out = tmp_path / "blue-xti.safetensors"
    assert main(["export", str(tmp_path / "t.safetensors"), "blue hair", "--model", str(folder), "--format", "xti",
                 "-o", str(out), "--steps", "300"]) == 0
    error = float(re.search(r"within ([\d.]+)% of the tag's vector", capsys.readouterr().out).group(1)) / 100
    assert main(["import", str(tmp_path / "t.safetensors"), str(out), "--name", "blue again", "--model", str(folder),
                 "-o", str(tmp_path / "back.safetensors")]) == 0
    back = TagTable.load(tmp_path / "back.safetensors")
    got, want = back.data[back.row("blue again")], table.data[rows]
    relative = float((got - want).norm() / want.norm())
    assert relative <= error + 1e-3, (relative, error)
    assert error < 0.5


def test_distilled_export_loads_into_the_stock_pipeline_and_beats_the_fitted_start(tmp_path, capsys):
    """--method distill (the SD1.x default): the file loads with diffusers' load_textual_inversion, and with it in a
    prompt the stock UNet's prediction is closer to the condvec tag's than with the fitted embedding it starts from."""
    import re

    from diffusers import StableDiffusionPipeline
    from standins import make_sd15

    from bootstrap.cli import main
    from bootstrap.table import bootstrap_table
    from unet_patch.load import load_model

    folder = make_sd15(tmp_path / "model")
    table = bootstrap_table(load_model(folder), ["red", "blue hair", "glass"], groups="layers", progress=False)
    rows = table.row("blue hair")  # a per-layer concept no single input embedding matches exactly
    table.data[rows] += 0.5 * torch.randn(table.data[rows].shape, generator=torch.Generator().manual_seed(0))
    table.save(tmp_path / "t.safetensors")
    out = tmp_path / "blue.safetensors"
    assert main(["export", str(tmp_path / "t.safetensors"), "blue hair", "--model", str(folder), "-o", str(out),
                 "--steps", "60"]) == 0
    line = capsys.readouterr().out
    end, start = (float(v) / 100 for v in re.search(r"miss ([\d.]+)% .*: ([\d.]+)%\)", line).groups())
    assert end < start, line
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.load_textual_inversion(str(out), token="<blue>")
    image = pipe("<blue>, red", num_inference_steps=2, guidance_scale=3.0, output_type="np").images
    assert image.shape[0] == 1 and torch.isfinite(torch.as_tensor(image)).all()


def test_multi_vector_distilled_export_is_what_the_stock_pipeline_encodes(tmp_path, capsys):
    """--vectors 3: the file holds three vectors, diffusers' load_textual_inversion expands the token to three, and
    the stock pipeline's encoding of ``<tag>, red`` is exactly the one the export optimised through."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from standins import make_sd15

    from bootstrap.cli import main
    from bootstrap.export import _encode_with, _student_ids
    from bootstrap.table import bootstrap_table
    from unet_patch.load import load_model

    folder = make_sd15(tmp_path / "model")
    model = load_model(folder)
    bootstrap_table(model, ["red", "blue hair"], tokens_per_tag=2, progress=False).save(tmp_path / "t.safetensors")
    out = tmp_path / "blue.safetensors"
    assert main(["export", str(tmp_path / "t.safetensors"), "blue hair", "--model", str(folder), "-o", str(out),
                 "--steps", "5", "--vectors", "3"]) == 0
    assert "(3 vector(s))" in capsys.readouterr().out
    emb = load_file(out)["emb_params"]
    assert emb.shape == (3, model.text_encoders[0].config.hidden_size)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.load_textual_inversion(str(out), token="<blue>")
    stock = pipe.encode_prompt("<blue>, red", "cpu", 1, False)[0]
    ours = _encode_with(model.text_encoders[0], _student_ids(model.tokenizers[0], ["red"], 3)[None], emb)
    assert torch.allclose(stock, ours, atol=1e-5)
    assert main(["export", str(tmp_path / "t.safetensors"), "blue hair", "--model", str(folder), "-o",
                 str(tmp_path / "x.safetensors"), "--vectors", "2", "--method", "fit"]) == 2
    assert "--vectors belongs to --method distill" in capsys.readouterr().err
