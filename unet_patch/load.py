"""Loading a user's SD1.x / SD2.x / SDXL base model, offline, from a diffusers folder or a single-file checkpoint.

Nothing here ever downloads: every diffusers / transformers call gets ``local_files_only=True``, paths are checked to
be local before anything is loaded, and what would need the hub (a repo id, a single file without a local config) is
refused with a one-line :class:`DownloadRequiredError`. Pickle checkpoints (``.ckpt``, ``.pt``, ``.bin``) are refused.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from conditioner.errors import CondvecError

#: Scheduler classes a model folder's ``scheduler_config.json`` may name (``_class_name``); nothing else is looked
#: up on the ``diffusers`` module.
SCHEDULER_CLASSES = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler",
    "DEISMultistepScheduler", "LCMScheduler", "TCDScheduler", "DPMSolverSDEScheduler",
)


FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl", "pixel")
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x epsilon", "sd2-v": "SD2.x v-prediction", "sdxl": "SDXL",
                "pixel": "pixel-space UNet"}
#: Where a model folder keeps its own condvec table (condvec's CLIP-free models, ``TagDiffusionPipeline`` saves).
TABLE_FILE = os.path.join("table", "table.safetensors")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# SD's training schedule, used when a model has no scheduler/ config (the same for SD1.x, SD2.x and SDXL).
SD_DEFAULT_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

# What other denoisers in a diffusers folder are, for the refusal message.
_OTHER_ARCHITECTURES = {
    "SD3Transformer2DModel": "Stable Diffusion 3 (MMDiT transformer)",
    "FluxTransformer2DModel": "Flux (transformer)",
    "PixArtTransformer2DModel": "PixArt (DiT transformer)",
    "HunyuanDiT2DModel": "Hunyuan-DiT (transformer)",
    "AuraFlowTransformer2DModel": "AuraFlow (transformer)",
    "SanaTransformer2DModel": "Sana (transformer)",
    "UNet2DModel": "an unconditional UNet2DModel (no cross-attention)",
    "UNet3DConditionModel": "a text-to-video UNet3DConditionModel",
    "UNetSpatioTemporalConditionModel": "Stable Video Diffusion (spatio-temporal UNet)",
    "StableCascadeUNet": "Stable Cascade",
    "UVit2DModel": "aMUSEd (UVit2DModel)",
}
_IN_CHANNELS = {9: "an inpainting UNet (in_channels=9)", 8: "an InstructPix2Pix-style UNet (in_channels=8)",
                5: "a depth-to-image UNet (in_channels=5)", 7: "the x4 upscaler UNet (in_channels=7)"}
_MISMATCH = "; pass config= a local folder of the checkpoint's architecture (SD1.x / SD2.x / SDXL)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(CondvecError):
    """A base model cannot be loaded; the message is one line that says what is wrong and what to do."""


class UnsupportedModelError(ModelLoadError):
    """The model is not an SD1.x / SD2.x / SDXL text-to-image UNet; the message names what it is."""


class DownloadRequiredError(ModelLoadError):
    """Loading would need the Hugging Face hub (a repo id, or a single file without a local config)."""


class PickleCheckpointError(ModelLoadError):
    """A pickle checkpoint (``.ckpt`` / ``.pt`` / ``.bin``): refused, since unpickling can run arbitrary code."""


class MissingConfigError(ModelLoadError):
    """A config the model needs (``unet/config.json``, a single file's ``config=`` folder) is missing."""


@dataclass
class BaseModel:
    """A loaded base model: the UNet and what comes with it.

    Attributes:
        unet (`UNet2DConditionModel`): the denoiser.
        vae (`AutoencoderKL | None`): the VAE, `None` when the folder has none.
        scheduler (`SchedulerMixin`): the folder's scheduler, or SD's default schedule (DDIM) when it has none.
        text_encoders (`list`): the CLIP text encoders in pipeline order (SDXL: `text_encoder`, `text_encoder_2`);
            empty when the model has none or they were not loaded / were freed.
        tokenizers (`list`): their tokenizers, same order and length.
        family (`str`): one of `"sd1"`, `"sd2"`, `"sd2-v"`, `"sdxl"` (see :func:`detect_family`).
        name (`str`): the folder's or file's base name.
        path (`str`): the folder or checkpoint it was loaded from.
        force_zeros_for_empty_prompt (`bool`): the pipeline uses zeros (not the encoding of `""`) as the negative
            conditioning when no negative prompt is given (SDXL base's `model_index.json` setting).
        table (`TagTable | None`): the folder's own condvec table (:data:`TABLE_FILE`), if it has one.
        has_scheduler (`bool`): the folder has its own ``scheduler/`` config (otherwise ``scheduler`` is SD's
            default schedule).
    """

    unet: Any
    vae: Any | None
    scheduler: Any
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    family: str = "sd1"
    name: str = ""
    path: str = ""
    force_zeros_for_empty_prompt: bool = False
    table: Any | None = None
    has_scheduler: bool = True

    @property
    def prediction_type(self) -> str:
        """The scheduler's prediction type (`"epsilon"`, `"v_prediction"`, …)."""
        return self.scheduler.config.get("prediction_type", "epsilon")

    def free_text_encoders(self) -> None:
        """Drop the text encoders and tokenizers (after bootstrap: training and generation never run them)."""
        self.text_encoders, self.tokenizers = [], []


def _config_dict(config: Any) -> dict:
    return dict(config) if config is not None else {}


def detect_family(unet_config: dict, scheduler_config: dict | None = None) -> str:
    """The model family from a UNet config (and the scheduler config, for SD2's v-prediction).

    The rule reads the UNet's *structure*, never its widths, so it holds for the real models and for tiny stand-ins
    alike:

    - `addition_embed_type == "text_time"` (pooled text + size/crop time ids) with three down blocks → `"sdxl"`
      (real SDXL: cross-attention 2048 = CLIP-L 768 + OpenCLIP-bigG 1280);
    - otherwise `use_linear_projection=True` → SD2.x (real: cross-attention 1024), `"sd2-v"` when the scheduler
      predicts `v_prediction`, else `"sd2"`;
    - otherwise → `"sd1"` (real: cross-attention 768, conv projections in the transformers);
    - a UNet with cross-attention from RGB to RGB (`in_channels == out_channels == 3`, no VAE) → `"pixel"`:
      condvec's own CLIP-free pixel-space models (`models/tiny-base`, the built-ins).

    Args:
        unet_config (`dict`): the UNet's `config.json` (or `unet.config`).
        scheduler_config (`dict`, *optional*): the scheduler's config; without it SD2 is taken as epsilon.

    Raises:
        UnsupportedModelError: for anything else, naming what it is: transformer denoisers (SD3, Flux, PixArt…),
            UNets without cross-attention, inpainting / InstructPix2Pix / depth / upscaler UNets (`in_channels` ≠ 4
            or a class embedding), image-conditioned UNets (`encoder_hid_dim_type`), the SDXL refiner.
    """
    config, scheduler_config = _config_dict(unet_config), _config_dict(scheduler_config)
    class_name = config.get("_class_name", "UNet2DConditionModel")
    if class_name != "UNet2DConditionModel":
        what = _OTHER_ARCHITECTURES.get(class_name, f"{class_name}, not a UNet2DConditionModel")
        raise UnsupportedModelError(f"the model is {what}; condvec supports SD1.x, SD2.x and SDXL UNets "
                                    "(UNet2DConditionModel with cross-attention)")
    down = list(config.get("down_block_types") or [])
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")  # diffusers' default when absent
    blocks = down + list(config.get("up_block_types") or []) + [mid]
    if not any("CrossAttn" in (block or "") for block in blocks):
        raise UnsupportedModelError("the UNet has no cross-attention blocks, so there is nothing for tags to "
                                    "condition; condvec supports SD1.x, SD2.x and SDXL text-to-image UNets")
    in_channels = config.get("in_channels", 4)
    if in_channels == 3 and config.get("out_channels", 4) == 3 and config.get("addition_embed_type") is None:
        return "pixel"
    if in_channels != 4:
        what = _IN_CHANNELS.get(in_channels, f"a UNet with in_channels={in_channels}")
        raise UnsupportedModelError(f"the model is {what}; condvec supports 4-channel latent text-to-image "
                                    "SD1.x / SD2.x / SDXL UNets")
    if config.get("class_embed_type") is not None:
        raise UnsupportedModelError(f"the UNet has a class embedding (class_embed_type="
                                    f"{config['class_embed_type']!r}: an upscaler or image-variation model); "
                                    "condvec supports text-to-image SD1.x / SD2.x / SDXL UNets")
    if config.get("encoder_hid_dim_type") is not None:
        raise UnsupportedModelError(f"the UNet projects its conditioning (encoder_hid_dim_type="
                                    f"{config['encoder_hid_dim_type']!r}: a Kandinsky / DeepFloyd-IF-style model); "
                                    "condvec supports SD1.x / SD2.x / SDXL UNets")
    addition = config.get("addition_embed_type")
    if addition == "text_time":
        if len(down) != 3:
            raise UnsupportedModelError(f"the UNet has SDXL's text_time embedding but {len(down)} down blocks (the "
                                        "SDXL refiner has 4): the refiner is not supported, use an SDXL base model")
        return "sdxl"
    if addition is not None:
        raise UnsupportedModelError(f"the UNet has addition_embed_type={addition!r} (not SD1.x / SD2.x / SDXL); "
                                    "condvec supports SD1.x, SD2.x and SDXL UNets")
    if config.get("use_linear_projection", False):
        return "sd2-v" if scheduler_config.get("prediction_type") == "v_prediction" else "sd2"
    return "sd1"


def describe(model: BaseModel) -> str:
    """One line: family, name, UNet size and cross-attention layout, text encoders, VAE and scheduler."""
    params = sum(p.numel() for p in model.unet.parameters())
    attn2 = sum(1 for name, _ in model.unet.named_modules() if name.endswith(".attn2"))
    encoders = ", ".join(type(e).__name__ for e in model.text_encoders) or "none"
    return (f"{FAMILY_NAMES[model.family]} ({model.family}, {model.prediction_type}) {model.name!r}: UNet "
            f"{params / 1e6:.2f}M params, {attn2} cross-attention layers of width "
            f"{model.unet.config.cross_attention_dim}; text encoders: {encoders}; "
            f"VAE: {'yes' if model.vae is not None else 'none'}; scheduler: {type(model.scheduler).__name__}")


#: What diffusers, transformers and safetensors raise for a folder whose files are missing, truncated or of another
#: model (a missing or unreadable file; a bad config value or shape; a config key or type they cannot use), and
#: torch's "Error(s) in loading state_dict" (weights of another shape). Anything else raised while loading (another
#: RuntimeError, an AttributeError, an IndexError) is a bug and keeps its traceback.
_BAD_FILES = (OSError, ValueError, KeyError, TypeError)


@contextmanager
def _one_line(what: str, hint: str = ""):
    """Turn a library's bad-file error raised while loading ``what`` into a one-line ModelLoadError."""
    from safetensors import SafetensorError

    try:
        yield
    except ModelLoadError:
        raise
    except RuntimeError as err:  # torch's load_state_dict: the file holds another model's weights (keys, shapes)
        if not str(err).startswith("Error(s) in loading state_dict"):
            raise
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), "")[:300]
        raise ModelLoadError(f"cannot load {what}: its weights do not fit ({detail}){hint}") from err
    except (*_BAD_FILES, SafetensorError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[0] if lines else type(err).__name__
        if len(detail) > 300:
            detail = detail[:300] + "…"
        if isinstance(err, (KeyError, TypeError)):
            detail = f"{type(err).__name__} {detail}"
        raise ModelLoadError(f"cannot load {what}: {detail}{hint}") from err


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise MissingConfigError(f"cannot read {path}: {err}") from err


def _not_local(path: str, what: str) -> ModelLoadError:
    if _HUB_ID.match(path) and not os.path.isabs(path):
        return DownloadRequiredError(
            f"{what} {path!r} is not a local folder or file and condvec never downloads: fetch it first "
            f"(huggingface-cli download {path} --local-dir DIR) and pass DIR")
    return ModelLoadError(f"{what} {path!r} does not exist")


def _load_scheduler(folder: str | None):
    import diffusers

    config_path = os.path.join(folder, "scheduler", "scheduler_config.json") if folder else None
    if config_path is None or not os.path.isfile(config_path):
        where = f"in {folder!r}" if folder else "(the config is a UNet folder)"
        warnings.warn(f"no scheduler/scheduler_config.json {where}: using SD's default schedule (DDIM, "
                      "scaled_linear 0.00085–0.012, epsilon)", stacklevel=3)
        return diffusers.DDIMScheduler(**SD_DEFAULT_SCHEDULE)
    class_name = _read_json(config_path).get("_class_name", "DDIMScheduler")
    if class_name not in SCHEDULER_CLASSES:
        raise ModelLoadError(f"scheduler class {class_name!r} in {config_path} is not one condvec runs; use one of "
                             f"{', '.join(SCHEDULER_CLASSES)}")
    scheduler_cls = getattr(diffusers, class_name)
    with _one_line(config_path):
        return scheduler_cls.from_pretrained(os.path.join(folder, "scheduler"), local_files_only=True)


def _encoder_names(family: str) -> list[str]:
    return ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]


