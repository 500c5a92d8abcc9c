"""Pretrain the miniature Stable Diffusion (``models/mini-sd``): a tiny VAE, then UNet + CLIP text encoder jointly.

The result is a miniature SD1.x in SD1.x's own diffusers layout (``unet/``, ``text_encoder/``, ``tokenizer/``,
``vae/``, ``scheduler/``, ``model_index.json``), so diffusers' ``StableDiffusionPipeline`` runs it with its own
text encoder and condvec bootstraps from it exactly as from SD1.5.

Design (chosen by measurement on 2 CPU cores, see BENCHMARKS.md "Miniature SD"):

- images 32 px (the demo scenes of :mod:`demo.data`), a 2× ``AutoencoderKL`` → 16×16×4 latents;
- a ``CLIPTextModel`` (2 layers, 64 wide) with a word-level ``CLIPTokenizer`` (BPE trained on the captions with the
  ``tokenizers`` library, every caption word one token);
- a ``UNet2DConditionModel`` on the latents, cross-attention at 8×8 and 4×4 and in the mid block;
- v-prediction on SD's scaled-linear betas rescaled to zero terminal SNR, DDIM with trailing timesteps;
- AdamW, EMA of the UNet and text-encoder weights; caption dropout for classifier-free guidance.

Every stage checkpoints (safetensors + JSON; optimiser state included) and resumes exactly: each step's batch,
noise and timesteps come from a generator seeded by the step number, so a resumed run equals an uninterrupted one.

Why not the trainer's schedule, EMA and checkpoints: the shipped weights were made with this cosine schedule (its
floor at a tenth of the rate) and a dense EMA of two whole models, and rerunning the recipe must reproduce them;
the trainer's ``train.optim`` schedules decay to zero and its EMA and checkpoints are row-sparse over a table.

    python -m demo.pretrain vae  --work runs/mini-sd [--steps 1500]
    python -m demo.pretrain unet --work runs/mini-sd [--steps 6000]
    python -m demo.pretrain export --work runs/mini-sd --out models/mini-sd
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from conditioner.cli_errors import OneLineArgumentParser, run_cli
from conditioner.errors import CondvecError
from conditioner.fileio import atomic_dir, atomic_path

IMAGE_SIZE = 32
MAX_LENGTH = 77

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
    sample_size=IMAGE_SIZE, mid_block_add_attention=False,
)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=MAX_LENGTH, projection_dim=64, hidden_act="quick_gelu")
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, attention_head_dim=16,
    cross_attention_dim=TEXT_CONFIG["hidden_size"],
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)


# ----------------------------------------------------------------------------------------------------------- data


def prepare_data(work: Path, num: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """The demo scenes as one uint8 array ``(N, 32, 32, 3)`` and their captions, cached under ``work/data``."""
    from PIL import Image

    from demo.data import generate_demo_dataset

    cache = work / "data" / f"scenes-{num}-{seed}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return z["images"], [str(c) for c in z["captions"]]
    folder = work / "data" / f"scenes-{num}-{seed}"
    records = generate_demo_dataset(folder, num, size=IMAGE_SIZE, seed=seed)
    images = np.stack([np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in records])
    captions = [r["caption"] for r in records]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, captions=np.array(captions))
    os.replace(tmp, cache)
    return images, captions


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` → float ``(N, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def write_tokenizer(captions: list[str], out: Path) -> None:
    """Train a CLIP-style BPE (``vocab.json`` + ``merges.txt``) on the captions: every caption word one token.

    The byte alphabet (as in CLIP's vocabulary) keeps any other text tokenisable, character by character.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator([c.lower() for c in captions], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out))
    # The trainer's id order is not deterministic; the ids are rebuilt in a fixed order (special tokens, CLIP's
    # byte alphabet bare and as word ends, then every merge's result in merge order), so the same captions always
    # give the same vocab.json.
    trained = json.loads((out / "vocab.json").read_text())
    merges = [line.split() for line in (out / "merges.txt").read_text().splitlines()[1:] if line.strip()]
    order = ["<|startoftext|>", "<|endoftext|>", *sorted(alphabet), *(ch + "</w>" for ch in sorted(alphabet))]
    order += [a + b for a, b in merges]
    vocab = {}
    for piece in order:
        vocab.setdefault(piece, len(vocab))
    missing = sorted(set(trained) - set(vocab))
    if missing:
        raise CondvecError(f"tokenizer vocabulary pieces not built from the merges: {missing[:5]}")
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "do_lower_case": True}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2))


