"""GEMM epilogue fusion: a linear layer and the pointwise ops that consume it, as one call site.

Where it belongs: in lowering (:func:`.lower.lower`), between partitioning and the call sites. A
pointwise region (:mod:`.regions`) that reads a linear layer's output, where nothing else reads that
output, absorbs the linear: fc1 + GELU of a transformer MLP, a projection + the adaLN gate + the
residual add when no norm follows. The call site (:class:`GemmRegion`) has three kinds of candidate:

- cuBLAS + the epilogue kernel: ``aten.linear`` (cuBLAS on a GPU) writes the product, then the
  region's generated pointwise kernel reads it (what lowering did before this fusion existed). These
  configs are the pointwise family's (``XBLOCK``), the first is the untuned default when the epilogue
  has two ops or more, so an untuned model runs as it would without the fusion;
- the Triton matmul template (``BLOCK_M/N/K``): one kernel computes tiles of ``x @ w.T`` in fp32
  (``tl.dot``, IEEE fp32 for fp32 inputs as cuBLAS does by default) and applies the bias and the whole
  epilogue to each tile before storing it, so the product never goes through memory;
- :data:`~.configs.ATEN`: every op eager; the untuned default when the epilogue is one op (fc1 +
  GELU), as for a lone pointwise op (:attr:`.sites.FusedRegion.fuses_nothing`).

Tuning times all of them on the site's real inputs; the template is used only where it measurably
wins. The template's epilogue is the pointwise generator's own code (:mod:`.codegen`): its loads and
stores index the region's domain (the linear's output shape) with one flat index, here the 2-D tile
``row * N + col``, so broadcast operands (a per-sample gate of shape (B, 1, N), the bias) read the
same way as in the pointwise kernel.

A linear is absorbed only when its input can be read as a matrix (leading dimensions mergeable into
one row index), its weight is 2-D with static sizes, and the region's domain is its output shape.
Under ``TRITON_INTERPRET=1`` bf16 regions are not fused (the interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import sympy
import torch
from torch import fx

from .cache import Config
from .codegen import GeneratedKernel, _Body, generate, merged_dims, offset, operands, pyexpr
from .configs import ATEN, aten_first, is_aten, pointwise_configs, prune_blocks
from .launches import AtenCall, KernelCall, LaunchPlan, Ref
from .regions import Region, _same, node_arg, shape_of, strides_of
from .sites import (ChoiceEpoch, FusedRegion, KernelLibrary, SitePlan, TuningOptions, _binders, _Decline, _Tuned,
                    hash_source, region_graph, triton_cdiv)

aten = torch.ops.aten

TEMPLATE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")


def template_configs() -> list[dict[str, int]]:
    """Tiles of the matmul template: rows x columns of output, the K step, and the grouped launch order
    (``GROUP_M`` row tiles per column sweep, for L2 reuse of the weight). Small-M tiles first for
    batch-1 calls; :func:`prune_template` orders them for the shape."""
    return [
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 3},
    ]


def is_template(config: Config | dict[str, int]) -> bool:
    return "BLOCK_M" in config


def prune_template(configs: Sequence[Config], shape: tuple[int, ...]) -> list[Config]:
    """Template tiles that fit the (M, N, K) problem (no tile more than twice the work along a side)."""
    m, n, k = shape

    def fits(c: Config) -> bool:
        return c["BLOCK_M"] <= max(16, 2 * m) and c["BLOCK_N"] <= max(16, 2 * n) and c["BLOCK_K"] <= max(16, 2 * k)

    tiles = [c for c in configs if is_template(c)]
    return [c for c in tiles if fits(c)] or [min(tiles, key=lambda c: c["BLOCK_M"] * c["BLOCK_N"])]


# ------------------------------------------------------------------------------------------ matching


def absorbed_linear(region: Region) -> fx.Node | None:
    """The linear layer ``region`` (a pointwise region) can absorb, or None (see the module docstring)."""
    if region.kind != "pointwise":
        return None
    members = set(region.nodes)
    for node in region.inputs:
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        if not node.users or any(u not in members for u in node.users):
            continue
        x, w, b = node.args[0], node.args[1], node_arg(node, 2, "bias")
        if not all(isinstance(t, fx.Node) and isinstance(t.meta.get("val"), torch.Tensor) for t in (x, w)):
            continue
        if b is not None and not (isinstance(b, fx.Node) and b.meta["val"].dim() == 1):
            continue
        dtype = node.meta["val"].dtype
        if any(t.meta["val"].dtype != dtype for t in (x, w) + ((b,) if b is not None else ())):
            continue
        if w.meta["val"].dim() != 2 or any(s.free_symbols for s in shape_of(w)) or x.meta["val"].dim() < 2:
            continue
        if any(s.free_symbols for s in shape_of(x)[-1:]) or not _rows_mergeable(x):
            continue
        if not _same(shape_of(node), region.domain):
            continue
        return node
    return None


def _row_stride_gaps(shape: Sequence, strides: Sequence) -> list:
    """For each pair of adjacent leading (non-1) dimensions, ``stride_i - stride_j * size_j``: all zero
    when the leading dimensions index as one row (a matrix of rows x K with one row stride). Sizes and
    strides may be ints (a tensor) or sympy expressions (a captured node)."""
    lead = [(s, t) for s, t in zip(shape[:-1], strides[:-1]) if s != 1]
    return [lead[i][1] - lead[i + 1][1] * lead[i + 1][0] for i in range(len(lead) - 1)]


def _rows_mergeable(x: fx.Node) -> bool:
    return all(sympy.simplify(gap) == 0 for gap in _row_stride_gaps(shape_of(x), strides_of(x)))


def gemm_region(linear: fx.Node, epilogue: Region) -> Region:
    """The linear and its epilogue as one region (kind ``gemm``): inputs are the linear's, then the
    epilogue's other inputs; outputs are the epilogue's."""
    bias = node_arg(linear, 2, "bias")
    own = [linear.args[0], linear.args[1]] + ([bias] if isinstance(bias, fx.Node) else [])
    inputs = tuple(dict.fromkeys(own + [n for n in epilogue.inputs if n is not linear]))
    return Region("gemm", (linear, *epilogue.nodes), epilogue.domain, inputs, epilogue.outputs)


# ------------------------------------------------------------------------------------------- codegen


def generate_template(linear: fx.Node, epilogue: Region) -> GeneratedKernel:
    """The Triton matmul template with ``epilogue`` applied to each output tile.

    Arguments: ``x_ptr, w_ptr[, b_ptr]``, the epilogue's other inputs ``in<i>_ptr``, its outputs
    ``out<j>_ptr``, then ``M`` (rows of x), x's and w's strides, the index math's size symbols and the
    tile constexprs.
    """
    ins, outs = operands(epilogue)
    domain = epilogue.domain  # row-major: the flat index of (row, col) is row * N + col
    x = sympy.Symbol("xindex", integer=True, nonnegative=True)
    offsets = [offset(op, domain, merged_dims(domain, [op]), x) for op in ins + outs]
    symbols = tuple(sorted({s for e in offsets for s in e.free_symbols if s != x}, key=str))
    skip = [op.node for op in ins].index(linear)
    body = _Body(epilogue, ins, outs, [pyexpr(e) for e in offsets])
    n_out, k_in = (int(d) for d in shape_of(linear.args[1]))
    has_bias = isinstance(node_arg(linear, 2, "bias"), fx.Node)
    pointers = ["x_ptr", "w_ptr"] + (["b_ptr"] if has_bias else [])
    pointers += [f"in{i}_ptr" for i in range(len(ins)) if i != skip] + [f"out{j}_ptr" for j in range(len(outs))]
    params = pointers + ["M", "stride_xm", "stride_xk", "stride_wn", "stride_wk", *map(str, symbols),
                         *(f"{k}: tl.constexpr" for k in TEMPLATE_KEYS)]
    lines = [
        "pid = tl.program_id(0)",
        "num_pid_m = tl.cdiv(M, BLOCK_M)",
        f"num_pid_n = tl.cdiv({n_out}, BLOCK_N)",
        "group = GROUP_M * num_pid_n",
        "first_m = (pid // group) * GROUP_M",
        "size_m = tl.minimum(num_pid_m - first_m, GROUP_M)",
        "pid_m = first_m + (pid % group) % size_m",
        "pid_n = (pid % group) // size_m",
        "rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)",
        "cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)",
        "ks = tl.arange(0, BLOCK_K)",
        "row_ok = rows < M",
        f"col_ok = cols < {n_out}",
        "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        f"for k0 in range(0, {k_in}, BLOCK_K):",
        "    kk = k0 + ks",
        f"    k_ok = kk < {k_in}",
        "    a = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,",
        "                mask=row_ok[:, None] & k_ok[None, :], other=0.0)",
        "    b = tl.load(w_ptr + cols[None, :] * stride_wn + kk[:, None] * stride_wk,",
        "                mask=col_ok[None, :] & k_ok[:, None], other=0.0)",
        # fp32 inputs multiply in IEEE fp32, as cuBLAS does by default (not TF32); half inputs accumulate in fp32
        "    acc = tl.dot(a, b, acc, input_precision=\"ieee\")" if linear.meta["val"].dtype == torch.float32
        else "    acc = tl.dot(a, b, acc)",
    ]
    if has_bias:
        lines.append("acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]")
    lines += [
        f"xindex = rows[:, None] * {n_out} + cols[None, :]",
        "xmask = row_ok[:, None] & col_ok[None, :]",
        f"in{skip} = acc  # {linear.name}: the product, never written out",
        *body._epilogue(epilogue.nodes, "xmask", skip=skip),
    ]
    stem = "_".join(dict.fromkeys(epilogue.ops()))[:40]
    digest = hashlib.sha256(repr((params, lines)).encode()).hexdigest()[:8]
    name = f"gemm_{stem}_{digest}"
    shown = ", ".join(pyexpr(d) for d in domain)
    source = "\n".join([
        f"# graphopt: linear {k_in} -> {n_out} with a pointwise epilogue of {len(epilogue.nodes)} ops over ({shown})",
        "# generated from the captured graph; the product stays in registers (fp32) until the epilogue stores",
        "import triton",
        "import triton.language as tl",
        "", "",
        "@triton.jit",
        f"def {name}({', '.join(params)}):",
        *("    " + line for line in lines),
    ]) + "\n"
    return GeneratedKernel(name, source, gemm_region(linear, epilogue), tuple(ins), tuple(outs), symbols, None)


# ------------------------------------------------------------------------------------------ call site


class GemmRegion(_Tuned):
    """A linear layer and its pointwise epilogue: cuBLAS then the epilogue kernel (the untuned default),
    the fused Triton template, or every op eager, whichever tuning measures fastest.

    Called with the gemm region's inputs (x, w[, b], the epilogue's other inputs), returns the
    epilogue's outputs. Inputs whose layout the epilogue kernel was not generated for run the eager
    ops, counted in ``fallbacks``.
    """

    epilogue: FusedRegion

    def __init__(self, linear: fx.Node, epilogue: Region, library: KernelLibrary, options: TuningOptions,
                 epoch: ChoiceEpoch | None = None):
        super().__init__(options, epoch)
        from .kernels._launch import is_compiled

        self.region = gemm_region(linear, epilogue)
        # the epilogue kernel is part of this call site, not a site of its own: not a registered submodule
        # (a lowered module's modules() lists its call sites)
        object.__setattr__(self, "epilogue", FusedRegion(generate(epilogue), library, region_graph(epilogue),
                                                         options, epoch))
        self.template = generate_template(linear, epilogue)
        module = library.load(self.template)
        self.fn = getattr(module, self.template.name)
        if linear.meta["val"].dtype == torch.bfloat16 and not is_compiled(self.fn):
            raise _Decline("Triton's interpreter computes bf16 tl.dot wrongly (triton-lang/triton#11584)")
        self.kernel_name = self.template.name
        self.source_hash = hash_source(self.template.source, self.epilogue.generated.source)
        self.fallback = region_graph(self.region)
        self.fallbacks = 0
        inputs = self.region.inputs
        self._has_bias = isinstance(node_arg(linear, 2, "bias"), fx.Node)
        self._n_out, self._k = (int(d) for d in shape_of(linear.args[1]))
        self._dtype = linear.meta["val"].dtype
        # the epilogue's inputs as positions in this site's inputs; the product is -1
        self._epilogue_index = tuple(-1 if n is linear else inputs.index(n) for n in epilogue.inputs)
        self._template_index = tuple(i for i in self._epilogue_index if i != -1)
        self._symbols = self.template.symbols
        self._binders = _binders(self._symbols, inputs)
        self._names = tuple(f"g{i}" for i in range(len(inputs)))

    def extra_repr(self) -> str:
        then = " ".join(self.epilogue.generated.region.ops())
        return f"{self.kernel_name}: linear {self._k} -> {self._n_out}, then {then}"

    def reference(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.fallback(*inputs))

    def configs(self) -> list[dict[str, int]]:
        return [c for c in pointwise_configs() if not is_aten(c)] + template_configs() + [ATEN]

    def prune(self, configs: Sequence[Config], shape: tuple[int, ...]) -> list[Config]:
        m, n, _ = shape
        pointwise = prune_blocks("XBLOCK")([c for c in configs if not is_template(c)], (m * n,))
        ordered = [c for c in pointwise if not is_aten(c)] + prune_template(configs, shape) + \
            [c for c in pointwise if is_aten(c)]
        # a lone epilogue op: cuBLAS + its kernel moves what cuBLAS (bias included) + the op does, so
        # the untuned default is the ATen ops; the template, which saves the product's round trip, and
        # the epilogue kernel stay candidates
        return aten_first(ordered) if self.epilogue.fuses_nothing else ordered

    def tuning_shape(self, *inputs: torch.Tensor) -> tuple[int, ...]:
        x = inputs[0]
        return (x.numel() // max(self._k, 1), self._n_out, self._k)

    def _epilogue_inputs(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = inputs[0]
        product = torch.empty((*x.shape[:-1], self._n_out), dtype=self._dtype, device="meta")
        return [product if i == -1 else inputs[i] for i in self._epilogue_index]

    def _laid_out(self, inputs: Sequence[torch.Tensor]) -> bool:
        return self.epilogue._layout(self._epilogue_inputs(inputs)) is not None and _matrix_rows(inputs[0]) is not None

    def launch(self, config: Config, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if is_aten(config):
            return self.reference(*inputs)
        return self.plan(config, inputs).run(inputs)

    def plan(self, config: Config, inputs: Sequence[torch.Tensor]) -> LaunchPlan:
        """The allocations and launches of ``config`` (cuBLAS + epilogue, or the template)."""
        if not is_template(config):
            epilogue = self.epilogue.plan(config, self._epilogue_inputs(inputs))
            rename = {f"in{j}": ("mm" if i == -1 else self._names[i]) for j, i in enumerate(self._epilogue_index)}
            calls = tuple(KernelCall(c.kernel, c.grid, tuple(Ref(rename.get(a.name, a.name)) if isinstance(a, Ref)
                                                                 else a for a in c.args), c.constexprs)
                          for c in epilogue.calls)
            product = AtenCall(aten.linear.default, (Ref("g0"), Ref("g1"), Ref("g2") if self._has_bias else None), "mm")
            return LaunchPlan(self._names, epilogue.buffers, (product, *calls), epilogue.outputs)
        x, w = inputs[0], inputs[1]
        rows = _matrix_rows(x)
        assert rows is not None, "the template needs x's leading dimensions mergeable"
        m, stride_xm = rows
        outs = self.epilogue.output_buffers(self._epilogue_inputs(inputs))  # strides as eager gives them
        names = tuple(b.name for b in outs)
        if m == 0:
            return LaunchPlan(self._names, outs, (), names)
        cfg = dict(config)
        values = [b(inputs) for b in self._binders]
        grid = (triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(self._n_out, cfg["BLOCK_N"]),)
        own = [Ref("g0"), Ref("g1")] + ([Ref("g2")] if self._has_bias else [])
        args = (*own, *(Ref(self._names[i]) for i in self._template_index), *(Ref(b.name) for b in outs),
                m, stride_xm, x.stride(-1), *w.stride(), *values)
        return LaunchPlan(self._names, outs, (KernelCall(self.fn, grid, args, tuple(cfg.items())),), names)

    def plan_for(self, *inputs: torch.Tensor) -> SitePlan:
        if not self._laid_out(inputs):
            return SitePlan(None, None)
        return self.config_plan(self._config(self.tuning_shape(*inputs), inputs), inputs)

    def config_plan(self, config: Config, inputs: Sequence[torch.Tensor]) -> SitePlan:
        if is_aten(config):
            return SitePlan(config, None)
        return SitePlan(config, self.plan(config, inputs), tuple(range(len(inputs))))

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self._laid_out(inputs):
            self.fallbacks += 1
            return self.reference(*inputs)
        return self.launch(self._config(self.tuning_shape(*inputs), inputs), *inputs)


def _matrix_rows(x: torch.Tensor) -> tuple[int, int] | None:
    """(rows, row stride) of ``x`` read as a matrix over its last dimension, or None when its leading
    dimensions do not merge into one row index."""
    if any(_row_stride_gaps(x.shape, x.stride())):
        return None
    lead = [(s, t) for s, t in zip(x.shape[:-1], x.stride()[:-1]) if s != 1]
    return math.prod(s for s, _ in lead), (lead[-1][1] if lead else x.shape[-1])
