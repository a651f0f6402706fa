"""Shared by the kernel tests: the dtypes the kernels take and their tolerances."""

import os

import pytest
import torch

ON_GPU = os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()
"""Kernels compile and run on the GPU (else: the interpreter, on CPU tensors; see conftest.py)."""

TOLERANCE = {  # fp32 differs from the reference by summation order only; halves by their output rounding
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}

HALF_DTYPES = (torch.float16, torch.bfloat16)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCE[expected.dtype])

# The interpreter stores bf16 as uint16 and computes tl.dot (and other arithmetic not preceded by a cast
# to fp32) on the bit patterns (triton-lang/triton#11584; "It does not support operations on bfloat16",
# Triton's debugging guide), so kernels built on tl.dot are checked in bf16 on a GPU only.
INTERPRETER_BF16_DOT = pytest.mark.skipif(not ON_GPU, reason="Triton's interpreter multiplies bf16 bit patterns "
                                                             "in tl.dot (triton-lang/triton#11584); runs on a GPU")
DOT_HALF_DTYPES = (torch.float16, pytest.param(torch.bfloat16, marks=INTERPRETER_BF16_DOT))
