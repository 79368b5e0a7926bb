"""search: multi-objective Bayesian search over multi-LoRA memory configurations.

Light imports (standard library only) are eager: the spaces, the configuration type and
:func:`parameter_count` (the single source of truth the runtime's ``MemoryConfig`` uses).
The search itself (BoTorch, torch) is imported on first use of :class:`Search`, :func:`run`
and the other names below.

How the pipeline drives it
--------------------------
1. The space: ``paper_space(num_layers, target_shapes=ffn_target_shapes(L, hidden, ffn))``
   (the paper's: a bit per layer, one module count 0..32, one rank in {8, 16, 32, 64, 96};
   ``extended_space`` for a rank per layer).  ``target_shapes`` makes the parameter count
   exact, so it is a *known* objective: computed, never trained for, never modelled.
2. The search: ``Search(space, [VALIDATION_CE, space.parameter_count_objective()], q=...,
   n_init=..., log_path=...)`` (add ``ROUGE_L`` before the count for the paper's three
   objectives).  Defaults are the paper's: 100 Sobol points, SAAS-GP fitted by NUTS
   (512 warm-up / 256 samples / thinning 16), qLogNEHVI; ``surrogate="gp"`` is the cheap
   ``SingleTaskGP`` fallback for long searches.
3. Rounds: ``trials = search.ask()`` gives ``q`` trials; train their ``trial.config``
   (a :class:`LoRAConfig`: ``layer_mask``, ``modules``, ``ranks`` per layer) together as
   ``q`` virtual users, then ``search.tell(trial, {"val_ce": ce})`` each (extra numeric
   keys, e.g. ``"rouge_l"`` when it is not an objective, are logged as metrics; ``None``,
   NaN or inf marks a failed trial, logged and never fed to the surrogate).  Or hand the
   whole loop to ``search.run(score_round, n_trials)``, with ``score_round(configs) ->
   [{"val_ce": ...}, ...]``.
4. Resume: every told trial is appended to the JSONL ``log_path`` at once.  After a crash
   or a kill, build the same ``Search`` on the same ``log_path``: finished trials are
   loaded (never evaluated again), trials that were asked but not told are asked again,
   and ``run(score_round, n_trials)`` stops at exactly ``n_trials`` finished trials.
5. Pick: ``search.select("val_ce", tolerance=0.01, then="parameters")``: among the
   Pareto-optimal trials whose validation CE is within 1 % (relative) of the best CE found,
   the one with the fewest trainable parameters (ties: the lower CE).  ``python -m
   milp.train`` applies this rule (``--search-tolerance``) to its successful trials with at
   least one adapter plus an "adapters on every layer" reference, so a configuration without
   memory is never its pick.  ``search.pareto_front()``, ``search.hypervolume()`` and
   ``search.plot(directory)`` report the front.

Example (Sobol rounds only, so it runs in a second; a real search has ``n_init=100``):
    >>> import tempfile, pathlib
    >>> from search import Search, VALIDATION_CE, ffn_target_shapes, paper_space
    >>> space = paper_space(30, target_shapes=ffn_target_shapes(30, 576, 1536))  # SmolLM2-135M
    >>> objectives = [VALIDATION_CE, space.parameter_count_objective()]
    >>> log = pathlib.Path(tempfile.mkdtemp()) / "user0_trials.jsonl"
    >>> search = Search(space, objectives, q=4, n_init=8, log_path=log)
    >>> def train_and_score(configs):  # stands in for one batched training run of q virtual users
    ...     return [2.0 - 0.01 * sum(c.layer_mask) * min(c.modules[0], 4) for c in configs]
    >>> for _ in range(2):
    ...     trials = search.ask()
    ...     for t, ce in zip(trials, train_and_score([t.config for t in trials])):
    ...         _ = search.tell(t, {"val_ce": ce})
    >>> resumed = Search(space, objectives, q=4, n_init=8, log_path=log)  # e.g. after a crash
    >>> resumed.n_finished
    8
    >>> best = resumed.select("val_ce", tolerance=0.01, then="parameters")
    >>> best.ok, best.values["parameters"] == space.parameter_count(best.config)
    (True, True)
    >>> sorted(best.config.to_dict())
    ['layer_mask', 'modules', 'ranks']
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
