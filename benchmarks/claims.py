"""condvec against the ways users teach Stable Diffusion new concepts today, on the same frozen miniature SD.

    python -m benchmarks.claims [--preset cpu|tiny|gpu] [--out benchmarks/results/claims] [--model models/mini-sd]

Every method learns the same concepts from the same images (:func:`demo.data.generate_concept_dataset`: one
object of a fixed shape, colour and size under a new name, on a random background and position), on the same
frozen base, with the same batch, steps, timestep sampling, caption dropout and seed, and is sampled with the same
DDIM sampler, guidance, seeds and detector (:mod:`demo.detector`). A sample is *right* when it shows exactly one
object with the concept's shape, colour and size on the prompted background.

Methods (all start from the base's own reading of the concept's name):

- condvec ``single``, ``layers``, ``kv`` and ``layers`` with 2 timestep anchors: ``condvec-train``'s ``Trainer``
  on a table bootstrapped from the base's CLIP (:func:`bootstrap.table.bootstrap_table`), new tags bootstrapped
  from their names (the documented default), only the new tags trained (``table.freeze_existing``);
- textual inversion: one new token per concept, its input embedding trained through the frozen CLIP;
- XTI / P+: one new token per concept and cross-attention layer, each layer reading its own CLIP encoding;
- LoRA: peft LoRA (rank 4) on every attention projection of the UNet, the concept's name as trigger word;
- Custom Diffusion: the attn2 ``to_k`` / ``to_v`` weights and a new token per concept;
- DreamBooth: the whole UNet and a new token per concept.

Studies: 1 one concept (fidelity against steps, learning-rate sweep per method); 2 capacity (N concepts learned
together); 3 isolation (sequential rounds; condvec's earlier rows are checked bit-identical); 4 bleeding (prompts
with two and three learned concepts); 5 key/value swaps per block; 6 per-layer against single and anchors against
none, several seeds. Writes ``claims.json``, PNG grids and plots into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from demo.data import COLOURS, SHAPES, SIZES
from demo.detector import detect

METHODS = ("condvec single", "condvec layers", "condvec kv", "condvec layers+anchors", "textual inversion", "XTI",
           "LoRA", "Custom Diffusion", "DreamBooth")
CONDVEC = {  # method -> (groups, mode, anchors)
    "condvec single": ("single", "vector", 1),
    "condvec layers": ("layers", "vector", 1),
    "condvec kv": ("layers", "kv", 1),
    "condvec layers+anchors": ("layers", "vector", 2),
}
# factorised per-layer rows (table.factor_rank): layers rows as each tag's shared vector + rank-r offsets; run on
# request (--methods), not by default
FACTORISED = {"condvec layers r1": 1, "condvec layers r2": 2, "condvec layers r4": 4}
CONDVEC |= {name: ("layers", "vector", 1) for name in FACTORISED}
ALL_METHODS = METHODS + tuple(FACTORISED)
OBJECTS = [(s, c, z) for s in SHAPES for c in COLOURS for z in SIZES]  # the 36 objects the base can draw
BACKGROUNDS = ("white", "black", "gray")
_LETTERS = "bcdfghjklmnpqrstvwxz"


@dataclass
class Settings:
    """Sizes of every study; presets in :data:`PRESETS`."""

    batch: int = 16
    images_per_concept: int = 12
    steps: int = 200  # one-concept steps, and the least any run takes
    eval_at: tuple = (25, 50, 100, 200)
    samples: int = 4  # per concept and background at evaluation
    eval_concepts: int = 24  # concepts scored when a run holds more
    sweep: tuple = (1 / 3, 1.0, 3.0)  # multiples of each method's centre learning rate
    capacity: tuple = (10, 100, 1000)
    capacity_all_up_to: int = 100  # every method up to this N; above it only capacity_big_methods
    capacity_big_methods: tuple = ("condvec layers", "LoRA")
    exposures: int = 48  # images seen per concept in capacity and isolation runs (steps = N * exposures / batch,
    # at least ``steps``)
    rounds: int = 5
    per_round: int = 4
    isolation_methods: tuple = ("condvec layers", "textual inversion", "LoRA", "Custom Diffusion", "DreamBooth")
    seeds: tuple = (0, 1, 2)
    seed_study_concepts: int = 4
    sampler_steps: int = 25
    guidance: float = 3.0
    lora_rank: int = 4
    methods: tuple = METHODS


PRESETS = {
    "cpu": Settings(),
    "tiny": Settings(batch=4, images_per_concept=2, steps=2, eval_at=(1, 2), samples=1, eval_concepts=2,
                     sweep=(1.0, 3.0), capacity=(3, 4), capacity_all_up_to=3, exposures=2, rounds=2, per_round=1,
                     isolation_methods=METHODS, seeds=(0, 1), seed_study_concepts=2, sampler_steps=2),
    "gpu": Settings(batch=32, images_per_concept=32, steps=1000, eval_at=(100, 250, 500, 1000), samples=8,
                    eval_concepts=64, sweep=(0.25, 0.5, 1.0, 2.0, 4.0), capacity=(10, 100, 1000),
                    capacity_all_up_to=1000, exposures=96, rounds=5, per_round=10, isolation_methods=METHODS,
                    seeds=(0, 1, 2, 3, 4), seed_study_concepts=10),
}
# Centre of each method's learning-rate sweep: condvec's documented defaults, the usual values of the others.
CENTRE_LR = {"condvec single": 5e-2, "condvec layers": 1e-2, "condvec kv": 5e-2, "condvec layers+anchors": 1e-2,
             **{name: 1e-2 for name in FACTORISED}, "textual inversion": 2e-2, "XTI": 2e-2, "LoRA": 1e-3,
             "Custom Diffusion": 3e-4, "DreamBooth": 1e-4}
TOKEN_LR = 2e-2  # the new token's learning rate in Custom Diffusion and DreamBooth (textual inversion's centre)


def concept_names(n: int, start: int = 0) -> list[str]:
    """``n`` new concept names (``q`` + three consonants), unknown to the base."""
    out = []
    for i in range(start, start + n):
        a, b, c = i // 400 % 20, i // 20 % 20, i % 20
        out.append("q" + _LETTERS[a] + _LETTERS[b] + _LETTERS[c])
    return out


def concepts(n: int, start: int = 0) -> list[dict]:
    """Concepts ``start … start+n-1``: a name and a fixed object; objects cycle through a fixed shuffle of the 36."""
    order = np.random.default_rng(0).permutation(len(OBJECTS))
    return [dict(zip(("name", "shape", "colour", "size"), (name, *OBJECTS[order[(start + k) % len(OBJECTS)]])))
            for k, name in enumerate(concept_names(n, start))]


def write_data(folder: Path, items: list[dict], per_concept: int) -> Path:
    """The concepts' training images (one sub-folder each, generated once)."""
    from demo.data import generate_concept_dataset

    for c in items:
        sub = folder / c["name"]
        if not (sub / "ground_truth.jsonl").exists():
            generate_concept_dataset(sub, c["name"], {a: c[a] for a in ("shape", "colour", "size")}, per_concept,
                                     seed=1000 + sum(ord(ch) * 31 ** j for j, ch in enumerate(c["name"])) % 10**6)
    return folder


