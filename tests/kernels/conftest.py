"""Kernel tests: on a CUDA machine they run compiled; without one, through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET and patches the interpreter's known bugs)."""

import triton  # noqa: F401  (a test dependency: a missing triton must fail the suite here, not skip it)
