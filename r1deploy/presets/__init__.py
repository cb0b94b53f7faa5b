"""Model presets: the real HF config.json of each DeepSeek-R1-family model, shipped as data.

`resolve_config_path` turns a preset name or alias, a config.json path or a model directory
into the path of a config.json, with a clear error naming the valid presets otherwise.
"""

from __future__ import annotations

from pathlib import Path

from r1deploy.errors import UsageError

PRESET_DIR = Path(__file__).parent

# Short names people type for the presets.
ALIASES = {
    "r1": "deepseek-r1",
    "v3": "deepseek-v3",
    "v2-lite": "deepseek-v2-lite",
}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = key.removeprefix("deepseek-ai/").replace("deepseek-r1-distill-", "r1-distill-")
    return ALIASES.get(key, key)


def resolve_config_path(model: str) -> Path:
    """A preset name/alias, a path to a config.json, or a model directory containing one."""
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path / "config.json"
        raise UsageError(f"model directory {path} has no config.json")
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{canonical_name(model)}.json"
    if preset.is_file():
        return preset
    raise UsageError(f"unknown model {model!r}: use a config.json, a model directory, or one of "
                     f"{', '.join(preset_names())} (aliases: {', '.join(ALIASES)})")
