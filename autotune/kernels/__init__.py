"""Hand-written Triton kernels, one op per module (installed as ``graphopt.autotune.kernels``).

Each module holds the ``@triton.jit`` kernel(s), a launcher named after the op that checks its inputs,
allocates the output and launches with one of the module's ``configs()`` (the first unless a config is
given; :func:`graphopt.autotune.choose` picks a tuned one), and the plain-torch ``*_reference`` it is
tested against. Importing this package needs Triton. ``triton.jit`` decides when a module is imported
whether its kernels are compiled for CUDA tensors or interpreted on CPU tensors: set
``TRITON_INTERPRET=1`` before the first import to run them on a CPU (slowly, for tests).

The launchers share their modules' names, so ``graphopt.autotune.kernels.layernorm`` is the function;
reach a module's ``configs()`` and kernels with ``from graphopt.autotune.kernels.layernorm import configs``.
"""

from .attention import attention, attention_reference, block_causal_mask
from .dynamic_dwconv import dynamic_dwconv, dynamic_dwconv_reference
from .groupnorm import groupnorm, groupnorm_reference
from .layernorm import layernorm, layernorm_reference
from .linear_attention import linear_attention, linear_attention_reference
from .rmsnorm import rmsnorm, rmsnorm_reference

__all__ = [
    "attention", "attention_reference", "block_causal_mask", "dynamic_dwconv", "dynamic_dwconv_reference",
    "groupnorm", "groupnorm_reference", "layernorm", "layernorm_reference", "linear_attention",
    "linear_attention_reference", "rmsnorm", "rmsnorm_reference",
]
