"""The one CLI: every subcommand's --help works; usage errors are one line and exit 2."""

from __future__ import annotations

import pytest

from r1deploy.cli import build_parser, main


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)  # type: ignore[union-attr]


def test_known_subcommands() -> None:
    assert {"plan", "doctor", "serve", "generate", "bench"} <= set(_subcommands())


@pytest.mark.parametrize("name", _subcommands())
def test_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main([name, "--help"])
    except SystemExit as exc:
        code = exc.code
    assert code == 0 and "usage" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("argv", [["generate"], ["serve", "--port", "notaport"], ["bench", "--batch", "x"],
                                  ["plan", "--tp", "3"], ["frobnicate"]])
def test_usage_errors_are_one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "plan" in capsys.readouterr().out
