"""Checkpoints as safetensors + JSON (never pickle), written atomically, the last K kept.

A checkpoint folder ``checkpoints/step-0000500/`` holds:

- ``table.safetensors`` — the table (with per-tag training counts); with ``training.table_device: disk`` instead
  ``table-rows.safetensors``: only the rows the run holds in memory (touched or new), naming the mapped table file
  (its size and modification time are checked on resume);
- ``state.safetensors`` — optimiser moments and per-row step counts, EMA rows, UNet optimiser tensors (no RNG
  state is needed: every random draw is seeded from the seed, the step and the sample's batch position);
- ``unet.safetensors`` — UNet weights, only when the run trains them;
- ``state.json`` — step, UNet optimiser hyper-parameters, the resolved config and its fingerprint.

It is written to ``step-0000500.tmp-…``, every file and the folder flushed to disk, and renamed into place when
complete, so a crash while saving leaves the previous checkpoint untouched; older checkpoints are deleted only after
the new one exists. Saving a step that already exists first renames the old copy to ``step-0000500.prev``, which
still counts as that step's checkpoint until the new copy is in place: no moment without one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from conditioner.errors import CondvecError
from conditioner.fileio import fsync_dir
from conditioner.table import TagTable
from train.config import flatten
from train.sampling import save_model

HELD_ROWS = "table-rows.safetensors"  # training.table_device=disk: the rows held in memory, over the table file
_NAME = re.compile(r"^step-(\d{7})(\.prev)?$")
# learning-rate schedules whose value at a step depends on training.steps
_SCHEDULES_WITH_TOTAL = ("linear", "cosine")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints of a run, oldest first (one per step: ``step-N``, else ``step-N.prev``)."""
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    found: dict[int, str] = {}
    for name in sorted(os.listdir(root), reverse=True):  # "step-N" sorts after "step-N.prev": seen first
        match = _NAME.match(name)
        if match and os.path.isfile(os.path.join(root, name, "state.json")):
            found.setdefault(int(match.group(1)), os.path.join(root, name))
    return [found[step] for step in sorted(found)]


def fingerprint(cfg, world_size: int) -> dict:
    """What must not change between a run and its resume, as ``{"section.key": value}``.

    Everything but ``output.*``; ``training.steps`` too when the learning-rate schedule decays over it; and the
    number of processes.
    """
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    config.pop("output")
    if config["training"]["lr_schedule"] not in _SCHEDULES_WITH_TOTAL:
        config["training"].pop("steps")
    config["world_size"] = world_size
    return flatten(config)


def fingerprint_info(cfg, world_size: int) -> dict:
    """The fingerprint and its sha256, for ``state.json``."""
    flat = fingerprint(cfg, world_size)
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()
    return {"fingerprint": flat, "fingerprint_sha256": digest}


def check_fingerprint(path: str, cfg, world_size: int) -> None:
    """Refuse to resume checkpoint ``path`` with a config that changed where it must not.

    Raises:
        CondvecError: one line naming the changed keys (old → new).
    """
    with open(os.path.join(path, "state.json")) as f:
        saved = json.load(f).get("fingerprint", {})
    now = fingerprint(cfg, world_size)
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if changed:
        shown = ", ".join(f"{k} ({saved.get(k)!r} → {now.get(k)!r})" for k in changed[:4])
        raise CondvecError(f"cannot resume {path}: the config changed: {shown}"
                           + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
                           + "; only output.* and training.steps (with lr_schedule=constant) may change on resume")


