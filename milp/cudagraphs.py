"""``milp_cudagraphs``: torch's ``cudagraphs`` compile backend, the model's weights read in place.

:class:`milp.decode.ContinuousBatch` compiles its decode step with ``compile=True`` into CUDA
graphs without inductor's code generation: torch's ``cudagraphs`` backend traces the step
(dynamo, AOT autograd) and records one CUDA graph per shape (CUDA graph trees), which every later
step of that shape replays. That backend tells the graph trees which inputs keep their address
(*static*: read in place by the recorded graph) by counting the inputs AOT autograd lifted
itself. Since dynamo inlines ``nn.Module`` calls (always, from torch 2.6), a model's parameters
and buffers are dynamo's inputs like any other, AOT lifts none, and the graph trees take every
input as one that may move: before each replay they copy it into the graph's own buffer. For a
decode step that is a copy of every weight (2.2 GB for a TinyLlama-shaped model in bf16) before
the step reads them once more, three times the traffic of the step itself. Inductor's
``mode="reduce-overhead"`` reads dynamo's marks instead (parameters, buffers, tensors given to
``torch._dynamo.mark_static_address``), at the price of inductor's compile of every shape.

``milp_cudagraphs`` is the ``cudagraphs`` backend with those marks: every input dynamo marked
static (parameters, buffers, :class:`milp.kvcache.SlotCache`'s columns, the batch's token ids)
is passed to the graph trees as static; only the others (a few small tensors: the static plans'
buffers of the adapters) are copied per replay. ``torch.compile(fn, backend="milp_cudagraphs")``
names it: the package declares it as a dynamo backend entry point, which torch looks up by name,
and :func:`register` registers it where the package runs from a source tree (importing this
module does not load dynamo). :func:`static_inputs` is the rule.
It runs the stock backend with the graph trees' ``cudagraphify_impl`` wrapped for the call (in
the calling thread only): private torch API, as the stock backend's own use of it is. A graph
the stock backend will not capture (an op CUDA graphs cannot hold, a CPU tensor, a mutated input)
runs without CUDA graphs, as there, but with a ``RuntimeWarning`` naming torch's reason, where
torch only logs it to a logger that is off by default. Where a
torch release moves it, the compile fails, and :class:`milp.decode.ContinuousBatch` runs its step
eagerly with a ``RuntimeWarning``.

Example:
    >>> import torch
    >>> import milp.cudagraphs
    >>> w = torch.nn.Linear(4, 4)
    >>> milp.cudagraphs.static_inputs([w.weight, torch.zeros(2, 4)])
    [0]
"""
from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["BACKEND", "milp_cudagraphs", "register", "static_inputs"]

#: the name ``torch.compile(backend=...)`` takes
BACKEND = "milp_cudagraphs"

_LOCAL = threading.local()  # the static inputs of the compile running in this thread


def static_inputs(example_inputs: Sequence[Any]) -> list[int]:
    """The indices of ``example_inputs`` (a dynamo graph's) that keep their address from call to
    call: parameters, and tensors dynamo marked static (buffers, and tensors given to
    ``torch._dynamo.mark_static_address``)."""
    return [i for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor)
            and (isinstance(x, torch.nn.Parameter) or getattr(x, "_dynamo_static_input_type", None) is not None)]


def milp_cudagraphs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """The ``milp_cudagraphs`` backend (module doc): torch's ``cudagraphs`` backend, with
    :func:`static_inputs` read in place by the recorded graphs, not copied before each replay."""
    import torch._inductor.cudagraph_trees as trees
    from torch._dynamo.backends import cudagraphs as stock

    real, skip = trees.cudagraphify_impl, getattr(stock, "log_cudagraph_skip_and_bump_counter", None)
    _LOCAL.static = (len(example_inputs), static_inputs(example_inputs))
    trees.cudagraphify_impl = _wrapped(real)
    if skip is not None:
        setattr(stock, "log_cudagraph_skip_and_bump_counter", _warned(skip))  # noqa: B010 (a module's function)
    try:
        return stock.cudagraphs(gm, example_inputs)
    finally:
        trees.cudagraphify_impl = real
        if skip is not None:
            setattr(stock, "log_cudagraph_skip_and_bump_counter", skip)  # noqa: B010
        del _LOCAL.static


def _warned(real: Callable[[str], None]) -> Callable[[str], None]:
    """torch's skip logger (a log line nobody sees by default), also a ``RuntimeWarning``: a step
    that runs without CUDA graphs is a few times slower on a GPU, and whoever serves should know."""
    def log_cudagraph_skip_and_bump_counter(msg: str) -> None:
        if getattr(_LOCAL, "static", None) is not None:
            why = " ".join(msg.split())[:400]
            warnings.warn(f"milp_cudagraphs: torch will not capture a graph in CUDA graphs ({why}); it runs "
                          "without them", RuntimeWarning, stacklevel=2)
        real(msg)

    return log_cudagraph_skip_and_bump_counter


def _wrapped(real: Callable[..., Any]) -> Callable[..., Any]:
    def cudagraphify_impl(model: Any, inputs: list[Any], static_input_idxs: Sequence[int], *args: Any,
                          **kwargs: Any) -> Any:
        mine = getattr(_LOCAL, "static", None)
        if mine is not None:  # AOT's inputs: the ones it lifted itself first, then dynamo's, in order
            count, static = mine
            lifted = len(inputs) - count
            static_input_idxs = sorted({*static_input_idxs, *(lifted + i for i in static)})
        return real(model, inputs, static_input_idxs, *args, **kwargs)

    return cudagraphify_impl


@functools.cache
def register() -> str:
    """Make ``backend="milp_cudagraphs"`` known to ``torch.compile`` (where the installed entry
    point has not already); returns the name."""
    if BACKEND not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(milp_cudagraphs, name=BACKEND)
    return BACKEND
