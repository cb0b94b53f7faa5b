"""Which quantisation method each linear gets, passed explicitly to the layers that build linears (instead of
building_fp8's module-registration hook), so FP8 and AWQ reach tensor-parallel linears too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from r1deploy.quant.fp8_linear import BF16_LINEARS, Fp8LinearMethod

if TYPE_CHECKING:
    from r1deploy.quant.awq import AWQConfig

# A linear's checkpoint name (model.layers.3.mlp.gate_up_proj) -> its Linear quant_method, None: unquantised.
LinearMethodFor = Callable[[str], Any]


def no_quant(prefix: str) -> None:
    return None


@dataclass(frozen=True)
class LinearQuant:
    """awq: the checkpoint's AWQ config (modules_to_not_convert stay unquantised); fp8_block: hold block-scaled
    FP8 weights with these tiles (the loader's choice: quant/fp8_linear), except BF16_LINEARS."""

    awq: AWQConfig | None = None
    fp8_block: tuple[int, int] | None = None

    def __call__(self, prefix: str) -> Any:
        if self.awq is not None:
            return self.awq.linear_method(prefix)
        if self.fp8_block is not None and prefix.rsplit(".", 1)[-1] not in BF16_LINEARS:
            return Fp8LinearMethod(self.fp8_block)
        return None
