"""`python -m lstm_dist.config [--config FILE] [section.key=value ...]`: the resolved config as YAML;
`--reference`: the configuration reference (docs/configuration.md's table) in Markdown."""

from __future__ import annotations

import argparse
import sys

from lstm_dist.common.errors import run_cli
from lstm_dist.config.loading import add_arguments, load, parse_args
from lstm_dist.config.reference import reference_markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstm_dist.config", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--reference", action="store_true", help="print the configuration reference (Markdown)")
    args = parse_args(parser, argv)
    if args.reference:
        sys.stdout.write(reference_markdown())
        return 0
    cfg = load(args.config, args.overrides)
    sys.stdout.write(cfg.to_yaml())
    return 0


if __name__ == "__main__":
    run_cli(main)
