"""One CLI: plan | doctor | serve | generate | bench. Thin: each subcommand lives with its package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from r1deploy.errors import UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2, never a traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _not_landed(name: str, issue: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(f"r1deploy {name}: not available yet ({issue} has not landed)", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    from r1deploy.plan import cli as plan_cli
    from r1deploy.plan import doctor

    parser = _Parser(prog="r1deploy", description="Plan, serve and benchmark DeepSeek-R1-family models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    plan_cli.register(sub)
    doctor.register(sub)
    for name, issue, help_text in (
        ("serve", "the OpenAI-compatible server, issue 4", "OpenAI-compatible HTTP server"),
        ("bench", "the benchmark, issue 5", "load-test a server or the in-process engine"),
    ):
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_not_landed(name, issue))
    _register_generate(sub)
    return parser


def _register_generate(sub: argparse._SubParsersAction) -> None:
    try:
        from r1deploy.engine import generate_cli
    except ImportError:
        p = sub.add_parser("generate", help="generate one answer", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_not_landed("generate", "the engine core, issue 3"))
        return
    generate_cli.register(sub)


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
