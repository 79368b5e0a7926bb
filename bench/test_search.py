"""One Bayesian round of the configuration search: surrogate fit + acquisition optimisation.

The setting of the paper's search on LLaMA2-7B shapes: the paper's space (32 layer bits +
module count + rank, ``d = 34``), ``n = 100`` evaluated configurations (the first 100 distinct
configurations of the scrambled Sobol design, scored by the synthetic LoRA problem,
:mod:`search.problems`), ``q = 4`` candidates, the
paper's NUTS settings (512 warm-up / 256 samples / thinning 16) and the default
acquisition settings.  Objectives: the validation loss, modelled by a SAAS-GP, and the
parameter count, a *known* objective (computed, not modelled), so a round fits one GP.
Target: ≤ 60 s per round on 2 CPU cores; reported in ``extra_info``, never asserted.

``extra_info``: ``round_s`` (the whole ``ask()``), ``fit_s`` (NUTS, including JAX's
compilation for the new ``n``, about 10 s, paid every round since ``n`` grows), ``acq_s``
(qLogNEHVI construction + optimisation), ``target_s``, ``within_target``, ``n``, ``d``,
``q``, the NUTS and acquisition settings, ``threads`` and the 1-minute load average before
and after (``loadavg``: other jobs on a shared box inflate the times, several-fold).
Correctness first: the 4 candidates must be distinct grid points of the space that repeat
no evaluated configuration.

Run: ``pytest bench/test_search.py`` (1–3 minutes on 2 shared cores, depending on their load).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

import search.loop
from search import Search
from search.problems import LoRASynthetic
from search.surrogate import AcquisitionSettings, NUTSSettings, fit_surrogate

N, Q, TARGET_S = 100, 4, 60.0


def test_search_round_d34_n100_q4(benchmark, tmp_path):
    prob = LoRASynthetic(seed=0)
    nuts, acq = NUTSSettings(), AcquisitionSettings()
    # The N evaluated configurations, all from the Sobol design: a design of N points repeats
    # a few configurations of this space, and a search with n_init=N would ask the last ones
    # from a Bayesian round (another minute of setup, untimed). A design of N + 64 points gives
    # N distinct ones; the search timed resumes that log with n_init=N (n_init may change between
    # runs of one log), so its next ask is a Bayesian round on the N trials.
    log = tmp_path / "trials.jsonl"
    Search(prob.space, prob.objectives, q=Q, n_init=N + 64, seed=0, log_path=log).run(prob, N, progress=False)
    s = Search(prob.space, prob.objectives, q=Q, n_init=N, surrogate="saas", nuts=nuts, acquisition=acq, seed=0,
               log_path=log)
    assert s.n_finished == N and s.space.dim == 34
    assert all(t.source == "sobol" for t in s.trials)
    # JAX's one-time start (about 5 s at the first NUTS fit of a process, on top of the
    # compilation for the new n that every round pays) is not part of a round: a small fit
    # pays it here, as a search's earlier rounds would have.
    g = torch.Generator().manual_seed(0)
    X0 = torch.rand(8, s.space.dim, generator=g, dtype=torch.float64)
    tiny = NUTSSettings(warmup_steps=8, num_samples=8, thinning=1)
    fit_surrogate(X0, X0[:, :1].sin(), kind="saas", nuts=tiny, seed=0)

    times: dict[str, float] = {}
    real_fit, real_propose = search.loop.fit_surrogate, search.loop.propose

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                times[name] = time.perf_counter() - t0

        return wrapper

    load_before = os.getloadavg()[0]
    mp = pytest.MonkeyPatch()
    mp.setattr(search.loop, "fit_surrogate", timed("fit_s", real_fit))
    mp.setattr(search.loop, "propose", timed("acq_s", real_propose))
    out: dict[str, list] = {}

    def one_round():
        t0 = time.perf_counter()
        out["trials"] = s.ask(Q)
        times["round_s"] = time.perf_counter() - t0

    try:
        benchmark.pedantic(one_round, rounds=1, iterations=1)
    finally:
        mp.undo()

    trials = out["trials"]
    assert len(trials) == Q and all(t.source == "saas" for t in trials), [t.source for t in trials]
    keys = {s.space.canonical(t.config) for t in trials}
    assert len(keys) == Q and not keys & {s.space.canonical(t.config) for t in s.trials}
    assert all(s.space.snap(t.x) == t.x for t in trials)

    benchmark.extra_info.update(
        {
            "round_s": round(times["round_s"], 2),
            "fit_s": round(times["fit_s"], 2),
            "acq_s": round(times["acq_s"], 2),
            "target_s": TARGET_S,
            "within_target": times["round_s"] <= TARGET_S,
            "n": N,
            "d": s.space.dim,
            "q": Q,
            "modelled_objectives": 1,
            "nuts": f"{nuts.warmup_steps}/{nuts.num_samples}/{nuts.thinning}",
            "acquisition": f"mc {acq.mc_samples}, raw {acq.raw_samples}, restarts {acq.num_restarts}",
            "threads": torch.get_num_threads(),
            "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
    )
