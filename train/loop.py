"""The training loop: learn the tag table (and optionally UNet weights) on a tagged image dataset.

Every random choice — caption/tag dropout, flip, timestep, noise — is drawn from a generator seeded by
``(seed, micro_step, position in the global batch)``. A sample therefore gets the same randomness whatever the number
of processes and whether the run was resumed, and a resumed run needs no RNG state to continue bit-identically.

Across processes the table is never handed to DDP: every rank tokenises the whole global batch (cheap), so all ranks
know the union of touched rows without communication; each rank computes gradients for its shard, and only those
rows' gradients are all-reduced. UNet weights, when trained, go through accelerate's DDP as usual.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conditioner.encode import Rows, anchor_weights, pack, tokenize
from conditioner.parse import Tag, TagNormalization, parse_prompt
from conditioner.table import TagTable
from train import checkpoint as ckpt
from train.config import to_yaml
from train.optim import RowSparseAdamW, lr_at

_MIX = (6364136223846793005, 1442695040888963407, 2862933555777620809)


def sample_generator(seed: int, micro_step: int, position: int) -> torch.Generator:
    """The generator of one sample's randomness; depends only on its seed, micro-step and batch position."""
    value = (seed * _MIX[0] + micro_step * _MIX[1] + position * _MIX[2] + 12345) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


@dataclass
class Plan:
    """What one sample of a micro-step gets: its caption tags after dropout, timestep, flip and noise seed."""

    index: int
    tags: list[Tag]
    timestep: int
    flip: bool
    generator: torch.Generator


@dataclass
class RunState:
    step: int = 0
    metrics: list[dict] = field(default_factory=list)


