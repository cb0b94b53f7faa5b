"""Human output: the plan as rich tables, and `--explain`: every formula with its numbers."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from r1deploy.plan import memory as mem_mod
from r1deploy.plan.matrix import MATRIX_WORKLOAD, MatrixRow
from r1deploy.plan.memory import weights_bytes_total
from r1deploy.plan.parallel import valid_tp_sizes
from r1deploy.plan.planner import Plan
from r1deploy.plan.rules_of_thumb import rule_checks
from r1deploy.plan.serving import P99_WAIT_FACTOR


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def size(n: float) -> str:
    return f"{n / 1e12:.2f} TB" if n >= 1e12 else gb(n)


def count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    t = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    return t


def render_plan(plan: Plan, console: Console) -> None:
    d = plan.to_dict()
    m, p, mem, dep, perf, cost, host = (d[k] for k in ("model", "precision", "memory", "deployment",
                                                        "performance", "cost", "host"))
    w = d["workload"]
    load = f"{w['concurrency']} concurrent" if w["concurrency"] else f"{w['request_rate']} req/s"
    console.print(f"[bold]r1deploy plan[/bold]: {m['name']} on {dep['num_gpus']}x {dep['gpu_display_name']} "
                  f"({dep['layout']}), {load}, {w['input_len']:,} in / {w['output_len']:,} out tokens")
    console.print(_table("Model", [
        ("parameters", f"{count(m['total_params'])} total, {count(m['active_params'])} active per token"
                       + (f", +{count(m['mtp_params'])} MTP" if m["mtp_params"] else "")),
        ("architecture", f"{m['attention']}{' + MoE' if m['moe'] else ''}, {m['num_layers']} layers"),
        ("precision", (f"weights {p['weights']}{' g' + str(p['group_size']) if p['group_size'] else ''}, "
                      f"KV cache {p['kv_cache_dtype']}, compute {p['compute']}")),
    ]))
    console.print(_table("Memory per GPU", [
        ("weights", f"{gb(mem['weights_bytes_per_gpu'])} (model total {gb(mem['weights_bytes'])})"),
        ("activations (peak)", gb(mem["activation_bytes_per_gpu"])),
        ("runtime overhead", gb(mem["overhead_bytes_per_gpu"])),
        ("KV cache", f"{gb(mem['kv_budget_bytes_per_gpu'])} of {gb(mem['usable_bytes_per_gpu'])} usable"),
        ("KV per token", f"{mem['kv_bytes_per_token']:,} B model, {mem['kv_bytes_per_token_per_gpu']:,} B per GPU"),
        ("KV capacity", (f"{mem['kv_capacity_tokens']:,} tokens = {mem['max_concurrency']:,} requests "
                        f"of {w['input_len'] + w['output_len']:,} tokens")),
    ]))
    sd = perf["spec_decode"]
    console.print(_table(f"Performance (roofline x {dep['engine'] + ' profile' if dep['engine'] else 'efficiency'})", [
        ("TTFT p99", (f"{perf['ttft_s'] * 1e3:,.0f} ms (prefill alone {perf['prefill_s'] * 1e3:,.0f} ms, "
                     f"{perf['prefill_bound']}-bound)")),
        ("TPOT", (f"{perf['tpot_s'] * 1e3:,.1f} ms ({perf['tokens_per_s_per_user']:.1f} tok/s per user, "
                 f"decode {perf['decode_bound']}-bound)")),
        ("output tokens/s", (f"{perf['output_tokens_per_s']:,.0f} total, {perf['output_tokens_per_s_per_gpu']:,.0f} "
                            f"per GPU at {perf['concurrency']:.0f} in flight")),
    ] + ([("with MTP", (f"{sd['draft_tokens']} draft tokens at {sd['acceptance']:.0%} acceptance: TPOT "
                        f"{sd['tpot_s'] * 1e3:,.1f} ms, {sd['output_tokens_per_s']:,.0f} tok/s"))] if sd else [])))
    console.print(_table("Cost", [
        ("$/hour", f"${cost['usd_per_hour']:,.2f} ({dep['num_gpus']} x ${cost['usd_per_gpu_hour']:.2f})"),
        ("$ per M output tokens", f"${cost['usd_per_million_output_tokens']:,.2f}"),
    ]))
    console.print(_table(f"Host (per node, {dep['nodes']} node{'s' if dep['nodes'] > 1 else ''})", [
        ("system RAM", f"{host['ram_bytes'] / 2**30:,.0f} GiB"),
        ("disk", f"{size(host['disk_bytes'])} (checkpoint {gb(host['checkpoint_bytes'])})"),
        ("CPU cores", str(host["cpu_cores"])),
        ("load time", f"{host['load_time_s']:,.0f} s at {host['disk_read_bytes_per_s'] / 1e9:.1f} GB/s"),
        ("inter-node network", f"{host['internode_bytes_per_s'] / 1e9:,.1f} GB/s needed"
                               if dep["nodes"] > 1 else "none (one node)"),
    ]))
    if "offload" in d:
        console.print(_offload_table(d["offload"]))
    for note in d["notes"]:
        console.print(f"note: {note}")
    for engine, command in d["launch"].items():
        console.print(f"launch ({engine}): {command}", soft_wrap=True)


def _offload_table(o: dict) -> Table:
    path = "copy over PCIe" if o["miss_path"] == "pcie_copy" else "compute on the host"
    return _table(f"Expert offload (1x {o['gpu']} + host memory, {o['concurrency']} concurrent)", [
        ("GPU", (f"non-expert weights {gb(o['nonexpert_bytes'])} + {o['expert_slots']:,} of {o['experts_total']:,} "
                 f"expert slots ({gb(o['expert_slots'] * o['expert_bytes_each'])}) + KV {gb(o['kv_budget_bytes'])} "
                 f"(needs {gb(o['kv_needed_bytes'])}, holds {o['max_concurrency']:,} requests)")),
        ("hit rate", (f"{o['hit_rate']:.1%} (uniform routing), {o['touched_per_layer']:.0f} experts touched per "
                      f"layer, {o['misses_per_step']:,.0f} misses per step")),
        ("per miss", (f"copy {o['copy_s_per_expert'] * 1e3:.2f} ms, host {o['host_s_per_expert'] * 1e3:.2f} ms: "
                      f"{path}")),
        ("decode step", (f"{o['step_s'] * 1e3:,.1f} ms = GPU {o['gpu_step_s'] * 1e3:,.1f} ms + misses "
                         f"{o['miss_s'] * 1e3:,.1f} ms (overlap {o['prefetch_overlap']:.0%}) + overhead")),
        ("decode tokens/s", f"{o['decode_tokens_per_s']:,.1f} total, {o['tokens_per_s_per_user']:.2f} per user"),
        ("PCIe per token", f"{o['pcie_bytes_per_token'] / 1e6:,.2f} MB"),
        ("host RAM", (f"{o['host_ram_bytes'] / 2**30:,.0f} GiB (all experts pinned {gb(o['host_pinned_bytes'])}, "
                      f"{gb(o['experts_on_host_only_bytes'])} not on the GPU)")),
    ])


def explain_lines(plan: Plan) -> list[tuple[str, list[str]]]:
    s, c, h = plan.settings, plan.chosen, plan.host
    m, prec, lay, gpu, mem, perf, w = s.model, s.precision, c.layout, c.gpu, c.memory, c.perf, s.workload
    assert perf is not None
    b = prec.kv_bytes
    parts = ("embedding", "lm_head", "attention", "dense_mlp", "shared_experts", "routed_experts", "router", "norm")
    by_part = ", ".join(f"{p} {count(m.params(parts=(p,)))}" for p in parts if m.params(parts=(p,)))
    out: list[tuple[str, list[str]]] = [("Parameters (tensor by tensor from config.json)", [
        by_part,
        f"total = {m.total_params:,}; active = total - routed x (1 - k/E) = {int(m.active_params):,}"
        + (f" (k={m.num_experts_per_tok}, E={m.n_routed_experts})" if m.moe else ""),
        *([f"MTP module (stored, not served) = {m.mtp_params:,}; checkpoint total {m.checkpoint_params:,}"]
          if m.num_mtp_layers else []),
    ])]
    wt = weights_bytes_total(m, prec)
    out.append(("Weights", [
        (f"{prec.describe()}: matmul weights at the format's bytes (+ scales/zeros), embeddings, lm_head, "
        "norms and routers at 16 bit"),
        (f"total = {gb(wt)}; per GPU = attention/TP{lay.attention_tp} + MLP and experts/TP{lay.tp} + "
        f"vocab/TP{lay.tp}, {math.ceil(m.num_layers / lay.pp)} of {m.num_layers} layers (PP{lay.pp}) = "
        f"{gb(mem.weights_bytes)}"),
    ]))
    if m.mla:
        kv = (f"MLA: L x (kv_lora_rank + qk_rope_head_dim) x b = {m.num_layers} x ({m.kv_lora_rank} + "
              f"{m.qk_rope_head_dim}) x {b} = {mem.kv_bytes_per_token:,} B/token; not split by TP, so per GPU "
              f"{mem.kv_bytes_per_token_gpu:,} B (layers/PP)")
    else:
        kv = (f"GQA: 2 x L x n_kv x d_head x b = 2 x {m.num_layers} x {m.num_kv_heads} x {m.head_dim} x {b} = "
              f"{mem.kv_bytes_per_token:,} B/token; per GPU ceil(n_kv/TP) heads, layers/PP = "
              f"{mem.kv_bytes_per_token_gpu:,} B")
    out.append(("KV cache", [
        kv,
        (f"capacity = KV budget / per-GPU bytes x DP-attention ranks = {gb(mem.kv_budget_bytes)} / "
        f"{mem.kv_bytes_per_token_gpu:,} x {lay.attention_dp} = {mem.kv_capacity_tokens:,} tokens per instance"),
        (f"workload needs concurrency/replica x (input + output) = {perf.concurrency / lay.replicas:.0f} x "
        f"{w.tokens_per_request:,} = {perf.concurrency / lay.replicas * w.tokens_per_request:,.0f} tokens"),
    ]))
    out.append(("Activations, overhead, budget", [
        (f"activations = T x (4 x hidden + widest of attention/MLP/MoE per GPU) x 2 B x "
        f"{mem_mod.ACTIVATION_WORKSPACE_FACTOR} + logits, T = {mem_mod.DEFAULT_MAX_BATCHED_TOKENS} = "
        f"{gb(mem.activation_bytes)}"),
        (f"overhead = CUDA context {gb(mem_mod.CUDA_CONTEXT_BYTES)} + NCCL {gb(mem_mod.NCCL_BUFFER_BYTES)} "
        f"(if >1 GPU) + CUDA graphs {gb(mem_mod.CUDA_GRAPH_BYTES)} = {gb(mem.overhead_bytes)}"),
        (f"KV budget = {gpu.memory_gib} GiB x {s.gpu_memory_utilization} - weights - activations - overhead = "
        f"{gb(mem.usable_bytes)} - {gb(mem.weights_bytes)} - {gb(mem.activation_bytes)} - "
        f"{gb(mem.overhead_bytes)} = {gb(mem.kv_budget_bytes)}"),
    ]))
    out.append(("Parallelism", [
        (f"TP must divide {m.num_heads} heads{'' if m.mla else f' and fit {m.num_kv_heads} KV heads'}: "
        f"{', '.join(map(str, valid_tp_sizes(m, 128)))}"),
        (f"chosen: {lay.num_gpus} GPUs = {lay.replicas} replica(s) x TP{lay.tp} x PP{lay.pp}, EP{lay.ep}"
        f"{', DP-attention' if lay.dp_attention else ''}, {lay.nodes} node(s) of {lay.gpus_per_node}"),
    ]))
    pre, dec = perf.prefill, perf.decode
    rate = "FP8" if prec.weights == "fp8" and gpu.fp8_compute else "BF16"
    out.append(("Prefill (one prompt, one stage)", [
        f"FLOPs/GPU = 2 x N_active x S / TP + causal attention = {pre.flops / 1e12:,.1f} TFLOP (S = {w.input_len})",
        (f"compute = FLOPs / ({rate} {gpu.fp8_tflops if rate == 'FP8' else gpu.bf16_tflops} TFLOPS x "
        f"{s.eff.prefill_flops}) = {pre.compute_s * 1e3:.1f} ms; memory = {gb(pre.bytes)} / "
        f"({gpu.memory_bandwidth_tb_s} TB/s x {s.eff.memory_bandwidth}) = {pre.memory_s * 1e3:.1f} ms; "
        f"collectives {pre.comm_s * 1e3:.1f} ms"),
        *([(f"  routed experts' GEMMs at moe_flops {s.eff.moe_flops} and FP8 linears at fp8_flops {s.eff.fp8_flops} of "
            "that rate (the engine profile's)")] if (s.eff.moe_flops, s.eff.fp8_flops) != (1.0, 1.0) else []),
        f"prefill = PP x max(compute, memory) + comm = {perf.prefill_s * 1e3:.1f} ms",
    ]))
    micro = max(perf.concurrency / lay.replicas / lay.pp, 1)
    out.append(("Decode step (one micro-batch, one stage)", [
        f"batch B = {micro:.1f}, context = input + output/2 = {w.mean_context:,.0f}",
        (f"bytes/GPU = non-expert weights + experts x (1 - (1 - k/E)^B) + B x ctx x KV/token = {gb(dec.bytes)} "
        f"-> {dec.memory_s * 1e3:.2f} ms"),
        *([(f"INT4 linears: their packed bytes count / int4_read {s.eff.int4_read}, and with more than one token "
            f"(prefill too) at least int4_multirow {s.eff.int4_multirow} x their 16-bit bytes (dequantising kernels)")]
          if prec.int4 else []),
        f"FLOPs/GPU = 2 x N_active x B / TP + attention = {dec.flops / 1e12:.2f} TFLOP -> {dec.compute_s * 1e3:.2f} ms",
        (f"collectives: {'EP all-to-all' if lay.dp_attention else 'TP all-reduce'} 2(n-1)/n x B x hidden x 2 B per "
        f"layer over {'InfiniBand' if lay.tp_crosses_nodes else 'NVLink/PCIe'} = {dec.comm_s * 1e3:.2f} ms"),
        *([(f"fixed latency = layers x {s.eff.layer_overhead_s * 1e6:.0f} us + FP8 MoE layers x "
            f"{s.eff.fp8_moe_layer_overhead_s * 1e6:.0f} us = {dec.fixed_s * 1e3:.2f} ms (kernel chains; TP does not "
            "divide them)")] if dec.fixed_s else []),
        f"TPOT = (PP x step + overhead {s.eff.step_overhead_s * 1e3:.1f} ms) / (1 - rho) = {perf.tpot_s * 1e3:.1f} ms",
    ]))
    out.append(("Serving", [
        (f"rho = arrival rate x prefill time = {perf.prefill_utilization:.3f}; TTFT p99 = prefill + "
        f"rho/(2(1-rho)) x prefill x {P99_WAIT_FACTOR:.1f} = {perf.ttft_s * 1e3:.0f} ms"),
        (f"output tokens/s = request rate x output = {perf.request_rate:.2f} x {w.output_len} = "
        f"{perf.output_tokens_per_s:,.0f}"),
    ]))
    out.append(("Cost", [
        (f"$/h = {lay.num_gpus} x ${gpu.price_usd_per_hour:.2f} = ${c.usd_per_hour:.2f}; $/M output = $/h / "
        f"(tokens/s x 3600) x 1e6 = ${c.usd_per_million_output_tokens:.2f}"),
    ]))
    out.append(("Host (per node)", [
        (f"RAM = node weights {gb(h.node_weight_bytes)} x 1.25 + GPUs x 6 GiB + 16 GiB, rounded up = "
        f"{h.ram_bytes / 2**30:.0f} GiB"),
        f"disk = checkpoint {gb(h.checkpoint_bytes)} x 1.2 + 50 GB (+ the original if converting) = {size(h.disk_bytes)}",
        f"load = {gb(h.node_weight_bytes)} / {h.disk_read_bytes_per_s / 1e9:.1f} GB/s = {h.load_time_s:.0f} s",
    ]))
    out.append(("Rules of thumb vs this model", rule_checks(plan)))
    return out


def render_explain(plan: Plan, console: Console) -> None:
    render_plan(plan, console)
    for title, lines in explain_lines(plan):
        console.print(f"\n[bold]{title}[/bold]")
        for line in lines:
            console.print(f"  {line}", highlight=False, soft_wrap=True)


def _setup(plan: Plan) -> str:
    c = plan.chosen
    return f"{c.layout.num_gpus}x {c.gpu.display_name}\n{c.layout.describe()}"


def render_matrix(rows: list[MatrixRow], console: Console) -> None:
    w = MATRIX_WORKLOAD
    t = Table(title=f"Hardware selection matrix: {w['concurrency']} concurrent requests, {w['input_len']:,} in / "
                    f"{w['output_len']:,} out tokens, p99 TTFT <= {w['slo_ttft_ms']:.0f} ms, TPOT <= "
                    f"{w['slo_tpot_ms']:.0f} ms; host values per node", title_justify="left")
    for col in ("Band", "Weights, KV/token", "Cheapest setup", "$/M out", "On H100 SXM", "Host RAM", "Storage",
                "CPU cores", "Network"):
        t.add_column(col)
    for row in rows:
        d = row.cheapest.to_dict()
        mem, host, dep = d["memory"], d["host"], d["deployment"]
        h100 = _setup(row.datacenter) if row.datacenter else "no SLO-meeting setup"
        net = f"{host['internode_bytes_per_s'] / 1e9:.1f} GB/s" if dep["nodes"] > 1 else "-"
        t.add_row(f"{row.band}\n{row.preset}", f"{gb(mem['weights_bytes'])} {d['precision']['weights']}\n"
                  f"{mem['kv_bytes_per_token'] / 1024:,.0f} KiB/token", _setup(row.cheapest),
                  f"${d['cost']['usd_per_million_output_tokens']:.2f}", h100,
                  f"{host['ram_bytes'] / 2**30:,.0f} GiB", size(host["disk_bytes"]), str(host["cpu_cores"]), net)
    console.print(t)
