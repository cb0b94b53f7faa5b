"""No trust_remote_code path exists: no call in the package passes trust_remote_code other than the literal False,
and every Auto* from_pretrained call passes it as False (an explicit refusal: transformers would otherwise
prompt on a terminal, or raise, for a checkpoint that ships its own Python code)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "r1deploy"


def _calls() -> list[tuple[str, ast.Call]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Call):
                found.append((f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", node))
    return found


def _is_false(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def test_no_trust_remote_code_other_than_false() -> None:
    for where, call in _calls():
        for keyword in call.keywords:
            assert keyword.arg != "trust_remote_code" or _is_false(keyword.value), where
    for path in PACKAGE.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".json", ".yaml", ".jinja", ".sh"):
            assert "trust_remote_code=True" not in path.read_text(encoding="utf-8", errors="replace"), path


def test_auto_classes_load_with_trust_remote_code_false() -> None:
    auto_calls = [(where, call) for where, call in _calls()
                  if isinstance(call.func, ast.Attribute) and call.func.attr == "from_pretrained"
                  and isinstance(call.func.value, ast.Name) and call.func.value.id.startswith("Auto")]
    assert auto_calls  # the loader's AutoTokenizer at least: the walk sees the package
    for where, call in auto_calls:
        assert not any(k.arg is None for k in call.keywords), f"{where}: **kwargs could carry trust_remote_code"
        assert any(k.arg == "trust_remote_code" and _is_false(k.value) for k in call.keywords), where
