"""Everything a run needs before its first step: base model, data, table, what trains, and the input cache."""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf

from bootstrap.table import add_bootstrapped_tags, bootstrap_table
from conditioner.encode import tokenize
from conditioner.errors import CondvecError
from conditioner.factor import FactorRows, factorise
from conditioner.modes import VECTOR, table_mode
from conditioner.parse import Tag, TagNormalization, parse_prompt
from conditioner.regroup import regroup
from conditioner.table import TagTable
from conditioner.table_layout import Layout
from train import checkpoint as ckpt
from train import runlock
from train.cache import LatentCache, LatentEncoder, PixelCache
from train.config import layout_fields, run_layout
from train.data import Item, assign_buckets, scan_dataset
from train.kohya import read_kohya_config
from train.model import Base, load_base
from train.model import describe as describe_unet
from train.tracking import shown, trackers
from unet_patch.discover import discover, table_for_unet, takes_pooled
from unet_patch.kv import kv_table
from unet_patch.load import describe
from unet_patch.patch import install
from unet_patch.pipeline import vae_scale_factor
from unet_patch.projections import bypassed_parameters, kv_projections, special_rows_from


@dataclass
class Setup:
    """What :func:`build` prepared for a run."""

    unet: torch.nn.Module
    vae: torch.nn.Module | None
    noise_scheduler: object
    table: TagTable
    existing_rows: int  # rows of the table before the data's new tags were added
    train_special: bool  # whether the special rows (sink, padding) train
    unet_params: list[torch.nn.Parameter]  # UNet weights that train (may be empty)
    items: list[Item]
    captions: list[list[Tag]]
    cache: LatentCache | LatentEncoder | PixelCache
    resume_path: str | None
    sample_prompts: list[str]  # output.sample_prompts, or the dataset's most frequent captions
    cfg: DictConfig  # the run's config as resolved here (kohya settings, epochs as steps), read-only


def make_accelerator(cfg) -> Accelerator:
    """The run's accelerator: CPU when no GPU is present, the configured mixed precision and trackers."""
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    log_with = trackers(cfg.output.report_to)
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=str(cfg.training.mixed_precision),
                       log_with=log_with or None, project_dir=cfg.output.dir)


