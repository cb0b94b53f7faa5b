"""Quantised checkpoints under tensor parallelism on the CPU (gloo, 2 ranks): a tiny Llama in AWQ and in GPTQ
(act-order included), a tiny DeepSeek-V3 with block-scaled FP8 weights kept in FP8 and one in AWQ give the same
logits split over two ranks as whole (TP = 1), through a batched prefill and decode steps; each rank really holds
quantised shards. One spawn runs every case, to keep the suite's process starts down."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parents[1] / "quant"))
sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from awq_helpers import awq_checkpoint_tensors
from deepseek_support import FP8_TILE, TINY_V3, PagedDriver, randomize_, read_checkpoint, write_fp8_checkpoint
from gptq_helpers import gptq_checkpoint_tensors
from test_awq_deepseek import write_awq_checkpoint

from r1deploy.distributed.group import free_port, init_group, leave_group
from r1deploy.models.loader import load_model
from r1deploy.quant.fp8_block import FP8_DTYPE

SIZE = 2
GROUP = 16  # AWQ / GPTQ group: every rank's input rows (o_proj 32, down_proj 64) hold whole groups
LLAMA = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "bos_token_id": 1,
         "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32"}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROW_PARALLEL = ("o_proj", "down_proj")  # input rows split over the ranks
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}  # one act-order per input
PROMPTS = [list(range(3, 40, 3)), [7] * 5, list(range(100, 109))]


def _llama(path: Path, fmt: str) -> Path:
    """A tiny Llama with every decoder linear in `fmt` ("awq" or "gptq" with act-order): path/fmt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**LLAMA)).float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if name.endswith("norm.weight") else 0.1 * torch.randn_like(param))
    hf.save_pretrained(path / "fp32")
    gen = torch.Generator().manual_seed(1)
    orders: dict[str, torch.Tensor] = {}
    tensors = {}
    for name, tensor in load_file(str(path / "fp32" / "model.safetensors")).items():
        module = name.removesuffix(".weight").rpartition(".")[2]
        if not (name.endswith(".weight") and module in LINEARS):
            tensors[name] = tensor
            continue
        if fmt == "awq":
            parts = awq_checkpoint_tensors(tensor, GROUP)
        else:  # act-order: a row-parallel layer's groups stay inside one rank's rows, a column layer's anywhere
            width, halves = tensor.shape[1], SIZE if module in ROW_PARALLEL else 1
            key = name.replace(module, SHARED_INPUT.get(module, module))
            order = orders.setdefault(key, torch.cat([h * (width // halves) + torch.randperm(width // halves, generator=gen)
                                                      for h in range(halves)]))
            parts = gptq_checkpoint_tensors(tensor, GROUP, order)
        tensors.update({f"{name.removesuffix('.weight')}.{k}": v for k, v in parts.items()})
    out = path / f"llama-{fmt}"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "fp32" / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
        if fmt == "awq" else
        {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": True, "sym": False,
         "checkpoint_format": "gptq"})
    (out / "config.json").write_text(json.dumps(config))
    return out


def _deepseek(path: Path, fmt: str) -> Path:
    """TINY_V3 with its linears (and routed experts) in block-scaled FP8 (16 x 16 tiles) or AWQ: path/deepseek-fmt."""
    from transformers import DeepseekV3Config
    from transformers import DeepseekV3ForCausalLM as HFDeepseekV3

    hf = HFDeepseekV3(DeepseekV3Config(**TINY_V3, attn_implementation="eager")).float().eval()
    randomize_(hf, seed=40)
    hf_dir, out = path / f"deepseek-{fmt}-hf", path / f"deepseek-{fmt}"
    hf.save_pretrained(hf_dir)
    out.mkdir()
    if fmt == "fp8":
        config = json.loads((hf_dir / "config.json").read_text())
        write_fp8_checkpoint(dict(read_checkpoint(hf_dir)), config, out, FP8_TILE)
    else:
        (path / "awq-twin").mkdir()
        write_awq_checkpoint(hf_dir, out, path / "awq-twin")
    return out


def _logits(model: torch.nn.Module) -> list[torch.Tensor]:
    """Log-probs of a batched prefill and two decode steps (every rank runs the same steps, as TP workers do)."""
    driver = PagedDriver(model)
    seqs = [list(p) for p in PROMPTS]
    tables: list[list[int]] = [[] for _ in seqs]
    out = [driver.step(seqs, [0] * len(seqs), tables)]
    for step in range(2):
        new = [[(11 * step + 5 * i) % 250 + 3] for i in range(len(seqs))]
        out.append(driver.step(new, [len(s) for s in seqs], tables))
        seqs = [s + n for s, n in zip(seqs, new, strict=True)]
    return [torch.log_softmax(logits.float(), dim=-1) for logits in out]


def _check_shards(name: str, model: torch.nn.Module) -> None:
    """The TP build holds quantised shards (half the rows / columns), not a dequantised copy."""
    layer = model.model.layers[1 if name.startswith("deepseek") else 0]
    if name.startswith("llama"):
        down = layer.mlp.down_proj
        assert down.weight_packed.dtype == torch.int32 and down.weight_packed.shape == (64, 64 // 8)  # in 128 / 2
        assert (getattr(layer.self_attn.o_proj, "input_perm", None) is not None) == (name == "llama-gptq")
    elif name == "deepseek-fp8":
        attn = layer.self_attn
        assert attn.q_b_proj.weight.dtype == FP8_DTYPE and attn.q_b_proj.weight.shape == (2 * 24, 32)
        assert attn.o_proj.weight.dtype == FP8_DTYPE and attn.o_proj.weight_scale_inv.shape == (4, 2)  # 64 x 32
        assert layer.mlp.shared_experts.down_proj.weight.dtype == FP8_DTYPE
        assert layer.mlp.experts.gate_up_proj.dtype == FP8_DTYPE and layer.mlp.experts.num_local == 4
    else:
        attn = layer.self_attn
        assert attn.o_proj.weight_packed.shape == (64, 32 // 8) and attn.q_b_proj.weight_packed.shape == (48, 4)
        assert layer.mlp.experts.gate_up_proj_packed.shape[0] == 4


def _rank(rank: int, port: int, cases: dict[str, tuple[str, str]]) -> None:
    tp = init_group(rank, SIZE, "127.0.0.1", port, 120.0, "cpu")
    try:
        for name, (path, quantization) in cases.items():
            whole = load_model(path, dtype="float32", quantization=quantization).model
            split = load_model(path, dtype="float32", quantization=quantization, tp=tp).model
            _check_shards(name, split)
            for got, want in zip(_logits(split), _logits(whole), strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        leave_group()


def test_quantised_models_at_tp2_equal_tp1(tmp_path: Path) -> None:
    cases = {"llama-awq": (str(_llama(tmp_path, "awq")), "auto"),
             "llama-gptq": (str(_llama(tmp_path, "gptq")), "auto"),
             "deepseek-fp8": (str(_deepseek(tmp_path, "fp8")), "fp8"),  # kept in FP8 on the CPU too
             "deepseek-awq": (str(_deepseek(tmp_path, "awq")), "auto")}
    mp.spawn(_rank, args=(free_port("127.0.0.1"), cases), nprocs=SIZE)