class Trainer:
    """One training run, built from a resolved config (see ``train.config.RunConfig``)."""

    def __init__(self, cfg, accelerator=None):
        from accelerate import Accelerator

        self.cfg = cfg
        tr = cfg.training
        self.acc = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=tr.mixed_precision,
        )
        self.world = self.acc.num_processes
        self.rank = self.acc.process_index
        if tr.batch_size % self.world:
            raise ValueError(f"training.batch_size={tr.batch_size} must be divisible by the {self.world} processes")
        self.device = self.acc.device
        self.out = cfg.output.dir
        if not cfg.output.resume and ckpt.list_checkpoints(self.out):
            raise ValueError(f"output.dir {self.out!r} already holds checkpoints of a run: continue it with "
                             "output.resume=latest, or choose a new output.dir")
        self._setup()

    # ------------------------------------------------------------------ setup
    def log(self, message: str) -> None:
        if self.acc.is_main_process:
            print(message, flush=True)

    def _setup(self) -> None:
        from train.data import assign_buckets, scan_dataset
        from train.model import describe, load_base

        cfg, tr = self.cfg, self.cfg.training
        self._maybe_generate_demo()
        self.unet, self.vae, self.noise_scheduler, base_table, self.base_name = load_base(cfg.model, tr.seed)
        self.log(f"base model: {self.base_name} — {describe(self.unet)}")
        self.items = scan_dataset(cfg.data.path, caption_ext=cfg.data.caption_ext, metadata=cfg.data.metadata,
                                  repeats=dict(cfg.data.repeats), default_repeats=cfg.data.default_repeats)
        # bucket sides in pixels: multiples of bucket_step latent pixels
        scale = 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)
        step = cfg.data.bucket_step * scale
        buckets = assign_buckets(self.items, cfg.data.resolution, step=step, enabled=cfg.data.bucketing,
                                 max_aspect=cfg.data.max_aspect)
        self.log(f"data: {len(self.items)} images ({sum(i.repeats for i in self.items)} with repeats) "
                 f"in {len(buckets)} bucket(s): {', '.join(f'{w}x{h}' for w, h in buckets)}")
        self.table = self._make_table(base_table)
        self.captions = [self._parse_caption(item.caption, item.path) for item in self.items]
        self._add_data_tags()
        self._check_sample_prompts()
        self.table.to(self.device)

        # what trains
        self.unet.to(self.device)
        self.unet.requires_grad_(False)
        unet_params = []
        if tr.train == "full":
            self.unet.requires_grad_(True)
            if self.table.mode == "kv":  # kv tables bypass attn2 to_k / to_v: they get no gradient
                for layer in self.table.layers:
                    attn = self.unet.get_submodule(layer.name)
                    attn.to_k.requires_grad_(False)
                    attn.to_v.requires_grad_(False)
            unet_params = [p for p in self.unet.parameters() if p.requires_grad]
        elif tr.train == "table+kv":
            for layer in self.table.layers:
                attn = self.unet.get_submodule(layer.name)
                for proj in (attn.to_k, attn.to_v):
                    proj.requires_grad_(True)
                    unet_params.extend(proj.parameters())
        if tr.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        from unet_patch.patch import install

        install(self.unet, self.table)
        self.unet_optimizer = None
        if unet_params:
            self.unet.train()
            self.unet_optimizer = torch.optim.AdamW(unet_params, lr=tr.lr_unet, betas=(tr.beta1, tr.beta2),
                                                    eps=tr.eps, weight_decay=tr.weight_decay_unet)
            self.model, self.unet_optimizer = self.acc.prepare(self.unet, self.unet_optimizer)
        else:
            self.unet.eval()
            self.model = self.unet
        if self.vae is not None:
            self.vae.to(self.device).requires_grad_(False).eval()

        shape = (self.table.num_anchors, self.table.width)
        self.row_opt = RowSparseAdamW(len(self.table), shape, (tr.beta1, tr.beta2), tr.eps, tr.weight_decay,
                                      device=self.device)
        self.special_opt = RowSparseAdamW(2, shape, (tr.beta1, tr.beta2), tr.eps, 0.0, device=self.device)
        self.ema = self.table.data.clone() if tr.ema_decay > 0 else None
        self.ema_special = self.table.special.clone() if tr.ema_decay > 0 else None
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.state = RunState()
        self._batches_cache: dict[int, list[list[int]]] = {}
        self._setup_cache()
        if cfg.output.resume:
            self._resume(cfg.output.resume)

    def _maybe_generate_demo(self) -> None:
        d = self.cfg.data
        needed = d.generate_demo > 0 and not os.path.exists(d.path)
        self.acc.wait_for_everyone()  # every rank decides before rank 0 starts writing
        if not needed:
            return
        if self.acc.is_main_process:
            from train import demo_data

            size = 64 if d.resolution > 32 else 32  # the demo generator draws at 32 or 64 px; buckets resize

            if d.demo_concepts:
                for k, concept in enumerate(d.demo_concepts):
                    tag, spec = (part.strip() for part in concept.split("=", 1))
                    attributes = {}
                    for word in spec.split():
                        for key, options in (("colour", demo_data.COLOURS), ("shape", demo_data.SHAPES),
                                             ("size", demo_data.SIZES)):
                            if word in options:
                                attributes[key] = word
                    if len(attributes) != 3:
                        raise ValueError(f"data.demo_concepts {concept!r}: name a size ({', '.join(demo_data.SIZES)}),"
                                         f" a colour ({', '.join(demo_data.COLOURS)}) and a shape "
                                         f"({', '.join(demo_data.SHAPES)})")
                    demo_data.generate_concept_dataset(os.path.join(d.path, tag.replace(" ", "_")), tag, attributes,
                                                       d.generate_demo, size=size, seed=self.cfg.training.seed + k)
            else:
                demo_data.generate_demo_dataset(d.path, d.generate_demo, size=size, seed=self.cfg.training.seed)
            print(f"wrote {d.generate_demo} demo images to {d.path}", flush=True)
        self.acc.wait_for_everyone()

    def _normalization(self) -> TagNormalization:
        t = self.cfg.table
        return TagNormalization(lowercase=t.lowercase, underscores=t.underscores)

    def _make_table(self, base_table: TagTable | None) -> TagTable:
        t = self.cfg.table
        if t.start_from:
            table = TagTable.load(t.start_from)
            self.log(f"table: continuing {t.start_from} ({len(table)} tags)")
        elif base_table is not None and t.use_base_table:
            table = base_table
            self.log(f"table: the base model's own table ({len(table)} tags)")
        else:
            from unet_patch.discover import table_for_unet

            groups = OmegaConf.to_container(t.groups) if not isinstance(t.groups, str) else t.groups
            table = table_for_unet(
                self.unet, base_name=self.base_name, mode=t.mode, groups=groups, anchors=t.anchors,
                num_train_timesteps=self.noise_scheduler.config.num_train_timesteps, use_sink=t.use_sink,
                pad_to=t.pad_to, normalization=self._normalization(), seed=self.cfg.training.seed,
            )
            if base_table is not None and self._special_from(base_table, table):
                self.log("table: sink and padding rows derived from the base model's table")
            self.log(f"table: new, {table}")
        from unet_patch.discover import discover

        table.check_layers(discover(self.unet))
        self.existing_rows = len(table)
        return table

    @torch.no_grad()
    def _special_from(self, base: TagTable, table: TagTable) -> bool:
        """Give a new table the base table's sink and padding, converted to its layout.

        The base UNet learned to rely on its sink: a fresh table with a random sink would start from images the
        base never produced. Vector mode averages the base's per-layer rows over each new group; key/value mode
        applies each layer's own ``to_k`` / ``to_v`` to the base's row for that layer, which is exact.
        """
        if base.mode != "vector":
            return False
        # resample the base's anchors at the new table's anchors: (A_new, A_base)
        w = anchor_weights(base.anchors, torch.tensor(table.anchors)) if base.num_anchors > 1 else None
        for li, layer in enumerate(table.layers):
            src = base.special[:, :, base.group_columns(base.layer_group[li])]  # (2, A_base, D)
            src = src[:, :1].expand(-1, table.num_anchors, -1) if w is None else torch.einsum(
                "na,sad->snd", w.to(src.dtype), src)  # (2, A_new, D)
            if table.mode == "kv":
                attn = self.unet.get_submodule(layer.name)
                cols = table.group_columns(li)
                k = attn.to_k(src)  # (2, A, inner)
                v = attn.to_v(src)
                table.special[:, :, cols] = torch.cat([k, v], -1)
            else:
                g = table.layer_group[li]
                members = sum(1 for x in table.layer_group if x == g)
                cols = table.group_columns(g)
                if li == table.layer_group.index(g):
                    table.special[:, :, cols] = 0
                table.special[:, :, cols] += src / members
        return True

    def _parse_caption(self, caption: str, path: str) -> list[Tag]:
        try:
            return parse_prompt(caption, self.table.normalization)
        except ValueError as err:
            raise ValueError(f"caption of {path}: {err}") from None

    def _add_data_tags(self) -> None:
        seen: dict[str, None] = {}
        for tags in self.captions:
            for tag in tags:
                seen.setdefault(tag.name)
        new = [name for name in seen if name not in self.table._index]
        if new:
            t = self.cfg.table
            init = {"zeros": "zeros", "normal": "normal", "mean": "mean"}.get(t.init, t.init)
            self.table.add_tags(new, init=init, std=t.init_std, seed=self.cfg.training.seed + 7)
        split = [name for name in seen if name in self.table.values]
        if split:
            warnings.warn(f"{len(split)} tag(s) in the data are swapped (split) concepts, e.g. {split[0]!r}: only "
                          "their key source trains, their value source stays as it is", stacklevel=2)
        shown = ", ".join(new[:12]) + (f", … (+{len(new) - 12})" if len(new) > 12 else "")
        self.log(f"tags: {len(seen)} in the data, {len(new)} new to the table" + (f": {shown}" if new else ""))

    def _check_sample_prompts(self) -> None:
        for prompt in self.cfg.output.sample_prompts:
            try:
                tokenize(self.table, [prompt])
            except ValueError as err:
                message = str(err).split(" (pass lenient")[0]
                raise ValueError(f"output.sample_prompts {prompt!r}: {message}") from None

    def _setup_cache(self) -> None:
        from train.cache import LatentCache, PixelCache

        d = self.cfg.data
        if self.vae is None:
            self.cache = PixelCache()
        else:
            cache_dir = d.cache_dir or os.path.join(d.path, ".condvec_cache")
            self.cache = LatentCache(self.vae, cache_dir, device=self.device)
        if self.vae is None or d.cache_latents:
            if self.acc.is_main_process:
                self.cache.prepare(self.items, flips=d.flip, progress=self.cfg.output.progress)
            self.acc.wait_for_everyone()
            if not self.acc.is_main_process:
                self.cache.prepare(self.items, flips=d.flip, progress=False)

    # ------------------------------------------------------------------ batches
    def _global_batch(self, micro_step: int) -> list[int]:
        from train.data import epoch_batches

        tr = self.cfg.training
        if 0 not in self._batches_cache:  # every epoch has as many batches as epoch 0
            self._batches_cache[0] = epoch_batches(self.items, tr.batch_size, tr.seed, 0)
        epoch, pos = divmod(micro_step, len(self._batches_cache[0]))
        if epoch not in self._batches_cache:  # keep epoch 0 (for its length) and the current epoch only
            self._batches_cache = {0: self._batches_cache[0],
                                   epoch: epoch_batches(self.items, tr.batch_size, tr.seed, epoch)}
        return self._batches_cache[epoch][pos]

    def _plan(self, micro_step: int) -> list[Plan]:
        d, tr = self.cfg.data, self.cfg.training
        num_t = self.noise_scheduler.config.num_train_timesteps
        plans = []
        for position, index in enumerate(self._global_batch(micro_step)):
            gen = sample_generator(tr.seed, micro_step, position)
            tags = self.captions[index]
            if torch.rand((), generator=gen).item() < d.caption_dropout:
                tags = []
            elif d.tag_dropout > 0 and tags:
                keep = torch.rand(len(tags), generator=gen) >= d.tag_dropout
                tags = [t for t, k in zip(tags, keep.tolist()) if k]
            timestep = int(torch.randint(0, num_t, (), generator=gen))
            flip = bool(d.flip and torch.rand((), generator=gen).item() < 0.5)
            plans.append(Plan(index, tags, timestep, flip, gen))
        return plans

    # ------------------------------------------------------------------ one micro-step
    def _loss(self, plans: list[Plan], rows_param: torch.Tensor, special_param: torch.Tensor,
              all_rows: torch.Tensor) -> torch.Tensor:
        tr = self.cfg.training
        latents = torch.stack([self.cache.get(self.items[p.index], p.flip) for p in plans]).to(self.device)
        noise, extra = [], []
        for p in plans:
            noise.append(torch.randn(latents.shape[1:], generator=p.generator))
            extra.append(torch.randn(latents.shape[1], generator=p.generator) if tr.noise_offset else None)
        noise = torch.stack(noise).to(self.device)  # (b, C, H, W)
        if tr.noise_offset:
            noise = noise + tr.noise_offset * torch.stack(extra).to(self.device)[:, :, None, None]
        t = torch.tensor([p.timestep for p in plans], device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        tokens = tokenize(self.table, [p.tags for p in plans])
        rows = Rows(ids=all_rows, data=rows_param, special=special_param)  # the whole global batch's rows
        cond = pack(self.table, tokens, t.float(), rows=rows)
        with self.acc.autocast():
            pred = self.model(noisy, t, encoder_hidden_states=cond).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (b,)
        if tr.min_snr_gamma > 0:
            snr = self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])
            weight = torch.clamp(snr, max=tr.min_snr_gamma) / (snr + 1 if self.prediction_type == "v_prediction"
                                                               else snr)
            per_sample = per_sample * weight
        return per_sample.mean()

    # ------------------------------------------------------------------ one optimiser step
    def train_step(self) -> dict:
        """One optimiser step (``grad_accum`` micro-steps); returns its metrics."""
        tr = self.cfg.training
        started = time.perf_counter()
        step = self.state.step
        trainable_new_only = self.cfg.table.freeze_existing
        touched, touched_grads = [], []  # per micro-step: rows (K,) and their gradients (K, A, W)
        special_grad = torch.zeros_like(self.table.special)
        loss_sum = torch.zeros((), device=self.device)
        tags_in_batch: set[str] = set()
        for micro in range(tr.grad_accum):
            micro_step = step * tr.grad_accum + micro
            plans = self._plan(micro_step)
            global_tokens = tokenize(self.table, [p.tags for p in plans])
            all_rows = global_tokens.rows.to(self.device)
            for p in plans:
                for tag in p.tags:
                    tags_in_batch.add(tag.name)
                    self.table.counts[tag.name] = self.table.counts.get(tag.name, 0) + 1
            local = plans[self.rank:: self.world]
            rows_param = self.table.data[all_rows].clone().requires_grad_(True)  # (K, A, W)
            special_param = self.table.special.clone().requires_grad_(self.cfg.table.train_special)
            loss = self._loss(local, rows_param, special_param, all_rows) / tr.grad_accum
            if loss.requires_grad:  # a batch of dropped captions with frozen special rows has nothing to learn
                self.acc.backward(loss)
            row_grad = rows_param.grad if rows_param.grad is not None else torch.zeros_like(rows_param)
            if self.world > 1:
                torch.distributed.all_reduce(row_grad)  # only the touched rows travel
                row_grad /= self.world
            touched.append(all_rows)
            touched_grads.append(row_grad)
            if special_param.grad is not None:
                g = special_param.grad
                if self.world > 1:
                    torch.distributed.all_reduce(g)
                    g /= self.world
                special_grad += g
            loss_sum += loss.detach()
        if self.world > 1:
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= self.world

        # sum the micro-steps' gradients per row: (U, A, W) over the sorted union of touched rows
        row_ids, inverse = torch.unique(torch.cat(touched), return_inverse=True)
        row_grad = self.table.data.new_zeros(row_ids.numel(), *self.table.data.shape[1:])
        row_grad.index_add_(0, inverse, torch.cat(touched_grads))
        if trainable_new_only:
            keep = row_ids >= self.existing_rows
            row_ids, row_grad = row_ids[keep], row_grad[keep]
        unet_grads = [p.grad for p in self.unet_optimizer.param_groups[0]["params"] if p.grad is not None] \
            if self.unet_optimizer is not None else []
        sq = row_grad.pow(2).sum() + special_grad.pow(2).sum() + sum(g.pow(2).sum() for g in unet_grads)
        grad_norm = float(sq.sqrt())
        if tr.max_grad_norm > 0 and grad_norm > tr.max_grad_norm:
            scale = tr.max_grad_norm / (grad_norm + 1e-6)
            row_grad = row_grad * scale
            special_grad = special_grad * scale
            for g in unet_grads:
                g.mul_(scale)
        lr = lr_at(step, tr.lr, tr.lr_schedule, tr.warmup_steps, tr.steps)
        self.row_opt.step(self.table.data, row_ids, row_grad, lr)
        if self.cfg.table.train_special:
            self.special_opt.step(self.table.special, torch.arange(2, device=self.device), special_grad, lr)
        if self.unet_optimizer is not None:
            lr_unet = lr_at(step, tr.lr_unet, tr.lr_schedule, tr.warmup_steps, tr.steps)
            for group in self.unet_optimizer.param_groups:
                group["lr"] = lr_unet
            self.unet_optimizer.step()
            self.unet_optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and row_ids.numel():
            d = tr.ema_decay
            self.ema[row_ids] = d * self.ema[row_ids] + (1 - d) * self.table.data[row_ids]
            self.ema_special.mul_(d).add_(self.table.special, alpha=1 - d)
        self.state.step += 1
        return {"step": self.state.step, "loss": float(loss_sum), "lr": lr, "grad_norm": grad_norm,
                "tags_in_batch": len(tags_in_batch), "rows_updated": row_ids.numel(),
                "step_time": time.perf_counter() - started}

    # ------------------------------------------------------------------ checkpoints
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = self.row_opt.state_tensors("rows") | self.special_opt.state_tensors("special")
        if self.ema is not None:
            tensors["ema"] = self.ema
            tensors["ema_special"] = self.ema_special
        return tensors

    def _fingerprint(self) -> dict:
        """What must not change between a run and its resume (everything but output.* and training.steps)."""
        cfg = OmegaConf.to_container(self.cfg, resolve=True)
        cfg.pop("output")
        cfg["training"].pop("steps")
        cfg["world_size"] = self.world
        flat = {}

        def walk(node, prefix=""):
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                else:
                    flat[f"{prefix}{key}"] = value

        walk(cfg)
        return flat

    def save(self) -> str | None:
        path = None
        if self.acc.is_main_process:
            trained_unet = self.acc.unwrap_model(self.model) if self.unet_optimizer is not None else None
            fingerprint = self._fingerprint()
            info = {"existing_rows": self.existing_rows, "config": OmegaConf.to_container(self.cfg, resolve=True),
                    "fingerprint": fingerprint,
                    "fingerprint_sha256": hashlib.sha256(json.dumps(fingerprint, sort_keys=True,
                                                                    default=str).encode()).hexdigest()}
            path = ckpt.save_checkpoint(self.out, self.state.step, self.table, self._state_tensors(), info,
                                        unet=trained_unet, unet_optimizer=self.unet_optimizer,
                                        keep_last=self.cfg.output.keep_last)
        self.acc.wait_for_everyone()
        return path

    def _resume(self, resume: str) -> None:
        path = ckpt.resolve_resume(self.out, resume)
        unet = self.acc.unwrap_model(self.model) if self.unet_optimizer is not None else None
        with open(os.path.join(path, "state.json")) as f:
            saved = json.load(f).get("fingerprint", {})
        now = self._fingerprint()
        changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if changed:
            shown = ", ".join(f"{k} ({saved.get(k)!r} → {now.get(k)!r})" for k in changed[:4])
            raise ValueError(f"cannot resume {path}: the config changed: {shown}"
                             + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
                             + "; only output.* and training.steps may change on resume")
        table, tensors, info = ckpt.load_checkpoint(path, unet=unet, unet_optimizer=self.unet_optimizer)
        if table.tags != self.table.tags:
            raise ValueError(f"checkpoint {path} has other tags than this run's data and table: "
                             "resume with the same config and dataset")
        self.table.data.copy_(table.data.to(self.device))
        self.table.special.copy_(table.special.to(self.device))
        self.table.counts = table.counts
        self.existing_rows = info["existing_rows"]
        self.row_opt.load_state_tensors({k: v.to(self.device) for k, v in tensors.items()}, "rows")
        self.special_opt.load_state_tensors({k: v.to(self.device) for k, v in tensors.items()}, "special")
        if self.ema is not None:
            self.ema = tensors["ema"].to(self.device)
            self.ema_special = tensors["ema_special"].to(self.device)
        self.state.step = info["step"]
        metrics_path = os.path.join(self.out, "metrics.jsonl")
        if os.path.isfile(metrics_path):
            with open(metrics_path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            self.state.metrics = [m for m in rows if m["step"] <= self.state.step]
        self.log(f"resumed from {path} at step {self.state.step}")

    # ------------------------------------------------------------------ samples
    def sample_grid(self, tag: str) -> str | None:
        """Sample grid (prompts × seeds) with the current table; returns the PNG path (main process)."""
        o = self.cfg.output
        if not o.sample_prompts or not self.acc.is_main_process:
            return None
        from diffusers import DDIMScheduler
        from PIL import Image

        from train.plot import labelled_grid
        from unet_patch.pipeline import TagDiffusionPipeline

        unet = self.acc.unwrap_model(self.model)
        was_training = unet.training
        unet.eval()
        config = {k: v for k, v in self.noise_scheduler.config.items() if not k.startswith("_")}
        pipe = TagDiffusionPipeline(unet=unet, scheduler=DDIMScheduler.from_config(config), vae=self.vae,
                                    table=self.table)
        pipe.set_progress_bar_config(disable=True)
        rows = []
        for prompt in o.sample_prompts:
            images = []
            for seed in o.sample_seeds:
                gen = torch.Generator().manual_seed(int(seed))
                image = pipe(prompt, num_inference_steps=o.sample_steps, guidance_scale=o.sample_guidance,
                             generator=gen).images[0]
                if o.sample_upscale > 1:
                    image = image.resize((image.width * o.sample_upscale, image.height * o.sample_upscale),
                                         Image.NEAREST)
                images.append(image)
            rows.append(images)
        from unet_patch.patch import install

        install(unet, self.table)  # the pipeline restored the processors it found; keep ours
        unet.train(was_training)
        os.makedirs(os.path.join(self.out, "samples"), exist_ok=True)
        path = os.path.join(self.out, "samples", f"{tag}.png")
        labelled_grid(rows, list(o.sample_prompts), [f"seed {s}" for s in o.sample_seeds],
                      title=f"{os.path.basename(self.out)} - {tag}").save(path)
        return path

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        """Train to ``training.steps``; returns paths of what the run wrote."""
        cfg, o = self.cfg, self.cfg.output
        os.makedirs(self.out, exist_ok=True)
        if self.acc.is_main_process:
            with open(os.path.join(self.out, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
        writer = self._tensorboard() if o.tensorboard else None
        metrics_path = os.path.join(self.out, "metrics.jsonl")
        if self.acc.is_main_process:
            with open(metrics_path, "w") as f:
                for m in self.state.metrics:
                    f.write(json.dumps(m) + "\n")
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.training.steps, initial=self.state.step, desc="condvec-train", unit="step",
                   disable=not (o.progress and self.acc.is_main_process), dynamic_ncols=True)
        samples = []
        window: list[float] = []
        while self.state.step < cfg.training.steps:
            m = self.train_step()
            window.append(m["loss"])
            self.state.metrics.append(m)
            if self.acc.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
                if writer is not None:
                    for key in ("loss", "lr", "grad_norm", "tags_in_batch"):
                        writer.add_scalar(key, m[key], m["step"])
            bar.update(1)
            if m["step"] % o.log_every == 0 or m["step"] == cfg.training.steps:
                bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", tags=m["tags_in_batch"])
                window = []
            if o.sample_every and m["step"] % o.sample_every == 0 and m["step"] < cfg.training.steps:
                path = self.sample_grid(f"step-{m['step']:07d}")
                samples.append(path)
            if m["step"] % o.save_every == 0 and m["step"] < cfg.training.steps:
                self.save()
                self._plot()
        bar.close()
        final_ckpt = self.save()
        samples.append(self.sample_grid(f"step-{self.state.step:07d}"))
        result = self._finish()
        result["checkpoint"] = final_ckpt
        result["samples"] = [s for s in samples if s]
        if writer is not None:
            writer.close()
        return result

    def _plot(self) -> str | None:
        if not self.acc.is_main_process or not self.state.metrics:
            return None
        from train.plot import loss_plot

        path = os.path.join(self.out, "loss.png")
        loss_plot([m["step"] for m in self.state.metrics], [m["loss"] for m in self.state.metrics], path,
                  title=f"{os.path.basename(self.out)}: training loss (log scale)")
        return path

    def _finish(self) -> dict:
        result = {"plot": self._plot()}
        if self.acc.is_main_process:
            table_path = os.path.join(self.out, "table.safetensors")
            self.table.save(table_path)
            result["table"] = table_path
            if self.ema is not None:
                ema_table = self.table.copy()
                ema_table.data = self.ema.clone()
                ema_table.special = self.ema_special.clone()
                ema_table.save(os.path.join(self.out, "table-ema.safetensors"))
                result["table_ema"] = os.path.join(self.out, "table-ema.safetensors")
            if self.unet_optimizer is not None:
                result["model"] = self._save_model()
        self.acc.wait_for_everyone()
        return result

    def _save_model(self) -> str:
        from diffusers import DDIMScheduler

        from unet_patch.patch import remove
        from unet_patch.pipeline import TagDiffusionPipeline

        unet = self.acc.unwrap_model(self.model)
        remove(unet)
        config = {k: v for k, v in self.noise_scheduler.config.items() if not k.startswith("_")}
        pipe = TagDiffusionPipeline(unet=unet, scheduler=DDIMScheduler.from_config(config), vae=self.vae,
                                    table=self.table)
        path = os.path.join(self.out, "model")
        pipe.save_pretrained(path)
        from unet_patch.patch import install

        install(unet, self.table)
        return path

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.log("output.tensorboard=true but the tensorboard package is not installed: pip install tensorboard")
            return None
        return SummaryWriter(os.path.join(self.out, "tensorboard")) if self.acc.is_main_process else None


def train(cfg, accelerator=None) -> dict:
    """Run a training job from a resolved config; returns the paths written (table, plot, samples, …)."""
    return Trainer(cfg, accelerator).run()

