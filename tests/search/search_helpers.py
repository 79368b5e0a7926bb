"""Helpers of the search tests: tiny NUTS / acquisition settings keep them fast."""
from __future__ import annotations

import math

from search import Objective, ffn_target_shapes, paper_space
from search.surrogate import AcquisitionSettings, NUTSSettings

TINY_NUTS = NUTSSettings(warmup_steps=16, num_samples=16, thinning=4)
TINY_ACQ = AcquisitionSettings(mc_samples=16, raw_samples=64, num_restarts=2, maxiter_alternating=4)


def lora_space_small():
    """The paper's space on 8 small layers (d = 10)."""
    return paper_space(8, target_shapes=ffn_target_shapes(8, 64, 128))


def lora_objectives_for(space):
    """Validation loss (evaluated) + parameter count (known)."""
    return [Objective("val_ce", "minimize"), space.parameter_count_objective()]


def toy_loss(c) -> float:
    """A deterministic loss that depends on layers 1 and 6, the module count and the rank."""
    cap = c.modules[0] * c.ranks[0]
    b = 1.0 - math.exp(-cap / 128.0)
    return 2.0 - 0.3 * c.layer_mask[1] * b - 0.2 * c.layer_mask[6] * b
