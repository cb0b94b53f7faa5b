"""config.json's quantization_config -> the quantisation config of a checkpoint (AWQ, or GPTQ run as AWQ)."""

from __future__ import annotations

from typing import Any

from r1deploy.quant.awq import AWQConfig
from r1deploy.quant.gptq import GPTQConfig


def quant_config_from_hf(raw: dict[str, Any] | None) -> AWQConfig | GPTQConfig | None:
    """config.json's quantization_config -> the config whose linear_method(prefix) quantises each linear:
    AWQ, or GPTQ (quant/gptq.py: converted to AWQ's layout at load); None: unquantised."""
    if not raw:
        return None
    if str(raw.get("quant_method", "")).lower() == "gptq":
        return GPTQConfig.from_hf(raw)
    return AWQConfig.from_hf(raw)
