"""The run configuration: an OmegaConf structured schema, loaded as schema ← YAML ← ``key=value`` overrides."""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, is_dataclass
from enum import StrEnum
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from conditioner.errors import CondvecError
from conditioner.modes import MODES, table_mode
from conditioner.table_layout import Layout, LayoutError
from train.optim import table_lr_text

#: Upper bounds on what a user sets: beyond them a run can only diverge or exhaust memory.
MAX_LR = 10.0
MAX_INIT_STD = 10.0


#: The layouts a run's table starts from (conditioner.table_layout holds their defaults).
_PLAIN, _PRETRAINED = Layout(), Layout.pretrained()


class ConfigError(CondvecError):
    """A run configuration is invalid; the message names the key and how to fix it."""


def _choices(name: str, *values: str) -> type[StrEnum]:
    """An enum of allowed strings; OmegaConf then refuses any other value (names may hold '+', e.g. table+kv)."""
    return StrEnum(name, [(value, value) for value in values])


Builtin = _choices("Builtin", "tiny", "micro")
PredictionType = _choices("PredictionType", "epsilon", "v_prediction")
Metadata = _choices("Metadata", "auto", "sidecar", "jsonl")
Mode = _choices("Mode", *MODES)
Underscores = _choices("Underscores", "space", "keep")
Train = _choices("Train", "table", "table+kv", "full")
LrSchedule = _choices("LrSchedule", "constant", "linear", "cosine")
MixedPrecision = _choices("MixedPrecision", "no", "bf16", "fp16")
ReportTo = _choices("ReportTo", "none", "tensorboard", "wandb", "all")
OnBadImage = _choices("OnBadImage", "skip", "error")
TableDevice = _choices("TableDevice", "accelerator", "host", "disk")


def _f(default, help: str, **kw):  # noqa: A002 - "help" reads best in the schema
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    pretrained: str | None = _f(None, "diffusers-layout folder with unet/ (and optional vae/, scheduler/, text "
                                "encoders: SD1.x / SD2.x / SDXL tables then start from the model's own CLIP)")
    single_file: str | None = _f(None, "a single-file checkpoint (.safetensors) — needs single_file_config")
    single_file_config: str | None = _f(None, "local diffusers folder of the same architecture (or a UNet "
                                        "config.json) for the single-file checkpoint")
    unet_config: str | None = _f(None, "a UNet config (.json) to pretrain from scratch (pixel space, no VAE)")
    builtin: Builtin | None = _f(None, "built-in UNet from scratch: tiny (pixel space, 32 px) | micro (16 px, tests)")
    prediction_type: PredictionType | None = _f(None, "epsilon | v_prediction; default: the scheduler config's")
    num_train_timesteps: int = _f(1000, "diffusion timesteps when the model folder has no scheduler config")
    name: str | None = _f(None, "a name for the base model, recorded in the table")


@dataclass
class DataConfig:
    path: str | None = _f(MISSING, "dataset folder: images with .txt sidecars (recursive), or a metadata.jsonl; "
                          "null with kohya_config")
    kohya_config: str | None = _f(None, "a kohya sd-scripts dataset_config.toml ([[datasets]] / [[datasets.subsets]]:"
                                  " image_dir, num_repeats, keep_tokens, class_tokens, is_reg, …) instead of path")
    keep_tags: Any = _f(0, "tags tag dropout never drops: the first N of each caption (kohya's keep_tokens), or a "
                        "list of tag names (trigger tags)")
    metadata: Metadata = _f(Metadata.auto, "auto | sidecar | jsonl — where captions come from")
    caption_ext: str = _f(".txt", "sidecar caption extension")
    on_bad_image: OnBadImage = _f(OnBadImage.skip, "skip | error — an unreadable/too large image or a missing/bad "
                                  "caption is skipped with a warning (a count at the end), or stops the run")
    repeats: dict[str, int] = _f({}, "explicit repeats per subfolder (overrides kohya N_name folders)")
    default_repeats: int = _f(1, "repeats for images outside any repeat folder")
    resolution: int = _f(32, "training resolution (pixels); buckets keep about resolution² pixels")
    bucketing: bool = _f(True, "aspect-ratio bucketing; false = every image center-cropped square")
    bucket_step: int = _f(8, "bucket sides are multiples of this many latent pixels (8 → 64 px with SD's VAE)")
    max_aspect: float = _f(2.0, "largest bucket aspect ratio")
    flip: bool = _f(False, "random horizontal flip (do not use when tags name left/right)")
    tag_dropout: float = _f(0.0, "probability of dropping each tag of a caption")
    caption_dropout: float = _f(0.05, "probability of training a sample on the null prompt (keeps CFG working)")
    cache_latents: bool = _f(True, "cache VAE latents on disk (keyed by VAE identity and image size/mtime)")
    cache_dir: str | None = _f(None, "latent cache folder; default DATA/.condvec_cache")


