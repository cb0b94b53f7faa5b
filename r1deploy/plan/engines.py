"""Engine profiles: what a named serving engine (r1deploy, sglang, vllm, trtllm) reaches on given hardware.

A profile is data, r1deploy/plan/engines/NAME.json:
- `efficiency`: a calibration object (roofline.Efficiency factors, a "moe" section for MoE/MLA models), or
  `calibration`: the name of such a file beside this module (r1deploy: calibration_h200.json, which
  `plan --calibrate` refits from the committed runs);
- `features`: what the engine does that moves the numbers (MTP and its acceptance, DP-attention, EP
  all-to-all, FP8 KV, chunked prefill, CUDA graphs, its largest running batch);
- `fitted_factors` (published engines): the factors engine_fit.py fits on the `fitted` points; `fitted_on`:
  per factor, the points (or runs) it was fitted on, and how, and where the others come from;
- `points`: published runs, each marked `set: fitted` (used to fit the factors), `held_out` (never used
  for fitting; they check that the profile generalises) or `other_version` (an older release: shown only); `runs`: committed result files of this engine
  (benchmarks/results/*.json, read by points.py), relative to the repository root.
validate.py predicts every point with the profile and reports the errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1deploy.errors import UsageError
from r1deploy.plan.model_spec import ModelSpec
from r1deploy.plan.roofline import Efficiency, calibration_family, calibration_from_dict
from r1deploy.plan.serving import DEFAULT_SPEC_ACCEPTANCE, DEFAULT_SPEC_DECAY, SpecDecode

ENGINES_DIR = Path(__file__).resolve().parent / "engines"
ENGINE_NAMES = ("r1deploy", "sglang", "vllm", "trtllm")
# fitted: the factors were fitted on it; held_out: never used for fitting, checked against 25%; other_version: the
# same engine a major version apart (shown with its error, outside the targets).
POINT_SETS = ("fitted", "held_out", "other_version")


@dataclass(frozen=True)
class EngineProfile:
    name: str
    description: str
    efficiency: dict[str, Any]  # a calibration object
    features: dict[str, Any]
    fitted_on: dict[str, Any]
    points: tuple[dict[str, Any], ...]
    runs: tuple[str, ...]
    fitted_factors: tuple[str, ...] = ()  # refitted by engine_fit.py on the `fitted` points

    def eff(self, model: ModelSpec) -> Efficiency:
        return self.family_eff(calibration_family(model))

    def family_eff(self, family: str) -> Efficiency:
        return calibration_from_dict(self.efficiency, family, f"engine profile {self.name}")

    def spec_decode(self, model: ModelSpec) -> SpecDecode | None:
        """The engine's speculative decoding for `model`: MTP needs the checkpoint's MTP module."""
        mtp = self.features.get("mtp")
        if not mtp or not model.num_mtp_layers:
            return None
        return SpecDecode(int(mtp["draft_tokens"]), float(mtp["acceptance"]), float(mtp.get("decay", DEFAULT_SPEC_DECAY)))

    @property
    def max_running(self) -> int | None:
        """The engine's default cap on sequences decoded at once (max load = min(KV capacity, this))."""
        value = self.features.get("max_running_requests")
        return int(value) if value else None


def requested_spec(model: ModelSpec, engine: str | None, acceptance: float | None,
                   draft_tokens: int | None) -> SpecDecode | None:
    """Speculative decoding the user asked for: --num-speculative-tokens k (default: the engine's MTP draft
    count, else 1) at --spec-acceptance for the first draft token (default DeepSeek's published 0.85), each later
    position at the engine's decay (default 1); None when neither flag is given."""
    if acceptance is None and draft_tokens is None:
        return None
    mtp = (load_engine(engine).features.get("mtp") or {}) if engine else {}
    return SpecDecode(int(draft_tokens if draft_tokens is not None else mtp.get("draft_tokens", 1)),
                      float(acceptance if acceptance is not None else DEFAULT_SPEC_ACCEPTANCE),
                      float(mtp.get("decay", DEFAULT_SPEC_DECAY)))


def spec_decode_dict(settings: Any, chosen: Any) -> dict[str, Any] | None:
    """`performance.spec_decode` of a plan: what speculative decoding (the flags', else the engine's MTP) would
    give on the chosen deployment, beside the plan's numbers (which are without it, the engines' default); None
    when neither asks for it (the engine has no MTP or the model no MTP module)."""
    from r1deploy.plan.roofline import stage_cost
    from r1deploy.plan.serving import predict

    spec = settings.spec
    source = "flags"
    if spec is None:
        spec = load_engine(settings.engine).spec_decode(settings.model) if settings.engine else None
        source = f"engine {settings.engine}"
    if spec is None:
        return None
    cost = stage_cost(settings.model, settings.precision, chosen.layout, chosen.gpu, settings.eff)
    plain, perf = predict(cost, settings.workload), predict(cost, settings.workload, spec)
    return {"draft_tokens": spec.draft_tokens, "acceptance": spec.acceptance, "decay": spec.decay,
            "acceptance_per_position": list(spec.acceptance_per_position), "source": source,
            "tokens_per_step": spec.tokens_per_step, "speedup": plain.tpot_s / perf.tpot_s, "tpot_s": perf.tpot_s,
            "tokens_per_s_per_user": perf.tokens_per_s_per_user, "output_tokens_per_s": perf.output_tokens_per_s}


def load_engine(name: str) -> EngineProfile:
    if name not in ENGINE_NAMES:
        raise UsageError(f"--engine {name!r}: known engines are {', '.join(ENGINE_NAMES)}")
    path = ENGINES_DIR / f"{name}.json"
    data = json.loads(path.read_text())
    efficiency = data.get("efficiency")
    if "calibration" in data:
        efficiency = json.loads((Path(__file__).resolve().parent / data["calibration"]).read_text())
    points = tuple(data.get("points", []))
    for p in points:
        if p.get("set") not in POINT_SETS:
            raise ValueError(f"{path}: point {p.get('id')!r} has set {p.get('set')!r}, not one of {POINT_SETS}")
    return EngineProfile(name, data.get("description", ""), efficiency or {}, data.get("features", {}),
                         data.get("fitted_on", {}), points, tuple(data.get("runs", [])),
                         tuple(data.get("fitted_factors", [])))
