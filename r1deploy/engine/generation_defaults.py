"""Sampling defaults from the model's generation_config.json, as vLLM's `--generation-config` reads them.

A request (or an LLM.generate call without SamplingParams) that leaves temperature, top_p, top_k, min_p,
repetition_penalty or max_tokens unset gets the model's own values: DeepSeek ships R1 with temperature 0.6
and top_p 0.95, and its answers degrade at 1.0. Sources, by `generation_config`:
  "auto"         the model's generation_config.json; for a preset, or a model whose folder has none, the
                 values kept in presets/generation/<name>.json: DeepSeek's R1 files, and the SmolLM2 model
                 card's temperature 0.2 / top_p 0.9 for the embedded model (its own file sets none);
  "vllm"/"none"  no model defaults: SamplingParams' own (vLLM's "vllm");
  a folder path  that folder's generation_config.json.
`override_generation_config` is merged on top in every case (vLLM's `--override-generation-config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import GenerationConfig

from r1deploy.errors import UsageError
from r1deploy.presets import PRESET_DIR, canonical_name
from r1deploy.sampling_params import SamplingParams

GENERATION_CONFIG_SOURCES = ("auto", "vllm", "none")
# generation_config.json keys vLLM takes as sampling defaults (max_new_tokens is vLLM's max_tokens).
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")
PRESET_GENERATION_DIR = PRESET_DIR / "generation"


def generation_defaults(source: str, model_dir: Path | None, model_name: str,
                        overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """SamplingParams keyword defaults; checked by building a SamplingParams, so a bad value fails at start."""
    if source in ("vllm", "none"):
        config: dict[str, Any] = {}
    elif source == "auto":
        config = _read(model_dir, model_name)
    else:
        folder = Path(source).expanduser()
        if not (folder / "generation_config.json").is_file():
            raise UsageError(f"--generation-config {source}: no generation_config.json there "
                             f"(use {', '.join(GENERATION_CONFIG_SOURCES)} or a folder holding one)")
        config = _diff(folder, None)
    config.update(overrides or {})
    unknown = sorted(set(overrides or {}) - set(_SAMPLING_KEYS) - {"max_tokens"})
    if unknown:
        raise UsageError(f"--override-generation-config: unknown field(s) {', '.join(unknown)}; "
                         f"use {', '.join(_SAMPLING_KEYS)}")
    defaults = {key: config[key] for key in _SAMPLING_KEYS if config.get(key) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    if config.get("max_tokens") is not None:
        defaults["max_tokens"] = config["max_tokens"]
    try:
        SamplingParams(**defaults)
    except ValueError as exc:
        raise UsageError(f"generation defaults {defaults} (--generation-config / --override-generation-config): "
                         f"{exc}") from None
    return defaults


def _read(model_dir: Path | None, model_name: str) -> dict[str, Any]:
    if model_dir is not None and (model_dir / "generation_config.json").is_file():
        return _diff(model_dir, None)
    preset = PRESET_GENERATION_DIR / f"{canonical_name(model_name)}.json"
    return _diff(PRESET_GENERATION_DIR, preset.name) if preset.is_file() else {}


def _diff(folder: Path, file_name: str | None) -> dict[str, Any]:
    """Only what the file sets (to_diff_dict), so GenerationConfig's own defaults (top_k 50) never leak in."""
    try:
        return GenerationConfig.from_pretrained(folder, config_file_name=file_name).to_diff_dict()
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the generation config in {folder} (--generation-config): {exc}") from None
