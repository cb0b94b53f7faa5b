"""The benchmark's view of the planner (r1deploy.plan.planner.plan_deployment): optional and advisory.

The planner says what hardware a model needs (for the "cannot run here" message) and what it
predicts (for planned-vs-measured and MBU / MFU). When it is missing or fails, the benchmark still
runs and says those numbers were not computed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Dense Llama/Qwen2 weights per parameter when the planner is absent: bf16.
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}


def plan(model: str, gpu: str | None = None, **workload: Any) -> dict[str, Any] | None:
    """The plan for `model` (on `gpu`, default the planner's), at the run's workload when the planner
    accepts it (input_len, output_len, concurrency), else at its defaults."""
    try:
        from r1deploy.plan.planner import plan_deployment
    except ImportError:
        return None
    options = {"gpu": gpu} if gpu else {}
    for extra in (workload, {}):
        try:
            result = plan_deployment(model=model, **options, **extra)
        except Exception:  # noqa: BLE001, S112 - advisory: a planner error must not stop a benchmark
            continue
        return result if isinstance(result, dict) else None
    return None


def get(data: dict[str, Any] | None, dotted: str) -> Any:
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def deployment_hint(result: dict[str, Any] | None) -> str | None:
    """'8x H200 (TP8, EP8, FP8)' from a plan, or None."""
    gpus, gpu = get(result, "deployment.num_gpus"), get(result, "deployment.gpu")
    if not gpus or not gpu:
        return None
    parts = [f"TP{get(result, 'deployment.tp')}" if get(result, "deployment.tp") else ""]
    for key in ("ep", "pp"):
        size = get(result, f"deployment.{key}")
        if isinstance(size, int) and size > 1:
            parts.append(f"{key.upper()}{size}")
    precision = next((get(result, k) for k in ("deployment.precision", "precision.weights",
                                               "deployment.weight_dtype", "precision") if
                      isinstance(get(result, k), str)), None)
    if precision:
        parts.append(precision.upper())
    inner = ", ".join(p for p in parts if p)
    engine = get(result, "deployment.engine")
    return f"{gpus}x {str(gpu).upper()}" + (f" ({inner})" if inner else "") + (f", {engine} profile" if engine else "")


def dense_weights_bytes(config: dict[str, Any]) -> int | None:
    """Parameter bytes of a dense Llama/Qwen2 config (the planner does this exactly; this is the fallback)."""
    try:
        h, inter, layers, vocab = (int(config[k]) for k in ("hidden_size", "intermediate_size",
                                                              "num_hidden_layers", "vocab_size"))
        heads = int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        return None
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    attention = h * head_dim * (2 * heads + 2 * kv_heads)
    per_layer = attention + 3 * h * inter
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    params = layers * per_layer + embeddings
    return params * _DTYPE_BYTES.get(str(config.get("torch_dtype", "bfloat16")), 2)


def read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
