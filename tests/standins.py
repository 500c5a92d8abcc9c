"""Tiny stand-ins of SD1.5, SD2.x and SDXL model folders, written in diffusers layout, offline, in about a second.

Each builder keeps what condvec depends on and shrinks everything else:

- the UNet has the family's real block structure, so the attn2 layer *names* are exactly the real model's (16 for
  SD1.5 and SD2.x, 70 for SDXL), with the family's flags (``use_linear_projection``, ``addition_embed_type``,
  ``upcast_attention``) but channels of 32–64 and ``sample_size`` 8;
- the VAE is a 4-block ``AutoencoderKL`` with 4 latent channels and the real downscale factor 8 (64 px images for
  8×8 latents) and the family's ``scaling_factor``;
- the text encoders are 3-layer CLIP text models (hidden 32 / 48) with the family's activation and conventions
  (SD2's tokenizer pads with ``"!"``, SDXL's second encoder has a projection and its tokenizer pads with ``"!"``);
- the tokenizer is a real byte-level BPE ``CLIPTokenizer`` over a small vocabulary written by :func:`write_vocab`:
  the 256 byte symbols (``"!"`` is id 0 as in CLIP), their ``</w>`` forms, merges for :data:`WORDS`, and
  ``<|startoftext|>`` / ``<|endoftext|>`` as the two highest ids (CLIP's ``argmax`` pooling relies on that). Words
  outside :data:`WORDS` split into several tokens, as rare words do in CLIP.

Folders are saved by the stock pipeline's ``save_pretrained`` so ``model_index.json`` is what diffusers writes.
"""

from __future__ import annotations

import json
import os

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Whole-word tokens of the tiny vocabulary (each is one token); anything else is split into pieces.
WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "green", "hair", "girl", "boy", "sitting", "standing",
         "smile", "glass", "elephant", "digit", "one", "two", "three", "the", "and", "with", "hat")

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def write_vocab(folder: str | os.PathLike, words: tuple[str, ...] = WORDS) -> tuple[str, str]:
    """Write a CLIP-style ``vocab.json`` and ``merges.txt`` to ``folder``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1]] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_path, "w") as f:
        json.dump(vocab, f)
    with open(merges_path, "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_path, merges_path


def make_tokenizer(folder: str | os.PathLike, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over the tiny vocabulary (written to ``folder``), 77 tokens, padding with ``pad_token``."""
    vocab_path, merges_path = write_vocab(folder)
    return CLIPTokenizer(vocab=vocab_path, merges=merges_path, pad_token=pad_token, model_max_length=77)


def _text_config(tokenizer: CLIPTokenizer, hidden: int, act: str, projection_dim: int | None = None,
                 layers: int = 3) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=projection_dim or hidden,
        # CLIP's released configs keep the legacy ids (eos_token_id 2 → pooling at argmax of input ids, i.e. at EOS).
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )


def _vae(scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), scaling_factor=scaling_factor,
    ).eval()


