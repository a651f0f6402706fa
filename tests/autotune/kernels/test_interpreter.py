import os

import pytest

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from graphopt.autotune.kernels._launch import is_compiled  # noqa: E402
from graphopt.autotune.kernels.attention import attention_kernel  # noqa: E402
from graphopt.autotune.kernels.dynamic_dwconv import dynamic_dwconv_kernel  # noqa: E402
from graphopt.autotune.kernels.groupnorm import groupnorm_apply_kernel, groupnorm_stats_kernel  # noqa: E402
from graphopt.autotune.kernels.layernorm import layernorm_kernel  # noqa: E402
from graphopt.autotune.kernels.linear_attention import (linear_attention_apply_kernel,  # noqa: E402
                                                        linear_attention_state_kernel)
from graphopt.autotune.kernels.rmsnorm import rmsnorm_kernel  # noqa: E402

KERNELS = [attention_kernel, dynamic_dwconv_kernel, groupnorm_apply_kernel, groupnorm_stats_kernel, layernorm_kernel,
           linear_attention_apply_kernel, linear_attention_state_kernel, rmsnorm_kernel]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="kernels are compiled (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__)
def test_conftest_makes_every_kernel_interpreted(kernel):
    # triton.jit decides at decoration time; a compiled kernel here would mean the conftest ran too late
    assert isinstance(kernel, InterpretedFunction) and not is_compiled(kernel)
