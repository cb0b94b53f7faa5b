"""A tiny DeepSeek-V3 checkpoint with an MTP layer, in R1's layout, and a reference MTP written from the paper.

The checkpoint is a 4-layer transformers model whose layer 3 becomes the MTP layer's decoder block: config.json
says num_hidden_layers 3 and num_nextn_predict_layers 1, layer 3's routed experts are stored expert by expert
(R1's names, as transformers saves them), and enorm / hnorm / eh_proj / shared_head.norm plus the copies of embed_tokens and
shared_head.head are added. The reference runs the 3-layer main model and that decoder block in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from deepseek_support import TINY_V3, randomize_, read_checkpoint
from safetensors.torch import save_file

MTP = 3  # the MTP layer's index (num_hidden_layers)


def write_mtp_checkpoint(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Save the checkpoint (fp32) into path; returns its tensors."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**{**TINY_V3, "num_hidden_layers": MTP + 1},
                                                attn_implementation="eager")).float().eval()
    randomize_(hf, seed)
    hf.save_pretrained(path)
    tensors = dict(read_checkpoint(path))  # transformers saves routed experts one by one, as R1 stores them
    generator = torch.Generator().manual_seed(seed + 1)
    hidden = TINY_V3["hidden_size"]
    for name in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"model.layers.{MTP}.{name}.weight"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
    tensors[f"model.layers.{MTP}.eh_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=generator) / (
        2 * hidden) ** 0.5
    tensors[f"model.layers.{MTP}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[f"model.layers.{MTP}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    (path / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config.update(num_hidden_layers=MTP, num_nextn_predict_layers=1)
    (path / "config.json").write_text(json.dumps(config))
    return tensors


class ReferenceMTP:
    """DeepSeek-V3's MTP module, eq. (21)-(23) of the technical report, over transformers' modules:
    h'_i = M [RMSNorm(Emb(t_{i+1})) ; RMSNorm(h_i)], o = RMSNorm(TRM(h'_{0..i})), P_{i+2} = OutHead(o_i), with
    h_i the main model's final (normed) hidden state. Recomputes everything from position 0, no cache."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

        self.main = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # skips layer 3
        block_model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**TINY_V3, "num_hidden_layers": MTP + 1},
                                                             attn_implementation="eager")).float().eval()
        block_state = {k[len(f"model.layers.{MTP}."):]: v for k, v in tensors.items()
                       if k.startswith(f"model.layers.{MTP}.") and "mlp.experts." not in k}
        block = block_model.model.layers[MTP]
        prefix = f"model.layers.{MTP}.mlp.experts."
        n = TINY_V3["n_routed_experts"]
        block_state["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat((tensors[f"{prefix}{e}.gate_proj.weight"], tensors[f"{prefix}{e}.up_proj.weight"])) for e in range(n)])
        block_state["mlp.experts.down_proj"] = torch.stack([tensors[f"{prefix}{e}.down_proj.weight"] for e in range(n)])
        block.load_state_dict(block_state, strict=False)
        self.block = block
        self.rotary = block_model.model.rotary_emb
        w = {k[len(f"model.layers.{MTP}."):]: v for k, v in tensors.items() if k.startswith(f"model.layers.{MTP}.")}
        self.w = w
        self.eps = TINY_V3.get("rms_norm_eps", 1e-6)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    @torch.no_grad()
    def main_hidden(self, token_ids: list[int]) -> torch.Tensor:  # [L, hidden], after the final norm
        return self.main.model(torch.tensor([token_ids])).last_hidden_state[0]

    @torch.no_grad()
    def logits(self, token_ids: list[int], hidden: torch.Tensor) -> torch.Tensor:
        """MTP logits [L - 1, vocab] at positions 0..L-2 of token_ids (position i reads t_{i+1} and hidden[i])."""
        return self.head(self.outputs(token_ids, hidden))

    def head(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs @ self.w["shared_head.head.weight"].T

    @torch.no_grad()
    def outputs(self, token_ids: list[int], hidden: torch.Tensor) -> torch.Tensor:
        """The MTP layer's output hidden states o [L - 1, hidden] (after shared_head.norm) at positions 0..L-2."""
        w = self.w
        embeds = w["embed_tokens.weight"][torch.tensor(token_ids[1:])]
        x = torch.cat((self._rms(embeds, w["enorm.weight"]), self._rms(hidden[: len(token_ids) - 1], w["hnorm.weight"])),
                      dim=-1) @ w["eh_proj.weight"].T
        length = x.shape[0]
        positions = torch.arange(length)[None]
        mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
        y = self.block(x[None], attention_mask=mask, position_ids=positions,
                       position_embeddings=self.rotary(x[None], positions))
        y = y[0] if isinstance(y, tuple) else y
        return self._rms(y[0], w["shared_head.norm.weight"])
