"""``condvec-bootstrap``: a tag table from a Stable Diffusion model's own text encoder(s); embeddings as tags.

    condvec-bootstrap MODEL -o TABLE.safetensors [--tags FILE] [--data DIR] [--groups single|blocks|layers]
                      [--mode vector|kv] [--tokens-per-tag N] [--context-rows N] [--config DIR]
                      [--distill [--distill-steps N] [--prompts FILE] [--resume]]
    condvec-bootstrap import TABLE FILE [FILE …] --name TAG [--model MODEL] (-o OUT | --in-place)

MODEL is a diffusers folder or a single-file ``.safetensors`` checkpoint with ``--config`` (a local diffusers folder
of the same architecture). The text encoders run once, here; training and generation never need them again.
``--distill`` then teaches the table to condition the UNet as the model's own text encoder does, with no images
(:mod:`bootstrap.distill`).
"""

from __future__ import annotations

import os
import sys

from conditioner.cli_errors import OneLineArgumentParser, UsageError, run_cli
from conditioner.modes import MODES, VECTOR
from conditioner.schema import GROUPINGS, SD_SEQUENCE
from conditioner.table_layout import Layout, LayoutError

PROG = "condvec-bootstrap"


def main(argv: list[str] | None = None) -> int:
    """Run ``condvec-bootstrap``; returns 0, or 2 after a one-line error on stderr (nothing is written then)."""
    return run_cli(PROG, lambda: _run(argv), interrupted="interrupted; nothing written (a distillation continues "
                   "from its last checkpoint with --resume)")


def _run(argv: list[str] | None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["import"]:
        args = _import_parser().parse_args(argv[1:])
        print(_import(args))
    elif argv[:1] == ["export"]:
        args = _export_parser().parse_args(argv[1:])
        print(_export(args))
    else:
        args = _parser().parse_args(argv)
        line = _bootstrap(args)
        if line:
            print(line)
    return 0


def _parser() -> OneLineArgumentParser:
    from bootstrap.distill import DistillConfig

    p = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                              epilog=f"Embedding files into a table: {PROG} import --help; a tag out as a "
                                     f"textual-inversion file: {PROG} export --help")
    p.add_argument("model", metavar="MODEL", help="diffusers folder, or a .safetensors checkpoint with --config")
    p.add_argument("-o", "--output", required=True, metavar="TABLE", help="the table to write (.safetensors)")
    p.add_argument("--tags", metavar="FILE", help="tags, one per line (# starts a comment)")
    p.add_argument("--data", metavar="DIR", help="also every tag of this dataset's captions (as condvec-train reads)")
    plain, distilled = Layout.pretrained(), Layout.distilled()
    p.add_argument("--groups", choices=GROUPINGS,
                   help=f"layer groups; every group starts from the same vectors (default {plain.groups})")
    p.add_argument("--mode", choices=tuple(MODES),
                   help=f"vector: vectors through to_k/to_v; kv: each layer's K and V of them (default {plain.mode})")
    p.add_argument("--tokens-per-tag", type=int, metavar="N",
                   help=f"vectors per tag from its tokens (default {plain.tokens_per_tag}; with --distill "
                        f"{distilled.tokens_per_tag})")
    p.add_argument("--context-rows", type=int, metavar="N",
                   help=f"more vectors per tag from its EOS and padding positions (default {plain.context_rows}; "
                        f"with --distill {distilled.context_rows})")
    p.add_argument("--distill", action="store_true",
                   help="then distil the table from the model's own text encoder through the frozen UNet (no images)")
    p.add_argument("--distill-steps", type=int, default=DistillConfig.steps, metavar="N",
                   help=f"distillation steps (default {DistillConfig.steps})")
    p.add_argument("--prompts", metavar="FILE",
                   help="distil on these prompts' tags (one prompt per line) instead of random combinations")
    p.add_argument("--resume", action="store_true", help="continue an interrupted distillation of TABLE")
    p.add_argument("--config", metavar="DIR", help="for a single-file MODEL: a local diffusers folder of its kind")
    p.add_argument("--batch-size", type=int, default=256, help="tags per text-encoder forward (default 256)")
    p.add_argument("--force", action="store_true", help="overwrite an existing TABLE")
    return p


