"""``condvec-train RUN.yaml [key=value ...]``: learn a tag table (and optionally UNet weights) on tagged images."""

from __future__ import annotations

import os
import sys

from conditioner.cli_errors import OneLineArgumentParser, run_cli

PROG = "condvec-train"


def _parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog=PROG, description=__doc__,
        epilog="Overrides use dotted keys, e.g. training.steps=200 data.path=my_data output.resume=latest",
    )
    p.add_argument("config", help="run YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def _next_steps(cfg, result: dict) -> str:
    """What to run next, runnable as printed (after ``source .venv/bin/activate``): the run's real tags and files."""
    from conditioner.table import TagTable

    table = result.get("table")
    model = result.get("model") or cfg.model.pretrained
    out = cfg.output.dir
    lines = ["", "done. next (in the environment: source .venv/bin/activate):"]
    tags = [t for t in TagTable.load(table).tags if "#" not in t] if table else []
    if table:  # the concepts the run's sample prompts lead with come first (they are what the run was about)
        from conditioner.parse import parse_prompt

        leading = [parse_prompt(p)[0].name for p in cfg.output.sample_prompts if parse_prompt(p)]
        tags = [t for t in dict.fromkeys(leading) if t in tags] + [t for t in tags if t not in leading]
    if model and table:
        prompt = (list(cfg.output.sample_prompts) or [", ".join(tags[:2])])[0]
        extra = "" if result.get("model") else f" --table {table}"
        size = cfg.data.resolution
        upscale = f" --upscale {max(1, 256 // size)}" if size < 256 else ""
        lines.append(f'  condvec-generate --model {model}{extra} --prompt "{prompt}" --num 4 '
                     f"--steps {cfg.output.sample_steps} --guidance {cfg.output.sample_guidance:g}{upscale} "
                     f"--out {os.path.join(out, 'generated.png')}")
    if table:
        lines.append(f"  condvec-merge list {table}")
        if len(tags) >= 2:
            lines.append(f'  condvec-merge blend {table} "{tags[0]} and {tags[1]}" "0.5*{tags[0]} + 0.5*{tags[1]}" '
                         f"-o {os.path.join(out, 'blended.safetensors')}")
    for key in ("plot", "samples"):
        if result.get(key):
            value = result[key][-1] if isinstance(result[key], list) else result[key]
            lines.append(f"  look at: {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``condvec-train``; returns 0, or 2 with a one-line error on stderr on bad input."""
    return run_cli(PROG, lambda: _run(argv), interrupted="interrupted — continue with output.resume=latest")


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    from train.config import load_config, to_yaml  # heavy imports only once the arguments parse

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from train.loop import train

    result = train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(_next_steps(cfg, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
