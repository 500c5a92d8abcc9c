"""The training loop: learn the tag table (and optionally UNet weights) on a tagged image dataset.

Set-up is in ``train.setup``, data order and per-sample randomness in ``train.batches``, checkpoints in
``train.checkpoint``, reports in ``train.tracking``, sample grids in ``train.sampling``. Here: the step.

Across processes the table is never handed to DDP: every rank tokenises the whole global batch (cheap), so all ranks
know the union of touched rows without communication; each rank computes gradients for its shard, and only those
rows' gradients are all-reduced. UNet weights, when trained, go through accelerate's DDP, synchronised once per step.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from conditioner.encode import Rows, TokenBatch, pack, pack_pooled, tokenize
from conditioner.errors import CondvecError
from conditioner.factor import FACTORS, FactorRows, compose, factor_lr_scales
from train import checkpoint as ckpt
from train.batches import Plan, Planner, sample_generator
from train.data import micro_conditioning
from train.model import min_snr_weights
from train.optim import RowSparseAdamW, SparseEMA, SparseParam, default_lr, lr_at, table_tensor
from train.sampling import sample_grid
from train.setup import build, make_accelerator
from train.tracking import RunLog, shown

__all__ = ["NonFiniteError", "Plan", "Trainer", "sample_generator", "train"]


class NonFiniteError(CondvecError):
    """Too many steps in a row had a non-finite loss or gradient; the run stopped without saving."""


class Trainer:
    """One training run, built from a resolved config (see ``train.config.RunConfig``)."""

    def __init__(self, cfg, accelerator=None):
        self.cfg, tr = cfg, cfg.training
        self.acc = accelerator or make_accelerator(cfg)
        self.world, self.rank, self.device = self.acc.num_processes, self.acc.process_index, self.acc.device
        if tr.batch_size % self.world:
            raise CondvecError(f"training.batch_size={tr.batch_size} must be divisible by the {self.world} processes")
        s = build(cfg, self.acc)  # train.setup.Setup: everything prepared before the first step
        self.cfg = cfg = s.cfg  # resolved (kohya settings, epochs as steps) and read-only from here on
        tr = cfg.training
        self.unet, self.vae, self.noise_scheduler, self.table = s.unet, s.vae, s.noise_scheduler, s.table
        self.existing_rows, self.train_special, self.unet_params = s.existing_rows, s.train_special, s.unet_params
        self.items, self.captions, self.cache = s.items, s.captions, s.cache
        self.resume_path, self.sample_prompts = s.resume_path, s.sample_prompts
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.planner = Planner(self.items, self.captions, cfg.data, tr.batch_size, tr.seed,
                               self.noise_scheduler.config.num_train_timesteps)
        self.model, self.unet_optimizer = self.unet.eval(), None
        if self.unet_params:
            optimizer = torch.optim.AdamW(self.unet_params, lr=tr.lr_unet, betas=(tr.beta1, tr.beta2), eps=tr.eps,
                                          weight_decay=tr.weight_decay_unet)
            self.model, self.unet_optimizer = self.acc.prepare(self.unet.train(), optimizer)
        self.lr = default_lr(self.table, cfg.table.freeze_existing) if tr.lr is None else tr.lr
        if tr.lr is None and self.acc.is_main_process:
            what = "new concepts over a frozen table" if cfg.table.freeze_existing else "every tag of the data"
            print(f"training: table lr {self.lr:g}, the default for this layout when {what} trains (set "
                  "training.lr)", flush=True)
        self.params = self._sparse_params()  # the table's learnable tensors: stepped, clipped, saved in one loop
        self.time_ids = torch.tensor([micro_conditioning(item) for item in self.items], dtype=torch.float32) \
            if self.table.pooled is not None else None  # (items, 6), SDXL
        self.unet_ema = EMAModel(self.unet_params, decay=tr.ema_unet_decay) if tr.ema_unet_decay > 0 else None
        self.state, self.bad_steps = SimpleNamespace(step=0, metrics=[]), 0  # metrics: one dict per step taken
        if self.resume_path:
            ckpt.restore_trainer(self, self.resume_path)

    def _sparse_params(self) -> list[SparseParam]:
        """Tag rows, special rows and (SDXL) pooled rows, each with its row-sparse AdamW and optional EMA."""
        tr, table = self.cfg.training, self.table
        betas, home, decay = (tr.beta1, tr.beta2), table.data.device, tr.ema_decay

        def entry(attr, name, ema_name, decay_weight, per_tag, trainable=True, lr_scale=1.0):
            data = table_tensor(table, attr)
            opt = RowSparseAdamW(data.shape[0], tuple(data.shape[1:]), betas, tr.eps, decay_weight, device=home)
            return SparseParam(attr, name, ema_name, opt, SparseEMA(data, decay) if decay > 0 else None, per_tag,
                               trainable, lr_scale)

        if isinstance(table.data, FactorRows):  # factorised rows: each factor is a row-sparse parameter
            scales = factor_lr_scales(table.dim, table.data.rank)
            params = [entry(f"data.{name}", f"rows.{name}", f"ema.{name}", tr.weight_decay, True,
                            lr_scale=scales[name]) for name in FACTORS]
        else:
            params = [entry("data", "rows", "ema", tr.weight_decay, True)]
        params.append(entry("special", "special", "ema_special", 0.0, False, self.train_special))
        if table.pooled is not None:
            params.append(entry("pooled", "pooled", "ema_pooled", tr.weight_decay, True))
        return params

    def param(self, attr: str) -> SparseParam:
        """The learnable table tensor ``attr`` (``data``, ``special``, ``pooled``)."""
        return next(p for p in self.params if p.attr == attr)

    def _loss(self, plans: list[Plan], tokens: TokenBatch, rows: Rows) -> torch.Tensor:
        """Min-SNR-weighted diffusion loss of this rank's samples, conditioned on ``rows``."""
        latents = torch.stack([self.cache.get(self.items[p.index], p.flip) for p in plans]).to(self.device)
        noise = torch.stack([p.noise(latents.shape[1:], self.cfg.training.noise_offset) for p in plans])
        noise, t = noise.to(self.device), torch.tensor([p.timestep for p in plans], device=self.device)  # (b, C, H, W)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = self.noise_scheduler.get_velocity(latents, noise, t) if self.prediction_type == "v_prediction" \
            else noise
        cond = pack(self.table, tokens, t.float(), rows=rows)  # (b, N, W')
        added = None
        if self.time_ids is not None:
            added = {"text_embeds": pack_pooled(tokens, rows),  # (b, P)
                     "time_ids": self.time_ids[[p.index for p in plans]].to(self.device)}  # (b, 6)
        with self.acc.autocast():
            pred = self.model(noisy, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (b,)
        return (per_sample * min_snr_weights(self.noise_scheduler, t, self.cfg.training.min_snr_gamma)).mean()

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A trainable copy on the accelerator (``training.table_device: host`` keeps the table in host memory)."""
        if tensor.device == self.device:
            return tensor.clone()
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _mean_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:  # only the touched rows travel
            torch.distributed.all_reduce(tensor)
            tensor /= self.world
        return tensor

    def train_step(self) -> dict:
        """One optimiser step (``grad_accum`` micro-steps); returns its metrics."""
        tr, table, started = self.cfg.training, self.table, time.perf_counter()
        touched, counts = [], Counter()  # per micro-step: the batch's rows (K,)
        grads = {p.attr: [] if p.per_tag else torch.zeros(p.tensor(table).shape, device=self.device)
                 for p in self.params}  # per-tag: one (K, …) gradient per micro-step; others: summed
        loss = torch.zeros((), device=self.device)
        for micro in range(tr.grad_accum):
            plans = self.planner.plan(self.state.step * tr.grad_accum + micro)
            counts.update(tag.name for p in plans for tag in p.tags)
            tokens = tokenize(table, [p.tags for p in plans])  # the global batch, once
            ids = tokens.rows.to(table.data.device)  # (K,) rows of the global batch, where the table lives
            live = {p.attr: self._to_device(p.tensor(table)[ids] if p.per_tag else p.tensor(table)).requires_grad_(
                p.trainable) for p in self.params}
            data = live["data"] if "data" in live else compose(*(live[f"data.{name}"] for name in FACTORS))
            rows = Rows(ids=ids.to(self.device), data=data, special=live["special"], pooled=live.get("pooled"),
                        null_pooled=None if table.null_pooled is None else self._to_device(table.null_pooled))
            last = micro == tr.grad_accum - 1  # UNet gradients are all-reduced once, on the last micro-step
            with nullcontext() if last else self.acc.no_sync(self.model):
                share = slice(self.rank, None, self.world)
                micro_loss = self._loss(plans[share], tokens.select(share), rows) / tr.grad_accum
                if micro_loss.requires_grad:  # dropped captions with frozen special rows: nothing to learn
                    self.acc.backward(micro_loss)
            touched.append(rows.ids)
            for p in self.params:
                grad = live[p.attr].grad
                if p.per_tag:
                    grads[p.attr].append(self._mean_over_ranks(grad if grad is not None else torch.zeros_like(
                        live[p.attr])))
                elif grad is not None:
                    grads[p.attr] += self._mean_over_ranks(grad)
            loss += micro_loss.detach()
        loss = self._mean_over_ranks(loss)

        row_ids, inverse = torch.unique(torch.cat(touched), return_inverse=True)
        keep = row_ids >= self.existing_rows if self.cfg.table.freeze_existing else slice(None)
        steps = {}  # attr -> (rows, gradient) of this step
        for p in self.params:
            if p.per_tag:
                grad = torch.zeros(row_ids.numel(), *p.tensor(table).shape[1:], device=self.device)
                grad.index_add_(0, inverse, torch.cat(grads[p.attr]))
                steps[p.attr] = (row_ids[keep], grad[keep])
            else:
                steps[p.attr] = (torch.arange(p.tensor(table).shape[0], device=self.device), grads[p.attr])
        unet_grads = [p.grad for p in self.unet_params if p.grad is not None]
        grad_norm = float((sum(g.pow(2).sum() for _, g in steps.values())
                           + sum(g.pow(2).sum() for g in unet_grads)).sqrt())
        self.state.step += 1
        if not (math.isfinite(float(loss)) and math.isfinite(grad_norm)):  # before any row, moment or weight moves
            return self._skip(float(loss), counts)
        self.bad_steps = 0
        if 0 < tr.max_grad_norm < grad_norm:
            scale = tr.max_grad_norm / (grad_norm + 1e-6)
            steps = {attr: (ids, g * scale) for attr, (ids, g) in steps.items()}
            for g in unet_grads:
                g.mul_(scale)
        lr = lr_at(self.state.step - 1, self.lr, tr.lr_schedule, tr.warmup_steps, tr.steps)
        home = table.data.device  # where the table and its optimiser state live (host or accelerator)
        for p in self.params:
            if p.trainable:
                ids, grad = (x.to(home) for x in steps[p.attr])
                p.step(table, ids, grad, lr, self.state.step)
                if not bool(torch.isfinite(p.tensor(table)[ids]).all()):
                    raise NonFiniteError(f"step {self.state.step}: the optimiser step made table rows non-finite "
                                         f"(lr {lr:g}); stopped, the last checkpoint is untouched: lower training.lr")
        if self.unet_optimizer is not None:
            for group in self.unet_optimizer.param_groups:
                group["lr"] = lr_at(self.state.step - 1, tr.lr_unet, tr.lr_schedule, tr.warmup_steps, tr.steps)
            self.unet_optimizer.step()
            self.unet_optimizer.zero_grad(set_to_none=True)
            if self.unet_ema is not None:
                self.unet_ema.step(self.unet_params)
        for name, count in counts.items():
            table.counts[name] = table.counts.get(name, 0) + count
        return {"step": self.state.step, "loss": float(loss), "lr": lr, "grad_norm": grad_norm,
                "tags_in_batch": len(counts), "rows_updated": steps[self.params[0].attr][0].numel(),
                "step_time": time.perf_counter() - started}

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What a checkpoint holds besides the table and UNet: optimiser / EMA tensors and run info."""
        tensors = {}
        for p in self.params:
            tensors |= p.state_tensors()
        if self.unet_ema is not None:
            tensors |= {f"unet_ema.{i}": p.detach().cpu().contiguous()
                        for i, p in enumerate(self.unet_ema.shadow_params)}
        info = {"existing_rows": self.existing_rows, "bad_steps": self.bad_steps,
                "unet_ema_step": None if self.unet_ema is None else self.unet_ema.optimization_step}
        return tensors, info

    def restore_state(self, table, tensors: dict[str, torch.Tensor], info: dict) -> None:
        """Put back what :meth:`checkpoint_state` saved, with the checkpoint's ``table``."""
        for p in self.params:
            if self.table.disk_backed and p.per_tag:  # the checkpoint's held rows, over the same mapped file
                p.tensor(self.table).hold(*p.tensor(table).held())
            else:
                p.tensor(self.table).copy_(p.tensor(table).to(self.device))
        self.table.counts = table.counts
        self.existing_rows, self.bad_steps = info["existing_rows"], info.get("bad_steps", 0)
        tensors = {k: v.to(self.device) for k, v in tensors.items()}
        for p in self.params:
            p.load_state_tensors(tensors)
        if self.unet_ema is not None:
            for i, shadow in enumerate(self.unet_ema.shadow_params):
                shadow.copy_(tensors[f"unet_ema.{i}"])
            self.unet_ema.optimization_step = info["unet_ema_step"]
        self.state.step = info["step"]

    def _skip(self, loss: float, counts: Counter) -> dict:
        """Drop a step whose loss or gradient is not finite; stop after ``training.max_bad_steps`` in a row."""
        if self.unet_optimizer is not None:
            self.unet_optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        message = f"step {self.state.step}: non-finite loss ({loss}) or gradient; tags in the batch: " \
                  f"{shown(sorted(counts)) or 'none'}"
        if self.bad_steps > self.cfg.training.max_bad_steps:
            raise NonFiniteError(f"{message}; {self.bad_steps} such steps in a row (training.max_bad_steps="
                                 f"{self.cfg.training.max_bad_steps}): stopped, the last checkpoint is untouched")
        if self.acc.is_main_process:
            print(f"{message}; step skipped, nothing updated", flush=True)
        return {"step": self.state.step, "loss": None, "lr": None, "grad_norm": None, "tags_in_batch": len(counts),
                "rows_updated": 0, "step_time": 0.0, "skipped": True}

    def save(self) -> str | None:
        """Checkpoint the run (see ``train.checkpoint``); returns the folder (main process)."""
        return ckpt.save_trainer(self)

    def run(self) -> dict:
        """Train to ``training.steps``; returns paths of what the run wrote."""
        cfg, o = self.cfg, self.cfg.output
        log = RunLog(cfg, self.acc, self.state.metrics, self.state.step)
        samples = []
        while self.state.step < cfg.training.steps:
            m = self.train_step()
            log.step(m)
            if o.sample_every and m["step"] % o.sample_every == 0 and m["step"] < cfg.training.steps:
                samples.append(self.sample(f"step-{m['step']:07d}"))
            if m["step"] % o.save_every == 0 and m["step"] < cfg.training.steps:
                self.save()
                log.plot()
        log.close()
        result = {"checkpoint": self.save()}
        samples.append(self.sample(f"step-{self.state.step:07d}"))
        return result | {"samples": [s for s in samples if s], "plot": log.plot(), **ckpt.export_trainer(self)}

    def sample(self, tag: str) -> str | None:
        """A sample grid with the current table (main process); returns its path."""
        if not self.acc.is_main_process:
            return None
        unet = self.acc.unwrap_model(self.model)
        return sample_grid(self.cfg, unet, self.vae, self.table, self.noise_scheduler, tag, self.sample_prompts)


def train(cfg, accelerator=None) -> dict:
    """Run a training job from a resolved config; returns the paths written (table, plot, samples, …)."""
    return Trainer(cfg, accelerator).run()
