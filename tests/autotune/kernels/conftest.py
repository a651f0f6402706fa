"""The kernel tests run on CPU tensors under Triton's interpreter (the default here), and on the GPU
when the kernels compile (``TRITON_INTERPRET=0`` on a machine with CUDA): there every test's tensors
are created on the GPU, so the same parity checks run the compiled kernels, bf16 ``tl.dot`` included."""

import pytest
import torch

from tests.autotune.kernels.helpers import ON_GPU


@pytest.fixture(autouse=True)
def _kernel_device():
    if not ON_GPU:
        yield
        return
    previous = torch.get_default_device()
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(previous)
