"""Buffer reuse in generated forwards: the planner alone, then forwards run under TRITON_INTERPRET=1."""

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from graphopt.autotune import buffers as buffers_module  # noqa: E402
from graphopt.autotune import runtime as runtime_module  # noqa: E402
from graphopt.autotune.buffers import BufferPlanner, storage_keys  # noqa: E402
from tests import zoo  # noqa: E402
from tests.autotune.test_runtime import assert_same, general, lowered_runtime  # noqa: E402

CPU = torch.device("cpu")
F32 = torch.float32


def expr(value):
    return {F32: "f32", torch.float16: "f16", CPU: "cpu"}[value]


def alloc(planner, name, shape=(2, 3), strides=(3, 1), dtype=F32, **kw):
    return planner.allocate(name, shape, strides, dtype, CPU, expr, **kw)


def test_a_dead_buffer_serves_the_next_allocation_of_its_size_and_others_get_new_ones():
    planner = BufferPlanner()
    assert alloc(planner, "a") == ["a = torch.empty_strided((2, 3), (3, 1), dtype=f32, device=cpu)"]
    assert planner.release(["a"]) == ([], ["a"])  # kept, not deleted
    assert alloc(planner, "b", (6,), (1,), dtype=torch.float16) == [
        "b = torch.empty_strided((6,), (1,), dtype=f16, device=cpu)"]  # 12 bytes, not a's 24
    assert alloc(planner, "c") == ["c = a  # reuses a's buffer", "del a"]
    assert alloc(planner, "d", (3, 2), (1, 3), zero=True) == [
        "d = torch.empty_strided((3, 2), (1, 3), dtype=f32, device=cpu).zero_()"]  # a is taken
    assert planner.release(["c", "d"]) == ([], ["c", "d"])
    assert alloc(planner, "e", (3, 2), (1, 3), zero=True) == [
        "e = d.zero_()  # reuses d's buffer", "del d"]  # the latest freed first (still in cache), zeroed again
    assert alloc(planner, "f", (3, 2), (1, 3)) == ["f = c.as_strided((3, 2), (1, 3), 0)  # reuses c's buffer", "del c"]
    assert planner.taken == {"a", "c", "d"}
    stats = planner.stats
    assert (stats.allocations, stats.reused, stats.reused_bytes) == (6, 3, 72)


def test_a_buffer_is_not_reused_while_a_view_of_it_lives_and_its_last_view_hands_it_on():
    planner = BufferPlanner()
    key = (CPU, 4096)
    alloc(planner, "a", recorded=key)
    planner.alias("v", [key], tensor=True)  # v = a.transpose(...)
    assert planner.release(["a"]) == (["a"], [])
    assert alloc(planner, "b")[0].startswith("b = torch.empty_strided(")
    assert planner.release(["v"]) == ([], ["v"])
    assert alloc(planner, "c") == ["c = v.as_strided((2, 3), (3, 1), 0)  # reuses a's buffer", "del v"]


def test_an_address_the_allocator_handed_out_again_is_no_view_of_the_dead_buffer():
    planner = BufferPlanner()
    key = (CPU, 4096)
    alloc(planner, "a", recorded=key)
    assert planner.release(["a"]) == ([], ["a"])
    planner.alias("x", [key], tensor=True)  # an ATen op's new tensor at a's old address
    assert planner.release(["x"]) == (["x"], [])
    assert alloc(planner, "b") == ["b = a  # reuses a's buffer", "del a"]


def test_a_tuple_viewing_a_buffer_keeps_it_alive_but_cannot_hand_it_on():
    planner = BufferPlanner()
    key = (CPU, 4096)
    alloc(planner, "a", recorded=key)
    planner.alias("parts", [key, key], tensor=False)  # parts = a.chunk(2)
    assert planner.release(["a"]) == (["a"], [])
    assert planner.release(["parts"]) == (["parts"], [])
    assert alloc(planner, "b")[0].startswith("b = torch.empty_strided(")


