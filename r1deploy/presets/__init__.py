"""Model presets: the real HF config.json of each DeepSeek-R1-family model, shipped as data.

`resolve_config_path` turns a preset name or alias, a config.json path or a model directory
into the path of a config.json, with a clear error naming the valid presets otherwise.
`r1_chat_template` gives R1's chat format to an R1-family model whose tokenizer ships none.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

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


def preset_path(name: str) -> Path | None:
    """The preset file a name or alias means, or None; only shipped presets, so no name reaches outside them."""
    key = canonical_name(name)
    return PRESET_DIR / f"{key}.json" if key in preset_names() else None


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
    preset = preset_path(model)
    if preset is not None:
        return preset
    raise UsageError(f"unknown model {model!r}: use a config.json, a model directory, or one of "
                     f"{', '.join(preset_names())} (aliases: {', '.join(ALIASES)})")


# R1's role markers: added tokens of the DeepSeek-V3/R1 vocabulary that DeepSeek also put into the
# R1-Distill tokenizers, so a converted checkpoint or GGUF with any name still shows its family.
R1_ROLE_TOKENS = ("<｜User｜>", "<｜Assistant｜>")


@cache
def r1_template_text() -> str:
    return (PRESET_DIR / "r1_chat_template.jinja").read_text(encoding="utf-8")


def is_r1_family(architecture: str, name: str, tokenizer: Any = None) -> bool:
    """DeepSeek-V3/R1 (one architecture for both), a model named like an R1 preset
    (deepseek-r1, r1-distill-*; an HF directory keeps the hub name), or a vocabulary with R1's role tokens."""
    key = canonical_name(name)
    if architecture == "DeepseekV3ForCausalLM" or key == "deepseek-r1" or key.startswith("r1-distill-"):
        return True
    if tokenizer is None:
        return False
    ids = tokenizer.convert_tokens_to_ids(list(R1_ROLE_TOKENS))  # O(1) lookups, not get_vocab()
    return all(i is not None and i != tokenizer.unk_token_id for i in ids)


def r1_chat_template(architecture: str, name: str, tokenizer: Any) -> str | None:
    """Our R1 template for an R1-family model whose tokenizer has no chat template; None otherwise,
    so a checkpoint's own template (or a non-R1 model's lack of one) is never overridden."""
    if tokenizer is None or tokenizer.chat_template or not is_r1_family(architecture, name, tokenizer):
        return None
    return r1_template_text()