def _import_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog=f"{PROG} import", description="Add embedding files to a table as tags: kohya XTI, "
                              "A1111 / kohya / OneTrainer / diffusers textual inversion (SD1.x, SD2.x, SDXL).")
    p.add_argument("table", metavar="TABLE", help="the table to add to")
    p.add_argument("files", nargs="+", metavar="FILE", help="embedding files (.safetensors; .pt/.bin weights-only)")
    p.add_argument("--name", action="append", metavar="TAG",
                   help="tag name for each FILE, in order (default: the name stored in the file, else its stem)")
    p.add_argument("--model", metavar="MODEL", help="the model whose text encoder input-space embeddings go through")
    p.add_argument("--config", metavar="DIR", help="for a single-file MODEL: a local diffusers folder of its kind")
    p.add_argument("-o", "--output", metavar="OUT", help="write the result here")
    p.add_argument("--in-place", action="store_true", help="rewrite TABLE")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    return p


def _export_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog=f"{PROG} export", description="Write a tag as a textual-inversion embedding "
                              "(A1111 / Forge / ComfyUI / diffusers load_textual_inversion), found through the "
                              "model's own text encoder; prints how close it got.")
    p.add_argument("table", metavar="TABLE", help="the table holding the tag (vector mode)")
    p.add_argument("tag", metavar="TAG", help="the tag to export")
    p.add_argument("--model", required=True, metavar="MODEL", help="the model the table was built for, with its text "
                   "encoder(s)")
    p.add_argument("--config", metavar="DIR", help="for a single-file MODEL: a local diffusers folder of its kind")
    p.add_argument("--format", default="ti", choices=("ti", "xti"),
                   help="ti: textual inversion (SDXL: clip_l + clip_g); xti: kohya XTI, one embedding per block")
    p.add_argument("--method", choices=("distill", "fit"),
                   help="distill: match the UNet's predictions with the embedding in a prompt to its predictions with "
                        "the tag (default for SD1.x / SD2.x textual inversion); fit: match the tag's vector (SDXL, "
                        "XTI)")
    p.add_argument("--steps", type=int, default=400, help="optimisation steps (default 400)")
    p.add_argument("--vectors", type=int, default=1, metavar="N",
                   help="--method distill: the embedding's vectors (textual inversion's vectors per token; default 1)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the embedding to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite an existing FILE")
    return p


def _export(args) -> str:
    if not args.output.endswith(".safetensors"):
        raise UsageError(f"export: -o must be a .safetensors file, got {args.output!r}")
    if os.path.exists(args.output) and not args.force:
        raise UsageError(f"export: output {args.output!r} already exists; pass --force to overwrite it")
    if not 1 <= args.vectors <= SD_SEQUENCE - 2:
        raise UsageError(f"export: --vectors must be between 1 and {SD_SEQUENCE - 2} (CLIP's {SD_SEQUENCE} positions "
                         f"less BOS and EOS), got {args.vectors}")
    if not 1 <= args.steps <= 100_000:
        raise UsageError(f"export: --steps must be between 1 and 100000, got {args.steps}")
    import torch
    from safetensors.torch import save_file

    from bootstrap.export import export_embedding, modelspec
    from conditioner.fileio import atomic_path
    from conditioner.table import TagTable
    from unet_patch.load import load_model

    table = TagTable.load(args.table)
    model = load_model(args.model, config=args.config)
    method = args.method or ("distill" if args.format == "ti" and model.family != "sdxl" else "fit")
    if method == "fit" and args.vectors != 1:
        raise UsageError("export: --vectors belongs to --method distill (a fitted embedding has one vector)")
    if method == "distill" and (args.format != "ti" or model.family == "sdxl"):
        raise UsageError("export: --method distill writes SD1.x / SD2.x textual inversion; use --method fit for "
                         "XTI and SDXL")
    if method == "distill":
        from bootstrap.export import distil_embedding

        tensors, distilled = distil_embedding(model, table, args.tag, steps=args.steps, vectors=args.vectors)
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
            raise UsageError("export: the optimisation diverged (non-finite embedding); nothing written")
        with atomic_path(args.output) as tmp:
            save_file(tensors, tmp, metadata=modelspec(model, args.tag))
        return (f"wrote {args.output}: {args.tag!r} as textual inversion ({args.vectors} vector(s)), distilled "
                "through the UNet; with it in a prompt the UNet's predictions miss "
                f"{distilled.relative_error:.1%} of what the tag changes "
                f"(the fitted embedding it started from: {distilled.start_error:.1%})")
    tensors, report = export_embedding(model, table, args.tag, steps=args.steps, format=args.format)
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise UsageError("export: the optimisation diverged (non-finite embedding); nothing written")
    with atomic_path(args.output) as tmp:
        save_file(tensors, tmp, metadata=modelspec(model, args.tag))
    kind = "kohya XTI" if args.format == "xti" else "textual inversion"
    return (f"wrote {args.output}: {args.tag!r} as {kind} ({len(tensors)} part(s)); its encoding is within "
            f"{report.relative_error:.1%} of the tag's vector (cosine {report.cosine:.4f})")


