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
    table = result.get("table")
    model = result.get("model") or cfg.model.pretrained
    lines = ["", "done. next:"]
    if model and table:
        prompt = cfg.output.sample_prompts[0] if cfg.output.sample_prompts else "TAG, TAG"
        extra = "" if result.get("model") else f" --table {table}"
        lines.append(f'  condvec-generate --model {model}{extra} --prompt "{prompt}" --num 4 --upscale 4 '
                     f"--out {os.path.join(cfg.output.dir, 'generated.png')}")
    if table:
        lines.append(f"  condvec-merge list {table}")
        lines.append(f'  condvec-merge blend {table} NEW "0.5*TAG_A + 0.5*TAG_B" -o blended.safetensors')
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