def read_data(folder: Path, names: list[str]) -> tuple[list[np.ndarray], list[str]]:
    """Images (uint8 HWC) and captions of the concepts ``names`` under ``folder``."""
    images, captions = [], []
    for name in names:
        for line in (folder / name / "ground_truth.jsonl").read_text().splitlines():
            record = json.loads(line)
            images.append(np.asarray(Image.open(folder / name / record["file_name"]).convert("RGB")))
            captions.append(record["caption"])
    return images, captions


# ----------------------------------------------------------------------------------------------- the frozen base
class Base:
    """The frozen miniature SD: UNet, VAE, CLIP, tokenizer, schedulers."""

    def __init__(self, model: str):
        from diffusers import DDPMScheduler

        from unet_patch.load import load_model

        loaded = load_model(model)
        self.model = loaded  # bootstrap_table reads its text encoder
        self.path, self.unet, self.vae = model, loaded.unet.eval(), loaded.vae.eval()
        self.text_encoder, self.tokenizer = loaded.text_encoders[0].eval(), loaded.tokenizers[0]
        self.scheduler_config = dict(loaded.scheduler.config)
        self.noise = DDPMScheduler.from_config(self.scheduler_config)
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
        self.attn2 = [n for n, m in self.unet.named_modules() if n.endswith("attn2")]
        self._latents: dict = {}

    @torch.no_grad()
    def latents(self, images: list[np.ndarray]) -> torch.Tensor:
        """``(N, C, h, w)`` scaled latent means, as ``condvec-train`` caches them."""
        out = []
        for i in range(0, len(images), 256):
            x = torch.tensor(np.stack(images[i:i + 256])).permute(0, 3, 1, 2).float() / 127.5 - 1
            out.append(self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        x = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------------------------------- the methods
class _SliceProcessor:
    """XTI: layer ``index`` attends to its own slice of a per-layer packed encoder state."""

    def __init__(self, index: int, width: int):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.index, self.width, self.inner = index, width, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        own = encoder_hidden_states[..., self.index * self.width:(self.index + 1) * self.width]
        return self.inner(attn, hidden_states, own, attention_mask)


class _Tokens(torch.nn.Module):
    """A token embedding with ``new`` rows appended (``layers`` sets of them for XTI; ``layer`` picks one)."""

    def __init__(self, base: torch.Tensor, new: torch.Tensor, trainable: bool):
        super().__init__()
        self.register_buffer("base", base, persistent=False)
        self.new = torch.nn.Parameter(new, requires_grad=trainable)  # (layers, K, D)
        self.layer = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, torch.cat([self.base, self.new[self.layer]]))


class Baseline:
    """A CLIP-based method: new tokens and/or UNet weights trained through the frozen base's text encoder."""

    def __init__(self, kind: str, base: Base, names: list[str], lr: float, rank: int = 4, previous=None):
        from peft import LoraConfig

        self.kind, self.base = kind, base
        if previous is not None:  # a later isolation round: keep the earlier concepts and weights
            self.tokenizer, self.text_encoder, self.unet = previous.tokenizer, previous.text_encoder, previous.unet
            self.names = previous.names + names
        else:
            self.tokenizer, self.text_encoder = copy.deepcopy(base.tokenizer), copy.deepcopy(base.text_encoder)
            self.unet = base.unet if kind == "textual inversion" else copy.deepcopy(base.unet)
            self.names = list(names)
            if kind == "LoRA":
                self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        self.layers = len(base.attn2) if kind == "XTI" else 1
        self.new_tokens = kind != "LoRA"  # LoRA's trigger is the plain name, read by the unchanged tokenizer
        if self.new_tokens:
            self._add_tokens(names, previous)
        if kind == "XTI":
            self.unet.set_attn_processor({n + ".processor": _SliceProcessor(i, self.unet.config.cross_attention_dim)
                                          for i, n in enumerate(base.attn2)} | {
                n + ".processor": m.processor for n, m in self.unet.named_modules()
                if n.endswith("attn1")})
        groups = []
        if self.new_tokens:
            groups.append({"params": [self.embedding.new], "lr": lr if kind in ("textual inversion", "XTI")
                           else TOKEN_LR, "weight_decay": 0.0})
        weights = self._unet_weights()
        if weights:
            groups.append({"params": weights, "lr": lr, "weight_decay": 0.0 if kind == "LoRA" else 0.01})
        self.optimizer = torch.optim.AdamW(groups)

    def _add_tokens(self, names: list[str], previous) -> None:
        table = self.base.text_encoder.get_input_embeddings().weight.detach()
        ids = [self.base.tokenizer(n, add_special_tokens=False).input_ids for n in names]
        init = torch.stack([table[i].mean(0) for i in ids])  # the base's own reading of the name's pieces
        self.tokenizer.add_tokens(names)
        init = init.expand(self.layers, -1, -1)
        if previous is not None:
            old = previous.embedding.new.detach()
            kept = self.text_encoder.get_input_embeddings().base
            self.embedding = _Tokens(kept, torch.cat([old, init], dim=1).clone(), True)
            self.frozen_rows = old.shape[1]
        else:
            self.embedding = _Tokens(table.clone(), init.clone(), True)
            self.frozen_rows = 0
        self.text_encoder.set_input_embeddings(self.embedding)

    def _unet_weights(self) -> list[torch.nn.Parameter]:
        if self.kind in ("textual inversion", "XTI"):
            return []
        if self.kind == "LoRA":
            return [p for n, p in self.unet.named_parameters() if "lora_" in n]
        if self.kind == "Custom Diffusion":
            chosen = [p for n, p in self.unet.named_parameters()
                      if ".attn2.to_k." in n or ".attn2.to_v." in n]
        else:  # DreamBooth
            chosen = list(self.unet.parameters())
        for p in chosen:
            p.requires_grad_(True)
        return chosen

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def hidden(self, prompts: list[str], timesteps=None) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        outs = []
        for layer in range(self.layers):
            if self.new_tokens:
                self.embedding.layer = layer
            outs.append(self.text_encoder(ids)[0])
        return torch.cat(outs, dim=-1)  # (B, 77, layers * D)

    def context(self):
        return nullcontext()

    def parameters_per_concept(self) -> dict:
        """Trainable numbers: per concept (tokens) and shared (UNet weights)."""
        token = self.layers * self.embedding.new.shape[-1] if self.new_tokens else 0
        shared = sum(p.numel() for p in self._shared())
        return {"per concept": token, "shared": shared}

    def _shared(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]
                if not (self.new_tokens and p is self.embedding.new)]


