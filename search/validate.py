"""Validation experiment: SAAS-GP + qLogNEHVI against scrambled Sobol at equal evaluations.

Run ``python -m search.validate`` (``--help`` for flags).  For each problem (BoTorch's DTLZ2,
d = 6, m = 2; the synthetic 34-dimensional LoRA problem of :mod:`search.problems`) and each
seed, the Bayesian search evaluates ``n_init`` Sobol points then ``n_bo`` points in rounds of
``q``; the baseline evaluates the first ``n_init + n_bo`` points of the same scrambled Sobol
sequence (so the first ``n_init`` points are shared: a paired comparison).  Hypervolumes use
each problem's fixed reference point and noise-free objective values.

Writes ``<out>/search_validation.json`` (settings, per-seed final hypervolumes, traces,
timings), ``<out>/search_validation.md`` (the table) and ``<out>/search_validation.png``
(hypervolume vs evaluations, mean and min–max band), atomically: the JSON and the markdown
after every run, the plot once all runs are done.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "run_one"]


def _set_threads(n: int) -> None:
    os.environ.setdefault(
        "XLA_FLAGS", f"--xla_cpu_multi_thread_eigen={'false' if n == 1 else 'true'} intra_op_parallelism_threads={n}"
    )
    import torch

    torch.set_num_threads(n)


def _problem(name: str, seed: int) -> Any:
    from .problems import DTLZ2Problem, LoRASynthetic

    if name == "dtlz2":
        return DTLZ2Problem()
    if name == "lora34":
        return LoRASynthetic(seed=seed)
    raise ValueError(f"problem must be 'dtlz2' or 'lora34', got {name!r}")


def run_one(problem_name: str, method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One search (``method`` ``"bo"`` or ``"sobol"``); returns its hypervolume trace and timing.

    Example:
        >>> ns = argparse.Namespace(n_init=4, n_bo=0, q=2, surrogate="gp", warmup=8, samples=8,
        ...                         thinning=2, mc_samples=8, raw_samples=16, num_restarts=1)
        >>> len(run_one("dtlz2", "sobol", 0, ns)["trace"])
        4
    """
    from . import pareto
    from .loop import Search
    from .surrogate import AcquisitionSettings, NUTSSettings

    if method not in ("bo", "sobol"):
        raise ValueError(f"method must be 'bo' or 'sobol', got {method!r}")
    prob = _problem(problem_name, seed)
    total = args.n_init + args.n_bo
    n_init = args.n_init if method == "bo" else total
    search = Search(
        prob.space,
        prob.objectives,
        q=args.q,
        n_init=n_init,
        surrogate=args.surrogate,
        nuts=NUTSSettings(args.warmup, args.samples, args.thinning),
        acquisition=AcquisitionSettings(args.mc_samples, args.raw_samples, args.num_restarts),
        ref_point=prob.ref_point,
        seed=seed,
    )
    t0 = time.perf_counter()
    search.run(prob, total, progress=False)
    wall = time.perf_counter() - t0
    Y = [prob.true_values(t.config) for t in search.trials]
    dirs = [o.direction for o in prob.objectives]
    trace = [v / prob.hv_scale for v in pareto.hypervolume_trace(Y, prob.ref_point, dirs)]
    extra: dict[str, Any] = {
        # per trial: source, then the noise-free objective values (parameters as a fraction)
        "trials": [[t.source] + [round(v / (prob.hv_scale if i else 1.0), 6) for i, v in enumerate(y)]
                   for t, y in zip(search.trials, Y)],
    }
    if hasattr(prob, "space") and hasattr(search.trials[0].config, "layer_mask"):
        for row, t in zip(extra["trials"], search.trials):
            c = t.config
            row += [sum(c.layer_mask), c.modules[0], c.ranks[0]]
    if hasattr(prob, "log_values"):
        Ylog = [prob.log_values(y) for y in Y]
        extra["trace_log"] = pareto.hypervolume_trace(Ylog, list(prob.log_ref_point), dirs)
        extra["final_hv_log"] = extra["trace_log"][-1]
        extra["max_hv_log"] = prob.max_hv_log
        extra["best_loss"] = min(y[0] for y in Y)
        near = [y[1] for y in Y if y[0] <= prob.best_loss + 0.02]
        extra["min_params_near_best"] = min(near) / prob.max_parameters if near else None
    sources: dict[str, int] = {}
    for t in search.trials:
        sources[t.source] = sources.get(t.source, 0) + 1
    return {
        "final_hv": trace[-1],
        "max_hv": prob.max_hv,
        "trace": trace,
        "wall_s": round(wall, 2),
        "sources": sources,
        **extra,
    }


def _stats(xs: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
    }


