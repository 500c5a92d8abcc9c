"""Checkpoints as safetensors + JSON (never pickle), written atomically, the last K kept.

A checkpoint folder ``checkpoints/step-0000500/`` holds:

- ``table.safetensors`` — the table (with per-tag training counts);
- ``state.safetensors`` — optimiser moments and per-row step counts, EMA rows, UNet optimiser tensors (no RNG
  state is needed: every random draw is seeded from the seed, the step and the sample's batch position);
- ``unet.safetensors`` — UNet weights, only when the run trains them;
- ``state.json`` — step, UNet optimiser hyper-parameters, the resolved config and its fingerprint.

It is written to ``step-0000500.tmp-…`` and renamed into place when complete, so a crash while saving leaves the
previous checkpoint untouched; older checkpoints are deleted only after the new one exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^step-(\d{7})$")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(root) if (m := _NAME.match(n))]
    return [os.path.join(root, n) for _, n in sorted(found)
            if os.path.isfile(os.path.join(root, n, "state.json"))]


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


def save_checkpoint(run_dir: str, step: int, table, tensors: dict[str, torch.Tensor], info: dict,
                    unet: torch.nn.Module | None = None, unet_optimizer: torch.optim.Optimizer | None = None,
                    keep_last: int = 3) -> str:
    """Write one checkpoint atomically and prune old ones; returns its folder."""
    root = checkpoint_dir(run_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:07d}")
    tmp = tempfile.mkdtemp(prefix=f"step-{step:07d}.tmp-", dir=root)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
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
        if os.path.exists(final):  # the same step saved again: move the old copy aside, never delete it first
            os.replace(final, tempfile.mkdtemp(prefix=f"step-{step:07d}.tmp-old-", dir=root))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    others = [c for c in list_checkpoints(run_dir) if c != final]  # the one just written is never pruned
    for old in others[: max(0, len(others) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in os.listdir(root):  # temp folders of interrupted saves
        if ".tmp-" in leftover:
            shutil.rmtree(os.path.join(root, leftover), ignore_errors=True)
    return final


def load_checkpoint(path: str, unet: torch.nn.Module | None = None,
                    unet_optimizer: torch.optim.Optimizer | None = None):
    """Read a checkpoint: returns ``(table, tensors, info)`` and loads UNet weights / optimiser in place."""
    from conditioner.table import TagTable

    with open(os.path.join(path, "state.json")) as f:
        info = json.load(f)
    tensors = load_file(os.path.join(path, "state.safetensors"))
    table = TagTable.load(os.path.join(path, "table.safetensors"))
    if unet is not None:
        unet.load_state_dict(load_file(os.path.join(path, "unet.safetensors")))
    if unet_optimizer is not None:
        unet_optimizer.load_state_dict(_optimizer_state(tensors, info["unet_optimizer"]))
    return table, tensors, info
