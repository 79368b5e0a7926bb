"""The search: ask/tell API, ``run`` loop, resumable JSONL trial log, Pareto front, plots.

A round is ``q`` candidates asked together — the runtime trains them as ``q`` "virtual
users" in one batched run — and told back when scored::

    search = Search(space, objectives, q=4, n_init=100, log_path="trials.jsonl")
    while search.n_finished < budget:
        trials = search.ask()                      # q configurations
        scores = train_and_score([t.config for t in trials])
        for t, s in zip(trials, scores):
            search.tell(t, s)                      # {"val_ce": ..., "rouge_l": ...}

or ``search.run(score_round, n_trials=budget)`` for the same loop with a progress bar.

Design
------
* Initial design: the first ``n_init`` points of a scrambled Sobol sequence (seeded by
  ``seed``), snapped onto the space's grid; design point ``i`` is asked at most once.
* Then Bayesian rounds: one surrogate per evaluated objective fitted on the successful
  trials (SAAS-GP by NUTS, or ``SingleTaskGP`` with ``surrogate="gp"``), qLogNEHVI over all
  objectives, ``q`` candidates conditioned on the still-pending ones.  A candidate equal to
  an evaluated or pending point is replaced by the next unused Sobol point, so a round
  never scores the same configuration twice.  If fitting or optimisation fails
  numerically the round falls back to Sobol points with a warning.
* Failed trials: a NaN/inf/``None`` objective value marks the trial ``"failed"``; it is
  logged and counts toward the budget but is never fed to a surrogate.
* Trial log: one header line (space, objectives) then one line per *finished* trial
  (``trial_id``, ``round``, ``status``, ``config``, encoded ``x``, ``objectives``, extra
  ``metrics``, ``source``, ``seed``, ``design_index``, ``elapsed_s``, ``timestamp``), each
  written whole and fsync-ed; ``run`` writes a round's lines in one write, so a process
  stopped while telling a round leaves none of it (the rest of a round asked anew would be
  another round).  A new :class:`Search` on an existing log resumes: finished trials are
  loaded, never re-evaluated, and ``run(n_trials=N)`` stops at exactly ``N`` finished
  trials.  Trials asked but not told when the process died are simply asked again.
  Corrupt lines are skipped with a warning; a log written for another space, other
  objectives or another ``seed`` (its design indices name that seed's Sobol points) is
  refused.  ``q``, ``n_init`` and ``surrogate`` may change between runs of one log.
* Reference point: the user's (natural units, per objective), else the rule of
  :func:`search.pareto.infer_ref_point` applied to the current successful trials.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, SupportsInt, cast

import torch
from torch.quasirandom import SobolEngine

from . import pareto as _pareto
from .objectives import Objective, check_objectives
from .space import Space
from .surrogate import SURROGATES, AcquisitionSettings, NUTSSettings, fit_surrogate, propose
from .trial_log import append_record, decode_float, encode_float, read_log, repair_tail

__all__ = ["Search", "Trial", "run"]

LOG_VERSION = 1
_STATUSES = ("ok", "failed")


@dataclass
class Trial:
    """One evaluation: the configuration, its encoded point and (once told) its values.

    ``status`` is ``"pending"`` until told, then ``"ok"`` or ``"failed"`` (a non-finite
    objective).  ``values`` maps every objective name to its value (natural units).
    """

    trial_id: int
    round: int
    config: Any
    x: tuple[float, ...]
    source: str
    seed: int
    design_index: int | None = None
    status: str = "pending"
    values: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float | None = None
    timestamp: float | None = None
    asked_at: float = field(default_factory=time.monotonic, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """Told with all objective values finite."""
        return self.status == "ok"


_MAX_SEED = 2**62


def _check_int(v: Any, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} ({v!r})")
    if int(v) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(v)}")
    return int(v)


def _as_float(v: numbers.Real, name: str) -> float:
    """``float(v)``; an int beyond the float range is a ``ValueError`` naming ``name``."""
    try:
        return float(v)
    except OverflowError:
        bits = int(cast(SupportsInt, v)).bit_length()  # numbers.Real has no __int__ in its stub; an int or Fraction has
        raise ValueError(f"{name} must be a number in the float range, got an int of {bits} bits") from None


class Search:
    """Multi-objective Bayesian configuration search with an ask/tell API.

    Args:
        space: a :class:`search.space.Space` (e.g. ``paper_space(L, target_shapes=...)``).
        objectives: at least two :class:`search.Objective`; known ones are computed.
        q: candidates per round (virtual users trained together).
        n_init: size of the scrambled-Sobol initial design (paper: 100).
        surrogate: ``"saas"`` (SAAS-GP, NUTS) or ``"gp"`` (``SingleTaskGP``, cheap fallback).
        nuts: NUTS settings (default: the paper's 512 warm-up / 256 samples / thinning 16).
        acquisition: acquisition-optimisation settings.
        ref_point: optional reference point in natural units: a sequence (one value per
            objective) or a mapping name → value (missing names are inferred).
        seed: seeds the Sobol design, NUTS and the acquisition optimiser (round ``r``
            uses ``seed + r``).
        log_path: JSONL trial log; an existing log is resumed.

    Example:
        >>> from search import BoxSpace, Objective
        >>> s = Search(BoxSpace([(0, 1)] * 2), [Objective("a"), Objective("b")], q=2, n_init=4)
        >>> trials = s.ask()
        >>> for t in trials:
        ...     _ = s.tell(t, {"a": t.config[0], "b": 1 - t.config[0] * t.config[1]})
        >>> s.n_finished
        2
    """

    _SCAN = 4096  # Sobol points scanned past the design for a configuration not yet asked

    def __init__(
        self,
        space: Space,
        objectives: Sequence[Objective],
        *,
        q: int = 4,
        n_init: int = 100,
        surrogate: str = "saas",
        nuts: NUTSSettings | None = None,
        acquisition: AcquisitionSettings | None = None,
        ref_point: Sequence[float] | Mapping[str, float] | None = None,
        seed: int = 0,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(space, Space):
            raise TypeError(f"space must be a search.space.Space, got {type(space).__name__}")
        self.space = space
        self.objectives = check_objectives(objectives)
        self.q = _check_int(q, "q", 1)
        self.n_init = _check_int(n_init, "n_init", 0)
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        self.surrogate = surrogate
        self.nuts = NUTSSettings() if nuts is None else nuts  # not `or`: a falsy 0 or "" is refused
        if not isinstance(self.nuts, NUTSSettings):
            raise TypeError(f"nuts must be NUTSSettings, got {type(self.nuts).__name__}")
        self.acquisition = AcquisitionSettings() if acquisition is None else acquisition
        if not isinstance(self.acquisition, AcquisitionSettings):
            raise TypeError(f"acquisition must be AcquisitionSettings, got {type(self.acquisition).__name__}")
        self.seed = _check_int(seed, "seed", 0)
        if self.seed >= _MAX_SEED:  # torch and JAX take 63-bit seeds: BO would fail each round, Sobol standing in
            raise ValueError(f"seed must be < 2**62 (round r seeds torch and JAX with seed + r), got {self.seed}")
        self._user_ref = self._check_ref_point(ref_point)
        if log_path is not None and not isinstance(log_path, (str, os.PathLike)):
            raise TypeError(f"log_path must be a str or os.PathLike or None, got {type(log_path).__name__}")
        self.log_path = None if log_path is None else Path(log_path)

        self._finished: dict[int, Trial] = {}
        self._pending: dict[int, Trial] = {}
        self._next_id = 0
        self._round = 0
        self._sobol = SobolEngine(space.dim, scramble=True, seed=self.seed)
        self._sobol_points: list[tuple[float, ...]] = []
        self._used_design: set[int] = set()
        if self.log_path is not None:
            self._open_log()

    # ------------------------------------------------------------------ properties
    @property
    def names(self) -> tuple[str, ...]:
        """Objective names, in order."""
        return tuple(o.name for o in self.objectives)

    @property
    def directions(self) -> tuple[str, ...]:
        """Objective directions, in order."""
        return tuple(o.direction for o in self.objectives)

    @property
    def trials(self) -> list[Trial]:
        """Finished trials (ok and failed), by trial id."""
        return [self._finished[k] for k in sorted(self._finished)]

    @property
    def pending(self) -> list[Trial]:
        """Asked but not yet told trials."""
        return [self._pending[k] for k in sorted(self._pending)]

    @property
    def n_finished(self) -> int:
        """Number of finished trials (the budget counter)."""
        return len(self._finished)

    @property
    def n_failed(self) -> int:
        """Number of failed trials."""
        return sum(1 for t in self._finished.values() if not t.ok)

    # ------------------------------------------------------------------ validation
    def _check_ref_point(self, ref: Any) -> dict[str, float]:
        if ref is None:
            return {}
        if isinstance(ref, Mapping):
            unknown = set(ref) - set(self.names)
            if unknown:
                raise ValueError(
                    f"ref_point has unknown objective name(s) {sorted(unknown)}; objectives are {self.names}"
                )
            items = dict(ref)
        else:
            if isinstance(ref, (str, bytes)) or not isinstance(ref, Sequence):
                raise TypeError(f"ref_point must be a sequence or a mapping, got {type(ref).__name__}")
            if len(ref) != len(self.objectives):
                raise ValueError(f"ref_point must have {len(self.objectives)} values, got {len(ref)}")
            items = dict(zip(self.names, ref))
        out = {}
        for k, v in items.items():
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                raise ValueError(f"ref_point[{k!r}] must be a finite number, got {v!r}")
            out[k] = float(v)
        return out

    # ------------------------------------------------------------------ log
    def _header(self) -> dict[str, Any]:
        return {
            "type": "header",
            "version": LOG_VERSION,
            "space": self.space.describe(),
            "objectives": [o.describe() for o in self.objectives],
            "seed": self.seed,
            "q": self.q,
            "n_init": self.n_init,
            "surrogate": self.surrogate,
        }

    def _open_log(self) -> None:
        path = self.log_path
        assert path is not None
        if path.exists() and path.is_dir():
            raise ValueError(f"log_path {str(path)!r} is a directory, expected a file")
        path.parent.mkdir(parents=True, exist_ok=True)
        header_seen = False
        if path.exists():
            want = self._header()
            for lineno, rec in read_log(path):
                kind = rec.get("type")
                if kind == "header":
                    if rec.get("space") != want["space"] or rec.get("objectives") != want["objectives"]:
                        raise ValueError(
                            f"log_path {str(path)!r} was written for a different search "
                            f"(space {rec.get('space')}, objectives {rec.get('objectives')}); "
                            f"this search has space {want['space']} and objectives {want['objectives']}"
                        )
                    if "seed" in rec and rec["seed"] != want["seed"]:
                        # the log's design indices name points of that seed's Sobol sequence
                        raise ValueError(
                            f"log_path {str(path)!r} was written with seed={rec['seed']!r}; resume it with "
                            f"that seed (this search has seed={self.seed}), or start a new log"
                        )
                    header_seen = True
                elif kind == "trial":
                    try:
                        trial = self._trial_from_record(rec)
                    except (KeyError, TypeError, ValueError, OverflowError) as e:  # huge ints, Infinity
                        warnings.warn(f"{path}:{lineno}: skipping invalid trial record ({e})", stacklevel=2)
                        continue
                    why = self._known_mismatch(trial)
                    if why is not None:  # the space describes itself the same but computes other values
                        raise ValueError(
                            f"log_path {str(path)!r} was written for a different search: trial "
                            f"{trial.trial_id} (line {lineno}) has {why} (another space's target_shapes?)"
                        )
                    if trial.trial_id in self._finished:
                        warnings.warn(
                            f"{path}:{lineno}: skipping duplicate record of trial {trial.trial_id}", stacklevel=2
                        )
                        continue
                    self._finished[trial.trial_id] = trial
                else:
                    warnings.warn(f"{path}:{lineno}: skipping record of unknown type {kind!r}", stacklevel=2)
            repair_tail(path)
        if not header_seen:
            append_record(path, self._header())
        if self._finished:
            self._next_id = max(self._finished) + 1
            self._round = max(t.round for t in self._finished.values()) + 1
            self._used_design = {t.design_index for t in self._finished.values() if t.design_index is not None}

    def _known_mismatch(self, t: Trial) -> str | None:
        """Why ``t``'s logged values of the known objectives are not what they compute, or ``None``.

        Known objectives are computed from the configuration, so a resumed log must hold the
        values this search computes; the space's description does not cover everything they
        depend on (``SearchSpace.describe`` has no ``target_shapes``).
        """
        x = torch.tensor([t.x], dtype=torch.float64)
        for o in self.objectives:
            if o.is_known:
                assert o.known is not None
                now, logged = float(o.known(x).reshape(-1)[0]), t.values[o.name]
                if not math.isfinite(logged):  # a failed trial's missing value (an ok one is refused before)
                    continue
                if not (now == logged or math.isclose(now, logged, rel_tol=1e-9)):
                    return f"{o.name} = {logged!r} in the log, but this search computes {now!r}"
        return None

    def _trial_from_record(self, rec: Mapping[str, Any]) -> Trial:
        tid = rec["trial_id"]
        if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
            raise ValueError(f"trial_id must be a non-negative int, got {tid!r}")
        rnd = rec["round"]
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
            raise ValueError(f"round must be a non-negative int, got {rnd!r}")
        x = rec["x"]
        if not isinstance(x, list) or len(x) != self.space.dim:
            raise ValueError(f"x must be a list of {self.space.dim} numbers")
        xs = tuple(float(v) for v in x)
        if self.space.snap(xs) != xs:
            raise ValueError("x is not a point of the space's grid")
        config = self.space.decode(xs)
        if "config" in rec and self.space.config_to_dict(config) != rec["config"]:
            raise ValueError("config does not match the decoded x")
        objs = rec["objectives"]
        if not isinstance(objs, dict) or set(objs) != set(self.names):
            raise ValueError(f"objectives must map exactly {list(self.names)}")
        values = {k: decode_float(objs[k]) for k in self.names}
        status = rec["status"]
        finite = all(math.isfinite(v) for v in values.values())
        if status not in _STATUSES or (status == "ok") != finite:
            raise ValueError(f"status {status!r} does not match the objective values")
        design_index = rec.get("design_index")
        if design_index is not None and (isinstance(design_index, bool) or not isinstance(design_index, int)):
            raise ValueError("design_index must be an int or null")
        metrics = rec.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise ValueError("metrics must be an object")
        return Trial(
            trial_id=tid,
            round=rnd,
            config=config,
            x=xs,
            source=str(rec.get("source", "")),
            seed=int(rec.get("seed", 0)),
            design_index=design_index,
            status=status,
            values=values,
            metrics=metrics,
            elapsed_s=rec.get("elapsed_s"),
            timestamp=rec.get("timestamp"),
        )

    def _record(self, t: Trial) -> dict[str, Any]:
        return {
            "type": "trial",
            "trial_id": t.trial_id,
            "round": t.round,
            "status": t.status,
            "config": self.space.config_to_dict(t.config),
            "x": list(t.x),
            "objectives": {k: encode_float(v) for k, v in t.values.items()},
            "metrics": t.metrics,
            "source": t.source,
            "seed": t.seed,
            "design_index": t.design_index,
            "elapsed_s": t.elapsed_s,
            "timestamp": t.timestamp,
        }

    # ------------------------------------------------------------------ design
    def _sobol_point(self, i: int) -> tuple[float, ...]:
        while len(self._sobol_points) <= i:
            block = self._sobol.draw(max(16, i + 1 - len(self._sobol_points)), dtype=torch.float64)
            self._sobol_points.extend(self.space.snap(row) for row in block.tolist())
        return self._sobol_points[i]

    def _next_design_indices(self, k: int, limit: int | None) -> list[int]:
        """The next ``k`` unused Sobol indices (below ``limit`` if given)."""
        busy = self._used_design | {t.design_index for t in self._pending.values() if t.design_index is not None}
        out: list[int] = []
        i = 0
        while len(out) < k and (limit is None or i < limit):
            if i not in busy:
                out.append(i)
            i += 1
        return out

    # ------------------------------------------------------------------ ask / tell
    def _ok_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        ok = [t for t in self.trials if t.ok]
        X = torch.tensor([t.x for t in ok], dtype=torch.float64).reshape(len(ok), self.space.dim)
        Y = torch.tensor([[t.values[n] for n in self.names] for t in ok], dtype=torch.float64)
        return X, Y.reshape(len(ok), len(self.names))

    def reference_point(self) -> list[float]:
        """The reference point in natural units (user-given values, the rest inferred).

        Example:
            >>> from search import BoxSpace, Objective
            >>> s = Search(BoxSpace([(0, 1)]), [Objective("a"), Objective("b")], ref_point=[2.0, 3.0])
            >>> s.reference_point()
            [2.0, 3.0]
        """
        if len(self._user_ref) == len(self.names):
            return [self._user_ref[n] for n in self.names]
        _, Y = self._ok_data()
        if Y.shape[0] == 0:
            raise ValueError("no successful trial yet: cannot infer a reference point (pass ref_point=...)")
        inferred = _pareto.infer_ref_point(Y, self.directions)
        return [self._user_ref.get(n, v) for n, v in zip(self.names, inferred)]

    def ask(self, n: int | None = None) -> list[Trial]:
        """The next ``n`` (default ``q``) trials to evaluate; they stay pending until told.

        The first ``n_init`` trials come from the Sobol design; later ones from a
        Bayesian round (at least two successful trials are needed, else Sobol continues).
        No configuration is asked twice (equivalence by :meth:`Space.canonical`), so a
        small space, once every configuration was asked, gives fewer trials, or none.

        Example:
            >>> from search import paper_space, ffn_target_shapes, Objective
            >>> sp = paper_space(4, target_shapes=ffn_target_shapes(4, 8, 16))
            >>> s = Search(sp, [Objective("val_ce"), sp.parameter_count_objective()], q=3, n_init=10)
            >>> [t.source for t in s.ask()]
            ['sobol', 'sobol', 'sobol']
        """
        n = self.q if n is None else _check_int(n, "n", 1)
        rnd = self._round
        self._round += 1
        seed = self.seed + rnd
        trials: list[Trial] = []

        def add(x: tuple[float, ...], source: str, design_index: int | None) -> None:
            t = Trial(self._next_id, rnd, self.space.decode(x), x, source, seed, design_index)
            self._next_id += 1
            self._pending[t.trial_id] = t
            trials.append(t)

        canon = self.space.canonical
        seen = {canon(t.config) for t in self._finished.values()} | {canon(t.config) for t in self._pending.values()}
        # The design: the first unused points below ``n_init`` that repeat no configuration
        # asked so far.  A repeat is skipped for good and the scan goes on, so a round gets
        # ``n`` design points while the design has them: what is asked depends only on the
        # finished and pending trials, never on which repeats this object happened to skip
        # before (a search resumed from its log asks what an uninterrupted one would).
        while len(trials) < n:
            idx = self._next_design_indices(n - len(trials), self.n_init)
            if not idx:
                break
            for i in idx:
                x = self._sobol_point(i)
                key = canon(self.space.decode(x))
                if key in seen:  # a small space: the design repeats itself; skip the point for good
                    self._used_design.add(i)
                    continue
                add(x, "sobol", i)
                seen.add(key)
        k = n - len(trials)
        if k == 0:
            return trials
        X_ok, _ = self._ok_data()
        if X_ok.shape[0] >= 2:
            try:
                cands = self._bo_candidates(k, seed)
            except (RuntimeError, ValueError) as e:  # numerical trouble: keep going with Sobol
                msg = f"Bayesian round {rnd} failed ({type(e).__name__}: {e}); using Sobol points"
                warnings.warn(msg, stacklevel=2)
                cands = []
            for x in cands:
                key = canon(self.space.decode(x))
                if key not in seen:
                    add(x, self.surrogate, None)
                    seen.add(key)
        # Sobol points past the design: before there is data to model, after a failed
        # round, or in place of a candidate that repeats a scored configuration.  A space
        # whose configurations are all taken (e.g. only the rank searched) gives fewer trials
        # than asked, or none: ``_SCAN`` Sobol points past the design found nothing new.
        while len(trials) < n:
            idx = self._next_design_indices(n - len(trials) + 64, self.n_init + self._SCAN)
            if not idx:
                break
            for i in idx:
                x = self._sobol_point(i)
                key = canon(self.space.decode(x))
                if key in seen:
                    self._used_design.add(i)  # a repeat: skip this Sobol point for good
                    continue
                add(x, "sobol", i)
                seen.add(key)
                if len(trials) == n:
                    break
        return trials

    def _bo_candidates(self, k: int, seed: int) -> list[tuple[float, ...]]:
        X, Y = self._ok_data()
        modelled = [i for i, o in enumerate(self.objectives) if not o.is_known]
        known = [(i, o.known_relaxed or o.known, o.sign) for i, o in enumerate(self.objectives) if o.is_known]
        signs = torch.tensor([o.sign for o in self.objectives], dtype=torch.float64)
        Ym = Y * signs
        model = fit_surrogate(
            X,
            Ym[:, modelled],
            kind=self.surrogate,
            nuts=self.nuts,
            seed=seed,
            # a space either maps every input or none (the base class's None)
            input_map=cast(Callable[[torch.Tensor], torch.Tensor], self.space.effective_tensor)
            if self.space.effective_tensor(X[:1]) is not None else None,
        )
        ref = torch.tensor(self.reference_point(), dtype=torch.float64) * signs
        pend = [t.x for t in self._pending.values()]
        X_pending = torch.tensor(pend, dtype=torch.float64) if pend else None
        cand = propose(
            model,
            X,
            ref,
            self.space,
            k,
            modelled=modelled,
            known=known,  # type: ignore[arg-type]
            X_pending=X_pending,
            settings=self.acquisition,
            seed=seed,
        )
        return [tuple(row) for row in cand.tolist()]

    def _coerce_values(self, values: Any) -> tuple[dict[str, float], dict[str, Any]]:
        evaluated = [o.name for o in self.objectives if not o.is_known]
        extras: dict[str, Any] = {}
        if isinstance(values, Mapping):
            missing = [n for n in evaluated if n not in values]
            if missing:
                raise ValueError(f"values is missing objective(s) {missing}; expected {evaluated}")
            raw = {n: values[n] for n in evaluated}
            for k, v in values.items():
                if k not in self.names:
                    if not isinstance(k, str):
                        raise TypeError(f"values keys must be str, got {type(k).__name__}")
                    extras[k] = v
        elif isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"values must be a mapping name -> value or a sequence, got {type(values).__name__}")
        else:
            if len(values) != len(evaluated):
                raise ValueError(f"values must have {len(evaluated)} entries ({evaluated}), got {len(values)}")
            raw = dict(zip(evaluated, values))
        out = {}
        for k, v in raw.items():
            if v is None:
                out[k] = math.nan
            elif isinstance(v, bool) or not isinstance(v, numbers.Real):
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    out[k] = float(v.item())
                    continue
                raise TypeError(f"values[{k!r}] must be a real number (or None for a failure), got {type(v).__name__}")
            else:
                out[k] = _as_float(v, f"values[{k!r}]")
        for k, v in extras.items():
            if isinstance(v, (bool, str)) or v is None:
                continue
            if isinstance(v, numbers.Real):
                extras[k] = encode_float(_as_float(v, f"values[{k!r}] (an extra metric)"))
            else:
                raise TypeError(f"values[{k!r}] (an extra metric) must be a number, str, bool or None")
        return out, extras

    def tell(self, trial: Trial | int, values: Mapping[str, Any] | Sequence[Any]) -> Trial:
        """Record the objective values of a pending trial (and append it to the log).

        ``values`` maps each *evaluated* objective's name to its value (extra numeric keys
        are kept as ``metrics``), or lists them in objective order.  Known objectives are
        computed.  A NaN/inf/``None`` value marks the trial ``"failed"``.

        Example:
            >>> from search import BoxSpace, Objective
            >>> s = Search(BoxSpace([(0, 1)]), [Objective("a"), Objective("b")], q=1, n_init=2)
            >>> s.tell(s.ask()[0], {"a": 1.0, "b": float("nan")}).status
            'failed'
        """
        return self._tell([(trial, values)])[0]

    def _tell(self, told: Sequence[tuple[Trial | int, Mapping[str, Any] | Sequence[Any]]]) -> list[Trial]:
        """:meth:`tell` of several trials whose records reach the log in one write: a process
        stopped while telling a round leaves none of it in the log, so a resumed search asks
        that round again as it was asked, not the rest of it as a new round."""
        # scored as copies: a refused value or a failed log write leaves every pending trial as it was
        scored = [self._scored(trial, values) for trial, values in told]
        if self.log_path is not None and scored:
            append_record(self.log_path, [self._record(s) for _, s in scored])
        done = []
        for t, s in scored:
            t.values, t.metrics, t.status, t.elapsed_s, t.timestamp = s.values, s.metrics, s.status, s.elapsed_s, \
                s.timestamp
            del self._pending[t.trial_id]
            self._finished[t.trial_id] = t
            if t.design_index is not None:
                self._used_design.add(t.design_index)
            done.append(t)
        return done

    def _scored(self, trial: Trial | int, values: Mapping[str, Any] | Sequence[Any]) -> tuple[Trial, Trial]:
        """The pending trial ``trial`` and a copy of it with ``values`` set (:meth:`_tell` copies them
        into the trial once all are scored and logged, and moves it)."""
        tid = trial.trial_id if isinstance(trial, Trial) else trial
        if isinstance(tid, bool) or not isinstance(tid, numbers.Integral):
            raise TypeError(f"trial must be a Trial or a trial id, got {type(trial).__name__}")
        tid = int(tid)
        if tid not in self._pending:
            state = "already told" if tid in self._finished else "unknown"
            raise ValueError(f"trial {tid} is {state}; only pending trials (from ask()) can be told")
        t0 = self._pending[tid]
        t = dataclasses.replace(t0, values={}, metrics={})
        vals, extras = self._coerce_values(values)
        x = torch.tensor([t.x], dtype=torch.float64)
        for o in self.objectives:
            if o.is_known:
                assert o.known is not None
                vals[o.name] = float(o.known(x).reshape(-1)[0])
        t.values = {n: vals[n] for n in self.names}
        t.metrics = extras
        t.status = "ok" if all(math.isfinite(v) for v in t.values.values()) else "failed"
        t.elapsed_s = round(time.monotonic() - t.asked_at, 6)
        t.timestamp = time.time()
        return t0, t

    # ------------------------------------------------------------------ loop
    def run(
        self,
        objective: Callable[[Any], Any],
        n_trials: int,
        *,
        batched: bool = True,
        progress: bool = True,
    ) -> Search:
        """Ask, evaluate and tell until exactly ``n_trials`` trials are finished (or, with a
        warning, until a small space has no configuration left that was not evaluated).

        With ``batched=True`` (default) ``objective(configs)`` receives the list of a
        round's configurations and returns one result per configuration (a mapping or a
        sequence, as for :meth:`tell`); with ``batched=False`` it is called once per
        configuration.  Trials already in a resumed log count toward ``n_trials``.
        Exceptions from ``objective`` propagate (told trials are already in the log).

        Example:
            >>> from search import BoxSpace, Objective
            >>> s = Search(BoxSpace([(0, 1)]), [Objective("a"), Objective("b")], q=2, n_init=5)
            >>> _ = s.run(lambda cs: [{"a": c[0], "b": 1 - c[0]} for c in cs], 5, progress=False)
            >>> s.n_finished, len(s.pareto_front())
            (5, 5)
        """
        n_trials = _check_int(n_trials, "n_trials", 0)
        if not callable(objective):
            raise TypeError(f"objective must be callable, got {type(objective).__name__}")
        from tqdm.auto import tqdm

        bar = tqdm(total=n_trials, initial=min(self.n_finished, n_trials), disable=not progress, desc="search")
        try:
            while self.n_finished < n_trials:
                trials = self.pending
                if not trials:
                    trials = self.ask(min(self.q, n_trials - self.n_finished))
                if not trials:
                    warnings.warn(
                        f"the space has no configuration left that was not evaluated: stopping after "
                        f"{self.n_finished} of {n_trials} trials",
                        stacklevel=2,
                    )
                    break
                trials = trials[: n_trials - self.n_finished]
                configs = [t.config for t in trials]
                if batched:
                    results = objective(configs)
                    if isinstance(results, (str, bytes, Mapping)) or not isinstance(results, Sequence):
                        raise TypeError(
                            "objective must return a sequence of results (one per configuration), "
                            f"got {type(results).__name__}"
                        )
                    if len(results) != len(trials):
                        raise ValueError(f"objective returned {len(results)} results for {len(trials)} configurations")
                    self._tell(list(zip(trials, results)))  # the round in one log write
                    bar.update(len(trials))
                else:
                    for t in trials:
                        self.tell(t, objective(t.config))
                        bar.update(1)
                if any(t.ok for t in self._finished.values()):
                    bar.set_postfix(failed=self.n_failed, front=len(self.pareto_front()))
        finally:
            bar.close()
        return self

    # ------------------------------------------------------------------ results
    def pareto_front(self) -> list[Trial]:
        """The successful trials that no other successful trial dominates.

        Example:
            >>> from search import BoxSpace, Objective
            >>> s = Search(BoxSpace([(0, 1)]), [Objective("a"), Objective("b")], q=3, n_init=3)
            >>> for t, v in zip(s.ask(), [(1, 1), (0, 2), (2, 2)]):
            ...     _ = s.tell(t, v)
            >>> [t.values["a"] for t in s.pareto_front()]
            [1.0, 0.0]
        """
        ok = [t for t in self.trials if t.ok]
        if not ok:
            return []
        mask = _pareto.pareto_mask([[t.values[n] for n in self.names] for t in ok], self.directions)
        return [t for t, m in zip(ok, mask) if m]

    def hypervolume(self, ref_point: Sequence[float] | None = None) -> float:
        """Hypervolume of the successful trials (natural units; default :meth:`reference_point`).

        Example:
            >>> from search import BoxSpace, Objective
            >>> s = Search(BoxSpace([(0, 1)]), [Objective("a"), Objective("b")], q=2, n_init=2,
            ...            ref_point=[2.0, 2.0])
            >>> for t, v in zip(s.ask(), [(0, 1), (1, 0)]):
            ...     _ = s.tell(t, v)
            >>> s.hypervolume()
            3.0
        """
        _, Y = self._ok_data()
        given = self._ref_point_arg(ref_point)
        if Y.shape[0] == 0:
            return 0.0
        return _pareto.hypervolume(Y, self._full_ref(given), self.directions)

    def hypervolume_trace(self, ref_point: Sequence[float] | None = None) -> list[float]:
        """Hypervolume after each finished trial (by trial id), with one fixed reference point."""
        given = self._ref_point_arg(ref_point)
        if not any(t.ok for t in self._finished.values()):
            return [0.0] * self.n_finished
        Y = [[t.values[n] for n in self.names] for t in self.trials]
        return _pareto.hypervolume_trace(Y, self._full_ref(given), self.directions)

    def _ref_point_arg(self, ref_point: Sequence[float] | Mapping[str, float] | None) -> dict[str, float] | None:
        """A ``ref_point`` argument checked as the constructor's (``None``: the search's own)."""
        return None if ref_point is None else self._check_ref_point(ref_point)

    def _full_ref(self, given: dict[str, float] | None) -> list[float]:
        """The reference point: ``given`` values (a mapping may name only some objectives), the
        rest :meth:`reference_point`'s."""
        if given is not None and len(given) == len(self.names):
            return [given[n] for n in self.names]
        base = self.reference_point()
        return [(given or {}).get(n, v) for n, v in zip(self.names, base)]

    def select(self, primary: str, *, tolerance: float = 0.0, then: str | None = None) -> Trial:
        """Pick one configuration from the Pareto front by a simple documented rule.

        Among Pareto-optimal trials whose ``primary`` objective is within ``tolerance``
        (relative, e.g. 0.01 = 1 %) of the best value, return the best by ``then``
        (default: the other objectives in order as tie-breakers), ties broken by
        ``primary``.  ``select("val_ce", tolerance=0.01, then="parameters")``: the fewest
        trainable parameters among the front's configurations within 1 % of the best
        validation CE.  (``python -m milp.train`` picks by this rule over its trials with at
        least one adapter and an "adapters on every layer" reference, not over the front.)
        Raises ``ValueError`` before any trial succeeded.

        Example:
            >>> from search import BoxSpace, Objective
            >>> s = Search(BoxSpace([(0, 1)]), [Objective("ce"), Objective("params")], q=2, n_init=2)
            >>> for t, v in zip(s.ask(), [(1.00, 10), (1.005, 5)]):
            ...     _ = s.tell(t, v)
            >>> s.select("ce", tolerance=0.01, then="params").values["params"]
            5.0
        """
        if primary not in self.names:
            raise ValueError(f"primary must be one of {self.names}, got {primary!r}")
        if then is not None and then not in self.names:
            raise ValueError(f"then must be one of {self.names}, got {then!r}")
        if not isinstance(tolerance, numbers.Real) or not tolerance >= 0:
            raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
        front = self.pareto_front()
        if not front:
            raise ValueError("no successful trial yet")
        sign = {o.name: o.sign for o in self.objectives}
        best = max(sign[primary] * t.values[primary] for t in front)
        slack = float(tolerance) * max(abs(best), 1e-12)
        near = [t for t in front if sign[primary] * t.values[primary] >= best - slack]
        order = [then] if then else [n for n in self.names if n != primary]
        order += [primary]
        return max(near, key=lambda t: tuple(sign[n] * t.values[n] for n in order))

    def plot(self, directory: str | os.PathLike[str], prefix: str = "search") -> tuple[Path, Path]:
        """Write ``{prefix}_pareto.png`` and ``{prefix}_hypervolume.png`` into ``directory``."""
        from .plots import plot_hypervolume, plot_pareto

        d = Path(directory)
        ok = [t for t in self.trials if t.ok]
        p1, p2 = d / f"{prefix}_pareto.png", d / f"{prefix}_hypervolume.png"
        plot_pareto([[t.values[n] for n in self.names] for t in ok], self.names, self.directions, p1)
        plot_hypervolume({self.surrogate: self.hypervolume_trace()}, p2)
        return p1, p2


def run(
    objective: Callable[[Any], Any],
    n_trials: int,
    space: Space,
    objectives: Sequence[Objective],
    *,
    batched: bool = True,
    progress: bool = True,
    **kwargs: Any,
) -> Search:
    """Create a :class:`Search` (``kwargs`` go to its constructor) and :meth:`Search.run` it.

    Example:
        >>> from search import BoxSpace, Objective
        >>> s = run(lambda cs: [(c[0], 1 - c[0]) for c in cs], 4, BoxSpace([(0, 1)]),
        ...         [Objective("a"), Objective("b")], q=2, n_init=4, progress=False)
        >>> s.n_finished
        4
    """
    return Search(space, objectives, **kwargs).run(objective, n_trials, batched=batched, progress=progress)
