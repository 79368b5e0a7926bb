"""Triton launches without ``JITFunction.run``'s per-call work.

``kernel[grid](*args, **constexprs)`` binds every argument to the signature, specialises each
one (dtype, 16-byte alignment, ints equal to 1 or divisible by 16), turns the specialisation and
the options into a cache key string, looks the compiled kernel up, checks the kernel's globals
and builds the launch metadata, on every call. On a 2-core CPU that is about 9 µs of host time
per launch, half of a launcher call (``bench/launch_host.py``, triton 3.6 and 3.9 alike: the
shrink's 18 µs become 9). A decode step launches a few hundred kernels, and an eager
training step of a small linear is bound by the host.

A :class:`Launch` is one launcher's memoised decision for one problem (grid, constexprs and
launch options; :func:`kernels.tuning.launch_plan` keeps it). It remembers the compiled kernel
that Triton picked for each *argument key*, and later calls with the same key call that
kernel's launcher directly (``CompiledKernel.run``, what ``JITFunction.run`` ends with), with
the same arguments, stream and hooks. The key is finer than Triton's specialisation, so a key
never maps to a kernel that Triton would not pick for those arguments:

* a tensor: its dtype and ``data_ptr() % 16`` (Triton: dtype, 16-byte aligned or not);
* an int: its value (Triton: ``== 1``, ``% 16 == 0``, 32- or 64-bit);
* a bool, float or ``None``: its value;
* the current device; and the kind of each position is fixed at the first call (a position
  that held a tensor then and holds something else now takes Triton's own path).

A new key takes Triton's path twice: the first time Triton picks (or compiles) the kernel,
the second time its launcher is watched and its call compared with the one the direct path
would make, object for object; the key goes direct only when they are the same. So the
direct path checks Triton's calling convention itself, on whatever Triton is installed: where
they differ, that launch plan keeps Triton's path and a ``RuntimeWarning`` says so. Triton's
path is kept for everything else: the interpreter (``TRITON_INTERPRET=1``), anything that is not
a plain ``JITFunction`` (``kernels.aot.LaunchRecorder``'s wrappers), kernels with pre-run
hooks, and ``MILP_TRITON_LAUNCH=jit`` (the switch, read per call; ``direct`` is the default).
Launch hooks (Triton's profiler, proton) are honoured: with a hook installed the launch
metadata is built and passed as Triton does; without one, nothing is built.

What the direct path does not redo per call: Triton's check that the kernel's global
variables have not changed since it was compiled, and the reading of the ``TRITON_DEBUG`` /
instrumentation knobs into the options (set them before the first launch, as usual).

``tests/kernels/test_launch.py`` checks, on a stand-in CUDA driver that compiles for sm_90 and
records each launch, that every launcher passes exactly what Triton's path passes (kernel,
grid, stream, arguments), for aligned and misaligned pointers, a stride of 1 and of 2 (Triton
specialises a 1 away), dtypes, and specialisations in turn, on the triton versions CI runs.
"""
from __future__ import annotations

import threading
import types
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

import torch
import triton
from triton import knobs
from triton.compiler import CompiledKernel
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from ._backend import env

try:
    from triton.knobs import HookChain
except ImportError:  # a triton before HookChain: launch hooks are plain callables or None
    HookChain = type("NoHookChain", (), {})

__all__ = ["Launch", "direct_launch_enabled"]

_MAX_KEYS = 256  # remembered argument keys per launch plan (a plan is one problem: a few)


def direct_launch_enabled() -> bool:
    """``MILP_TRITON_LAUNCH`` is ``direct`` (the default), not ``jit``.

    Example:
        >>> direct_launch_enabled()
        True
    """
    value = env("MILP_TRITON_LAUNCH", "direct")
    if value == "direct":
        return True
    if value == "jit":
        return False
    raise ValueError(f"MILP_TRITON_LAUNCH must be 'direct' or 'jit', got {value!r}")


class _NotThatKind(Exception):
    """An argument is not of the kind its position had when the key function was made."""


def _not_that_kind() -> NoReturn:
    raise _NotThatKind


def _kind(a: object) -> str | None:
    if isinstance(a, torch.Tensor):
        return "tensor"
    if a is None:
        return "None"
    if type(a) in (int, bool, float):
        return type(a).__name__
    return None