class BaseCLIP:
    """The frozen base with its own CLIP, untouched (prompts in words)."""

    def __init__(self, base: Base):
        self.base, self.unet = base, base.unet

    def hidden(self, prompts: list[str], timesteps=None) -> torch.Tensor:
        tok = self.base.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return self.base.text_encoder(ids)[0]

    def context(self):
        return nullcontext()


def train_baseline(method: Baseline, base: Base, latents: torch.Tensor, captions: list[str], steps: int, batch: int,
                   seed: int, on_step=None) -> float:
    """The shared training loop (uniform timesteps, v-prediction MSE, 5% caption dropout, clip 1.0, epochs
    shuffled by ``seed``); returns seconds per step."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    params = method.trainable()
    began = time.perf_counter()
    for step in range(1, steps + 1):
        while len(order) < batch:
            order += torch.randperm(len(captions), generator=gen).tolist()
        idx, order = order[:batch], order[batch:]
        x0 = latents[idx]
        caps = ["" if torch.rand((), generator=gen) < 0.05 else captions[i] for i in idx]
        t = torch.randint(0, base.noise.config.num_train_timesteps, (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        noisy, target = base.noise.add_noise(x0, noise, t), base.noise.get_velocity(x0, noise, t)
        with method.context():
            pred = method.unet(noisy, t, encoder_hidden_states=method.hidden(caps, t)).sample
        loss = F.mse_loss(pred, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        method.optimizer.step()
        method.optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step)
    return (time.perf_counter() - began) / steps


class Condvec:
    """A condvec table trained by ``condvec-train``'s own ``Trainer`` (only the new tags train)."""

    def __init__(self, method: str, base: Base, data: Path, work: Path, steps: int, batch: int, lr: float,
                 seed: int, start: Path | None = None):
        from bootstrap.table import bootstrap_table
        from demo.data import tag_vocabulary
        from train.config import load_config
        from train.loop import Trainer

        groups, mode, anchors = CONDVEC[method]
        work.mkdir(parents=True, exist_ok=True)
        if start is None:
            start = work / "bootstrap.safetensors"
            if not start.exists():
                bootstrap_table(base.model, tag_vocabulary(), groups=groups, mode=mode, anchors=anchors,
                                progress=False).save(start)
        self.start = start
        cfg = load_config(None, [
            f"model.pretrained={base.path}", f"data.path={data}", "data.resolution=32", "data.bucketing=false",
            "data.caption_dropout=0.05", f"table.start_from={start}", "table.freeze_existing=true",
            f"table.factor_rank={FACTORISED.get(method, 0)}", "training.train=table", f"training.steps={steps}",
            f"training.batch_size={batch}", f"training.lr={lr}",
            "training.min_snr_gamma=0", f"training.seed={seed}", f"output.dir={work / 'run'}",
            "output.overwrite=true", "output.sample_every=0", f"output.save_every={steps}", "output.progress=false"])
        self.trainer = Trainer(cfg)
        self.unet, self.names = self.trainer.unet, None

    def train(self, steps: int, on_step=None) -> float:
        began, done = time.perf_counter(), 0
        while self.trainer.state.step < steps:
            self.trainer.train_step()
            done += 1
            if on_step is not None:
                on_step(self.trainer.state.step)
        return (time.perf_counter() - began) / max(done, 1)

    @property
    def table(self):
        return self.trainer.table

    def hidden(self, prompts: list[str], timesteps=None) -> torch.Tensor:
        from conditioner.encode import encode

        return encode(self.table, prompts, timesteps=timesteps)

    def context(self):
        from unet_patch import patched

        return patched(self.unet, self.table)

    def parameters_per_concept(self) -> dict:
        stored = self.table.data.numel() // max(1, len(self.table))  # factorised rows store fewer numbers
        return {"per concept": stored, "shared": 0}