def build(cfg, acc: Accelerator) -> Setup:
    """Prepare a run from its resolved config (see ``train.config.RunConfig``); logs one line per decision.

    Raises:
        CondvecError: bad data, table or config combinations, with a one-line message.
    """
    say = print if acc.is_main_process else _silent
    log = say  # lines about the table and tags; a resumed run's table is the checkpoint's, so they are left out
    if acc.is_main_process:  # one run per folder: a second process on it is refused here
        runlock.acquire(cfg.output.dir)
    resume_path = ckpt.resolve_resume(cfg.output.dir, cfg.output.resume) if cfg.output.resume else None
    if acc.is_main_process:
        replaced = runlock.check_fresh(cfg.output.dir, resume=resume_path is not None,
                                       overwrite=cfg.output.overwrite)
        if replaced and resume_path is None:
            say(f"output.overwrite: replacing the earlier run in {cfg.output.dir} ({', '.join(replaced)})",
                flush=True)
    acc.wait_for_everyone()
    if resume_path is not None:
        with open(os.path.join(resume_path, "state.json")) as f:
            say(f"resumed from {resume_path} at step {json.load(f)['step']}", flush=True)
        log = _silent
    base = load_base(cfg.model, cfg.training.seed)
    unet, vae, noise_scheduler = base.unet, base.vae, base.noise_scheduler
    say(f"base model: {base.name} — {describe(base.text) if base.text is not None else describe_unet(unet)}",
        flush=True)
    items, decided = _scan(cfg, say)
    cfg = _resolved(cfg, decided)
    d = cfg.data
    small = [item for item in items if min(item.width, item.height) < d.resolution]
    if small:
        say(f"data: {len(small)} of {len(items)} images are smaller than data.resolution={d.resolution} and are "
            f"upscaled to it: {shown([os.path.basename(i.path) for i in small])}", flush=True)
    buckets = assign_buckets(items, d.resolution, step=d.bucket_step * vae_scale_factor(vae), enabled=d.bucketing,
                             max_aspect=d.max_aspect)
    say(f"data: {len(items)} images ({sum(i.repeats for i in items)} with repeats) in {len(buckets)} bucket(s): "
        f"{', '.join(f'{w}x{h}' for w, h in buckets)}", flush=True)
    table = _make_table(cfg, base, log)
    existing_rows = len(table)
    captions = [_parse_caption(item.caption, item.path, table) for item in items]
    _add_data_tags(cfg, table, captions, base, log)
    table = _convert_mode(cfg, table, unet, log)
    table = _factorise(cfg, table, log)
    if base.text is not None:
        base.text.free_text_encoders()  # bootstrap is over: CLIP is never run again
    if takes_pooled(unet) and table.pooled is None:
        raise CondvecError("an SDXL UNet needs pooled vectors, and this table has none: start from the model folder "
                           "with its text encoders (table.bootstrap: true) or from a table bootstrapped from it")
    for prompt in cfg.output.sample_prompts:
        try:
            tokenize(table, [prompt])
        except CondvecError as err:
            raise CondvecError(f"output.sample_prompts {prompt!r}: {str(err).split(' (pass lenient')[0]}") from err
    if str(cfg.training.table_device) == "accelerator":
        table.to(acc.device)
    train_special = cfg.table.train_special
    if train_special is None:
        bootstrapped = "bootstrap" in table.base_model  # its null sequence is exactly what the base model saw
        train_special = not (cfg.table.freeze_existing or bootstrapped)
        why = "the base model's own null sequence" if bootstrapped else "freeze_existing"
        log(f"table: special rows (sink, padding) {'train' if train_special else f'stay frozen ({why})'};"
            " set table.train_special to choose", flush=True)

    unet.to(acc.device).requires_grad_(False)
    unet_params: list[torch.nn.Parameter] = []
    if cfg.training.train == "full":
        unet.requires_grad_(True)
        for param in bypassed_parameters(unet, table):  # a kv table gives K and V directly: no gradient there
            param.requires_grad_(False)
        unet_params = [p for p in unet.parameters() if p.requires_grad]
    elif cfg.training.train == "table+kv":
        unet_params = [p for module in kv_projections(unet, table) for p in module.parameters()]
        for param in unet_params:
            param.requires_grad_(True)
    if cfg.training.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    install(unet, table)
    if vae is not None:
        vae.to(acc.device).requires_grad_(False).eval()
    cache = _make_cache(cfg, vae, items, acc)
    sample_prompts = list(cfg.output.sample_prompts) or _frequent_captions(items)
    if not cfg.output.sample_prompts:
        say(f"samples: no output.sample_prompts, so the grids show the dataset's most frequent captions: "
            f"{' | '.join(sample_prompts)}", flush=True)
    return Setup(unet, vae, noise_scheduler, table, existing_rows, train_special, unet_params, items, captions,
                 cache, resume_path, sample_prompts, cfg)


def _resolved(cfg: DictConfig, decided: dict) -> DictConfig:
    """A read-only copy of ``cfg`` with what the data decided (``{"section.key": value}``); ``cfg`` is unchanged."""
    nested: dict = {}
    for key, value in decided.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    out = OmegaConf.merge(cfg, nested)
    OmegaConf.set_readonly(out, True)
    return out