def _load_text_encoders(folder: str, family: str, torch_dtype: torch.dtype | None,
                        skip: frozenset[str] = frozenset()) -> tuple[list, list]:
    """The folder's text encoders and tokenizers in pipeline order; empty lists when it has none."""
    import transformers

    names = [n for n in _encoder_names(family) if n not in skip]
    present = [n for n in names if os.path.isfile(os.path.join(folder, n, "config.json"))]
    if not present:
        return [], []
    if len(present) != len(names):
        missing = sorted(set(names) - set(present))
        raise MissingConfigError(f"{folder!r} has {', '.join(present)} but not {', '.join(missing)}: an "
                                 f"{FAMILY_NAMES[family]} model needs all of {', '.join(names)} (or none)")
    encoders, tokenizers = [], []
    for name in present:
        config = _read_json(os.path.join(folder, name, "config.json"))
        class_name = (config.get("architectures") or ["CLIPTextModel"])[0]
        if class_name not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            raise UnsupportedModelError(f"{folder}/{name} is a {class_name}; condvec bootstraps from CLIP text "
                                        "encoders (CLIPTextModel / CLIPTextModelWithProjection)")
        tokenizer_dir = os.path.join(folder, name.replace("text_encoder", "tokenizer"))
        if not os.path.isdir(tokenizer_dir):
            raise MissingConfigError(f"{folder!r} has {name}/ but no {os.path.basename(tokenizer_dir)}/: the "
                                     "text encoder cannot be used without its tokenizer")
        files = set(os.listdir(tokenizer_dir))
        if not ({"vocab.json", "merges.txt"} <= files or "tokenizer.json" in files):
            missing = sorted({"vocab.json", "merges.txt"} - files)
            raise MissingConfigError(f"{tokenizer_dir!r} lacks {' and '.join(missing)} (or a tokenizer.json): the "
                                     "tokenizer cannot be built without its vocabulary; copy the model's tokenizer "
                                     "files there")
        with _one_line(f"{folder}/{name}"):
            encoder = getattr(transformers, class_name).from_pretrained(
                os.path.join(folder, name), local_files_only=True, dtype=torch_dtype)
        with _one_line(tokenizer_dir):
            tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        if len(tokenizer) < 1000 and len(tokenizer) < config.get("vocab_size", 0) // 2:
            raise MissingConfigError(f"{tokenizer_dir!r} gives a vocabulary of {len(tokenizer)} tokens for a text "
                                     f"encoder of {config.get('vocab_size')}: its vocab.json / merges.txt are not "
                                     "the model's; copy the model's tokenizer files there")
        encoders.append(encoder.eval().requires_grad_(False))
        tokenizers.append(tokenizer)
    return encoders, tokenizers