# ---------------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(method, base: Base, prompts: list[str], n: int, settings: Settings, seed: int = 1234) -> list[np.ndarray]:
    """``n`` images per prompt: DDIM (the model's scheduler), classifier-free guidance against ``""``."""
    from diffusers import DDIMScheduler

    out = []
    anchored = isinstance(method, Condvec) and method.table.num_anchors > 1
    c, h, w = base.unet.config.in_channels, base.unet.config.sample_size, base.unet.config.sample_size
    for start in range(0, len(prompts), max(1, 64 // n)):
        chunk = [p for p in prompts[start:start + max(1, 64 // n)] for _ in range(n)]
        scheduler = DDIMScheduler.from_config(base.scheduler_config)
        scheduler.set_timesteps(settings.sampler_steps)
        gen = torch.Generator().manual_seed(seed + start)
        x = torch.randn((len(chunk), c, h, w), generator=gen) * scheduler.init_noise_sigma
        with method.context():
            cond = None if anchored else method.hidden(chunk + [""] * len(chunk))
            for t in scheduler.timesteps:
                if anchored:
                    cond = method.hidden(chunk + [""] * len(chunk), timesteps=torch.full((2 * len(chunk),),
                                                                                          float(t)))
                pred = method.unet(scheduler.scale_model_input(torch.cat([x, x]), t), t,
                                   encoder_hidden_states=cond).sample
                text, uncond = pred.chunk(2)
                x = scheduler.step(uncond + settings.guidance * (text - uncond), t, x).prev_sample
        out += list(base.decode(x))
    return out


def _right(found: dict, want: dict, background: str) -> bool:
    return (len(found["objects"]) == 1 and found["background"] == background
            and all(found["objects"][0][a] == want[a] for a in ("shape", "colour", "size")))


def fidelity(method, base: Base, items: list[dict], settings: Settings) -> dict:
    """Fraction of samples right per concept (``TAG, BG background`` for each background) and their mean."""
    prompts = [(c, bg) for c in items for bg in BACKGROUNDS]
    images = sample(method, base, [f"{c['name']}, {bg} background" for c, bg in prompts], settings.samples,
                    settings)
    per: dict = {c["name"]: 0 for c in items}
    for k, (c, bg) in enumerate(prompts):
        for image in images[k * settings.samples:(k + 1) * settings.samples]:
            per[c["name"]] += _right(detect(image), c, bg)
    total = len(BACKGROUNDS) * settings.samples
    per = {name: v / total for name, v in per.items()}
    return {"mean": float(np.mean(list(per.values()))), "per concept": per, "samples": total * len(items)}


def _scored(items: list[dict], settings: Settings) -> list[dict]:
    """The concepts scored of a run: all, or ``eval_concepts`` spread evenly over them."""
    if len(items) <= settings.eval_concepts:
        return items
    picks = np.linspace(0, len(items) - 1, settings.eval_concepts).round().astype(int)
    return [items[i] for i in picks]


# ------------------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One method trained on one concept set."""

    method: str
    lr: float
    steps: int
    seed: int = 0
    curve: list = field(default_factory=list)
    seconds_per_step: float = 0.0
    params: dict = field(default_factory=dict)
    model: object = None


def make_method(name: str, base: Base, data: Path, names: list[str], work: Path, steps: int, settings: Settings,
                lr: float, seed: int = 0):
    """A fresh method object ready to train on the concepts ``names`` under ``data``."""
    if name in CONDVEC:
        return Condvec(name, base, data, work, steps, settings.batch, lr, seed)
    return Baseline(name, base, names, lr, settings.lora_rank)


def run(name: str, base: Base, data: Path, items: list[dict], work: Path, steps: int, settings: Settings, lr: float,
        seed: int = 0, eval_at=()) -> Run:
    """Train ``name`` on ``items`` for ``steps``; fidelity at each step of ``eval_at`` and at the end."""
    torch.manual_seed(seed)
    result = Run(name, lr, steps, seed)
    scored = _scored(items, settings)
    method = make_method(name, base, data, [c["name"] for c in items], work, steps, settings, lr, seed)

    def on_step(step):
        if step in eval_at and step != steps:
            result.curve.append({"step": step, **fidelity(method, base, scored, settings)})

    if isinstance(method, Condvec):
        result.seconds_per_step = method.train(steps, on_step)
    else:
        images, captions = read_data(data, [c["name"] for c in items])
        result.seconds_per_step = train_baseline(method, base, base.latents(images), captions, steps,
                                                 settings.batch, seed, on_step)
    result.curve.append({"step": steps, **fidelity(method, base, scored, settings)})
    result.params, result.model = method.parameters_per_concept(), method
    print(f"  {name:24s} lr {lr:.2g} seed {seed}: fidelity {result.curve[-1]['mean']:.2f} "
          f"({result.seconds_per_step:.3f} s/step)", flush=True)
    return result


def _summary(r: Run) -> dict:
    out = {k: v for k, v in asdict(r).items() if k != "model"}
    for point in out["curve"]:
        point.pop("per concept", None)
    return out


def _bytes(params: dict, n: int) -> float:
    """fp32 bytes per concept: its own numbers plus its share of the shared weights."""
    return 4 * (params["per concept"] + params["shared"] / n)


# ---------------------------------------------------------------------------------------------------- studies
def study_one(base: Base, out: Path, settings: Settings) -> tuple[dict, dict]:
    """Study 1: one concept alone, every method, a learning-rate sweep; fidelity against steps."""
    items = concepts(1)
    data = write_data(out / "data" / "one", items, settings.images_per_concept)
    results, best = {}, {}
    for name in settings.methods:
        runs = [run(name, base, data, items, out / "work" / "one" / f"{name}-{i}", settings.steps, settings,
                    CENTRE_LR[name] * m, eval_at=settings.eval_at) for i, m in enumerate(settings.sweep)]
        # The best lr: the highest final fidelity, then the highest mean along the curve.
        winner = max(runs, key=lambda r: (r.curve[-1]["mean"], np.mean([p["mean"] for p in r.curve])))
        best[name] = winner.lr
        peak = max(winner.curve, key=lambda p: p["mean"])
        results[name] = {"sweep": {f"{r.lr:.3g}": r.curve[-1]["mean"] for r in runs}, "best lr": winner.lr,
                         "curve": [{"step": p["step"], "fidelity": p["mean"]} for p in winner.curve],
                         "steps to best": peak["step"], "best fidelity": peak["mean"],
                         "seconds per step": round(winner.seconds_per_step, 4),
                         "parameters": winner.params, "bytes per concept": _bytes(winner.params, 1)}
    return results, best


def _steps(n: int, settings: Settings) -> int:
    """Steps that show each of ``n`` concepts ``exposures`` images, and at least the one-concept ``steps`` (a row
    of a few concepts is updated in nearly every step, so fewer steps would leave it short of updates)."""
    return max(settings.steps, math.ceil(n * settings.exposures / settings.batch))


def study_capacity(base: Base, out: Path, settings: Settings, lrs: dict) -> tuple[dict, dict]:
    """Study 2: N concepts learned together; per-concept fidelity against N. Returns the runs of the smallest N
    too (the bleeding and key/value studies reuse them)."""
    results, kept = {}, {}
    for n in settings.capacity:
        items = concepts(n)
        data = write_data(out / "data" / f"n{n}", items, settings.images_per_concept)
        steps = _steps(n, settings)
        names = settings.methods if n <= settings.capacity_all_up_to else settings.capacity_big_methods
        results[n] = {}
        for name in names:
            began = time.perf_counter()
            r = run(name, base, data, items, out / "work" / f"n{n}" / name, steps, settings, lrs[name])
            results[n][name] = {"fidelity": r.curve[-1]["mean"], "steps": steps,
                                "exposures per concept": steps * settings.batch / n,
                                "scored concepts": len(_scored(items, settings)),
                                "seconds": round(time.perf_counter() - began, 1),
                                "seconds per step": round(r.seconds_per_step, 4),
                                "bytes per concept": _bytes(r.params, n)}
            if n == settings.capacity[0]:
                kept[name] = r
    return results, kept


def study_isolation(base: Base, out: Path, settings: Settings, lrs: dict) -> dict:
    """Study 3: sequential rounds of new concepts; after each, every earlier concept's fidelity."""
    results = {}
    for name in settings.isolation_methods:
        rows, method, earlier, start = [], None, [], None
        for rnd in range(settings.rounds):
            new = concepts(settings.per_round, start=5000 + rnd * settings.per_round)
            data = write_data(out / "data" / f"round{rnd}", new, settings.images_per_concept)
            steps = _steps(len(new), settings)
            work = out / "work" / "isolation" / f"{name}-{rnd}"
            if name in CONDVEC:
                before = None
                if method is not None:
                    start = work.parent / f"{name}-{rnd - 1}" / "after.safetensors"
                    method.table.save(start)
                    before = method.table.copy()
                method = Condvec(name, base, data, work, steps, settings.batch, lrs[name], 0, start=start)
                method.train(steps)
                identical = None
                if before is not None:
                    identical = bool(method.table.tags[:len(before)] == before.tags
                                     and torch.equal(method.table.data[:len(before)], before.data)
                                     and torch.equal(method.table.special, before.special))
            else:
                method = Baseline(name, base, [c["name"] for c in new], lrs[name], settings.lora_rank,
                                  previous=method)
                images, captions = read_data(data, [c["name"] for c in new])
                kept = method.embedding.new.detach()[:, :method.frozen_rows].clone() if method.new_tokens else None
                train_baseline(method, base, base.latents(images), captions, steps, settings.batch, 0)
                identical = None if kept is None or not method.frozen_rows else bool(
                    torch.equal(method.embedding.new.detach()[:, :method.frozen_rows], kept))
            earlier_scores = fidelity(method, base, earlier, settings)["per concept"] if earlier else {}
            now = fidelity(method, base, new, settings)["per concept"]
            rows.append({"round": rnd + 1, "new concepts": now, "earlier concepts": earlier_scores,
                         "earlier rows bit-identical": identical})
            earlier = earlier + new
        first = [c["name"] for c in concepts(settings.per_round, start=5000)]
        results[name] = {"rounds": rows, "first round by round": [
            float(np.mean([r["new concepts" if i == 0 else "earlier concepts"][n] for n in first]))
            for i, r in enumerate(rows)]}
        print(f"  isolation {name:24s}: first round {results[name]['first round by round']}", flush=True)
    return results


def _match(found: list[dict], wanted: list[dict]) -> tuple[dict, ...]:
    return max(itertools.permutations(found),
               key=lambda objs: sum(o[a] == w[a] for o, w in zip(objs, wanted) for a in ("shape", "colour", "size")))


def _pairs(items: list[dict], k: int, count: int, sizes_differ: bool = False) -> list[list[dict]]:
    """Up to ``count`` groups of ``k`` concepts that differ pairwise in shape and colour (and size)."""
    groups = []
    for combo in itertools.combinations(items, k):
        if all(a["shape"] != b["shape"] and a["colour"] != b["colour"]
               and (a["size"] != b["size"] or not sizes_differ) for a, b in itertools.combinations(combo, 2)):
            groups.append(list(combo))
        if len(groups) == count:
            break
    return groups


def study_bleeding(base: Base, out: Path, settings: Settings, runs: dict, count_tag: str = "two objects") -> dict:
    """Study 4: prompts with two and three learned concepts (from the capacity study's smallest set)."""
    items = concepts(settings.capacity[0])
    results = {}
    for name, r in runs.items():
        results[name] = {}
        for k in (2, 3):
            groups = _pairs(items, k, 6)
            if not groups:
                continue
            count = f", {count_tag}" if k == 2 else ""  # the base has a tag for two objects, none for three
            prompts = [", ".join(c["name"] for c in g) + f"{count}, white background" for g in groups]
            images = sample(r.model, base, prompts, settings.samples * 2, settings)
            right = count = crossed = objects = 0
            for j, g in enumerate(groups):
                for image in images[j * settings.samples * 2:(j + 1) * settings.samples * 2]:
                    found = detect(image)["objects"]
                    if len(found) != k:
                        continue
                    count += 1
                    matched = _match(found, g)
                    right += all(o[a] == w[a] for o, w in zip(matched, g) for a in ("shape", "colour", "size"))
                    for o, w in zip(matched, g):
                        objects += 1
                        crossed += any(o[a] != w[a] and any(o[a] == v[a] for v in g if v is not w)
                                       for a in ("shape", "colour", "size"))
            total = len(groups) * settings.samples * 2
            results[name][f"{k} concepts"] = {"all right": right / total, f"{k} objects": count / total,
                                              "objects with a crossed attribute": crossed / objects if objects
                                              else None, "samples": total}
    return results


def study_swap(base: Base, out: Path, settings: Settings, runs: dict) -> dict:
    """Study 5: key = one concept, value = another, per block, in a short and a many-tag prompt."""
    from merge.concepts import swap

    items = concepts(settings.capacity[0])
    pairs = _pairs(items, 2, 3, sizes_differ=True)
    results = {}
    for name in ("condvec layers", "condvec kv"):
        if name not in runs:
            continue
        model = runs[name].model
        table = model.table
        results[name] = {}
        for where in (None, "down", "mid", "up"):
            follows = {a: {"key": 0, "value": 0, "other": 0, "both (same)": 0} for a in ("shape", "colour", "size")}
            long_follows = copy.deepcopy(follows)
            for a_cfg, b_cfg in pairs:
                swapped = swap(table, "swapped", key=a_cfg["name"], value=b_cfg["name"], layers=where)
                saved = model.trainer.table
                model.trainer.table = swapped
                third = next((c for c in items if c["name"] not in (a_cfg["name"], b_cfg["name"])), a_cfg)
                for prompt, tally in (("swapped, white background", follows),
                                      (f"swapped, {third['name']}, two objects, white background", long_follows)):
                    if third is a_cfg and tally is long_follows:
                        continue
                    for image in sample(model, base, [prompt], settings.samples * 2, settings):
                        objs = detect(image)["objects"]
                        if not objs:
                            continue
                        o = objs[0]  # the short prompt: the (leftmost) object drawn
                        if tally is long_follows:  # beside the third concept: the object least like it
                            o = max(objs, key=lambda x: sum(x[a] != third[a] for a in ("shape", "colour", "size")))
                        for a in tally:
                            side = ("key" if o[a] == a_cfg[a] else "value" if o[a] == b_cfg[a] else "other")
                            side = "both (same)" if a_cfg[a] == b_cfg[a] else side
                            tally[a][side] += 1
                model.trainer.table = saved
            results[name][where or "all layers"] = {"short prompt": follows, "with another concept": long_follows}
    # The base's CLIP asked for "key's shape in value's colour" in words.
    clip = BaseCLIP(base)
    right = total = 0
    for a_cfg, b_cfg in pairs:
        prompt = (f"{b_cfg['colour']} {a_cfg['shape']}, {a_cfg['size']} {a_cfg['shape']}, "
                  f"{a_cfg['shape']} on center, white background")
        for image in sample(clip, base, [prompt], settings.samples * 2, settings):
            total += 1
            right += _right(detect(image), {"shape": a_cfg["shape"], "colour": b_cfg["colour"],
                                            "size": a_cfg["size"]}, "white")
    results["base CLIP, key's shape and size in value's colour, in words"] = right / max(total, 1)
    return results


def study_seeds(base: Base, out: Path, settings: Settings, lrs: dict) -> dict:
    """Study 6: single vs layers vs layers+anchors at their tuned lr, several seeds."""
    items = concepts(settings.seed_study_concepts, start=7000)
    data = write_data(out / "data" / "seeds", items, settings.images_per_concept)
    steps = _steps(len(items), settings)
    results = {}
    for name in ("condvec single", "condvec layers", "condvec layers+anchors", *FACTORISED, "textual inversion",
                 "XTI"):
        if name not in settings.methods:
            continue
        scores = [run(name, base, data, items, out / "work" / "seeds" / f"{name}-{s}", steps, settings, lrs[name],
                      seed=s).curve[-1]["mean"] for s in settings.seeds]
        results[name] = {"fidelity by seed": scores, "mean": float(np.mean(scores)),
                         "std": float(np.std(scores)), "lr": lrs[name], "steps": steps}
    return results


# ------------------------------------------------------------------------------------------------ reporting
def _plots(out: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in report["one concept"].items():
        ax.plot([p["step"] for p in r["curve"]], [p["fidelity"] for p in r["curve"]], marker="o", label=name,
                linestyle="-" if name.startswith("condvec") else "--")
    ax.set(xlabel="training step", ylabel="fidelity", ylim=(-0.02, 1.02), title="one concept: fidelity vs steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "one-concept.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    names = sorted({m for per in report["capacity"].values() for m in per})
    for name in names:
        ns = [n for n, per in report["capacity"].items() if name in per]  # str keys after JSON, int before
        ax.plot([int(n) for n in ns], [report["capacity"][n][name]["fidelity"] for n in ns], marker="o", label=name,
                linestyle="-" if name.startswith("condvec") else "--")
    ax.set(xscale="log", xlabel="concepts learned together (N)", ylabel="per-concept fidelity", ylim=(-0.02, 1.02),
           title="capacity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "capacity.png", dpi=120)
    plt.close(fig)


def _grid(out: Path, base: Base, runs: dict, settings: Settings) -> None:
    from unet_patch.grid import labelled_grid

    items = concepts(settings.capacity[0])[:4]
    rows, labels = [], []
    for name, r in runs.items():
        images = sample(r.model, base, [f"{c['name']}, white background" for c in items], 2, settings)
        rows.append([Image.fromarray(a) for a in images])
        labels.append(name)
    columns = [f"{c['colour']} {c['size']} {c['shape']}"[:14] + f" #{j}" for c in items for j in range(2)]
    labelled_grid(rows, labels, columns, title=f"{settings.capacity[0]} concepts learned together "
                  "(prompt: TAG, white background)", upscale=2).save(out / "capacity-samples.png")


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def render(report: dict) -> str:
    """The studies of a ``claims.json`` report as markdown tables (what BENCHMARKS.md shows)."""
    out = []
    if "one concept" in report:
        out += ["**Study 1 — one concept.** Fidelity after each number of steps, at each method's best learning rate "
                "(sweep: final fidelity per lr).", "",
                "| method | best lr | " + " | ".join(f"step {p['step']}" for p in
                                                    next(iter(report["one concept"].values()))["curve"])
                + " | sweep | s/step | numbers per concept | bytes per concept |",
                "| --- | --- | " + "--- | " * len(next(iter(report["one concept"].values()))["curve"])
                + "--- | --- | --- | --- |"]
        for name, r in report["one concept"].items():
            sweep = ", ".join(f"{lr}: {_pct(v)}" for lr, v in r["sweep"].items())
            params = r["parameters"]
            numbers = f"{params['per concept']:,}" + (f" + {params['shared']:,} shared" if params["shared"] else "")
            out.append(f"| {name} | {r['best lr']:.2g} | " + " | ".join(_pct(p["fidelity"]) for p in r["curve"])
                       + f" | {sweep} | {r['seconds per step']:.3f} | {numbers} | {r['bytes per concept']:,.0f} |")
        out.append("")
    if "capacity" in report:
        ns = list(report["capacity"])
        names = list(dict.fromkeys(m for n in ns for m in report["capacity"][n]))
        out += ["**Study 2 — capacity.** Per-concept fidelity with N concepts learned together (steps · batch / N "
                "images seen per concept in brackets).", "",
                "| method | " + " | ".join(f"N = {n}" for n in ns) + " | bytes per concept at the largest N |",
                "| --- | " + "--- | " * len(ns) + "--- |"]
        for name in names:
            cells = []
            for n in ns:
                r = report["capacity"][n].get(name)
                cells.append("not run" if r is None else f"{_pct(r['fidelity'])} ({r['exposures per concept']:.0f})")
            last = next(report["capacity"][n][name] for n in reversed(ns) if name in report["capacity"][n])
            out.append(f"| {name} | " + " | ".join(cells) + f" | {last['bytes per concept']:,.0f} |")
        out.append("")
    if "isolation" in report:
        rounds = len(next(iter(report["isolation"].values()))["rounds"])
        out += ["**Study 3 — isolation.** Fidelity of the first round's concepts after each round of new concepts, "
                "and whether every earlier concept's own rows or tokens stayed bit-identical (checked).", "",
                "| method | " + " | ".join(f"after round {i + 1}" for i in range(rounds))
                + " | earlier rows bit-identical |", "| --- | " + "--- | " * rounds + "--- |"]
        for name, r in report["isolation"].items():
            same = [x["earlier rows bit-identical"] for x in r["rounds"][1:]]
            shown = "n/a (shared weights only)" if all(v is None for v in same) else (
                "yes, every round" if all(same) else "no")
            if name in ("Custom Diffusion", "DreamBooth") and all(same):
                shown = "tokens yes; the shared UNet weights are retrained every round"
            out.append(f"| {name} | " + " | ".join(_pct(v) for v in r["first round by round"]) + f" | {shown} |")
        out.append("")
    if "bleeding" in report:
        out += ["**Study 4 — bleeding.** Prompts with two (`A, B, two objects, white background`) and three learned "
                "concepts: all objects right, the right object count, and objects showing another concept's "
                "attribute.", "",
                "| method | 2: all right | 2: two objects | 2: crossed | 3: all right | 3: three objects "
                "| 3: crossed |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in report["bleeding"].items():
            cells = []
            for k in (2, 3):
                x = r.get(f"{k} concepts")
                crossed = x and x["objects with a crossed attribute"] if x and x[f"{k} objects"] else None
                cells += ["–"] * 3 if x is None else [_pct(x["all right"]), _pct(x[f"{k} objects"]), _pct(crossed)]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    if "key/value" in report:
        out += ["**Study 5 — key/value swaps** (`key = A, value = B` in the chosen layers): of the drawn objects, "
                "how many take each attribute from the key concept, the value concept or neither.", "",
                "| table | layers | prompt | shape key / value / other | colour key / value / other "
                "| size key / value / other |", "| --- | --- | --- | --- | --- | --- |"]
        for name, per in report["key/value"].items():
            if not isinstance(per, dict):
                continue
            for where, prompts in per.items():
                for prompt, tally in prompts.items():
                    cells = [" / ".join(str(tally[a][k]) for k in ("key", "value", "other"))
                             for a in ("shape", "colour", "size")]
                    out.append(f"| {name} | {where} | {prompt} | " + " | ".join(cells) + " |")
        words = report["key/value"].get("base CLIP, key's shape and size in value's colour, in words")
        if words is not None:
            out += ["", f"The base's CLIP asked in words for the key concept's shape and size in the value concept's "
                        f"colour: {_pct(words)} right."]
        out.append("")
    if "seeds" in report:
        out += ["**Study 6 — seeds.** Fidelity per seed at each method's tuned learning rate.", "",
                "| method | lr | steps | per seed | mean ± std |", "| --- | --- | --- | --- | --- |"]
        for name, r in report["seeds"].items():
            out.append(f"| {name} | {r['lr']:.2g} | {r['steps']} | "
                       + ", ".join(_pct(v) for v in r["fidelity by seed"])
                       + f" | {_pct(r['mean'])} ± {100 * r['std']:.0f} |")
        out.append("")
    return "\n".join(out)


def combine(parts: list[dict]) -> dict:
    """One report from runs that each did some of the studies (``--studies``, ``--capacity``): capacity results
    merge by N, every other study must come from one run, and every run must have used study 1's learning rates
    (to 1%: ``--lr`` values copied with two significant digits)."""
    out: dict = {"commands": [p["command"] for p in parts], "machine": parts[0]["machine"],
                 "settings": [p["settings"] for p in parts], "seconds": [p["seconds"] for p in parts],
                 "capacity": {}}
    tuned = next((p["learning rates"] for p in parts if "one concept" in p), None)
    for part in parts:
        if tuned is not None:
            ran = {m for per in part.get("capacity", {}).values() for m in per}
            ran |= {m for key in ("isolation", "bleeding", "seeds", "key/value") for m in part.get(key, {})
                    if m in ALL_METHODS}
            differ = sorted(m for m in ran if not math.isclose(part["learning rates"][m], tuned[m], rel_tol=0.01))
            if differ:
                raise SystemExit(f"{part['command']!r} used other learning rates than study 1 for {differ}")
        for key, value in part.items():
            if key == "capacity":
                for n, per in value.items():
                    if n in out["capacity"]:
                        raise SystemExit(f"capacity N={n} is in two runs")
                    out["capacity"][n] = per
            elif key in ("one concept", "isolation", "bleeding", "key/value", "seeds"):
                if key in out:
                    raise SystemExit(f"study {key!r} is in two runs")
                out[key] = value
    out["capacity"] = dict(sorted(out["capacity"].items(), key=lambda kv: int(kv[0])))
    out["learning rates"] = tuned or parts[0]["learning rates"]
    return out


STUDY_KEYS = {1: "one concept", 2: "capacity", 3: "isolation", 4: "bleeding", 5: "key/value", 6: "seeds"}


def _part(item: str) -> dict:
    """``PATH`` or ``PATH:3,5``: a run's report, or only the given studies of it."""
    path, _, chosen = item.rpartition(":")
    if not path or not all(s.strip().isdigit() for s in chosen.split(",")):
        path, chosen = item, ""
    report = json.loads(Path(path).read_text())
    if chosen:
        keep = {STUDY_KEYS[int(s)] for s in chosen.split(",")}
        report = {k: v for k, v in report.items() if k not in STUDY_KEYS.values() or k in keep}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.claims", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--model", default="models/mini-sd")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/claims"))
    parser.add_argument("--studies", default="1,2,3,4,5,6", help="comma-separated study numbers to run")
    parser.add_argument("--methods", help="comma-separated subset of: " + ", ".join(ALL_METHODS))
    parser.add_argument("--capacity", help="comma-separated concept counts of the capacity study (default: the "
                        "preset's); its smallest set is what studies 4 and 5 prompt")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                        help="learning rate of a method when study 1 (the sweep) does not run, e.g. 'LoRA=0.003'")
    parser.add_argument("--combine", nargs="+", metavar="CLAIMS_JSON[:STUDIES]",
                        help="merge the claims.json of runs that each did some studies into --out (with plots); "
                             "':3,5' after a file takes only those studies from it")
    parser.add_argument("--render", type=Path, metavar="CLAIMS_JSON",
                        help="only print the markdown tables of an earlier run's claims.json")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    if args.combine:
        report = combine([_part(item) for item in args.combine])
        args.out.mkdir(parents=True, exist_ok=True)
        if "one concept" in report and report["capacity"]:
            _plots(args.out, report)
        (args.out / "claims.json").write_text(json.dumps(report, indent=1))
        (args.out / "claims.md").write_text(render(report))
        print(f"wrote {args.out / 'claims.json'} and claims.md from {len(args.combine)} runs")
        return 0
    settings = copy.deepcopy(PRESETS[args.preset])
    if args.methods:
        chosen = tuple(m.strip() for m in args.methods.split(","))
        unknown = [m for m in chosen if m not in ALL_METHODS]
        if unknown:
            parser.error(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
        settings.methods = chosen
        settings.isolation_methods = tuple(m for m in settings.isolation_methods if m in chosen)
        settings.capacity_big_methods = tuple(m for m in settings.capacity_big_methods if m in chosen)
    studies = {int(s) for s in args.studies.split(",")}
    if args.capacity:
        settings.capacity = tuple(int(n) for n in args.capacity.split(","))
    given = {}
    for item in args.lr:
        name, _, value = item.rpartition("=")
        if name not in ALL_METHODS:
            parser.error(f"--lr {item!r}: unknown method {name!r}; choose from {', '.join(ALL_METHODS)}")
        given[name] = float(value)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    base = Base(args.model)
    report: dict = {"command": " ".join(["python -m benchmarks.claims", *(sys.argv[1:] if argv is None else argv)]),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                               f"{torch.get_num_threads()} torch threads", "settings": asdict(settings)}
    timing = {}

    def stage(label, fn, *a):
        t = time.perf_counter()
        print(f"study: {label}", flush=True)
        value = fn(*a)
        timing[label] = round(time.perf_counter() - t, 1)
        return value

    lrs = dict(CENTRE_LR) | given
    if 1 in studies:
        report["one concept"], lrs = stage("one concept", study_one, base, args.out, settings)
    report["learning rates"] = lrs
    kept = {}
    if studies & {2, 4, 5}:
        report["capacity"], kept = stage("capacity", study_capacity, base, args.out, settings, lrs)
        _grid(args.out, base, kept, settings)
    if 3 in studies:
        report["isolation"] = stage("isolation", study_isolation, base, args.out, settings, lrs)
    if 4 in studies:
        report["bleeding"] = stage("bleeding", study_bleeding, base, args.out, settings, kept)
    if 5 in studies:
        report["key/value"] = stage("key/value", study_swap, base, args.out, settings, kept)
    if 6 in studies:
        report["seeds"] = stage("seeds", study_seeds, base, args.out, settings, lrs)
    report["seconds"] = {**timing, "total": round(time.perf_counter() - began, 1)}
    if "one concept" in report and "capacity" in report:
        _plots(args.out, report)
    (args.out / "claims.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "claims.md").write_text(render(json.loads(json.dumps(report, default=str))))
    print(f"wrote {args.out / 'claims.json'} ({report['seconds']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
