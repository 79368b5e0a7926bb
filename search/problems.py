"""Test problems for validating the search: DTLZ2 and a synthetic LoRA-configuration problem.

:class:`LoRASynthetic` imitates the real search on LLaMA2-7B shapes (32 layers, 4096 ↔ 11008,
the paper's space, ``d = 34``): a validation loss that depends on only 4 dimensions — two
layer bits, the module count and the rank — plus noise, and the exact trainable-parameter
count, which depends on every layer bit (so adapters on irrelevant layers cost parameters
and buy nothing)::

    cap     = n · r                                  (rank budget per layer)
    benefit = 1 - exp(-cap / 256)
    overfit = (cap / 3072)²
    loss    = 2 - α_a (0.30 benefit - 0.10 overfit) - α_b (0.20 benefit - 0.10 overfit) + ε,
    ε ~ N(0, noise_std²)

Hypervolumes of validation runs are computed on the *noise-free* loss of the evaluated
configurations (the usual practice), with a fixed reference point, both with the parameter
count on a linear scale (as a fraction of the maximum, what the search optimises) and on a
log scale (``log10(1 + p) / log10(1 + p_max)``), which separates the small configurations
the linear scale squeezes against zero.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from .objectives import Objective
from .pareto import hypervolume
from .space import BoxSpace, LoRAConfig, SearchSpace, ffn_target_shapes, paper_space

__all__ = ["DTLZ2Problem", "LoRASynthetic"]


class LoRASynthetic:
    """34-dimensional synthetic LoRA-configuration problem with 4 relevant dimensions.

    Example:
        >>> p = LoRASynthetic(seed=0)
        >>> p.space.dim, p.relevant
        (34, ('layer_5', 'layer_20', 'modules', 'rank'))
        >>> p.true_loss(LoRAConfig.uniform(32, modules=0, rank=8))
        2.0
        >>> round(p.max_hv, 4), round(p.best_loss, 4)
        (0.5167, 1.5312)
    """

    name = "lora34"

    def __init__(
        self,
        *,
        num_layers: int = 32,
        relevant_layers: tuple[int, int] = (5, 20),
        noise_std: float = 0.01,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        seed: int = 0,
    ) -> None:
        if isinstance(relevant_layers, (str, bytes)) or not isinstance(relevant_layers, Sequence):
            raise TypeError(f"relevant_layers must be a pair of ints, got {type(relevant_layers).__name__}")
        if len(relevant_layers) != 2:
            raise ValueError(f"relevant_layers must be two distinct layers, got {tuple(relevant_layers)}")
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in relevant_layers):
            raise TypeError(f"relevant_layers must be a pair of ints, got {tuple(relevant_layers)!r}")
        a, b = (int(v) for v in relevant_layers)
        if not (0 <= a < num_layers and 0 <= b < num_layers and a != b):
            raise ValueError(f"relevant_layers must be two distinct layers in [0, {num_layers}), got {relevant_layers}")
        if isinstance(noise_std, bool) or not isinstance(noise_std, numbers.Real):
            raise TypeError(f"noise_std must be a real number, got {type(noise_std).__name__} ({noise_std!r})")
        if not (noise_std >= 0 and math.isfinite(noise_std)):
            raise ValueError(f"noise_std must be finite and >= 0, got {noise_std}")
        self.layers: tuple[int, int] = (a, b)
        self.noise_std: float = float(noise_std)
        self.space: SearchSpace = paper_space(
            num_layers, target_shapes=ffn_target_shapes(num_layers, hidden_size, intermediate_size)
        )
        self.objectives = [Objective("val_ce", "minimize"), self.space.parameter_count_objective("parameters")]
        self.max_parameters = self.space.parameter_count(LoRAConfig.uniform(num_layers, 32, 96))
        #: Fixed reference point (natural units): the no-adapter loss + 0.05, every parameter.
        self.ref_point = [2.05, float(self.max_parameters)]
        #: Hypervolumes are reported divided by this (parameters as a fraction of the maximum).
        self.hv_scale = float(self.max_parameters)
        self.relevant = (f"layer_{a}", f"layer_{b}", "modules", "rank")
        self._gen: torch.Generator = torch.Generator().manual_seed(10_000 + seed)
        #: The best noise-free loss over the space (both relevant layers on, best n · r).
        self.best_loss = min(
            self.true_loss(LoRAConfig.uniform(num_layers, n, r)) for n in range(33) for r in self.space.ranks
        )
        self._log_max: float = math.log10(1.0 + self.max_parameters)
        # The true Pareto front: switching on a layer other than the two relevant ones only
        # adds parameters, so it lies among the configurations using those two at most.
        front = [
            self.true_values(LoRAConfig([i in on for i in range(num_layers)], [n] * num_layers, [r] * num_layers))
            for on in ((a,), (b,), (a, b))
            for n in range(33)
            for r in self.space.ranks
        ]
        #: The largest attainable hypervolume (linear and log-scale views, same units as reported).
        self.max_hv = hypervolume(front, self.ref_point, ["minimize"] * 2) / self.hv_scale
        self.max_hv_log = hypervolume([self.log_values(y) for y in front], list(self.log_ref_point), ["minimize"] * 2)

    def log_values(self, values: Sequence[float]) -> list[float]:
        """``[loss, log10(1 + parameters) / log10(1 + max parameters)]`` (the log-scale view)."""
        return [values[0], math.log10(1.0 + values[1]) / self._log_max]

    #: Reference point of the log-scale view.
    log_ref_point = (2.05, 1.0)

    def true_loss(self, c: LoRAConfig) -> float:
        """Noise-free loss of a configuration."""
        a, b = self.layers
        cap = c.modules[a] * c.ranks[a], c.modules[b] * c.ranks[b]
        loss = 2.0
        for on, k, w in ((c.layer_mask[a], cap[0], 0.30), (c.layer_mask[b], cap[1], 0.20)):
            if on:
                loss -= w * (1.0 - math.exp(-k / 256.0)) - 0.10 * (k / 3072.0) ** 2
        return loss

    def true_values(self, c: LoRAConfig) -> list[float]:
        """Noise-free ``[loss, parameters]``."""
        return [self.true_loss(c), float(self.space.parameter_count(c))]

    def __call__(self, configs: Sequence[LoRAConfig]) -> list[dict[str, float]]:
        """Batched objective for :meth:`search.Search.run`: noisy loss per configuration."""
        out = []
        for c in configs:
            eps = float(torch.randn((), generator=self._gen)) * self.noise_std
            out.append({"val_ce": self.true_loss(c) + eps})
        return out


class DTLZ2Problem:
    """BoTorch's DTLZ2 (both objectives minimised), ``d = 6``, ``m = 2``, noise-free.

    Example:
        >>> p = DTLZ2Problem()
        >>> p.space.dim, p.ref_point
        (6, [1.1, 1.1])
    """

    name = "dtlz2"

    def __init__(self, dim: int = 6, num_objectives: int = 2) -> None:
        from botorch.test_functions.multi_objective import DTLZ2

        self.problem = DTLZ2(dim=dim, num_objectives=num_objectives)
        self.space = BoxSpace([(0.0, 1.0)] * dim)
        self.objectives = [Objective(f"f{i}", "minimize") for i in range(num_objectives)]
        self.ref_point = [1.1] * num_objectives
        self.hv_scale = 1.0
        self.max_hv = float(self.problem.max_hv)

    def true_values(self, c: Sequence[float]) -> list[float]:
        """Objective values of one point."""
        return self.problem(torch.tensor([list(c)], dtype=torch.float64))[0].tolist()

    def __call__(self, configs: Sequence[Any]) -> list[list[float]]:
        """Batched objective for :meth:`search.Search.run`."""
        X = torch.tensor([list(c) for c in configs], dtype=torch.float64)
        return self.problem(X).tolist()
