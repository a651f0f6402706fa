"""dce: dead-code elimination, then drop the parameters and buffers nothing reads any more.

Where it belongs: last among the exact passes, after every pass that leaves values unused (no-op
removal bypasses nodes, folding replaces whole parameter subgraphs by one constant). Exact: only
nodes whose values reach no output and that have no side effect (asserts stay) are removed.
"""

from __future__ import annotations

from torch import fx

from graphopt.pipeline import Pass, PassContext


def _dce(gm: fx.GraphModule, ctx: PassContext) -> None:
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    ctx.hit("dead-node", before - len(gm.graph.nodes))

    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = 0
    for kind, named in (("parameter", gm.named_parameters), ("buffer", gm.named_buffers)):
        for name, _ in list(named(remove_duplicate=False)):
            if name in used:
                continue
            owner_path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            if attr in getattr(owner, "_parameters", {}) or attr in getattr(owner, "_buffers", {}):
                delattr(owner, attr)
                dropped += 1
    gm.delete_all_unused_submodules()
    if dropped:
        ctx.hit("dead-tensor", dropped)
        ctx.note(f"dropped {dropped} unused parameter/buffer tensors")


DCE = Pass("dce", exact=True, transform=_dce, doc=__doc__ or "")