def test_a_disabled_planner_allocates_and_deletes_everything():
    planner = BufferPlanner(enabled=False)
    alloc(planner, "a", recorded=(CPU, 1))
    assert planner.release(["a"]) == (["a"], [])
    assert alloc(planner, "b")[0].startswith("b = torch.empty_strided(")
    assert planner.stats.reused == 0


def test_tensors_without_memory_have_no_storage_key():
    x = torch.zeros(2, 3)
    assert storage_keys((x, x.t(), torch.empty(0), 3)) == ((CPU, x.data_ptr()), (CPU, x.data_ptr()), None, None)


class HeldView(nn.Module):
    """A kernel's output ``a`` whose last use by name comes before a same-sized kernel output ``b``
    is allocated, while a view of it (``v``) is read at the end: ``b`` must not take ``a``'s buffer."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8) / 3)

    def forward(self, x):
        a = torch.sin(x * 2)
        v = a.transpose(-1, -2)
        h = a @ self.w
        b = torch.cos(h + 1)
        c = torch.exp(-(b @ self.w) ** 2)
        return v @ c, c


def held_view_runtime(**kw):
    return lowered_runtime(HeldView(), torch.randn(2, 8, 8), **kw)


def test_a_buffer_a_live_view_holds_is_not_reused_and_the_forward_equals_the_general_path():
    runtime, gm, tensors = held_view_runtime()
    want = general(gm, tensors)
    with torch.no_grad():
        runtime(tensors)
        got = runtime(tensors)
    assert_same(got, want)
    (forward,) = runtime.forwards
    assert forward.buffers.allocations >= 3, forward.source


def test_without_alias_tracking_the_held_view_case_would_compute_garbage(monkeypatch):
    """The test above can fail: with views not tracked, the forward reuses a buffer a view still reads."""
    monkeypatch.setattr(buffers_module.BufferPlanner, "alias", lambda self, name, recorded, tensor: None)
    runtime, gm, tensors = held_view_runtime()
    want = general(gm, tensors)
    with torch.no_grad():
        runtime(tensors)
        got = runtime(tensors)
    (forward,) = runtime.forwards
    assert forward.buffers.reused > 0 and not torch.equal(got[0], want[0]), forward.source


def test_a_forward_whose_reuse_changes_the_outputs_is_written_again_without_it(monkeypatch):
    monkeypatch.setattr(buffers_module.BufferPlanner, "alias", lambda self, name, recorded, tensor: None)
    monkeypatch.setattr(runtime_module, "_needs_check", lambda forward, tensors: True)  # as on a GPU
    runtime, gm, tensors = held_view_runtime()
    want = general(gm, tensors)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="with buffer reuse gave other outputs"):
        runtime(tensors)
    (forward,) = runtime.forwards
    assert forward.buffers.reused == 0 and "# reuses " not in forward.source
    with torch.no_grad():
        assert_same(runtime(tensors), want)


def test_a_dits_forward_reuses_buffers_and_returns_fresh_outputs_each_call():
    model, args, kwargs = zoo.ZOO["dit"]()
    runtime, gm, tensors = lowered_runtime(model, *args, kwargs=kwargs)
    plain = runtime_module.Runtime(gm, reuse_buffers=False)
    want = general(gm, tensors)
    with torch.no_grad():
        runtime(tensors)
        first = runtime(tensors)
        second = runtime(tensors)
        plain(tensors)
    assert_same(first, want)
    assert_same(second, want)
    assert first[0].data_ptr() != second[0].data_ptr()  # a call's outputs are its own, never a later call's buffers
    (forward,) = runtime.forwards
    assert forward.buffers.reused > 0 and forward.source.count("# reuses ") == forward.buffers.reused
    (without,) = plain.forwards
    assert without.buffers.reused == 0 and "# reuses " not in without.source
    assert without.buffers.allocations == forward.buffers.allocations
    assert without.source.count("torch.empty_strided(") == forward.source.count("torch.empty_strided(") + \
        forward.buffers.reused