def _key_function(args: tuple) -> Callable[..., tuple] | None:
    """A function of ``args``' arity returning their key (see the module docstring), made from
    the kinds of ``args`` as generated code (what Triton's binder does for its specialisation:
    no per-argument dispatch in a loop), or ``None`` for a kind it does not key. One function
    per sequence of kinds (generating one takes about 0.1 ms).

    A tensor position reads ``dtype`` and ``data_ptr()`` (anything else there raises
    ``AttributeError``); an int, bool, float or ``None`` position checks its class first, so
    no tensor ever lands in a key.
    """
    kinds = tuple(map(_kind, args))
    if kinds in _KEY_FUNCTIONS:
        return _KEY_FUNCTIONS[kinds]
    parts, checks = [], []
    for i, kind in enumerate(kinds):
        name = f"a{i}"
        if kind is None:
            _KEY_FUNCTIONS[kinds] = None
            return None
        if kind == "tensor":
            parts.append(f"{name}.dtype, {name}.data_ptr() & 15")
        elif kind == "None":
            parts.append(name)
            checks.append(f"{name} is None")
        else:
            parts.append(name)
            checks.append(f"{name}.__class__ is {kind}")
    names = ", ".join(f"a{i}" for i in range(len(args)))
    guard = f"    if not ({' and '.join(checks)}):\n        not_that_kind()\n" if checks else ""
    src = f"def key({names}):\n{guard}    return ({', '.join(parts)},)\n"
    space = {"not_that_kind": _not_that_kind}
    exec(src, space)  # noqa: S102 - generated from the argument kinds only
    _KEY_FUNCTIONS[kinds] = space["key"]
    return space["key"]


_KEY_FUNCTIONS: dict[tuple[str | None, ...], Callable[..., tuple] | None] = {}  # kinds -> key function (or None)


