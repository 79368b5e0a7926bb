"""A stand-in CUDA driver for Triton on a machine without a GPU: for tests of the launch path
(``tests/kernels/test_launch.py``) and host-time measurements of it (``bench/launch_host.py``),
never for results.

Triton compiles for sm_90 as it would on an H100/H200 (its own ptxas, no GPU needed); loading a
binary returns a fake handle, and each compiled kernel's launcher records its call (or does
nothing) instead of launching. Everything above the C launcher — ``JITFunction.run``'s binding,
specialisation, cache and hooks, and :class:`kernels._launch.Launch` — runs for real, with CPU
tensors standing in for device memory (nothing reads or writes them).

Use it in a fresh process with ``TRITON_INTERPRET=0`` (the kernels must be decorated as compiled
``JITFunction`` objects), before the first launch::

    from kernels import _fake_cuda
    launches = _fake_cuda.install(stream=7)     # the launcher calls, as recorded
    ... launch kernels ...
    _fake_cuda.RECORD = False                   # time the host path: launches do nothing
"""
from __future__ import annotations

import itertools
import types
from collections.abc import Callable
from typing import Any, NoReturn

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import GPUDriver

RECORD = True
_LAUNCHES: list[dict] = []
_HANDLES = itertools.count(1)


def describe(arg: object) -> object:
    """What a launch argument is, comparable across calls: tensors by dtype, shape, strides and
    pointer alignment (``data_ptr() % 16``), everything else by value (``repr`` for objects)."""
    if isinstance(arg, torch.Tensor):
        return ("tensor", str(arg.dtype), tuple(arg.shape), arg.stride(), arg.data_ptr() % 16)
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    return repr(arg)


def _calls_something(hook: object) -> bool:
    """A launch hook that would call a function: not ``None``, not an empty ``HookChain``."""
    return hook is not None and bool(getattr(hook, "calls", True))


class _Launcher:
    """One compiled kernel's launcher: records ``(kernel, grid, stream, function, arguments,
    hooks)`` and calls the enter/exit hooks as Triton's C launcher does."""

    def __init__(self, src: Any, metadata: Any) -> None:
        self.name = getattr(metadata, "name", "?")
        self.fp_fusion = getattr(metadata, "enable_fp_fusion", None)  # the compile option it was built with

    def __call__(self, g0: int, g1: int, g2: int, stream: int, function: int, packed_metadata: Any,
                 launch_metadata: Any, enter: Callable[[Any], object] | None, leave: Callable[[Any], object] | None,
                 *args: object) -> None:
        if enter is not None:
            enter(launch_metadata)
        if RECORD:
            _LAUNCHES.append(dict(
                launcher=id(self), name=self.name, fp_fusion=self.fp_fusion, grid=(g0, g1, g2), stream=stream,
                function=function,
                packed_metadata=repr(packed_metadata), hooks=(_calls_something(enter), _calls_something(leave)),
                args=[describe(a) for a in args],
            ))
        if leave is not None:
            leave(launch_metadata)


class _Utils:
    def load_binary(self, name: str, kernel: bytes, shared: int, device: int) -> tuple[int, int, int, int, int]:
        # (module, function, registers, spills, max threads per block)
        return next(_HANDLES), next(_HANDLES), 64, 0, 1024

    def get_device_properties(self, device: int) -> dict[str, int]:
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 6144}


class FakeCudaDriver(GPUDriver):
    """Compiles for ``cuda:<arch>``, device 0, on ``stream``; launches are recorded."""

    def __init__(self, arch: int = 90, stream: int = 0):
        # GPUDriver.__init__ would take the device and stream from torch.cuda: not here
        self.utils = _Utils()
        self.launcher_cls = _Launcher
        self.arch, self.stream = arch, stream

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int) -> int:
        return self.stream

    def get_device_capability(self, device: int = 0) -> tuple[int, int]:
        return divmod(self.arch, 10)

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self) -> types.ModuleType:
        return torch.cuda

    @staticmethod
    def is_active() -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_benchmarker(self) -> NoReturn:
        raise NotImplementedError("no timing on the stand-in driver")

    def get_empty_cache_for_benchmark(self) -> NoReturn:
        raise NotImplementedError("no timing on the stand-in driver")

    def clear_cache(self, cache: torch.Tensor) -> None:
        pass


def install(arch: int = 90, stream: int = 0) -> list[dict]:
    """Make the stand-in Triton's active driver; returns the list the launches are recorded in.
    From then on ``kernels.use_backend("triton")`` runs the ops' Triton paths on CPU tensors
    (their outputs are garbage: the launches do nothing)."""
    from triton.runtime import driver

    from . import _backend

    if _backend.interpreting():
        raise RuntimeError("the stand-in driver runs compiled kernels: start the process with TRITON_INTERPRET=0")
    driver.set_active(FakeCudaDriver(arch, stream))
    _backend.STAND_IN_DRIVER = True  # the triton backend takes CPU tensors (use_backend("triton"))
    return _LAUNCHES
