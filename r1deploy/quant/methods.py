"""Which quantisation method each linear gets, passed explicitly from the loader through the model to the layers
that build linears, so FP8 and AWQ / GPTQ reach tensor-parallel linears as they reach plain ones."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from r1deploy.quant.fp8_linear import Fp8LinearMethod

if TYPE_CHECKING:
    from r1deploy.quant.awq import AWQConfig
    from r1deploy.quant.gptq import GPTQConfig

# A linear's checkpoint name (model.layers.3.mlp.gate_up_proj) -> its Linear quant_method, None: unquantised.
LinearMethodFor = Callable[[str], Any]


@dataclass(frozen=True)
class LinearQuant:
    """int4: the checkpoint's AWQ or GPTQ config (its linear_method(prefix) leaves modules_to_not_convert
    unquantised); fp8_block: hold block-scaled FP8 weights with these tiles (the loader's choice,
    models/loader._fp8_block), None: FP8 checkpoints are dequantised at load. A layer that must stay in the
    model dtype whatever the checkpoint (MLA's kv_b_proj) passes no method instead of asking."""

    int4: AWQConfig | GPTQConfig | None = None
    fp8_block: tuple[int, int] | None = None

    def __call__(self, prefix: str) -> Any:
        if self.int4 is not None:
            return self.int4.linear_method(prefix)
        if self.fp8_block is not None:
            return Fp8LinearMethod(self.fp8_block)
        return None


NO_QUANT = LinearQuant()  # every linear unquantised