def sd15_unet(cross_attention_dim: int = 32) -> UNet2DConditionModel:
    """SD1.5's UNet structure (16 attn2 layers, same names) with tiny channels."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def make_sd15(tmp: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny SD1.5-structured model folder under ``tmp`` and return its path (``tmp/sd15``).

    UNet: SD1.5's blocks (CrossAttnDown×3 + Down, mid cross-attention, Up + CrossAttnUp×3, two layers per block),
    channels (32, 32, 64, 64), cross-attention 32. Text encoder: 3-layer CLIP-L-like (quick_gelu), hidden 32; tokenizer
    pads with ``<|endoftext|>``. Scheduler: SD's PNDM (scaled_linear 0.00085–0.012, epsilon).
    """
    torch.manual_seed(seed)
    path = os.path.join(tmp, "sd15")
    tokenizer = make_tokenizer(os.path.join(tmp, "sd15-vocab"))
    text_encoder = CLIPTextModel(_text_config(tokenizer, 32, "quick_gelu")).eval()
    scheduler = PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_vae(0.18215), text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=sd15_unet(32), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_sd2(tmp: str | os.PathLike, prediction_type: str = "v_prediction", seed: int = 0) -> str:
    """Write a tiny SD2.x-structured model folder under ``tmp`` and return its path (``tmp/sd2`` or ``tmp/sd2-v``).

    UNet: SD2's blocks with ``use_linear_projection=True`` and per-block heads (2, 2, 4, 4) (SD2: (5, 10, 20, 20)),
    ``upcast_attention`` for v-prediction as SD2.1-v. Text encoder: OpenCLIP-like (gelu), hidden 32, stored already
    truncated as diffusers' SD2 repos store it (their ``text_encoder`` has 23 of OpenCLIP's 24 layers, so the last
    hidden state *is* OpenCLIP's penultimate layer). Tokenizer pads with ``"!"`` as SD2's. Scheduler: DDIM with
    ``prediction_type``.
    """
    torch.manual_seed(seed)
    path = os.path.join(tmp, "sd2-v" if prediction_type == "v_prediction" else "sd2")
    tokenizer = make_tokenizer(os.path.join(tmp, "sd2-vocab"), pad_token="!")
    text_encoder = CLIPTextModel(_text_config(tokenizer, 32, "gelu")).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=(2, 2, 4, 4), use_linear_projection=True,
        upcast_attention=prediction_type == "v_prediction", norm_num_groups=8,
    ).eval()
    scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=_vae(0.18215), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_sdxl(tmp: str | os.PathLike, seed: int = 0, force_zeros_for_empty_prompt: bool = True) -> str:
    """Write a tiny SDXL-structured model folder under ``tmp`` and return its path (``tmp/sdxl``).

    UNet: SDXL's blocks (Down + CrossAttnDown×2, transformer depths (1, 2, 10), so all 70 attn2 layer names are
    SDXL's), channels (32, 64, 64), ``addition_embed_type="text_time"`` with time embedding 8, cross-attention 80 =
    32 + 48 (the two encoders concatenated), ``projection_class_embeddings_input_dim`` = 6·8 + 40 (six time ids + the
    pooled vector). Encoders: ``text_encoder`` CLIP-L-like (quick_gelu, hidden 32, pads with ``<|endoftext|>``),
    ``text_encoder_2`` OpenCLIP-bigG-like ``CLIPTextModelWithProjection`` (gelu, hidden 48, projection 40, tokenizer
    pads with ``"!"``). Scheduler: Euler (scaled_linear, epsilon). ``force_zeros_for_empty_prompt`` as SDXL base 1.0.
    """
    torch.manual_seed(seed)
    path = os.path.join(tmp, "sdxl")
    tokenizer = make_tokenizer(os.path.join(tmp, "sdxl-vocab"))
    tokenizer_2 = make_tokenizer(os.path.join(tmp, "sdxl-vocab-2"), pad_token="!")
    text_encoder = CLIPTextModel(_text_config(tokenizer, 32, "quick_gelu")).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, 48, "gelu", projection_dim=40)).eval()
    time_dim, pooled_dim = 8, 40
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=32 + 48, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled_dim, norm_num_groups=8,
    ).eval()
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=_vae(0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                                     add_watermarker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# diffusers → original LDM key names for SD1.x/SD2.x UNets (the inverse of diffusers' single-file converter, as in
# diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py).
_LDM_TOP = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
            ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
_LDM_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
               ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def _ldm_layer_map() -> list[tuple[str, str]]:
    pairs = []
    for i in range(4):
        for j in range(2):
            pairs.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                pairs.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            pairs.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                pairs.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            pairs.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            pairs.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return pairs


def to_ldm_unet(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD1.x/SD2.x-structured diffusers UNet state dict in original LDM key layout (``model.diffusion_model.…``)."""
    layer_map = _ldm_layer_map()
    out = {}
    for key, value in state_dict.items():
        name = key
        for ldm, hf in _LDM_TOP:
            if name.startswith(hf):
                name = ldm + name[len(hf):]
        if "resnets" in name:
            for ldm, hf in _LDM_RESNET:
                name = name.replace(hf, ldm)
        for ldm, hf in layer_map:
            if name.startswith(hf):
                name = ldm + name[len(hf):]
        out["model.diffusion_model." + name] = value.contiguous()
    return out


def make_single_file(tmp: str | os.PathLike, folder: str, with_text_encoder: bool = False) -> tuple[str, str]:
    """The UNet of an SD1.x/SD2.x stand-in ``folder`` as one LDM-layout ``.safetensors`` file, plus a config folder.

    Returns ``(checkpoint_path, config_dir)``: the checkpoint holds the ``model.diffusion_model.*`` keys (a UNet
    export as kohya / A1111 tools write it) and, with ``with_text_encoder``, the CLIP text encoder under SD1.x's
    ``cond_stage_model.transformer.text_model.*`` keys (as in a full A1111 checkpoint); ``config_dir`` is ``folder``
    itself (a local diffusers folder of the same architecture, which is what ``from_single_file(config=…)`` reads
    configs, tokenizers and missing components from).
    """
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), local_files_only=True)
    state = to_ldm_unet(unet.state_dict())
    suffix = "-unet"
    if with_text_encoder:
        text_encoder = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), local_files_only=True)
        state.update({"cond_stage_model.transformer.text_model." + key.removeprefix("text_model."): value.contiguous()
                      for key, value in text_encoder.state_dict().items()})
        suffix = "-full"
    path = os.path.join(tmp, os.path.basename(os.path.normpath(folder)) + suffix + ".safetensors")
    save_file(state, path)
    return path, folder