@dataclass
class TableConfig:
    start_from: str | None = _f(None, "continue training this table (.safetensors); a table.groups / table.mode "
                                "that differs converts it (and says so)")
    use_base_table: bool = _f(True, "start from the base model's own table when it has one (its tags and sink)")
    mode: Mode | None = _f(None, "vector (vectors through the key/value projections) | kv (direct K and V per layer); "
                           "null = vector, or a start_from table's own")
    groups: Any = _f(None, "single | blocks | layers | {group: [layer globs]}; null = layers, or a start_from "
                     "table's own")
    factor_rank: int = _f(0, "> 0: factorised per-layer rows — each tag's own shared vector plus its own rank-r "
                          "per-group offsets (about 1 + r vectors a tag instead of one per group); 0 = full rows, "
                          "or a start_from table's own")
    bootstrap: bool = _f(True, "a base with text encoders: new tables and new tags start from its own CLIP encoding")
    tokens_per_tag: int | None = _f(None, "vectors per new tag from its tokens (textual inversion's vectors per "
                                    f"token); null = the table's own ({_PLAIN.tokens_per_tag} for a new table, "
                                    "as many as a distilled table's tags have)")
    context_rows: int | None = _f(None, "more vectors per new tag from its EOS and padding in the base's CLIP (the "
                                  f"context rows of a distilled table); null = the table's own ({_PLAIN.context_rows}"
                                  " for a new table)")
    anchors: int | None = _f(None, f"timestep anchors; null = {_PLAIN.anchors} (off), or a start_from table's own")
    pad_to: int | None = _f(None, f"fixed sequence length; null = {_PRETRAINED.pad_to} for a table bootstrapped from "
                            "a base's CLIP (what SD UNets were trained with), else as long as the prompt")
    use_sink: bool | None = _f(None, f"start every sequence with the attention-sink row; null = {_PLAIN.use_sink}")
    lowercase: bool = _f(True, "tag normalisation: fold case")
    underscores: Underscores = _f(Underscores.space, "tag normalisation: space (booru _ → space) | keep")
    init: str = _f("normal", "new tags without bootstrap: zeros | normal | mean | mean:A,B,… | tag:NAME")
    init_std: float = _f(0.02, "std of the normal init (and of the noise on 'mean')")
    train_special: bool | None = _f(None, "also train the special rows (sink, padding); null = true for a new table, "
                                    "false for a table bootstrapped from the base's CLIP (its null sequence is the "
                                    "base's own) and when freeze_existing keeps a table's tags as they are")
    freeze_existing: bool = _f(False, "with start_from: train only tags new to the table (and, unless "
                               "train_special=true, not the special rows)")