class Launch:
    """A launcher's grid, constexprs and launch options for one problem, and the compiled
    kernels Triton picked for its calls so far (see the module docstring).

    ``launch(fn, *args)`` is ``fn[launch.grid](*args, **launch.kw)``, faster once seen. A
    ``Launch`` serves the compiled kernel of its second call (one problem of one launcher);
    another one takes Triton's path, and so does a first call (a plan that is not memoised,
    inside :func:`kernels.tuning.use_config`, is used once: it costs nothing more than
    before). Per argument key: the first call asks Triton which kernel it launches, the
    second is Triton's launch again with its launcher call compared to the one the direct path
    would make (:meth:`_verify`), and the calls after that are direct. Should the two ever
    differ (another Triton's calling convention), this launch keeps Triton's path, with a
    warning.

    Example:
        >>> launch = Launch((4, 2), {"BLOCK": 16, "num_warps": 4})
        >>> launch.grid, launch.kw["BLOCK"]
        ((4, 2), 16)
    """

    __slots__ = ("grid", "kw", "_grid3", "_used", "_fn", "_arity", "_keyfn", "_tail", "_seen", "_pending")

    def __init__(self, grid: tuple[int, ...], kw: dict):
        self.grid = tuple(grid)
        self.kw = types.MappingProxyType(dict(kw))
        g = self.grid + (1, 1)
        self._grid3 = (g[0], g[1], g[2])
        self._used = False    # called before
        self._fn: Any = None  # the JITFunction served, once seen
        self._arity = -1
        self._keyfn: Callable[..., tuple] | None = None  # its key function (None: no direct path)
        self._tail = ()       # values of the parameters after the positional ones
        self._seen: dict = {}     # (device, key) -> compiled kernel, launched directly
        self._pending: dict = {}  # (device, key) -> compiled kernel Triton picked, not verified yet

    def __call__(self, fn: Any, *args: Any) -> None:
        if fn is not self._fn and not self._serve(fn, args):
            fn[self.grid](*args, **self.kw)
            return
        if (self._keyfn is None or len(args) != self._arity or getattr(fn, "pre_run_hooks", None)
                or not direct_launch_enabled()):
            fn[self.grid](*args, **self.kw)
            return
        try:
            key = self._keyfn(*args)
        except (_NotThatKind, AttributeError):
            fn[self.grid](*args, **self.kw)
            return
        drv = driver.active
        device = drv.get_current_device()
        kernel = self._seen.get((device, key))
        if kernel is None:
            self._learn(fn, (device, key), args)
            return
        stream = drv.get_current_stream(device)
        runtime = knobs.runtime
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        full = args + self._tail
        if _idle(enter) and _idle(leave):
            meta = enter = leave = None
        else:
            meta = kernel.launch_metadata(self.grid, stream, *full)
        g0, g1, g2 = self._grid3
        kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, meta, enter, leave, *full)

    def _serve(self, fn: Any, args: tuple) -> bool:
        """Bind to ``fn``: a compiled kernel, at this launch's second call."""
        if self._fn is not None or type(fn) is not JITFunction or not self._used:
            self._used = True
            return False
        self._keyfn = _key_function(args)
        self._arity = len(args)
        params = list(fn.signature.parameters.values())[len(args):]
        # bound as Triton binds them: the keyword values, then the defaults
        self._tail = tuple(self.kw[p.name] if p.name in self.kw else p.default for p in params)
        self._fn = fn
        return True

    def _learn(self, fn: Any, seen: tuple, args: tuple) -> None:
        """A key not launched directly yet: Triton's path (it compiles or finds the kernel, and
        launches it), remembering its kernel the first time and verifying the second."""
        pending = self._pending.pop(seen, None)
        if pending is not None:
            self._verify(fn, seen, pending, args)
            return
        kernel = fn[self.grid](*args, **self.kw)
        if isinstance(kernel, CompiledKernel):  # not an async compile's future, nor a hook's None
            if len(self._pending) >= _MAX_KEYS:
                self._pending.clear()
            self._pending[seen] = kernel

    def _verify(self, fn: Any, seen: tuple, kernel: Any, args: tuple) -> None:
        """Launch through Triton's path with ``kernel``'s launcher watched: its call must be the
        one the direct path would make (grid, stream, function, metadata, hooks, and every
        argument, the same objects), or this launch never goes direct."""
        calls = []
        launcher = getattr(kernel, "_run", None)
        if launcher is None:  # no launcher to watch: this Triton is not one the direct path knows
            self._give_up("its compiled kernels keep their launcher elsewhere")
            fn[self.grid](*args, **self.kw)
            return
        me = threading.get_ident()

        def watched(*call: Any) -> Any:
            if threading.get_ident() == me:
                calls.append(call)
            return launcher(*call)

        kernel._run = watched
        try:
            fn[self.grid](*args, **self.kw)
        finally:
            if kernel._run is watched:
                kernel._run = launcher
        if not calls:  # Triton launched another kernel (its cache was cleared): learn it again
            return
        runtime = knobs.runtime
        meta = calls[0][6] if len(calls[0]) > 6 else None  # built per call: not compared
        want = (self._grid3 + (driver.active.get_current_stream(seen[0]), kernel.function, kernel.packed_metadata)
                + (meta, runtime.launch_enter_hook, runtime.launch_exit_hook) + args + self._tail)
        if len(calls) == 1 and _same_call(calls[0], want):
            if len(self._seen) >= _MAX_KEYS:
                self._seen.clear()
            self._seen[seen] = kernel
        else:
            self._give_up(f"Triton's launcher call for {getattr(fn, '__name__', 'a kernel')} differs from the "
                          "direct path's")

    def _give_up(self, why: str) -> None:
        self._keyfn = None
        if why not in _WARNED:
            _WARNED.add(why)
            warnings.warn(f"kernels: launching through Triton's JITFunction.run ({why}; triton "
                          f"{triton.__version__}); MILP_TRITON_LAUNCH=jit silences this", RuntimeWarning,
                          stacklevel=3)


_WARNED: set[str] = set()


def _same_call(got: tuple, want: tuple) -> bool:
    """The same launcher call: the same objects, or equal values of the same type."""
    try:
        return len(got) == len(want) and all(
            a is b or (type(a) is type(b) and not isinstance(a, torch.Tensor) and bool(a == b))
            for a, b in zip(got, want))
    except Exception:  # noqa: BLE001 - values that do not compare: not the same call
        return False


def _idle(hook: Any) -> bool:
    """No launch hook to call: ``None``, or an empty ``HookChain`` (triton 3.5 and later)."""
    return hook is None or (hook.__class__ is HookChain and not hook.calls)
