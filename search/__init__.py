"""search: multi-objective Bayesian search over multi-LoRA memory configurations.

Light imports (standard library only) are eager: the spaces, the configuration type and
:func:`parameter_count` (the single source of truth the runtime's ``MemoryConfig`` uses).
The search itself (BoTorch, torch) is imported on first use of :class:`Search`, :func:`run`
and the other names below.

Example:
    >>> from search import Search, paper_space, ffn_target_shapes, VALIDATION_CE
    >>> space = paper_space(30, target_shapes=ffn_target_shapes(30, 576, 1536))
    >>> s = Search(space, [VALIDATION_CE, space.parameter_count_objective()], q=4, n_init=100)
    >>> len(s.ask())
    4
"""
from typing import Any

from .objectives import ROUGE_L, VALIDATION_CE, Objective, default_objectives
from .space import (
    PAPER_MODULES,
    PAPER_RANKS,
    BoxSpace,
    LoRAConfig,
    SearchSpace,
    Space,
    extended_space,
    ffn_target_shapes,
    paper_space,
    parameter_count,
)

_LAZY = {
    "Search": "loop",
    "Trial": "loop",
    "run": "loop",
    "NUTSSettings": "surrogate",
    "AcquisitionSettings": "surrogate",
    "fit_surrogate": "surrogate",
    "propose": "surrogate",
    "hypervolume": "pareto",
    "hypervolume_trace": "pareto",
    "infer_ref_point": "pareto",
    "pareto_mask": "pareto",
    "plot_pareto": "plots",
    "plot_hypervolume": "plots",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'search' has no attribute {name!r}")


__all__ = [
    "PAPER_MODULES",
    "PAPER_RANKS",
    "ROUGE_L",
    "VALIDATION_CE",
    "BoxSpace",
    "LoRAConfig",
    "Objective",
    "SearchSpace",
    "Space",
    "default_objectives",
    "extended_space",
    "ffn_target_shapes",
    "paper_space",
    "parameter_count",
    *_LAZY,
]