@dataclass
class TrainingConfig:
    train: Train = _f(Train.table, "table | table+kv (also the attn2 key/value projections) | full (whole UNet)")
    steps: int = _f(1000, "optimiser steps")
    epochs: int = _f(0, "> 0: train this many epochs (passes over the data with repeats) instead of training.steps")
    batch_size: int = _f(8, "global batch per optimiser micro-step (split across processes)")
    grad_accum: int = _f(1, "micro-steps per optimiser step")
    lr: float | None = _f(None, f"learning rate of the table; null = measured defaults — {table_lr_text()} "
                          "(BENCHMARKS.md)")
    lr_unet: float = _f(1e-4, "learning rate of UNet weights (table+kv, full)")
    lr_schedule: LrSchedule = _f(LrSchedule.constant, "constant | linear | cosine (after warmup)")
    warmup_steps: int = _f(0, "linear warmup steps")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(0.0, "decoupled weight decay of table rows (applied only to rows in the batch)")
    weight_decay_unet: float = _f(1e-2, "weight decay of UNet weights")
    max_grad_norm: float = _f(1.0, "gradient clipping by global norm (0 = off)")
    min_snr_gamma: float = _f(5.0, "min-SNR loss weighting gamma (0 = off)")
    noise_offset: float = _f(0.0, "noise offset (brighter/darker images)")
    ema_decay: float = _f(0.0, "EMA of the table rows (0 = off); saved as table-ema.safetensors")
    ema_unet_decay: float = _f(0.0, "EMA of the trained UNet weights (train: full / table+kv; 0 = off, 0.999 is "
                               "typical): the exported model/ carries the EMA weights (diffusers' EMAModel, with "
                               "its (1 + n) / (10 + n) warm-up)")
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the UNet")
    table_device: TableDevice = _f(TableDevice.accelerator, "accelerator | host | disk — host keeps the table "
                                   "(and its optimiser state) in CPU memory and moves only each step's rows to the "
                                   "accelerator; disk memory-maps table.start_from and holds only the rows the "
                                   "run touched (checkpoints store those rows; the final table is streamed): "
                                   "tables larger than memory")
    num_threads: int = _f(0, "CPU threads for torch (torch.set_num_threads); 0 = torch's default (one per core)")
    mixed_precision: MixedPrecision = _f(MixedPrecision.no,
                                         "no | bf16 (autocast; fp16 is refused: it needs loss scaling)")
    max_bad_steps: int = _f(3, "steps in a row with a non-finite loss or gradient that are skipped before the run "
                            "stops (0 = stop at the first)")
    seed: int = _f(0, "seed of everything: init, data order, noise, timesteps, dropout")


@dataclass
class OutputConfig:
    dir: str = _f("runs/condvec", "run folder (checkpoints, samples, metrics, final table)")
    save_every: int = _f(500, "checkpoint every N steps (and at the end)")
    save_every_epochs: int = _f(0, "> 0: checkpoint every N epochs instead of output.save_every")
    keep_last: int = _f(3, "checkpoints to keep")
    resume: str | None = _f(None, "latest | a checkpoint folder — continue a run exactly")
    overwrite: bool = _f(False, "replace an earlier run in output.dir (its checkpoints and samples are deleted); "
                         "without it such a folder is refused")
    sample_every: int = _f(500, "sample grid every N steps (0 = only at the end)")
    sample_prompts: list[str] = _f([], "prompts for sample grids (rows)")
    sample_seeds: list[int] = _f([0, 1, 2, 3], "seeds for sample grids (columns)")
    sample_steps: int = _f(20, "denoising steps for samples")
    sample_guidance: float = _f(3.0, "guidance scale for samples")
    sample_upscale: int = _f(3, "nearest-neighbour upscale of sample images in grids")
    log_every: int = _f(10, "progress-bar loss average over N steps (metrics.jsonl gets every step)")
    report_to: ReportTo = _f(ReportTo.none, "none | tensorboard | wandb | all — also log metrics there through "
                             "accelerate's trackers (needs the tensorboard / wandb package)")
    progress: bool = _f(True, "show a tqdm progress bar")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    table: TableConfig = field(default_factory=TableConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def _keys(cls, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cls):
        path = f"{prefix}{f.name}"
        out.append(path)
        default = f.default_factory() if f.default_factory is not NO_DEFAULT else f.default
        if is_dataclass(default):
            out.extend(_keys(type(default), path + "."))
    return out


def _suggest(bad: str) -> str:
    keys = _keys(RunConfig)
    leaf = bad.split(".")[-1]
    matches = difflib.get_close_matches(bad, keys, n=1, cutoff=0.5)
    matches = matches or [k for k in keys if k.split(".")[-1] in difflib.get_close_matches(
        leaf, [k.split(".")[-1] for k in keys], n=1, cutoff=0.6)]
    return f" — did you mean '{matches[0]}'?" if matches else ""


_ENUM_ERROR = re.compile(r"Invalid value '(?P<value>.*)', expected one of \[(?P<allowed>[^\]]*)\]")


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError) or "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return f"unknown config key '{key}'{_suggest(key)}"
    if isinstance(err, MissingMandatoryValue):
        return f"missing required value '{key}': set it in the YAML or as {key}=... on the command line"
    choices = _ENUM_ERROR.search(msg)
    if isinstance(err, ValidationError) and choices:
        return f"'{key}' must be one of {choices['allowed']}, got {choices['value']!r}"
    if isinstance(err, ValidationError):
        return f"bad value for '{key}': {msg}"
    return f"config error at '{key}': {msg}" if key else f"config error: {msg}"


