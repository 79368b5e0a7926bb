"""Objectives of the configuration search: a name, a direction, optionally a known function.

BoTorch maximises; an objective with ``direction="minimize"`` is negated internally
(:attr:`Objective.sign`), and every value the search reports or logs is in the
objective's own units and direction.

A *known* objective (``known=f``) is computed from the encoded point by ``f(X[..., d]) ->
[...]`` instead of being evaluated and modelled: the trainable-parameter count is exact
and cheap, so fitting a Gaussian process to it would only add a NUTS run per round and
model error.  The acquisition function sees its exact value (through BoTorch's
``GenericMCMultiOutputObjective``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .space import SearchSpace

__all__ = ["ROUGE_L", "VALIDATION_CE", "Objective", "default_objectives"]

_DIRECTIONS = ("minimize", "maximize")


@dataclass(frozen=True)
class Objective:
    """One search objective.

    Args:
        name: unique, non-empty name (the key of the value in ``tell``/the log).
        direction: ``"minimize"`` or ``"maximize"``.
        known: optional ``f(X) -> values`` on unit-cube points ``X [..., d]`` (float64
            tensor) returning ``[...]``; the objective is then computed, not evaluated.
        known_relaxed: optional differentiable extension of ``known`` that equals it on the
            space's grid; the acquisition optimiser uses it for its continuous-relaxation
            starting points (a piecewise-constant ``known`` gives L-BFGS no gradient).

    Example:
        >>> Objective("val_ce", "minimize").sign
        -1.0
        >>> Objective("rouge_l", "maximize").sign
        1.0
    """

    name: str
    direction: str = "minimize"
    known: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)
    known_relaxed: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")
        if not self.name:
            raise ValueError("name must be a non-empty string")
        if self.direction not in _DIRECTIONS:
            raise ValueError(f"direction must be 'minimize' or 'maximize', got {self.direction!r}")
        if self.known is not None and not callable(self.known):
            raise TypeError(f"known must be callable or None, got {type(self.known).__name__}")
        if self.known_relaxed is not None:
            if not callable(self.known_relaxed):
                raise TypeError(f"known_relaxed must be callable or None, got {type(self.known_relaxed).__name__}")
            if self.known is None:
                raise ValueError("known_relaxed needs known (the exact function) as well")

    @property
    def sign(self) -> float:
        """``+1`` for maximised objectives, ``-1`` for minimised ones (BoTorch maximises)."""
        return 1.0 if self.direction == "maximize" else -1.0

    @property
    def is_known(self) -> bool:
        """Whether the value is computed from the configuration rather than evaluated."""
        return self.known is not None

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (stored in the trial log's header)."""
        return {"name": self.name, "direction": self.direction, "known": self.is_known}


#: Validation cross-entropy of the user's targets (lower is better).
VALIDATION_CE = Objective("val_ce", "minimize")
#: ROUGE-L of generated answers (higher is better).
ROUGE_L = Objective("rouge_l", "maximize")


def default_objectives(space: SearchSpace, *, rouge: bool = True) -> list[Objective]:
    """The paper's objectives: validation CE ↓, ROUGE-L ↑ (optional), parameter count ↓ (known).

    Example:
        >>> from search.space import paper_space, ffn_target_shapes
        >>> s = paper_space(2, target_shapes=ffn_target_shapes(2, 4, 8))
        >>> [o.name for o in default_objectives(s)]
        ['val_ce', 'rouge_l', 'parameters']
    """
    from .space import SearchSpace

    if not isinstance(space, SearchSpace):  # the parameter count needs a LoRA space's target shapes
        raise TypeError(f"space must be a SearchSpace (with target_shapes), got {type(space).__name__}")
    objs: list[Objective] = [VALIDATION_CE]
    if rouge:
        objs.append(ROUGE_L)
    objs.append(space.parameter_count_objective())
    return objs


def check_objectives(objectives: Sequence[Objective]) -> tuple[Objective, ...]:
    """Validate a list of objectives (internal helper)."""
    if isinstance(objectives, (str, bytes, Objective)) or not isinstance(objectives, Sequence):
        raise TypeError(f"objectives must be a sequence of Objective, got {type(objectives).__name__}")
    objs = tuple(objectives)
    for i, o in enumerate(objs):
        if not isinstance(o, Objective):
            raise TypeError(f"objectives[{i}] must be an Objective, got {type(o).__name__}")
    if len(objs) < 2:
        raise ValueError(f"objectives must list at least 2 objectives (a multi-objective search), got {len(objs)}")
    names = [o.name for o in objs]
    if len(set(names)) != len(names):
        raise ValueError(f"objectives must have unique names, got {names}")
    if all(o.is_known for o in objs):
        raise ValueError("objectives: at least one objective must be evaluated (not known)")
    return objs
