"""Backend selection (Triton or the torch reference) and opt-in NVTX ranges.

The rule, for every op:

* CUDA tensors run the Triton kernels, on GPUs Triton supports: NVIDIA compute capability
  8.0 and up (Triton's README; AMD GPUs under ROCm too). On older NVIDIA GPUs (V100 sm_70,
  T4 sm_75) Triton still compiles these kernels, but without tensor cores: every dot becomes
  FMA, and ptxas reports 12–14 KB of spill stores for the fused GEMM in bf16/fp16
  (``python -m kernels.aot --arch 75``). There ``auto`` runs the torch path (cuBLAS; its
  gather form, which decode and CUDA-graph capture take, reads nothing back on the host);
  ``MILP_KERNELS=triton`` still forces Triton.
* CPU tensors run the torch reference, except under ``TRITON_INTERPRET=1``
  with the backend forced to ``"triton"`` (``MILP_KERNELS=triton`` or
  :func:`use_backend`), which is how CI executes the Triton kernels on CPU.

``MILP_KERNELS`` = ``auto`` (default) | ``triton`` | ``torch`` sets the process
default; :func:`use_backend` overrides it for a block of code.

NVTX: set ``MILP_NVTX=1`` and every op pushes a named range (``milp.<op>``, e.g.
``milp.lora_linear``) and every Triton launch another (``milp.kernel.<kernel>``),
visible in ``nsys`` timelines and, through ``record_function``, in ``torch.profiler``
traces (where the dispatcher also records the ops themselves as ``milp::<op>``).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from typing import overload

import torch

__all__ = [
    "interpreting",
    "interpreter_problem",
    "triton_available",
    "use_backend",
    "backend_for",
    "triton_supports",
    "TRITON_MIN_CAPABILITY",
    "nvtx_enabled",
    "nvtx_range",
    "set_interpreter_overflow_checks",
    "SideStream",
]

_VALID = ("auto", "triton", "torch")
_local = threading.local()


# os.environ.get encodes the key and decodes the value on every call (microseconds); the ops
# read a few variables per launch, so they look in the environment's own byte-keyed table
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_DATA = _ENV_DATA if isinstance(_ENV_DATA, dict) else None
_ENV_KEYS: dict[str, bytes] = {}


@overload
def env(name: str, default: str) -> str: ...
@overload
def env(name: str, default: None = None) -> str | None: ...


def env(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``, fast (changes through ``os.environ`` are seen)."""
    if _ENV_DATA is None:
        return os.environ.get(name, default)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    value = _ENV_DATA.get(key)
    if value is None:
        return default
    # the decoded text of the raw value last seen: os.environ stores a new bytes object on
    # every assignment, so the same object means the same text (no decoding per call)
    seen = _ENV_TEXT.get(key)
    if seen is None or seen[0] is not value:
        seen = _ENV_TEXT[key] = (value, os.fsdecode(value))
    return seen[1]