def load_config(path: str | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Load a run config: schema defaults ← YAML file ← ``key=value`` overrides, then validate.

    Args:
        path (`str`, *optional*): the run YAML.
        overrides (`list[str]`, *optional*): dotlist overrides, e.g. ``["training.steps=200", "data.flip=true"]``.

    Raises:
        ConfigError: unknown keys (with a suggestion), wrong types, missing required values, invalid choices.
    """
    try:
        schema = OmegaConf.structured(RunConfig)
        parts = [schema]
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError(f"config file {path!r} does not exist")
            loaded = OmegaConf.load(path)
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{path!r} must hold a mapping of sections (model, data, table, training, output)")
            parts.append(loaded)
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value, e.g. training.steps=200")
        parts.append(OmegaConf.from_dotlist(list(overrides or [])))
        cfg = OmegaConf.merge(*parts)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from err
    except Exception as err:  # YAML syntax errors and the like
        raise ConfigError(f"cannot read config {path!r}: {str(err).splitlines()[0]}") from err
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Check fields against each other; raise ConfigError naming the key."""
    m, d, t, tr, o = cfg.model, cfg.data, cfg.table, cfg.training, cfg.output
    for key, value in flatten(OmegaConf.to_container(cfg, resolve=True)).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"'{key}' must be a finite number, got {value}")
    for key, value, high in [("training.lr", tr.lr, MAX_LR), ("training.lr_unet", tr.lr_unet, MAX_LR),
                             ("table.init_std", t.init_std, MAX_INIT_STD),
                             ("training.batch_size", tr.batch_size, 1 << 16),
                             ("training.grad_accum", tr.grad_accum, 1 << 16),
                             ("training.steps", tr.steps, 10**9), ("data.resolution", d.resolution, 8192),
                             ("output.sample_upscale", o.sample_upscale, 16)]:
        if value is not None and value > high:
            raise ConfigError(f"'{key}' must be <= {high:g}, got {value:g}")
    if not 0 <= t.factor_rank <= 1024:
        raise ConfigError(f"'table.factor_rank' must be in [0, 1024] (0 = full rows), got {t.factor_rank}")
    if str(tr.table_device) == "disk" and not t.start_from:
        raise ConfigError("training.table_device=disk trains a table file without loading it: set "
                          "table.start_from=TABLE.safetensors (condvec-bootstrap writes one from a model)")
    if str(tr.table_device) == "disk":
        _check_disk_layout(t)
    if t.factor_rank and str(tr.table_device) == "disk":
        raise ConfigError("'table.factor_rank' and training.table_device=disk do not go together: factorise the "
                          "table file first (condvec-merge factorise), then train it in memory — it is small")
    if t.init_std < 0:
        raise ConfigError(f"'table.init_std' must be >= 0, got {t.init_std}")
    sources = [k for k in ("pretrained", "single_file", "builtin", "unet_config") if m[k]]
    if len(sources) != 1:
        raise ConfigError("set exactly one of model.pretrained, model.single_file, model.builtin, model.unet_config "
                          f"(got {', '.join(sources) or 'none'})")
    if m.single_file and not m.single_file_config:
        raise ConfigError("model.single_file needs model.single_file_config (a local config folder or config.json)")
    run_layout(t)  # mode, groups, anchors, vectors per tag, pad_to: the layout's own rules
    if tr.mixed_precision == "fp16":
        raise ConfigError("'training.mixed_precision' fp16 is not supported (the row-sparse optimiser does no loss "
                          "scaling): use bf16 or no")
    if tr.train == "table+kv" and t.mode is not None and table_mode(str(t.mode)).direct_kv:
        raise ConfigError("'training.train' table+kv trains the attn2 key/value projections, which table.mode=kv "
                          "bypasses: use train=table or mode=vector")
    if tr.num_threads < 0:
        raise ConfigError(f"'training.num_threads' must be >= 0 (0 = torch's default), got {tr.num_threads}")
    if tr.max_bad_steps < 0:
        raise ConfigError(f"'training.max_bad_steps' must be >= 0, got {tr.max_bad_steps}")
    if o.sample_every < 0 or tr.max_grad_norm < 0:
        raise ConfigError("'output.sample_every' and 'training.max_grad_norm' must be >= 0")
    if t.init not in ("zeros", "normal", "mean") and not t.init.startswith(("tag:", "mean:")):
        raise ConfigError(f"'table.init' must be zeros, normal, mean, mean:A,B,… or tag:NAME, got {t.init!r}")
    for key, value, low in [("training.steps", tr.steps, 1), ("training.batch_size", tr.batch_size, 1),
                            ("training.grad_accum", tr.grad_accum, 1),
                            ("data.resolution", d.resolution, 8), ("output.save_every", o.save_every, 1),
                            ("output.keep_last", o.keep_last, 1), ("output.log_every", o.log_every, 1),
                            ("output.sample_steps", o.sample_steps, 1),
                            ("output.sample_upscale", o.sample_upscale, 1)]:
        if value < low:
            raise ConfigError(f"'{key}' must be >= {low}, got {value}")
    for key, value in [("data.tag_dropout", d.tag_dropout), ("data.caption_dropout", d.caption_dropout)]:
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"'{key}' must be in [0, 1), got {value}")
    if not 0.0 <= tr.ema_decay < 1.0:
        raise ConfigError(f"'training.ema_decay' must be in [0, 1), got {tr.ema_decay}")
    if not 0.0 <= tr.ema_unet_decay < 1.0:
        raise ConfigError(f"'training.ema_unet_decay' must be in [0, 1), got {tr.ema_unet_decay}")
    if tr.ema_unet_decay > 0 and tr.train == "table":
        raise ConfigError("'training.ema_unet_decay' averages trained UNet weights, but training.train=table trains "
                          "none: set training.train=full or table+kv, or ema_unet_decay=0")
    if (tr.lr is not None and tr.lr <= 0) or tr.lr_unet <= 0:
        raise ConfigError("learning rates must be > 0")
    if (d.path is None) == (d.kohya_config is None):
        raise ConfigError("set exactly one of data.path (a dataset folder) and data.kohya_config (a kohya "
                          "dataset_config.toml)")
    keep = d.keep_tags
    if not (isinstance(keep, int) and not isinstance(keep, bool) and keep >= 0) and not (
            OmegaConf.is_list(keep) and all(isinstance(k, str) for k in keep)):
        raise ConfigError(f"'data.keep_tags' must be an integer >= 0 or a list of tag names, got {keep!r}")
    if tr.epochs < 0 or o.save_every_epochs < 0:
        raise ConfigError("'training.epochs' and 'output.save_every_epochs' must be >= 0")