def _scan(cfg, say) -> tuple[list[Item], dict]:
    """The dataset's items, and what they decide of the config (``{"section.key": value}``): ``data.path``, or every
    subset of ``data.kohya_config`` (which may set the resolution and buckets); ``training.epochs`` /
    ``output.save_every_epochs`` become steps here."""
    d, decided = cfg.data, {}
    if d.kohya_config is None:
        items = scan_dataset(d.path, caption_ext=d.caption_ext, metadata=d.metadata, repeats=dict(d.repeats),
                             default_repeats=d.default_repeats, on_bad_image=str(d.on_bad_image))
    else:
        kohya = read_kohya_config(d.kohya_config)
        for note in kohya.notes:
            say(note, flush=True)
        trains_unet = cfg.training.train != "table"
        items = []
        for subset in kohya.subsets:
            if subset.is_reg and not trains_unet:
                say(f"kohya config: regularisation subset {subset.image_dir} skipped: prior preservation protects "
                    "UNet weights, and training.train=table trains none", flush=True)
                continue
            found = scan_dataset(subset.image_dir, caption_ext=subset.caption_extension,
                                 default_repeats=subset.num_repeats, on_bad_image=str(d.on_bad_image),
                                 default_caption=subset.class_tokens)
            for item in found:
                item.keep = subset.keep_tokens
            items += found
        if not items:
            raise CondvecError(f"data.kohya_config {d.kohya_config!r}: no subset left to train on")
        if kohya.resolution is not None:
            decided["data.resolution"] = kohya.resolution
        if kohya.enable_bucket is not None:
            decided["data.bucketing"] = bool(kohya.enable_bucket)
        if kohya.bucket_reso_steps is not None:
            decided["data.bucket_step"] = max(1, int(kohya.bucket_reso_steps) // 8)
        say(f"kohya config: {len(kohya.subsets)} subset(s); resolution "
            f"{decided.get('data.resolution', d.resolution)}, bucketing {decided.get('data.bucketing', d.bucketing)}",
            flush=True)
    tr, o = cfg.training, cfg.output
    if tr.epochs or o.save_every_epochs:
        per_epoch = -(-sum(item.repeats for item in items) // (tr.batch_size * tr.grad_accum))
        if tr.epochs:
            decided["training.steps"] = tr.epochs * per_epoch
            say(f"training.epochs={tr.epochs}: {decided['training.steps']} steps ({per_epoch} per epoch)",
                flush=True)
        if o.save_every_epochs:
            decided["output.save_every"] = o.save_every_epochs * per_epoch
            say(f"output.save_every_epochs={o.save_every_epochs}: a checkpoint every {decided['output.save_every']} "
                "steps", flush=True)
    return items, decided


def _frequent_captions(items: list[Item], count: int = 3) -> list[str]:
    """The ``count`` most frequent captions of the dataset (ties: first seen first)."""
    return [caption for caption, _ in Counter(item.caption for item in items).most_common(count)]


def _make_table(cfg, base: Base, log) -> TagTable:
    """The run's table before the data's new tags: continued, the base's own, bootstrapped, or new."""
    t, unet = cfg.table, base.unet
    groups = layout_fields(t).get("groups")
    normalization = TagNormalization(lowercase=t.lowercase, underscores=str(t.underscores))
    if str(cfg.training.table_device) == "disk":  # its layout was checked against the file: train.config.validate
        table = TagTable.open(t.start_from, writable=True)
        log(f"table: {t.start_from} on disk ({len(table.names)} tags, memory-mapped; rows the run touches are held in "
            "memory)", flush=True)
    elif t.start_from or (base.table is not None and t.use_base_table):
        table = TagTable.load(t.start_from) if t.start_from else base.table
        log(f"table: continuing {t.start_from} ({len(table.names)} tags)" if t.start_from
            else f"table: the base model's own table ({len(table.names)} tags)", flush=True)
        if groups is not None and groups != table.group_kind and table.mode_spec.groupable:
            log(f"table: converted from {table.group_kind} to {groups if isinstance(groups, str) else 'custom'} "
                "groups (table.groups)", flush=True)
            table = regroup(table, groups)
    elif base.text is not None and t.bootstrap:
        layout = run_layout(t, Layout.pretrained)
        # bootstrapped as vectors; table.mode=kv converts after the data's tags are in (_convert_mode), and says so
        table = bootstrap_table(base.text, [], layout=layout.replace(mode=VECTOR), progress=False,
                                normalization=normalization)
        log(f"table: bootstrapped from {base.name}'s text encoder(s): null sequence of {table.special.shape[0]} "
            f"positions from {table.base_model['bootstrap']['encoder']}", flush=True)
    else:
        table = table_for_unet(unet, base_name=base.name, layout=run_layout(t),
                               num_train_timesteps=base.noise_scheduler.config.num_train_timesteps,
                               normalization=normalization, seed=cfg.training.seed)
        special = special_rows_from(base.table, table, unet) if base.table is not None else None
        if special is not None:
            table.special = special
            log("table: sink and padding rows derived from the base model's table", flush=True)
        log(f"table: new, {table}", flush=True)
    table.check_layers(discover(unet))
    return table


def _convert_mode(cfg, table: TagTable, unet, log) -> TagTable:
    """``table.mode: kv`` for a vector table (bootstrapped, continued or the base's): each layer's K and V."""
    wanted = cfg.table.mode
    if wanted is None or str(wanted) == table.mode:
        return table
    if not table_mode(str(wanted)).direct_kv:
        raise CondvecError(f"table.mode={wanted}, but the table is in key/value mode: its rows are each layer's K "
                           "and V and cannot become vectors again; drop table.mode or start a new table")
    log("table: converted to key/value mode through each layer's projections (table.mode=kv)", flush=True)
    return kv_table(table, unet)


def _factorise(cfg, table: TagTable, log) -> TagTable:
    """``table.factor_rank: r``: factorised per-layer rows (a start_from table that is factorised stays so)."""
    rank = cfg.table.factor_rank
    current = table.data.rank if isinstance(table.data, FactorRows) else 0
    if not rank or rank == current:
        return table
    if current:
        raise CondvecError(f"table.factor_rank={rank}, but the table is factorised at rank {current}: drop "
                           "table.factor_rank, or convert it (condvec-merge factorise / unfactorise)")
    table, error = factorise(table, rank)
    log(f"table: factorised per-layer rows at rank {rank} (relative error {error:.2g} of the rows as they were)",
        flush=True)
    return table


def _parse_caption(caption: str, path: str, table: TagTable) -> list[Tag]:
    try:
        return parse_prompt(caption, table.normalization)
    except CondvecError as err:
        raise CondvecError(f"caption of {path}: {err}") from err


def _add_data_tags(cfg, table: TagTable, captions: list[list[Tag]], base: Base, log) -> None:
    seen: dict[str, None] = {}
    for tags in captions:
        for tag in tags:
            seen.setdefault(tag.name)
    new = [name for name in seen if name not in table]
    own = {k: v for k, v in layout_fields(cfg.table).items() if k in ("tokens_per_tag", "context_rows")}
    layout = Layout.of(table).replace(**own)  # vectors per new tag: the table's own unless the config sets them
    if new and base.text is not None and cfg.table.bootstrap:
        add_bootstrapped_tags(table, base.text, new, layout=layout, progress=cfg.output.progress)
        log(f"tags: {len(new)} new tag(s) start from {base.name}'s text encoding"
            + (f", {layout.tokens_per_tag} token vector(s) and {layout.context_rows} context rows each"
               if layout.vectors > 1 else ""), flush=True)
    elif new:
        table.add_tags(new, init=cfg.table.init, std=cfg.table.init_std, seed=cfg.training.seed + 7,
                       vectors=layout.vectors)
    split = [name for name in seen if name in table.values]
    if split:
        warnings.warn(f"{len(split)} tag(s) in the data are swapped (split) concepts, e.g. {split[0]!r}: only "
                      "their key source trains, their value source stays as it is", stacklevel=2)
    log(f"tags: {len(seen)} in the data, {len(new)} new to the table" + (f": {shown(new)}" if new else ""), flush=True)


def _silent(*args, **kwargs) -> None:
    pass


def _make_cache(cfg, vae, items: list[Item], acc: Accelerator) -> LatentCache | LatentEncoder | PixelCache:
    """Pixels in memory (no VAE), or VAE latents: cached on disk (``data.cache_latents``) or encoded on the fly."""
    d = cfg.data
    if vae is None:
        cache = PixelCache()
    elif d.cache_latents:
        cache = LatentCache(vae, d.cache_dir or os.path.join(d.path, ".condvec_cache"), device=acc.device)
    else:
        return LatentEncoder(vae, device=acc.device)
    if acc.is_main_process:
        cache.prepare(items, flips=d.flip, progress=cfg.output.progress)
    acc.wait_for_everyone()
    if not acc.is_main_process:
        cache.prepare(items, flips=d.flip, progress=False)
    return cache
