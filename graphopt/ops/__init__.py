"""graphopt's own torch operators: what approximate passes substitute into graphs.

Each op is one module: a ``torch.library.custom_op`` whose default implementation is the plain-torch
reference (so it runs anywhere, on any device), a fake implementation for ``torch.export``, and a CUDA
implementation that runs the op's Triton kernel from :mod:`graphopt.autotune.kernels`. Importing this
package registers them as ``torch.ops.graphopt.<name>``; lowering (``optimize(..., target="cuda")``)
turns each call into a tuned kernel call site.

Each op also has an ONNX translation next to its reference (``<name>_onnx``): the reference's math in
standard ONNX ops, which :func:`graphopt.export_onnx` hands to torch.onnx, so graphs holding these ops
export and run in any onnxruntime.
"""

from .block_causal_attention import (block_causal_attention, block_causal_attention_onnx,
                                     block_causal_attention_reference, block_causal_mask)
from .dynamic_dwconv import dynamic_dwconv, dynamic_dwconv_onnx, dynamic_dwconv_reference
from .linear_attention import linear_attention, linear_attention_onnx, linear_attention_reference

__all__ = ["block_causal_attention", "block_causal_attention_onnx", "block_causal_attention_reference",
           "block_causal_mask", "dynamic_dwconv", "dynamic_dwconv_onnx", "dynamic_dwconv_reference",
           "linear_attention", "linear_attention_onnx", "linear_attention_reference"]
