"""Suite-wide setup. Without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be set
before anything imports triton (torch may do so while the other tests run), so it is set here, first, and
the interpreter's known bugs are patched once for every test folder."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter() -> None:
    """Four Triton 3.6 interpreter bugs that the compiled kernels don't have (seen here, numpy 2.4):

    1. A loaded scalar (a 1-element numpy array) used as a loop bound goes through int(array), which
       numpy >= 2.4 refuses for ndim > 0 ("only 0-dimensional arrays can be converted to Python
       scalars"). The attention kernels loop up to a loaded seq_len, so reshape to 0-d first.
    2. tl.dot on bfloat16 operands multiplies their raw uint16 storage (numpy has no bfloat16),
       giving errors of ~1e10; widen bf16 operands to fp32 bit-exactly before the matmul.
    3. A float32 -> bfloat16 cast truncates (no rounding mode is passed), where the GPU rounds to
       nearest even; the kernels that mirror PyTorch's bf16 rounding would be off by an ulp.
    4. A float32 -> float8e4nv cast adds 1 to the truncated mantissa without carrying into the exponent
       (126.8 -> 64, -31.2 -> -16); the GPU (cvt.rn.satfinite) and torch round to nearest even.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor: type, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    interpreter._patch_lang_tensor = patched

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(h: interpreter.TensorHandle) -> interpreter.TensorHandle:
        if h.dtype.scalar != tl.bfloat16:
            return h
        bits = h.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def dot(self: object, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = dot

    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def cast(self: object, src: interpreter.TensorHandle, dst_type: tl.dtype) -> interpreter.TensorHandle:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = src.data.astype(np.float32).view(np.uint32)
            nearest_even = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16  # finite inputs
            return interpreter.TensorHandle(nearest_even.astype(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast

    fp_to_fp_impl = interpreter.InterpreterBuilder.create_fp_to_fp

    def fp_to_fp(self: object, src: interpreter.TensorHandle, dst_type: tl.dtype, rounding_mode: object):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = values.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            return interpreter.TensorHandle(bits, tl.float8e4nv)
        return fp_to_fp_impl(self, src, dst_type, rounding_mode)

    interpreter.InterpreterBuilder.create_fp_to_fp = fp_to_fp


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter()