def resolve_resume(run_dir: str, resume: str) -> str:
    """``latest`` → the newest complete checkpoint of the run; a path → that checkpoint (checked)."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise FileNotFoundError(f"output.resume=latest, but {checkpoint_dir(run_dir)!r} holds no checkpoint yet")
        return found[-1]
    if not os.path.isfile(os.path.join(resume, "state.json")):
        raise FileNotFoundError(f"output.resume={resume!r} is not a checkpoint folder (no state.json)")
    return resume


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"unet_opt.{idx}.{key}"] = value.detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("unet_opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: str, step: int, table: TagTable, tensors: dict[str, torch.Tensor], info: dict,
                    unet: torch.nn.Module | None = None, unet_optimizer: torch.optim.Optimizer | None = None,
                    keep_last: int = 3) -> str:
    """Write one checkpoint atomically and durably, and prune old ones; returns its folder.

    Args:
        run_dir (`str`): the run folder; checkpoints go to ``run_dir/checkpoints/step-NNNNNNN``.
        step (`int`): the optimiser step.
        table (`TagTable`): the table.
        tensors (`dict[str, torch.Tensor]`): optimiser and EMA state.
        info (`dict`): JSON-able run information (config, fingerprint, …); ``step`` is added.
        unet (`torch.nn.Module`, *optional*): UNet weights, when the run trains them.
        unet_optimizer (`torch.optim.Optimizer`, *optional*): its optimiser.
        keep_last (`int`, defaults to 3): checkpoints to keep, this one included.
    """
    # Hand-written rather than conditioner.fileio.atomic_dir: re-saving a step must keep a complete copy under a
    # name list_checkpoints recognises (step-N.prev) until the new one is in place.
    root = checkpoint_dir(run_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:07d}")
    tmp = tempfile.mkdtemp(prefix=f"step-{step:07d}.tmp-", dir=root)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        if table.disk_backed:  # only the rows in memory; the table file they lie over is never written
            table.save_held(os.path.join(tmp, HELD_ROWS))
        else:
            table.save(os.path.join(tmp, "table.safetensors"))
        all_tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        info = dict(info, step=step)
        if unet_optimizer is not None:
            opt_tensors, opt_meta = _optimizer_tensors(unet_optimizer)
            all_tensors.update(opt_tensors)
            info["unet_optimizer"] = opt_meta
        save_file(all_tensors, os.path.join(tmp, "state.safetensors"))
        if unet is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
            save_file(state, os.path.join(tmp, "unet.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:  # written last: marks the folder complete
            json.dump(info, f, indent=1)
        for name in os.listdir(tmp):
            fsync_dir(os.path.join(tmp, name))
        fsync_dir(tmp)
        previous = final + ".prev"
        if os.path.exists(final):  # the same step saved again: its old copy stays a checkpoint until replaced
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
            fsync_dir(root)
        os.replace(tmp, final)
        fsync_dir(root)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    others = [c for c in list_checkpoints(run_dir) if c != final]  # the one just written is never pruned
    for old in others[: max(0, len(others) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in os.listdir(root):  # temp folders of interrupted saves, old copies already replaced
        replaced = leftover.endswith(".prev") and os.path.isdir(os.path.join(root, leftover[: -len(".prev")]))
        if ".tmp-" in leftover or replaced:
            shutil.rmtree(os.path.join(root, leftover), ignore_errors=True)
    return final


def load_checkpoint(path: str, unet: torch.nn.Module | None = None,
                    unet_optimizer: torch.optim.Optimizer | None = None):
    """Read a checkpoint: returns ``(table, tensors, info)`` and loads UNet weights / optimiser in place.

    Raises:
        CondvecError: a file of the checkpoint holds NaN or infinite values (optimiser moments, EMA, UNet weights):
            resuming from it would write them into the run's table, so it is refused, naming the file.
    """
    with open(os.path.join(path, "state.json")) as f:
        info = json.load(f)
    state_file = os.path.join(path, "state.safetensors")
    tensors = load_file(state_file)
    _check_finite_tensors(state_file, tensors)
    held = os.path.join(path, HELD_ROWS)
    if os.path.isfile(held):
        table = TagTable.open_held(held)
    else:
        table = TagTable.load(os.path.join(path, "table.safetensors"))
    if unet is not None:
        weights_file = os.path.join(path, "unet.safetensors")
        weights = load_file(weights_file)
        _check_finite_tensors(weights_file, weights)
        unet.load_state_dict(weights)
    if unet_optimizer is not None:
        unet_optimizer.load_state_dict(_optimizer_state(tensors, info["unet_optimizer"]))
    return table, tensors, info


def _check_finite_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CondvecError(f"checkpoint file {path!r} is damaged: {name} holds NaN or infinite values; resume "
                               "from an earlier checkpoint (output.resume=PATH) or start the run again")


def save_trainer(trainer) -> str | None:
    """Checkpoint a ``train.loop.Trainer``: table, optimiser and EMA state, UNet (when trained), config and step.

    Returns:
        `str | None`: the checkpoint folder on the main process, `None` elsewhere.
    """
    path = None
    if trainer.acc.is_main_process:
        cfg = trainer.cfg
        tensors, info = trainer.checkpoint_state()
        info |= {"config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                 **fingerprint_info(cfg, trainer.world)}
        trained = trainer.unet_optimizer is not None
        path = save_checkpoint(cfg.output.dir, trainer.state.step, trainer.table, tensors, info,
                               unet=trainer.acc.unwrap_model(trainer.model) if trained else None,
                               unet_optimizer=trainer.unet_optimizer, keep_last=cfg.output.keep_last)
    trainer.acc.wait_for_everyone()
    return path


def restore_trainer(trainer, path: str) -> None:
    """Continue a ``train.loop.Trainer`` from checkpoint ``path``, exactly where it was saved.

    Raises:
        CondvecError: the config changed where it must not, or the table's tags differ from this run's.
    """
    check_fingerprint(path, trainer.cfg, trainer.world)
    trained = trainer.unet_optimizer is not None
    table, tensors, info = load_checkpoint(path, unet=trainer.acc.unwrap_model(trainer.model) if trained else None,
                                           unet_optimizer=trainer.unet_optimizer)
    if table.tags != trainer.table.tags:
        raise CondvecError(f"checkpoint {path} has other tags than this run's data and table: "
                           "resume with the same config and dataset")
    trainer.restore_state(table, tensors, info)
    metrics_path = os.path.join(trainer.cfg.output.dir, "metrics.jsonl")
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        trainer.state.metrics = [m for m in rows if m["step"] <= trainer.state.step]
    if trainer.acc.is_main_process:
        print(f"table: {trainer.table} (as saved at step {trainer.state.step})", flush=True)


def ema_table(trainer) -> TagTable | None:
    """A ``train.loop.Trainer``'s table with every row's EMA caught up to the current step; `None` without EMA."""
    averaged = [p for p in trainer.params if p.ema is not None]
    if not averaged:
        return None
    table = trainer.table.copy()
    for p in averaged:
        p.set_tensor(table, p.averaged(trainer.table, trainer.state.step))
    return table


def export_trainer(trainer) -> dict:
    """Write a run's final table, its EMA and the trained model (main process); returns their paths."""
    out, folder = {}, trainer.cfg.output.dir
    if trainer.acc.is_main_process:
        out["table"] = os.path.join(folder, "table.safetensors")
        trainer.table.save(out["table"])
        if any(p.ema is not None for p in trainer.params):
            out["table_ema"] = os.path.join(folder, "table-ema.safetensors")
            ema_table(trainer).save(out["table_ema"])
        if trainer.unet_optimizer is not None:
            ema = trainer.unet_ema
            if ema is not None:  # the exported model carries the averaged weights (and the EMA table, if any)
                ema.store(trainer.unet_params)
                ema.copy_to(trainer.unet_params)
            try:
                averaged = ema_table(trainer)
                out["model"] = save_model(os.path.join(folder, "model"), trainer.acc.unwrap_model(trainer.model),
                                          trainer.vae, trainer.table if averaged is None else averaged,
                                          trainer.noise_scheduler)
            finally:
                if ema is not None:
                    ema.restore(trainer.unet_params)
    trainer.acc.wait_for_everyone()
    return out
