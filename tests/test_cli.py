"""The one CLI: every subcommand's --help works; serve and bench are not landed yet."""

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
    out = capsys.readouterr()
    if name in ("serve", "bench"):
        assert code == 2 and len(out.err.strip().splitlines()) == 1
    else:
        assert code == 0 and "usage" in out.out.lower()


@pytest.mark.parametrize("name", ["serve", "bench"])
def test_not_landed_one_line_exit_2(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([name]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not available" in err


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "plan" in capsys.readouterr().out
