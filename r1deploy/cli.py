"""One CLI: plan | doctor | serve | generate | bench | up. Thin: each subcommand lives with its package."""

from __future__ import annotations

import argparse
import sys

from r1deploy.errors import UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2, never a traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from r1deploy.bench import cli as bench_cli
    from r1deploy.deploy import up as up_cli
    from r1deploy.doctor import cli as doctor_cli
    from r1deploy.engine import generate_cli
    from r1deploy.plan import cli as plan_cli
    from r1deploy.server import cli as serve_cli

    parser = _Parser(prog="r1deploy", description="Plan, serve and benchmark DeepSeek-R1-family models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (plan_cli, doctor_cli, serve_cli, generate_cli, bench_cli, up_cli):
        module.register(sub)
    return parser


def _run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    return _run(build_parser(), argv)


def benchmark_main(argv: list[str] | None = None) -> int:
    """`deepseek-benchmark`: the seed guide's name for `r1deploy bench`."""
    return main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
