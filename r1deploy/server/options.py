"""`r1deploy serve` flags spelled as vLLM's: model source (--revision, --download-dir), generation defaults
(--generation-config, --override-generation-config), metrics names (--metrics-prefix) and SSE keep-alives."""

from __future__ import annotations

import argparse
import json
from typing import Any

from r1deploy.errors import UsageError
from r1deploy.server.vllm_metrics import METRIC_PREFIXES


def add_vllm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None,
                   help="with a Hugging Face Hub id (org/name): the branch, tag or commit to download")
    p.add_argument("--download-dir", default=None,
                   help="Hub cache folder for downloaded models (default: $HF_HUB_CACHE, or $HF_HOME/hub)")
    p.add_argument("--generation-config", default="auto", metavar="auto|vllm|none|FOLDER",
                   help="sampling defaults for fields a request leaves unset: auto = the model's "
                        "generation_config.json (R1 presets: temperature 0.6, top_p 0.95); vllm or none = "
                        "the engine's (temperature 1, top_p 1); or a folder holding a generation_config.json")
    p.add_argument("--override-generation-config", default=None, metavar="JSON",
                   help='JSON merged over the generation defaults, e.g. \'{"temperature": 0.5, '
                        '"max_new_tokens": 2048}\'')
    p.add_argument("--metrics-prefix", choices=METRIC_PREFIXES, default=METRIC_PREFIXES[0],
                   help="name prefix of the vLLM-compatible /metrics series: r1deploy:... or vllm:... (for "
                        "dashboards, autoscalers and gateways built on vLLM's series)")
    p.add_argument("--sse-keepalive", type=float, default=15.0, metavar="SECONDS",
                   help="send an SSE comment (': keep-alive') after this many seconds without a chunk, so proxies "
                        "keep a long-thinking stream open (0: never)")


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig keywords for the generation defaults; a bad JSON names its flag."""
    overrides = None
    if args.override_generation_config is not None:
        try:
            overrides = json.loads(args.override_generation_config)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--override-generation-config: not valid JSON ({exc})") from None
        if not isinstance(overrides, dict):
            raise UsageError("--override-generation-config: expected a JSON object, e.g. '{\"temperature\": 0.5}'")
    return {"generation_config": args.generation_config, "override_generation_config": overrides}