def _force_zeros(folder: str | None, family: str) -> bool:
    index = os.path.join(folder, "model_index.json") if folder else ""
    if os.path.isfile(index):
        value = _read_json(index).get("force_zeros_for_empty_prompt")
        if value is not None:
            return bool(value)
    return family == "sdxl"  # StableDiffusionXLPipeline's default


def _refuse_other_denoiser(folder: str) -> None:
    for sub in ("transformer", "prior", "decoder"):
        config_path = os.path.join(folder, sub, "config.json")
        if os.path.isfile(config_path):
            detect_family(_read_json(config_path))  # raises, naming the architecture
    index = os.path.join(folder, "model_index.json")
    if os.path.isfile(index) and _read_json(index).get("requires_aesthetics_score"):
        raise UnsupportedModelError(f"{folder!r} is an SDXL refiner (aesthetic-score time ids); "
                                    "use an SDXL base model")


def load_model(path: str | os.PathLike, config: str | os.PathLike | None = None, with_text_encoders: bool = True,
               torch_dtype: torch.dtype | None = None, with_table: bool = True) -> BaseModel:
    """Load an SD1.x / SD2.x / SDXL base model from local files, never from the hub.

    Args:
        path (`str`): a diffusers folder (`unet/`, optional `vae/`, `scheduler/`, `text_encoder/` + `tokenizer/`,
            `text_encoder_2/` + `tokenizer_2/`) or a single-file `.safetensors` checkpoint (original LDM keys as
            A1111 / kohya / ComfyUI write them, or diffusers UNet keys).
        config (`str`, *optional*): for a single file, a local diffusers folder of the same architecture (the base
            model it was fine-tuned from): configs, scheduler and tokenizers come from it, and so do the VAE and text
            encoders when the checkpoint holds none. A UNet-only folder (`config.json`) is also accepted.
        with_text_encoders (`bool`, *optional*, defaults to `True`): load the text encoders and tokenizers (needed
            to bootstrap a table; training and generation never run them).
        torch_dtype (`torch.dtype`, *optional*): dtype for the UNet, VAE and text encoders (default: as stored).
        with_table (`bool`, *optional*, defaults to `True`): load the folder's own condvec table (:data:`TABLE_FILE`)
            when it has one.

    Returns:
        `BaseModel`, with `family` from :func:`detect_family`.

    Raises:
        PickleCheckpointError: a `.ckpt` / `.pt` / `.bin` checkpoint.
        DownloadRequiredError: a hub repo id, or a single file without a local `config`.
        MissingConfigError: no `unet/config.json`, an unreadable config, a text encoder without its tokenizer.
        UnsupportedModelError: not an SD1.x / SD2.x / SDXL text-to-image UNet (the message names what it is).
        ModelLoadError: anything else diffusers / transformers refuse, as one line.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _not_local(path, "model")
    if os.path.isfile(path):
        lower = path.lower()
        if lower.endswith(PICKLE_SUFFIXES):
            raise PickleCheckpointError(
                f"{path!r} is a pickle checkpoint, refused (unpickling can run arbitrary code): convert it to "
                ".safetensors first, e.g. with diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py "
                "--checkpoint_path FILE --dump_path DIR --to_safetensors, or load it in a tool you trust and save it "
                "with safetensors.torch.save_file")
        if not lower.endswith(".safetensors"):
            raise ModelLoadError(f"{path!r} is neither a model folder nor a .safetensors checkpoint")
        return _load_single_file(path, config, with_text_encoders, torch_dtype)
    if config is not None:
        raise ModelLoadError(f"config= is only for single-file checkpoints; {path!r} is a folder with its own configs")
    return _load_folder(path, with_text_encoders, torch_dtype, with_table)


def _load_folder(folder: str, with_text_encoders: bool, torch_dtype: torch.dtype | None,
                 with_table: bool = True) -> BaseModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    _refuse_other_denoiser(folder)
    unet_config_path = os.path.join(folder, "unet", "config.json")
    if not os.path.isfile(unet_config_path):
        raise MissingConfigError(f"{folder!r} has no unet/config.json: expected a diffusers-layout model folder "
                                 "(unet/, vae/, scheduler/, text_encoder/, tokenizer/)")
    scheduler_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    scheduler_config = _read_json(scheduler_path) if os.path.isfile(scheduler_path) else None
    family = detect_family(_read_json(unet_config_path), scheduler_config)
    with _one_line(f"{folder}/unet"):
        unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), torch_dtype=torch_dtype,
                                                    local_files_only=True)
    vae = None
    if os.path.isfile(os.path.join(folder, "vae", "config.json")):
        with _one_line(f"{folder}/vae"):
            vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), torch_dtype=torch_dtype,
                                                local_files_only=True)
    scheduler = _load_scheduler(folder)
    encoders, tokenizers = _load_text_encoders(folder, family, torch_dtype) if with_text_encoders else ([], [])
    table = None
    if with_table and os.path.isfile(os.path.join(folder, TABLE_FILE)):
        from conditioner.table import TagTable

        table = TagTable.load(os.path.join(folder, TABLE_FILE))
    return BaseModel(unet=unet.eval(), vae=vae.eval() if vae is not None else None, scheduler=scheduler,
                     text_encoders=encoders, tokenizers=tokenizers, family=family,
                     name=os.path.basename(os.path.normpath(folder)), path=folder,
                     force_zeros_for_empty_prompt=_force_zeros(folder, family), table=table,
                     has_scheduler=scheduler_config is not None)


def _has_weights(folder: str) -> bool:
    return os.path.isdir(folder) and any(n.endswith((".safetensors", ".bin")) for n in os.listdir(folder))


def _load_single_file(path: str, config: str | os.PathLike | None, with_text_encoders: bool,
                      torch_dtype: torch.dtype | None) -> BaseModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import safe_open

    if config is None:
        raise DownloadRequiredError(
            f"{path!r} is a single-file checkpoint and needs config=DIR, a local diffusers folder of the same "
            "architecture (e.g. the base model it was fine-tuned from); condvec never fetches configs from the hub")
    config = os.fspath(config)
    if config.endswith(".json"):
        config = os.path.dirname(config) or "."
    if not os.path.isdir(config):
        raise _not_local(config, "config")
    if os.path.isfile(os.path.join(config, "unet", "config.json")):
        root, unet_sub = config, "unet"
        _refuse_other_denoiser(root)
    elif os.path.isfile(os.path.join(config, "config.json")):
        root, unet_sub = None, None
    else:
        raise MissingConfigError(f"config {config!r} has neither unet/config.json nor config.json: pass a local "
                                 "diffusers model folder of the checkpoint's architecture")
    unet_dir = os.path.join(config, unet_sub) if unet_sub else config
    scheduler_path = os.path.join(root, "scheduler", "scheduler_config.json") if root else ""
    scheduler_config = _read_json(scheduler_path) if os.path.isfile(scheduler_path) else None
    unet_config = _read_json(os.path.join(unet_dir, "config.json"))
    family = detect_family(unet_config, scheduler_config)

    with _one_line(path):
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            conv_in = next((k for k in ("model.diffusion_model.input_blocks.0.0.weight", "conv_in.weight")
                            if k in keys), None)
            shape = f.get_slice(conv_in).get_shape() if conv_in else []
            in_channels = shape[1] if len(shape) == 4 else None
    if conv_in is None:
        if any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys):
            raise UnsupportedModelError(f"{path!r} is a Stable Diffusion 3 checkpoint (MMDiT); condvec supports "
                                        "SD1.x, SD2.x and SDXL")
        if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
            raise UnsupportedModelError(f"{path!r} is a Flux checkpoint; condvec supports SD1.x, SD2.x and SDXL")
        raise ModelLoadError(f"{path!r} holds no UNet weights (no model.diffusion_model.input_blocks.0.0.weight or "
                             "conv_in.weight)")
    if in_channels is not None and in_channels != unet_config.get("in_channels", 4):
        detect_family(dict(unet_config, in_channels=in_channels))  # names inpainting etc.
    if conv_in == "conv_in.weight":
        from safetensors.torch import load_file

        with _one_line(f"{path} with {unet_dir}/config.json", _MISMATCH):
            unet = UNet2DConditionModel.from_config(unet_config)
            unet.load_state_dict(load_file(path), strict=True)
            if torch_dtype is not None:
                unet.to(torch_dtype)
    else:
        with _one_line(f"{path} with {unet_dir}/config.json", _MISMATCH):
            unet = UNet2DConditionModel.from_single_file(path, config=config, subfolder=unet_sub,
                                                         local_files_only=True, torch_dtype=torch_dtype)
    vae = None
    if any(k.startswith("first_stage_model.") for k in keys) and root:
        with _one_line(f"the VAE of {path}"):
            vae = AutoencoderKL.from_single_file(path, config=root, subfolder="vae", local_files_only=True,
                                                 torch_dtype=torch_dtype)
    elif root and _has_weights(os.path.join(root, "vae")):
        with _one_line(f"{root}/vae"):
            vae = AutoencoderKL.from_pretrained(os.path.join(root, "vae"), torch_dtype=torch_dtype,
                                                local_files_only=True)
    scheduler = _load_scheduler(root)
    encoders, tokenizers = [], []
    if with_text_encoders and root:
        in_checkpoint = any(k.startswith(("cond_stage_model.", "conditioner.embedders.")) for k in keys)
        if in_checkpoint:
            encoders, tokenizers = _text_encoders_from_checkpoint(path, root, family, unet, torch_dtype)
        elif all(_has_weights(os.path.join(root, n)) for n in _encoder_names(family)):
            encoders, tokenizers = _load_text_encoders(root, family, torch_dtype)
    return BaseModel(unet=unet.eval(), vae=vae.eval() if vae is not None else None, scheduler=scheduler,
                     text_encoders=encoders, tokenizers=tokenizers, family=family, name=os.path.basename(path),
                     path=path, force_zeros_for_empty_prompt=_force_zeros(root, family),
                     has_scheduler=scheduler_config is not None)


def _text_encoders_from_checkpoint(path: str, root: str, family: str, unet, torch_dtype: torch.dtype | None):
    """The text encoders stored in a full single-file checkpoint, converted by diffusers' own single-file loader."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        pipeline_cls, extra = StableDiffusionXLPipeline, {}
    else:
        pipeline_cls, extra = StableDiffusionPipeline, dict(safety_checker=None, feature_extractor=None,
                                                            requires_safety_checker=False)
    with _one_line(f"the text encoders of {path} (configs and tokenizers from {root})"):
        pipe = pipeline_cls.from_single_file(path, config=root, local_files_only=True, torch_dtype=torch_dtype,
                                             unet=unet, vae=None, scheduler=None, **extra)
    names = _encoder_names(family)
    encoders = [getattr(pipe, n).eval().requires_grad_(False) for n in names]
    tokenizers = [getattr(pipe, n.replace("text_encoder", "tokenizer")) for n in names]
    return encoders, tokenizers
