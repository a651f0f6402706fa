"""Small operations on captured FX graphs that several layers share.

Captured graphs are ``torch.export`` graph modules: their forward flattens its arguments with a
pytree spec, and an unused ``_guards_fn`` call checks the input shapes. Copies made here share the
parameters and buffers of the original (a graph variant costs no weight memory) and keep both.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterable

import torch
import torch.utils._pytree as pytree
from torch import fx


def copy_sharing_weights(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copy of ``gm``'s graph over the same parameters and buffers."""
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    with warnings.catch_warnings():  # torch's own pytree specs warn about their deprecated LeafSpec when copied
        warnings.simplefilter("ignore", FutureWarning)
        graph._codegen = copy.deepcopy(gm.graph._codegen)
    value, output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    node = graph.output(value)
    node.meta = dict(output.meta)
    return fx.GraphModule(gm, graph)


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def add_input(gm: fx.GraphModule, name: str, example: torch.Tensor) -> fx.Node:
    """Append a flat tensor input called ``name`` (after the existing ones) and return its node.

    The node carries ``val`` (a tensor of ``example``'s shape and dtype) like every captured node;
    the graph's flattening spec is extended so ``gm(*old_inputs, new_input)`` binds. Call
    ``gm.recompile()`` afterwards.
    """
    inputs = placeholders(gm)
    if any(n.name == name or n.target == name for n in inputs):
        raise ValueError(f"the graph already has an input called {name!r}")
    with gm.graph.inserting_after(inputs[-1]):
        node = gm.graph.placeholder(name)
    node.meta["val"] = example.detach().clone()
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None:
        count = len(inputs) + 1
        _, spec = pytree.tree_flatten((tuple(range(count)), {}))
        codegen.pytree_info = info._replace(orig_args=[*info.orig_args, name], in_spec=spec)
    return node


def drop_guards(gm: fx.GraphModule) -> None:
    """Remove the export guard call (a call_module nothing reads), so the graph can be traced again."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


def move_to(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """``gm``, captured on another device, moved to ``device`` in place: its parameters and buffers, and
    every device its ops name. An exported graph spells out the device of each tensor it creates
    (``arange``, ``full``) and asserts the device of each ``.to()`` result (``_assert_tensor_metadata``),
    so moving the weights alone leaves ops that make tensors on, or insist on, the capture's device."""
    gm.to(device)

    def retarget(value: object) -> object:
        return device if isinstance(value, torch.device) and value != device else value

    for node in gm.graph.nodes:
        node.args = fx.node.map_aggregate(node.args, retarget)
        node.kwargs = fx.node.map_aggregate(node.kwargs, retarget)
    gm.recompile()
    return gm



def refresh_values(gm: fx.GraphModule, nodes: Iterable[fx.Node] | None = None) -> None:
    """Recompute node values (shape, strides, dtype, device) from their inputs' fake values, in place:
    every node's, or only those of ``nodes`` (in graph order, each from its inputs' values as they are).

    A rewrite that changes what a node's inputs are leaves the values of the nodes downstream as they
    were: a column slice of a merged matmul keeps the strides of the matmul it replaced, and so does
    every view of it. Whatever reads strides from the values (the kernel generator's index math)
    then describes a layout the tensors do not have. The placeholders keep their values (their
    symbolic batch included); parameters and buffers are read as fake tensors of their own layout.

    The ops run with the shape environment's guards suppressed: a fake kernel that asks about a
    symbolic size (nearest upsampling's does, about the batch) is answered from the example's sizes,
    as the capture was, instead of recording a guard. Recorded, such a guard pins the batch to the
    example's size in the environment every value of the graph shares, so the graph's sizes would
    read as constants from then on (every UNet with nearest upsampling did).
    """
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    inputs = [n.meta.get("val") for n in placeholders(gm)]
    mode = detect_fake_mode([v for v in inputs if isinstance(v, torch.Tensor)])
    if mode is None or any(not isinstance(v, (torch.Tensor, int, float, bool, torch.SymInt)) for v in inputs):
        return  # a graph without fake values (built by hand): nothing recorded to keep true
    quiet = mode.shape_env.suppress_guards() if mode.shape_env is not None else contextlib.nullcontext()
    if nodes is not None:
        chosen = set(nodes)
        with quiet:
            for node in gm.graph.nodes:
                if node in chosen and node.op == "call_function":
                    args, kwargs = pytree.tree_map_only(fx.Node, lambda n: n.meta["val"], (node.args, node.kwargs))
                    with mode:
                        node.meta["val"] = node.target(*args, **kwargs)
        return

    class _Propagation(FakeTensorProp):
        def get_attr(self, target, args, kwargs):  # type: ignore[no-untyped-def]
            value = super().get_attr(target, args, kwargs)
            return mode.from_tensor(value, static_shapes=True) if isinstance(value, torch.Tensor) else value

    with quiet:
        _Propagation(gm, mode).propagate_dont_convert_inputs(*inputs)