def _read_lines(path: str, what: str) -> list[str]:
    """The lines of a UTF-8 text file, comments (``#``) and surrounding blanks removed."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.split("#", 1)[0].strip() for line in f]
    except UnicodeDecodeError as err:
        raise UsageError(f"{what} {path!r} is not UTF-8 text (byte {err.start}): save it as UTF-8") from err


def _read_tags(args) -> list[str]:
    tags: list[str] = []
    if args.tags:
        lines = _read_lines(args.tags, "--tags")
        split = [line for line in lines if "," in line]
        if split:
            print(f"--tags: {len(split)} line(s) hold commas and were split into tags (first: {split[0]!r}); a tag "
                  "cannot contain a comma, since prompts split on commas", file=sys.stderr)
        tags += [t.strip() for line in lines for t in line.split(",")]
    if args.data:
        from conditioner.captions import scan_captions
        from conditioner.parse import parse_prompt

        for caption in scan_captions(args.data):  # captions only: no image is opened
            tags += [tag.name for tag in parse_prompt(caption)]
    tags = [t for t in dict.fromkeys(tags) if t]
    if not tags:
        raise UsageError("no tags to bootstrap: give --tags FILE (one tag per line) and/or --data DIR")
    return tags


def _bootstrap(args) -> str:
    from bootstrap.distill import DistillConfig
    from bootstrap.table import bootstrap_table
    from unet_patch.load import describe, load_model

    layout = _layout(args)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.output.endswith(".safetensors"):
        raise UsageError(f"-o must name a .safetensors file, got {args.output!r}")
    if os.path.exists(args.output) and not args.force:
        raise UsageError(f"{args.output!r} already exists; pass --force to overwrite it")
    if not args.distill and (args.resume or args.prompts or args.distill_steps != DistillConfig.steps):
        raise UsageError("--distill-steps, --prompts and --resume belong to --distill")
    if args.distill and args.distill_steps < 1:
        raise UsageError(f"--distill-steps must be >= 1, got {args.distill_steps}")
    if args.distill and layout.mode != VECTOR:
        raise UsageError("--distill distils a vector-mode table: drop --mode kv (convert after, condvec-merge kv)")
    tags = _read_tags(args)
    prompts = _read_prompts(args.prompts, tags) if args.prompts else []
    if args.distill:
        from bootstrap.distill import work_dir

        state = os.path.join(work_dir(args.output), "checkpoint", "state.json")
        if os.path.exists(state) and not (args.resume or args.force):
            raise UsageError(f"an interrupted distillation of {args.output!r} is in {work_dir(args.output)!r}: pass "
                             "--resume to continue it, or --force to start over")
    model = load_model(args.model, config=args.config)
    print(describe(model), flush=True)
    table = bootstrap_table(model, tags, layout=layout, batch_size=args.batch_size)
    note = ""
    if args.distill:
        note = _distill(args, model, table, prompts)
        if _rank() > 0:  # under torchrun only the first process writes
            return None
    table.save(args.output)
    return (f"wrote {args.output}: {len(tags)} tags × {layout.vectors} vector(s), "
            f"{len(table.group_names)} group(s), {table.mode} mode, null sequence of {table.special.shape[0]} "
            f"positions from {table.base_model['bootstrap']['encoder']}" + note)


def _layout(args) -> Layout:
    """The table's layout from the flags: ``Layout.distilled()`` with --distill, else ``Layout.pretrained()``."""
    flags = {"groups": args.groups, "mode": args.mode, "tokens_per_tag": args.tokens_per_tag,
             "context_rows": args.context_rows}
    try:
        return (Layout.distilled if args.distill else Layout.pretrained)(
            **{k: v for k, v in flags.items() if v is not None})
    except LayoutError as err:
        raise UsageError(f"--{err.field.replace('_', '-')} {err.problem}") from err


