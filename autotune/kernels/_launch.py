"""What every launcher in this package checks before it launches, and how it picks its config.

A Triton kernel handed the wrong tensor does not fail cleanly: a CPU tensor gives "Pointer argument
cannot be accessed from Triton", a float64 one compiles a kernel nobody tested, a wrong shape reads out
of bounds. So each launcher checks its inputs here first and raises ``ValueError`` with a message that
names the op, the argument and what was expected (``ValueError`` rather than ``assert``: the checks
must survive ``python -O``).

A launcher's work after its checks is data, a :class:`~graphopt.autotune.launches.LaunchPlan`
(re-exported here), which the launcher runs at once and :mod:`graphopt.autotune.runtime` writes into
a generated forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from triton.runtime.jit import JITFunction

from ..cache import Config
from ..launches import Buffer, KernelCall, LaunchPlan, Ref, contiguous_strides  # noqa: F401 - the launchers' vocabulary

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes the kernels are written for: fp32 is exact up to summation order, halves accumulate in fp32."""


def is_compiled(kernel: object) -> bool:
    """Whether ``kernel`` was decorated for the GPU; under ``TRITON_INTERPRET=1`` it is interpreted on the CPU.

    ``triton.jit`` reads the variable when the decorator runs, i.e. when the kernel's module is imported,
    so this asks the kernel object rather than the environment.
    """
    return isinstance(kernel, JITFunction)


def check_device(op: str, kernel: object, **tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device the kernel can read: CUDA compiled, CPU or CUDA interpreted."""
    given = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in given.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in given.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}")
    device = devices.pop()
    allowed = ("cuda",) if is_compiled(kernel) else ("cpu", "cuda")
    if device.type not in allowed:
        how = ("the compiled Triton kernel needs CUDA tensors (or import it under TRITON_INTERPRET=1 to run "
               "on the CPU)" if is_compiled(kernel) else "the interpreted kernel (TRITON_INTERPRET=1) needs "
               "CPU or CUDA tensors")
        raise ValueError(f"{op}: tensors are on {device}; {how}")
    return device


def check_float(op: str, name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """``t`` is fp32/fp16/bf16 and, with ``like``, of the same dtype as ``like``."""
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if like is not None and t.dtype != like.dtype:
        raise ValueError(f"{op}: {name} must have the same dtype as the input ({like.dtype}), got {t.dtype}")


def check_shape(op: str, name: str, t: torch.Tensor, expected: tuple[int, ...], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        suffix = f" ({what})" if what else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}{suffix}, got {tuple(t.shape)}")


def check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)}); "
                         f"call .contiguous() first")


def pick_config(op: str, configs: Callable[[], Iterable[Mapping[str, int]]],
                config: Mapping[str, int] | None) -> Config:
    """``config`` checked against the family's keys, or the family's first config when ``None``.

    Every ``BLOCK_*`` must be a power of two (``tl.arange`` needs one); a misspelt or missing key fails
    here instead of as a Triton "missing constexpr" error.
    """
    family = [Config(c) for c in configs()]
    if config is None:
        return family[0]
    chosen = Config(config)
    expected = set(family[0])
    if set(chosen) != expected:
        raise ValueError(f"{op}: config needs exactly the keys {sorted(expected)}, got {sorted(chosen)}")
    for key, value in chosen.items():
        if value < 1:
            raise ValueError(f"{op}: config {key}={value} must be positive")
        if key.startswith("BLOCK_") and value & (value - 1):
            raise ValueError(f"{op}: config {key}={value} must be a power of two")
    return chosen


def check_dot_blocks(op: str, config: Mapping[str, int], *keys: str) -> None:
    """``tl.dot`` needs every tile dimension to be at least 16."""
    for key in keys:
        if config[key] < 16:
            raise ValueError(f"{op}: config {key}={config[key]} must be at least 16 (a tl.dot tile dimension)")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
