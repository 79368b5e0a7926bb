"""search: multi-objective Bayesian search over multi-LoRA memory configurations.

Light imports (standard library only) are eager: the spaces, the configuration type and
:func:`parameter_count` (the single source of truth the runtime's ``MemoryConfig`` uses).
"""
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
]