def _check_disk_layout(t: DictConfig) -> None:
    """training.table_device=disk trains the file in its own layout: refuse a table section asking for another one,
    from the file's header alone (before any model loads)."""
    from conditioner.table import TagTable

    table = TagTable.open(t.start_from)
    asked = layout_fields(t)
    if ("groups" in asked and asked["groups"] != table.group_kind) or asked.get("mode", table.mode) != table.mode:
        raise ConfigError("training.table_device=disk trains the table file in its own layout: drop table.groups "
                          "/ table.mode, or convert the table first (condvec-merge regroup)")


def layout_fields(t: DictConfig) -> dict:
    """The layout fields the ``table`` section sets; null ones are left to the layout's defaults."""
    groups = t.groups if t.groups is None or isinstance(t.groups, str) else OmegaConf.to_container(t.groups)
    values = {"mode": None if t.mode is None else str(t.mode), "groups": groups, "anchors": t.anchors,
              "tokens_per_tag": t.tokens_per_tag, "context_rows": t.context_rows, "pad_to": t.pad_to,
              "use_sink": t.use_sink}
    return {key: value for key, value in values.items() if value is not None}


def run_layout(t: DictConfig, start=Layout) -> Layout:
    """The layout of a run's table: ``start`` (``Layout`` for a new table, ``Layout.pretrained`` for one bootstrapped
    from the base's CLIP) called with what the ``table`` section sets.

    Raises:
        ConfigError: a field out of range, named by its key (``'table.pad_to' must be …``).
    """
    try:
        return start(**layout_fields(t))
    except LayoutError as err:
        raise ConfigError(f"'table.{err.field}' {err.problem}") from err


def flatten(node: dict, prefix: str = "") -> dict:
    """A nested mapping as ``{"section.key": value}``."""
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (what ``--print-config`` shows and the run folder keeps)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def schema_help() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every field, for documentation."""
    out = []
    for section in fields(RunConfig):
        cls = type(section.default_factory())
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not NO_DEFAULT else f.default
            out.append((f"{section.name}.{f.name}", default, f.metadata.get("help", "")))
    return out