def load_tokenizer(folder: Path):
    """The CLIPTokenizer of a tokenizer folder written by :func:`write_tokenizer`."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                         model_max_length=MAX_LENGTH)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """``(N, 77)`` input ids, padded and truncated as SD's pipeline does."""
    return tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


# ------------------------------------------------------------------------------------------------ checkpoints


def _save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """One checkpoint file, written atomically: tensors (models, EMA, optimiser) + JSON metadata."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={"condvec_pretrain": json.dumps(meta)})


def _load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["condvec_pretrain"])
    return load_file(str(path)), meta


def _optimizer_tensors(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    out = {}
    for i, p in enumerate(params):
        state = opt.state.get(p)
        if state:
            out[f"opt.{i}.exp_avg"] = state["exp_avg"]
            out[f"opt.{i}.exp_avg_sq"] = state["exp_avg_sq"]
            out[f"opt.{i}.step"] = torch.as_tensor(state["step"], dtype=torch.float64).reshape(1)
    return out


def _restore_optimizer(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], tensors: dict) -> None:
    for i, p in enumerate(params):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {"exp_avg": tensors[f"opt.{i}.exp_avg"].clone(),
                            "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].clone(),
                            "step": torch.tensor(float(tensors[f"opt.{i}.step"][0]))}


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One model's state dict out of a checkpoint: the tensors named ``PREFIX.…``, without the prefix."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _latest(folder: Path, create: bool = False) -> Path | None:
    """The folder's newest checkpoint (``create``: make the folder first)."""
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    found = sorted(folder.glob("step-*.safetensors"))
    return found[-1] if found else None


def _lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# ---------------------------------------------------------------------------------------------------------- VAE