_ENV_TEXT: dict[bytes, tuple[bytes, str]] = {}


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return env("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    """True when ``triton`` imports."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - platform without triton
        return False
    return True


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run this project's kernels here, or ``None``.

    Triton's interpreter before 3.7 converts a kernel's scalars to Python ints with
    ``int(array)``, which NumPy 2.4 and later refuse for its 1-element arrays: every kernel
    with a loop over a run-time bound (``range(pid * BLOCK, K, STEP)``) fails with
    "only 0-dimensional arrays can be converted to Python scalars". Compiled kernels (GPUs)
    are not affected. Probed once, by running such a loop in the interpreter.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(out_ptr, n):  # type: ignore[no-untyped-def]  # Triton kernel: Triton types its params
        acc = tl.zeros((1,), dtype=tl.int32)
        for _ in range(tl.program_id(0), n):
            acc += 1
        tl.store(out_ptr + tl.arange(0, 1), acc)

    # a plain tensor even when the first call comes inside a torch.func transform (torch.zeros
    # there makes a wrapper the interpreter cannot read, and the cached answer would refuse the
    # interpreter for the whole process)
    no_functorch = getattr(torch._C, "_DisableFuncTorch", contextlib.nullcontext)
    try:
        with no_functorch():
            out = torch.zeros(1, dtype=torch.int32)
            _probe[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - the message says what happened
        import numpy

        return (f"Triton {triton.__version__}'s CPU interpreter cannot run the kernels with NumPy "
                f"{numpy.__version__} ({type(exc).__name__}: {exc}); install triton>=3.7 or "
                f"'numpy<2.4' to interpret them on CPU (compiled GPU kernels are not affected)")
    if int(out[0]) != 3:
        return f"Triton {triton.__version__}'s CPU interpreter miscounted a loop (3 expected, got {int(out[0])})"
    return None


def set_interpreter_overflow_checks(enabled: bool) -> bool:
    """Turn the Triton interpreter's int32-overflow assertions on or off; returns the old value.

    The interpreter checks every int32 add/sub/mul for overflow by default, which is what
    compiled kernels do only in debug mode, and it dominates interpreted run time. Test
    suites switch it off for speed and keep a dedicated test with it on.
    """
    import dataclasses

    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    old = builder.options.sanitize_overflow
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=bool(enabled))
    return old


def _default_backend() -> str:
    value = env("MILP_KERNELS", "auto").strip().lower()
    if value not in _VALID:
        raise ValueError(f"MILP_KERNELS must be one of {_VALID}, got {value!r}")
    return value


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the kernel backend inside a ``with`` block.

    Example:
        >>> with use_backend("torch"):
        ...     pass  # every op runs its torch reference here
    """
    if name not in _VALID:
        raise ValueError(f"backend must be one of {_VALID}, got {name!r}")
    previous = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = previous


#: set by :func:`kernels._fake_cuda.install`: Triton runs on a stand-in CUDA driver, so the
#: triton backend takes CPU tensors without the interpreter (launches do nothing: host timing)
STAND_IN_DRIVER = False


#: the oldest NVIDIA compute capability Triton supports ("NVIDIA GPUs (Compute Capability 8.0+)")
TRITON_MIN_CAPABILITY = (8, 0)


def triton_supports(index: int | None = None) -> bool:
    """Whether CUDA device ``index`` (``None``: the current one) is a GPU Triton supports:
    an NVIDIA GPU of compute capability :data:`TRITON_MIN_CAPABILITY` or newer, or any GPU of
    a ROCm build. :func:`backend_for`'s ``auto`` runs the torch path on the others.

    Example:
        >>> triton_supports() if torch.cuda.is_available() else True  # an H100: True
        True
    """
    return _triton_supports(torch.cuda.current_device() if index is None else index)


@functools.cache
def _triton_supports(index: int) -> bool:  # cached: backend_for asks on every op call
    if getattr(torch.version, "hip", None):
        return True
    return tuple(torch.cuda.get_device_capability(index)) >= TRITON_MIN_CAPABILITY


def backend_for(t: torch.Tensor) -> str:
    """The backend (``"triton"`` or ``"torch"``) that an op on ``t`` runs."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    choice = getattr(_local, "backend", None) or _default_backend()
    if choice == "torch" or not triton_available():
        return "torch"
    if t.is_cuda:
        return "triton" if choice == "triton" or _triton_supports(t.device.index) else "torch"
    if t.device.type == "cpu" and choice == "triton":
        if not interpreting():
            if STAND_IN_DRIVER:  # kernels._fake_cuda: compiled launches that do nothing (host timing)
                return "triton"
            raise RuntimeError(
                "the triton backend on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
            )
        problem = interpreter_problem()
        if problem is not None:
            raise RuntimeError(problem)
        return "triton"
    return "torch"


def nvtx_enabled() -> bool:
    """True when ``MILP_NVTX=1``."""
    return env("MILP_NVTX", "0") == "1"


_NO_RANGE = contextlib.nullcontext()


def nvtx_range(name: str) -> contextlib.AbstractContextManager:
    """An NVTX range (and a ``torch.profiler`` record) named ``name`` when ``MILP_NVTX=1``;
    otherwise a shared no-op context (no generator per call: ops open several per launch)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not nvtx_enabled():
        return _NO_RANGE
    return _nvtx_range(name)


@contextlib.contextmanager
def _nvtx_range(name: str) -> Iterator[None]:
    cuda = torch.cuda.is_available()
    with torch.profiler.record_function(name):
        if cuda:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if cuda:
                torch.cuda.nvtx.range_pop()


class _SideStreams(threading.local):
    by_device: dict | None = None


_SIDE_STREAMS = _SideStreams()


def _side_stream(index: int) -> torch.cuda.Stream:
    # one per thread and GPU (torch hands streams out of a fixed pool: nothing leaks): a thread
    # capturing a CUDA graph must not find another thread's work on the stream it joined
    streams = _SIDE_STREAMS.by_device
    if streams is None:
        streams = _SIDE_STREAMS.by_device = {}
    stream = streams.get(index)
    if stream is None:
        stream = streams[index] = torch.cuda.Stream(device=index)
    return stream


class SideStream:
    """Work issued inside ``with side:`` runs on a side stream of ``device`` (one per GPU and
    thread), after everything the current stream has queued so far; the current stream waits
    for it at :meth:`wait` (up to a :meth:`mark` made inside) or at :meth:`join` (all of it).
    Tensors made on the side stream and used after the join are named to :meth:`join`, which
    records the current stream on them for the caching allocator.

    A fork and join in one call: it works eagerly and under CUDA-graph capture (the side
    stream joins the capture and is joined back). On a CPU (the interpreter, where CI runs the
    kernels) everything stays in program order and the stream calls do nothing.
    """

    __slots__ = ("main", "side", "_ctx")

    def __init__(self, device: torch.device):
        self.main: torch.cuda.Stream | None = None
        self.side: torch.cuda.Stream | None = None
        self._ctx: torch.cuda.StreamContext | None = None
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.main = torch.cuda.current_stream(index)
            self.side = _side_stream(index)
            self.side.wait_stream(self.main)

    def __enter__(self) -> SideStream:
        if self.side is not None:
            self._ctx = torch.cuda.stream(self.side)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
            self._ctx = None

    def mark(self) -> torch.cuda.Event | None:
        """An event after the side stream's work issued so far (``None`` on a CPU)."""
        if self.side is None:
            return None
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def wait(self, mark: torch.cuda.Event | None) -> None:
        """The current stream waits for the side stream's work up to ``mark``."""
        if mark is not None:
            assert self.main is not None  # a mark is only made on a GPU, where main is set
            self.main.wait_event(mark)

    def join(self, *made_there: torch.Tensor | None) -> None:
        """The current stream waits for all the side stream's work; ``made_there``: tensors
        allocated on the side stream that live on."""
        if self.side is None:
            return
        assert self.main is not None  # set together with side
        self.main.wait_stream(self.side)
        for t in made_there:
            if t is not None and t.numel():
                t.record_stream(self.main)
