"""Command line: `python -m gradient_bottleneck COMMAND --help`."""

import argparse
import logging
import sys

from . import claims


def cmd_claims(args: argparse.Namespace) -> int:
    rows = claims.collect_verdicts(args.profile)
    table = claims.markdown_table(rows)
    print(table, end="")
    if args.update_readme:
        claims.update_readme(table)
        print(f"README.md claims table updated from results/{args.profile}/ ({len(rows)} rows)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gradient_bottleneck",
                                     description="Companion to 'Lost in Backpropagation' (arXiv:2603.10145).")
    commands = parser.add_subparsers(dest="command", required=True)

    table = commands.add_parser("claims", help="print the claims table built from results/<profile>/*.json")
    table.add_argument("--profile", default="cpu", help="results profile to read: smoke, cpu or gpu (default: cpu)")
    table.add_argument("--update-readme", action="store_true", help="also rewrite the table inside README.md")
    table.set_defaults(handler=cmd_claims)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