def _paired_wins(bo: list[dict[str, Any]], sobol: list[dict[str, Any]], key: str) -> tuple[int, int]:
    """``(BO wins, pairs)`` over the seeds both methods have run (runs finish in any order)."""
    so = {r["seed"]: r[key] for r in sobol}
    pairs = [(r[key], so[r["seed"]]) for r in bo if r["seed"] in so]
    return sum(1 for a, b in pairs if a > b), len(pairs)


def _markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = [
        "# Search validation: SAAS-GP + qLogNEHVI vs scrambled Sobol",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Budget: {s['n_init']} Sobol + {s['n_bo']} BO evaluations (q = {s['q']} per round, "
        f"{math.ceil(s['n_bo'] / s['q'])} rounds) vs {s['n_init'] + s['n_bo']} Sobol evaluations; surrogate "
        f"`{s['surrogate']}`, NUTS warm-up {s['warmup']} / samples {s['samples']} / thinning {s['thinning']} "
        f"({math.ceil(s['samples'] / s['thinning'])} posterior samples kept); qLogNEHVI MC samples "
        f"{s['mc_samples']}, raw samples {s['raw_samples']}, restarts {s['num_restarts']}; "
        f"{s['threads']} thread(s) per run, {s.get('jobs', 1)} run(s) in parallel. Seeds 0..{s['seeds'] - 1}: "
        "seed k seeds the scrambled Sobol sequence, NUTS and the optimiser, and (lora34) the noise; "
        "the BO run and the Sobol run of a seed share their first n_init points. "
        "Hypervolume of the noise-free objective values with a fixed reference point (DTLZ2: (1.1, 1.1); "
        "lora34: loss 2.05 and all parameters, parameters as a fraction of the maximum); "
        "\"% of max\" is the mean final HV over the largest attainable one.",
        "",
        "| problem | method | seeds | final HV mean ± std | min | max | % of max | BO > Sobol (paired) | "
        "wall s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pname, pres in res["problems"].items():
        bo = [r["final_hv"] for r in pres.get("bo", [])]
        so = [r["final_hv"] for r in pres.get("sobol", [])]
        wins, n = _paired_wins(pres.get("bo", []), pres.get("sobol", []), "final_hv")
        for method, vals in (("SAAS+qLogNEHVI" if s["surrogate"] == "saas" else "GP+qLogNEHVI", bo), ("Sobol", so)):
            if not vals:
                continue
            st = _stats(vals)
            key = "bo" if method != "Sobol" else "sobol"
            wall = statistics.fmean(r["wall_s"] for r in pres[key])
            pct = 100 * st["mean"] / pres[key][0]["max_hv"]
            lines.append(
                f"| {pname} | {method} | {len(vals)} | {st['mean']:.4f} ± {st['std']:.4f} | {st['min']:.4f} | "
                f"{st['max']:.4f} | {pct:.1f} | {f'{wins}/{n}' if key == 'bo' else ''} | {wall:.1f} |"
            )
    for pname, pres in res["problems"].items():
        runs = pres.get("bo", []) + pres.get("sobol", [])
        if not runs or "final_hv_log" not in runs[0]:
            continue
        lines += [
            "",
            f"{pname}, other views of the same runs: hypervolume with log-scale parameters; best noise-free "
            "loss found; fewest parameters (fraction of the maximum) among evaluated configurations within "
            "0.02 of the best possible loss (`-` = none found).",
            "",
            "| method | log-scale HV mean ± std | min | max | % of max | BO > Sobol | best loss mean | "
            "near-best params (per seed) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        wins, n = _paired_wins(pres.get("bo", []), pres.get("sobol", []), "final_hv_log")
        for key, label in (("bo", "BO"), ("sobol", "Sobol")):
            rs = pres.get(key, [])
            if not rs:
                continue
            st = _stats([r["final_hv_log"] for r in rs])
            near = ", ".join(
                "-" if r["min_params_near_best"] is None else f"{r['min_params_near_best']:.2e}" for r in rs
            )
            best = statistics.fmean(r["best_loss"] for r in rs)
            pct = 100 * st["mean"] / rs[0]["max_hv_log"]
            lines.append(
                f"| {label} | {st['mean']:.4f} ± {st['std']:.4f} | {st['min']:.4f} | {st['max']:.4f} | {pct:.1f} | "
                f"{f'{wins}/{n}' if key == 'bo' else ''} | {best:.4f} | {near} |"
            )
    lines += ["", f"Total wall time: {res['total_wall_s']:.0f} s on {res['machine']}.", ""]
    if res.get("note"):
        lines += [res["note"], ""]
    return "\n".join(lines)


def _plot(res: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .trial_log import atomic_write_with

    probs = list(res["problems"])
    fig = Figure(figsize=(5 * len(probs), 4), dpi=100)
    FigureCanvasAgg(fig)
    for k, pname in enumerate(probs):
        ax = fig.add_subplot(1, len(probs), k + 1)
        for c, method in enumerate(("bo", "sobol")):
            runs = res["problems"][pname].get(method, [])
            if not runs:
                continue
            n = min(len(r["trace"]) for r in runs)
            cols = [[r["trace"][i] for r in runs] for i in range(n)]
            xs = list(range(1, n + 1))
            ax.plot(xs, [statistics.fmean(v) for v in cols], c=f"C{c}", label=f"{method} (mean of {len(runs)})")
            ax.fill_between(xs, [min(v) for v in cols], [max(v) for v in cols], color=f"C{c}", alpha=0.2)
        ax.axvline(res["settings"]["n_init"], c="0.5", ls=":", lw=1)
        some = next((r for m in ("bo", "sobol") for r in res["problems"][pname].get(m, [])), None)
        if some is not None and "max_hv" in some:
            ax.axhline(some["max_hv"], c="k", ls="--", lw=1, label="largest attainable")
        ax.set_title(pname)
        ax.set_xlabel("evaluations")
        ax.set_ylabel("hypervolume")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", default="dtlz2,lora34", help="comma-separated: dtlz2, lora34")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    p.add_argument("--n-init", type=int, default=20, help="Sobol evaluations before BO")
    p.add_argument("--n-bo", type=int, default=30, help="BO evaluations")
    p.add_argument("--q", type=int, default=5, help="candidates per BO round")
    p.add_argument("--surrogate", choices=("saas", "gp"), default="saas")
    p.add_argument("--warmup", type=int, default=128, help="NUTS warm-up steps")
    p.add_argument("--samples", type=int, default=128, help="NUTS samples")
    p.add_argument("--thinning", type=int, default=16, help="NUTS thinning")
    p.add_argument("--mc-samples", type=int, default=32)
    p.add_argument("--raw-samples", type=int, default=256)
    p.add_argument("--num-restarts", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch/XLA threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (worker processes)")
    p.add_argument("--out", default="bench/results", help="output directory")
    p.add_argument("--note", default="", help="free text appended to the markdown")
    return p


def _worker_init(threads: int) -> None:
    import warnings

    warnings.filterwarnings("ignore")  # the parent prints the results; keep the log readable
    _set_threads(threads)


def _task(pname: str, method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    r = run_one(pname, method, seed, args)
    r["seed"] = seed
    return r


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m search.validate``."""
    args = _parser().parse_args(argv)
    for name in ("seeds", "q", "threads", "jobs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1")
    if args.n_init < 0 or args.n_bo < 0:
        raise SystemExit("--n-init and --n-bo must be >= 0")
    if args.n_init + args.n_bo < 1:
        raise SystemExit("--n-init + --n-bo must be >= 1 (nothing to evaluate)")
    problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    for p in problems:
        if p not in ("dtlz2", "lora34"):
            raise SystemExit(f"--problems: unknown problem {p!r} (dtlz2, lora34)")
    out = Path(args.out)
    from .trial_log import atomic_write_text

    res: dict[str, Any] = {
        "command": "python -m search.validate " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: getattr(args, k) for k in (
            "n_init", "n_bo", "q", "surrogate", "warmup", "samples", "thinning",
            "mc_samples", "raw_samples", "num_restarts", "threads", "jobs", "seeds")},
        "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), shared",
        "problems": {p: {"bo": [], "sobol": []} for p in problems},
        "note": args.note,
        "total_wall_s": 0.0,
    }
    # the slow runs first, so parallel workers finish together
    tasks = [(p, m, k) for m in ("bo", "sobol") for p in sorted(problems, key=lambda p: p != "lora34")
             for k in range(args.seeds)]
    t0 = time.perf_counter()

    def record(pname: str, method: str, r: dict[str, Any]) -> None:
        runs = res["problems"][pname][method]
        runs.append(r)
        runs.sort(key=lambda r: r["seed"])
        res["total_wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"{pname} seed {r['seed']} {method}: HV {r['final_hv']:.4f} ({r['wall_s']:.0f} s)", flush=True)
        atomic_write_text(out / "search_validation.json", json.dumps(res, indent=1) + "\n")
        atomic_write_text(out / "search_validation.md", _markdown(res))

    if args.jobs == 1:
        _set_threads(args.threads)
        for pname, method, seed in tasks:
            record(pname, method, _task(pname, method, seed, args))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")  # JAX does not survive fork
        with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_worker_init, initargs=(args.threads,)) as ex:
            futs = {ex.submit(_task, p, m, k, args): (p, m) for p, m, k in tasks}
            for f in as_completed(futs):
                record(*futs[f], f.result())
    _plot(res, out / "search_validation.png")
    print(_markdown(res))
    return res


if __name__ == "__main__":
    main()