def build_vae():
    """A fresh tiny ``AutoencoderKL`` (2× downsampling, 4 latent channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**VAE_CONFIG)


def train_vae(work: Path, steps: int, batch: int, lr: float, num: int, kl_weight: float = 1e-6,
              save_every: int = 250, seed: int = 0, log=print) -> Path:
    """Train (or resume) the VAE: L1 + MSE reconstruction with a small KL term. Returns the last checkpoint."""
    images, _ = prepare_data(work, num)
    x_all = to_tensor(images)
    vae = build_vae()
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    folder = work / "vae"
    start, last = 0, _latest(folder, create=True)
    if last is not None:
        tensors, meta = _load_state(last)
        vae.load_state_dict(_part(tensors, "model"))
        _restore_optimizer(opt, params, tensors)
        start = meta["step"]
        log(f"vae: resumed at step {start} from {last.name}")
    t0 = time.perf_counter()
    losses = []
    for step in range(start, steps):
        g = _step_generator(seed, step)
        x = x_all[torch.randint(len(x_all), (batch,), generator=g)]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, lr, 100, steps)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log(f"vae step {step + 1}/{steps} loss {np.mean(losses[-50:]):.4f} "
                f"{(time.perf_counter() - t0) / (step + 1 - start):.3f} s/step")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            tensors = {f"model.{k}": v for k, v in vae.state_dict().items()} | _optimizer_tensors(opt, params)
            _save_state(folder / f"step-{step + 1:06d}.safetensors", tensors, {"step": step + 1})
            _prune(folder)
    return _latest(folder)


def _prune(folder: Path, keep: int = 2) -> None:
    for old in sorted(folder.glob("step-*.safetensors"))[:-keep]:
        old.unlink()


def load_trained_vae(work: Path):
    """The VAE of the last VAE checkpoint, with ``scaling_factor`` set to 1 / std of the data's latents."""
    last = _latest(work / "vae")
    if last is None:
        raise CondvecError(f"no VAE checkpoint in {work / 'vae'}; run `python -m demo.pretrain vae` first")
    tensors, meta = _load_state(last)
    vae = build_vae()
    vae.load_state_dict(_part(tensors, "model"))
    vae.requires_grad_(False).eval()
    if "scaling_factor" in meta:
        vae.register_to_config(scaling_factor=meta["scaling_factor"])
    return vae, last


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(to_tensor(images[i:i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


# --------------------------------------------------------------------------------------------- UNet + CLIP


def unet_config(work: Path, channels: tuple[int, ...] | None = None) -> dict:
    """The run's UNet config: :data:`UNET_CONFIG` with the widths chosen at its start (kept in ``work``)."""
    path = work / "unet_config.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if channels is not None and tuple(saved["block_out_channels"]) != tuple(channels):
            raise CondvecError(f"{work} was started with --channels {','.join(map(str, saved['block_out_channels']))}"
                               f"; use a new --work folder for other widths")
        return UNET_CONFIG | saved
    config = dict(UNET_CONFIG)
    if channels is not None:
        if len(channels) != 3 or any(c % 16 for c in channels):
            raise CondvecError(f"--channels needs three multiples of 16, got {channels}")
        config["block_out_channels"] = tuple(channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"block_out_channels": list(config["block_out_channels"])}))
    return config


def build_unet_and_text(vocab_size: int, config: dict | None = None):
    """A fresh ``UNet2DConditionModel`` (``config``, default :data:`UNET_CONFIG`) and ``CLIPTextModel`` (seeded)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(config or UNET_CONFIG))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                        **TEXT_CONFIG))
    return unet, text


def _ema_update(ema: list[torch.Tensor], params: list[torch.nn.Parameter], decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up: ``min(decay, (1 + step) / (10 + step))``."""
    return min(decay, (1 + step) / (10 + step))


def train_unet(work: Path, steps: int, batch: int, lr: float, lr_text: float, num: int, ema_decay: float = 0.999,
               caption_dropout: float = 0.1, save_every: int = 250, snapshot_every: int = 500, seed: int = 0,
               high_noise_bias: float = 0.0, channels: tuple[int, ...] | None = None, two_object_share: float = 0.0,
               log=print) -> Path:
    """Train (or resume) UNet + text encoder jointly on the VAE's latents. Returns the last checkpoint.

    ``high_noise_bias`` ∈ [0, 1): that fraction of each batch draws its timestep from the top half of the schedule
    (where shapes are decided) instead of uniformly. ``two_object_share`` ∈ (0, 1): each sample is a two-object
    scene with that probability (0: scenes drawn uniformly, half of them two-object), for a phase that works on
    binding. Continuing a run with a larger ``steps`` restarts the cosine schedule's tail from there (a warm start).
    """
    from diffusers import DDPMScheduler

    images, captions = prepare_data(work, num)
    vae, _ = load_trained_vae(work)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "vocab.json").exists():
        write_tokenizer(captions, tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    ids_all = tokenize(tokenizer, captions)
    is_two = torch.tensor(["two objects" in c for c in captions])
    two_pool, one_pool = is_two.nonzero().flatten(), (~is_two).nonzero().flatten()
    null_ids = tokenize(tokenizer, [""])[0]
    latent_cache = work / "latents.safetensors"
    if latent_cache.exists():
        from safetensors.torch import load_file
        cached = load_file(str(latent_cache))
        mean_all, std_all = cached["mean"], cached["std"]
    else:
        from safetensors.torch import save_file
        mean_all, std_all = encode_latents(vae, images)
        mean_all, std_all = mean_all.contiguous(), std_all.contiguous()
        save_file({"mean": mean_all, "std": std_all}, str(latent_cache))
    scale = float(vae.config.scaling_factor)

    unet, text = build_unet_and_text(len(tokenizer), unet_config(work, channels))
    unet.train()
    text.train()
    unet_params = list(unet.parameters())
    text_params = list(text.parameters())
    params = unet_params + text_params
    opt = torch.optim.AdamW([{"params": unet_params, "lr": lr}, {"params": text_params, "lr": lr_text}],
                            weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one",)})
    alphas = sched.alphas_cumprod
    folder, snaps = work / "unet", work / "snapshots"
    start, last = 0, _latest(folder, create=True)
    if last is not None:
        tensors, meta = _load_state(last)
        unet.load_state_dict(_part(tensors, "unet"))
        text.load_state_dict(_part(tensors, "text"))
        for i, e in enumerate(ema):
            e.copy_(tensors[f"ema.{i}"])
        _restore_optimizer(opt, params, tensors)
        start = meta["step"]
        log(f"unet: resumed at step {start} from {last.name}")
    t0 = time.perf_counter()
    losses = []
    for step in range(start, steps):
        g = _step_generator(seed, step)
        idx = torch.randint(len(ids_all), (batch,), generator=g)
        if two_object_share > 0:
            pick_two = torch.rand(batch, generator=g) < two_object_share
            two = two_pool[torch.randint(len(two_pool), (batch,), generator=g)]
            one = one_pool[torch.randint(len(one_pool), (batch,), generator=g)]
            idx = torch.where(pick_two, two, one)
        z = (mean_all[idx] + std_all[idx] * torch.randn(mean_all[idx].shape, generator=g)) * scale
        ids = ids_all[idx].clone()
        drop = torch.rand(batch, generator=g) < caption_dropout
        ids[drop] = null_ids
        t = torch.randint(0, 1000, (batch,), generator=g)
        if high_noise_bias > 0:
            high = torch.rand(batch, generator=g) < high_noise_bias
            t = torch.where(high, torch.randint(500, 1000, (batch,), generator=g), t)
        noise = torch.randn(z.shape, generator=g)
        a = alphas[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
        noisy = a * z + s * noise
        target = a * noise - s * z
        for group, base in zip(opt.param_groups, (lr, lr_text)):
            group["lr"] = _lr_at(step, base, 200, steps)
        hidden = text(ids).last_hidden_state
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _ema_update(ema, params, ema_decay_at(step, ema_decay))
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log(f"unet step {step + 1}/{steps} loss {np.mean(losses[-50:]):.4f} "
                f"{(time.perf_counter() - t0) / (step + 1 - start):.3f} s/step")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            tensors = ({f"unet.{k}": v for k, v in unet.state_dict().items()}
                       | {f"text.{k}": v for k, v in text.state_dict().items()}
                       | {f"ema.{i}": e for i, e in enumerate(ema)} | _optimizer_tensors(opt, params))
            meta = {"step": step + 1, "loss_last_50": float(np.mean(losses[-50:])) if losses else None}
            _save_state(folder / f"step-{step + 1:06d}.safetensors", tensors, meta)
            _prune(folder)
        if snapshot_every and (step + 1) % snapshot_every == 0:
            export(work, snaps / f"step-{step + 1:06d}", ema=True, checkpoint=_latest(folder))
            export(work, snaps / f"step-{step + 1:06d}-raw", ema=False, checkpoint=_latest(folder))
    return _latest(folder)


# -------------------------------------------------------------------------------------------------- export


def export(work: Path, out: Path, ema: bool = True, checkpoint: Path | None = None) -> Path:
    """Write the SD1.x diffusers folder (EMA weights by default) from the last (or a given) UNet checkpoint."""
    from diffusers import DDIMScheduler

    checkpoint = checkpoint or _latest(work / "unet")
    if checkpoint is None:
        raise CondvecError(f"no UNet checkpoint in {work / 'unet'}; run `python -m demo.pretrain unet` first")
    tensors, meta = _load_state(checkpoint)
    tokenizer = load_tokenizer(work / "tokenizer")
    unet, text = build_unet_and_text(len(tokenizer), unet_config(work))
    unet.load_state_dict(_part(tensors, "unet"))
    text.load_state_dict(_part(tensors, "text"))
    if ema:
        with torch.no_grad():
            for i, p in enumerate([*unet.parameters(), *text.parameters()]):
                p.copy_(tensors[f"ema.{i}"])
    vae, _ = load_trained_vae(work)
    with atomic_dir(out) as tmp_name:
        tmp = Path(tmp_name)
        unet.save_pretrained(tmp / "unet")
        text.save_pretrained(tmp / "text_encoder")
        vae.save_pretrained(tmp / "vae")
        DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")
        (tmp / "tokenizer").mkdir(parents=True)
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            (tmp / "tokenizer" / name).write_bytes((work / "tokenizer" / name).read_bytes())
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers_version(),
                 "feature_extractor": [None, None], "safety_checker": [None, None],
                 "requires_safety_checker": False, "scheduler": ["diffusers", "DDIMScheduler"],
                 "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "pretrain.json").write_text(json.dumps({"step": meta["step"], "ema": ema}, indent=2) + "\n")
    return out


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def finish_vae(work: Path, num: int) -> float:
    """Measure the latents' std and store ``scaling_factor = 1 / std`` in the last VAE checkpoint's metadata."""
    images, _ = prepare_data(work, num)
    vae, last = load_trained_vae(work)
    mean, std = encode_latents(vae, images[:2048])
    z = mean + std * torch.randn_like(mean)
    factor = float(1.0 / z.std())
    tensors, meta = _load_state(last)
    meta["scaling_factor"] = factor
    _save_state(last, tensors, meta)
    return factor


# ----------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m demo.pretrain {vae,unet,export}``."""
    parser = OneLineArgumentParser(prog="python -m demo.pretrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    for name in ("vae", "unet", "export"):
        p = sub.add_parser(name)
        p.add_argument("--work", type=Path, default=Path("runs/mini-sd"))
        p.add_argument("--num", type=int, default=20000, help="demo scenes to train on")
        p.add_argument("--threads", type=int, default=1, help="torch threads (1 when other work shares the cores)")
        if name == "vae":
            p.add_argument("--steps", type=int, default=1500)
            p.add_argument("--batch", type=int, default=32)
            p.add_argument("--lr", type=float, default=2e-3)
        if name == "unet":
            p.add_argument("--steps", type=int, default=6000)
            p.add_argument("--batch", type=int, default=64)
            p.add_argument("--lr", type=float, default=2e-3)
            p.add_argument("--lr-text", type=float, default=1e-3)
            p.add_argument("--ema", type=float, default=0.999)
            p.add_argument("--high-noise-bias", type=float, default=0.0)
            p.add_argument("--two-object-share", type=float, default=0.0,
                           help="probability that a sample is a two-object scene (0: uniform over the scenes)")
            p.add_argument("--snapshot-every", type=int, default=500)
            p.add_argument("--channels", type=lambda v: tuple(int(c) for c in v.split(",")), default=None,
                           help="UNet block widths (default 32,64,64; fixed at the run's start)")
        if name == "export":
            p.add_argument("--out", type=Path, default=Path("models/mini-sd"))
            p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    args = parser.parse_args(argv)

    def run() -> int:
        torch.set_num_threads(args.threads)
        log = lambda msg: print(msg, flush=True)  # noqa: E731
        if args.stage == "vae":
            train_vae(args.work, args.steps, args.batch, args.lr, args.num, log=log)
            log(f"vae: scaling_factor {finish_vae(args.work, args.num):.4f}")
        elif args.stage == "unet":
            train_unet(args.work, args.steps, args.batch, args.lr, args.lr_text, args.num, ema_decay=args.ema,
                       high_noise_bias=args.high_noise_bias, snapshot_every=args.snapshot_every,
                       channels=args.channels, two_object_share=args.two_object_share, log=log)
        else:
            log(f"wrote {export(args.work, args.out, ema=not args.raw)}")
        return 0

    return run_cli("python -m demo.pretrain", run)


if __name__ == "__main__":
    sys.exit(main())
