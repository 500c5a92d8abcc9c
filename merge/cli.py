"""``condvec-merge``: inspect and edit tag tables from the command line.

Every editing subcommand writes a new file with ``-o OUT.safetensors`` (an existing OUT needs ``--force``) or
rewrites TABLE with ``--in-place``; files are written atomically, so a failed command never leaves a half-written
or overwritten file behind. Errors are one line on stderr (``condvec-merge: error: …``) with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from conditioner.cli_errors import OneLineArgumentParser, run_cli
from conditioner.schema import GROUPINGS

PROG = "condvec-merge"


def main(argv: list[str] | None = None) -> int:
    """Run ``condvec-merge``.

    Args:
        argv (`list[str]`, *optional*): the arguments after the program name; `None` reads ``sys.argv[1:]``.

    Returns:
        `int`: 0 on success; 2 after an error, printed as one line ``condvec-merge: error: …`` on stderr (nothing
        is written then).
    """
    return run_cli(PROG, lambda: _run(argv))


def _run(argv: list[str] | None) -> int:
    args = _build_parser().parse_args(argv)
    from merge import commands  # torch and the table code load only once the arguments parse

    message = getattr(commands, args.run)(args)
    if message:
        print(message)
    return 0


# ----------------------------------------------------------------------------- parser
def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description="Inspect and edit condvec tag tables (.safetensors).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=OneLineArgumentParser)

    p = commands.add_parser("list", help="list tags with training counts, split flag and per-group norms")
    p.add_argument("table", metavar="TABLE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run="_list")

    p = commands.add_parser("blend", help="NEW = weighted sum of tags, e.g. '0.6*cat + 0.4*dog'")
    p.add_argument("table", metavar="TABLE")
    p.add_argument("new", metavar="NEW")
    p.add_argument("expression", metavar="EXPR", help="weights need not sum to 1; the result's norm scales with them")
    p.add_argument("--layers", metavar="SPEC", help="blend only in these groups; the first tag stands elsewhere")
    p.add_argument("--slerp", action="store_true", help="spherical interpolation of two tags (weights sum to 1)")
    _output_options(p)
    p.set_defaults(run="_blend")

    p = commands.add_parser("swap", help="NEW attends like --key and contributes the content of --value")
    p.add_argument("table", metavar="TABLE")
    p.add_argument("new", metavar="NEW")
    p.add_argument("--key", required=True, metavar="TAG", help="key source (to_k; K in key/value mode)")
    p.add_argument("--value", required=True, metavar="TAG", help="value source (to_v; V in key/value mode)")
    p.add_argument("--layers", metavar="SPEC", help="groups to swap in (default: all)")
    p.add_argument("--rest", choices=("key", "value", "tied"),
                   help="outside --layers: the key concept, the value concept, or the key concept's key source "
                        "tied to to_v (default: key)")
    _output_options(p)
    p.set_defaults(run="_swap")

    p = commands.add_parser("mix", help="NEW = tag A in the --layers groups, tag B in the rest")
    p.add_argument("table", metavar="TABLE")
    p.add_argument("new", metavar="NEW")
    p.add_argument("--a", required=True, metavar="TAG")
    p.add_argument("--b", required=True, metavar="TAG")
    p.add_argument("--layers", required=True, metavar="SPEC")
    _output_options(p)
    p.set_defaults(run="_mix")

    p = commands.add_parser("drop", help="remove tags and every trace of their vectors")
    p.add_argument("table", metavar="TABLE")
    p.add_argument("tags", nargs="*", metavar="TAG")
    p.add_argument("--match", metavar="REGEX", help="also drop every tag this regex matches (re.search)")
    _output_options(p)
    p.set_defaults(run="_drop")

    p = commands.add_parser("rename", help="rename a tag")
    p.add_argument("table", metavar="TABLE")
    p.add_argument("old", metavar="OLD")
    p.add_argument("new", metavar="NEW")
    _output_options(p)
    p.set_defaults(run="_rename")

    p = commands.add_parser("extract", help="write a table with only some tags")
    p.add_argument("table", metavar="TABLE")
    p.add_argument("tags", nargs="+", metavar="TAG")
    _output_options(p, in_place=False)
    p.set_defaults(run="_extract")

    p = commands.add_parser("regroup", help="another layer grouping: single → blocks → layers copies, back averages")
    p.add_argument("table", metavar="TABLE")
    p.add_argument("--groups", required=True, choices=GROUPINGS, help="the new grouping")
    _output_options(p)
    p.set_defaults(run="_regroup")

    p = commands.add_parser("factorise", help="per-layer rows as each tag's shared vector + its own rank-R offsets")
    p.add_argument("table", metavar="TABLE")
    p.add_argument("--rank", type=int, default=2, help="rank of the per-group offsets (default 2: BENCHMARKS.md, "
                   "'Factorised per-layer rows'; groups − 1 is exact)")
    _output_options(p)
    p.set_defaults(run="_factorise")

    p = commands.add_parser("unfactorise", help="full per-layer rows again, rebuilt exactly from the factors")
    p.add_argument("table", metavar="TABLE")
    _output_options(p)
    p.set_defaults(run="_unfactorise")

    p = commands.add_parser("combine", help="merge two tables of the same base")
    p.add_argument("left", metavar="LEFT")
    p.add_argument("right", metavar="RIGHT")
    p.add_argument("--on-conflict", choices=("error", "left", "right", "mean"), default="error",
                   help="what to do with tags in both tables with different vectors (default: error)")
    _output_options(p, in_place=False)
    p.set_defaults(run="_combine")
    return parser


def _output_options(p: argparse.ArgumentParser, in_place: bool = True) -> None:
    p.add_argument("-o", "--output", metavar="OUT", required=not in_place, help="write the result here")
    if in_place:
        p.add_argument("--in-place", action="store_true", help="rewrite TABLE instead of writing OUT")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing OUT (with --in-place: a read-only TABLE) or replace a NEW tag")


if __name__ == "__main__":
    sys.exit(main())