def _read_prompts(path: str, tags: list[str]) -> list[str]:
    """Prompts to distil on; every tag of them must be in the vocabulary."""
    from conditioner.parse import TagNormalization, parse_prompt

    lines = [line for line in _read_lines(path, "--prompts") if line]
    if not lines:
        raise UsageError(f"--prompts {path!r} holds no prompt (one prompt per line)")
    norm = TagNormalization()
    known = {norm.apply(t) for t in tags}
    unknown = list(dict.fromkeys(tag.name for line in lines for tag in parse_prompt(line, norm)
                                 if tag.name not in known))
    if unknown:
        shown = ", ".join(repr(t) for t in unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise UsageError(f"--prompts {path!r} uses {len(unknown)} tag(s) outside the vocabulary: {shown}; add them "
                         "to --tags or remove them from the prompts")
    return [", ".join(tag.name for tag in parse_prompt(line, norm)) for line in lines]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _join_processes() -> None:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group (NCCL on GPUs, gloo on CPUs)."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _distill(args, model, table, prompts: list[str]) -> str:
    import json
    import shutil

    from bootstrap.distill import DistillConfig, distill, plot_losses, work_dir

    if not model.text_encoders:
        raise UsageError(f"--distill needs the model's text encoder: {args.model!r} has none")
    config = DistillConfig(steps=args.distill_steps, prompts=prompts)
    _join_processes()
    result = distill(model, table, config, args.output, resume=args.resume)
    if _rank() > 0:
        return ""
    work = work_dir(args.output)
    plot = plot_losses(result["losses"], os.path.join(work, "loss.png"))
    with open(os.path.join(work, "losses.json"), "w") as f:
        json.dump({"losses": result["losses"], "config": {k: v for k, v in vars(config).items() if k != "prompts"}},
                  f)
    shutil.rmtree(os.path.join(work, "checkpoint"), ignore_errors=True)  # done: only the log stays
    for leftover in ("pool.safetensors", "pool.safetensors.json"):
        if os.path.exists(os.path.join(work, leftover)):
            os.remove(os.path.join(work, leftover))
    return (f"; distilled {result['steps']} steps in {result['seconds']:.0f} s, teacher–student loss "
            f"{result['first']:.4f} → {result['last']:.4f} (plot: {plot})")


def _import(args) -> str:
    from bootstrap.embeddings import read_embedding
    from bootstrap.table import import_embedding
    from conditioner.table import TagTable

    if args.in_place == bool(args.output):
        raise UsageError("import: say where to write: -o OUT.safetensors, or --in-place to rewrite TABLE")
    out = args.table if args.in_place else args.output
    if not args.in_place and os.path.exists(out) and not args.force:
        raise UsageError(f"import: output {out!r} already exists; pass --force to overwrite it")
    if args.name and len(args.name) != len(args.files):
        raise UsageError(f"import: {len(args.name)} --name for {len(args.files)} files; give one per file, in order")
    table = TagTable.load(args.table)
    embeddings = [read_embedding(path) for path in args.files]
    model = None
    if any(e.kind != "output" for e in embeddings):
        if not args.model:
            raise UsageError("import: these embeddings are input-space (textual inversion / XTI): they go through the "
                             "model's text encoder; pass --model MODEL")
        from unet_patch.load import load_model

        model = load_model(args.model, config=args.config)
    added = []
    for k, (path, emb) in enumerate(zip(args.files, embeddings)):
        name = args.name[k] if args.name else (emb.name or os.path.splitext(os.path.basename(path))[0])
        rows = import_embedding(table, emb, name, model)
        added.append(f"{table.tags[rows[0]]} ({emb.format}, {len(rows)} vector(s))")
    table.save(out)
    return f"wrote {out}: added {', '.join(added)} ({len(table)} rows)"


if __name__ == "__main__":
    raise SystemExit(main())
