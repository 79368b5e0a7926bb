"""``python -m milp.evaluate``: MiLP against the TpLP, MaLP and UeLP baselines, and its ablations.

The paper's comparison on one base model and one dataset, reproducible with one command:

* every method gets the same base model, the same data, the same 70/10/20 *user* split (one
  per seed, drawn exactly as ``python -m milp.train --seed S`` draws it) and the same
  instruction-tuning budget (``--instruct-steps`` × ``--batch-size`` at ``--instruct-lr``
  through a shared LoRA of rank ``--instruct-rank`` on the attention q/v projections,
  :func:`milp.pipeline.add_instruction_adapter`), trained on the training users' pairs and
  evaluated on the test users' queries with the same greedy generation;
* **TpLP** — the user's profile + history as a system prompt (:func:`milp.baselines.tplp_context`,
  most recent first, at most ``--context-tokens`` tokens);
* **MaLP** — retrieval memory as a system prompt (:class:`milp.baselines.MemoryRetriever` with
  all-MiniLM-L6-v2: ``--k-long`` retrieved + ``--k-short`` most recent turns, same budget);
* **UeLP** — ``--uelp-vectors`` soft-prompt vectors from the user's embedded history
  (:class:`UelpPrefix` around :class:`milp.baselines.UserEncoder`), trained jointly with the
  shared adapter;
* **MiLP** — exactly ``python -m milp.train`` with the same flags (memory injection into each
  user's FFN adapters, optionally ``--search N``, instruction tuning through the users' memory
  adapters); its run directory is ``seed<S>/milp_run``;
* ablations (paper Table 5): **MiLP w/o memory injection** (the shared adapter instruction-tuned
  on the bare queries: no memory, no prompt context) and **MiLP w/o instruction tuning** (the
  memory-injected users of the MiLP run, shared adapter off). The memory-injected adapters are
  reused, never injected twice;
* the search-space ablation (paper Table 4, with ``--search N``): **MiLP whose configuration
  search varies only Num** (modules per layer), **Size** (rank), **Layer** (the layer mask), or
  two of them (``--methods milp-num,milp-size,...``: ``python -m milp.train --search-dims``), the
  rest fixed at ``--modules`` / ``--rank`` / every layer on; run after every seed's main methods;
* a reference row, the base model as shipped (no memory, no tuning), comes free from the MiLP run.

Metrics per method (:func:`milp.pipeline.score`): ROUGE-1, ROUGE-L, Persona-F1, and the win
rate against TpLP on the same test examples by ``--judge``: :class:`milp.metrics.EmbeddingJudge`
(default), :class:`milp.metrics.LMJudge` on the base model (``lm``) or on any local checkpoint
(ties count half; the judge's name is written in the outputs); and the **response CE**, the mean
cross-entropy of the reference answer under each method's model (teacher-forced, rebuilt from
what the method saved): it reads every reference token rather than one greedy sample, so it
separates methods on few test users where ROUGE of 48 generated tokens is mostly noise. Mean ±
sample standard deviation (n − 1) over the seeds. With MiLP in the comparison, a paired table
compares it with every other method per test example, pooled over the seeds: the mean
difference, its 95% bootstrap interval and a paired permutation test's p-value
(:func:`milp.metrics.paired_difference`), so a reader sees which gaps the test examples
support.

Outputs in ``--output`` (default ``runs/compare``)::

    run.json                         settings (a restart with other settings is refused)
    seed<S>/split.json               user ids of train / val / test
    seed<S>/milp_run/                the python -m milp.train run (users/, instruction adapter, ...)
    seed<S>/<method>/predictions.json  the test answers (+ timings, trainable parameters)
    seed<S>/<method>/adapter.safetensors, train.json   (+ prefix.safetensors for UeLP)
    comparison.json, comparison.md, comparison.png

``--report PREFIX`` writes the three result files also as ``PREFIX.json``, ``PREFIX.md`` and
``PREFIX.png``; ``--report-only`` writes them from the predictions already there, running nothing
(every cell averages the seeds that have the method; the tables give that count). Every file is
written atomically; a method/seed whose predictions exist is skipped (a trained but not yet
evaluated method reloads its adapter), so an interrupted
comparison continues where it stopped, and adding ``--seeds`` or ``--methods`` later only runs
what is new.

``torchrun --nproc_per_node N -m milp.evaluate ...`` runs the comparison in N processes (on
their own GPUs where there are several), and rank 0 writes the report once all are done: the
tables of one process, since every method runs as it would there. The work is dealt in units,
one per (seed, method) — MiLP and its memory-only ablation, which answers with MiLP's users, are
one unit — round-robin method by method (every seed's MiLP, then every seed's TpLP, ...), so
that one seed's methods spread over processes and each process gets a share of every method.

Example:
    >>> args = build_parser().parse_args(["--users", "20", "--seeds", "0,1", "--methods", "tplp,milp"])
    >>> args.seeds, args.methods
    ((0, 1), ('tplp', 'milp'))
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import train
from .baselines import MemoryRetriever, UserEncoder, tplp_context, user_vectors
from .config import MemoryConfig, atomic_write_bytes, atomic_write_text
from .data import Record, group_by_user, record_keys, split_users
from .pipeline import (
    PrefixEncoder,
    generate_responses,
    instruction_tune,
    remove_instruction_adapter,
    response_losses,
    score,
    user_content,
)
from .store import rename_legacy_folders

__all__ = ["METHODS", "SEARCH_ABLATIONS", "ALL_METHODS", "LABELS", "UelpPrefix", "build_parser", "run", "aggregate",
           "main"]

DEFAULT_OUTPUT = "runs/compare"
#: Method keys in table order; ``--methods`` takes a comma list of them.
METHODS: tuple[str, ...] = ("tplp", "malp", "uelp", "milp", "milp-no-memory", "milp-no-instruction")
#: The search-space ablation (paper Table 4): MiLP whose configuration search varies only these
#: dimensions (``milp.train --search-dims``); the others stay at ``--modules`` / ``--rank`` /
#: every layer on. Needs ``--search N``. Full MiLP searches all three.
SEARCH_ABLATIONS: dict[str, tuple[str, ...]] = {
    "milp-num": ("num",),
    "milp-size": ("size",),
    "milp-layer": ("layers",),
    "milp-num-size": ("num", "size"),
    "milp-num-layer": ("layers", "num"),
    "milp-size-layer": ("layers", "size"),
}
#: Every method ``--methods all`` runs (the Table 4 rows only with ``--search N``).
ALL_METHODS: tuple[str, ...] = (*METHODS, *SEARCH_ABLATIONS)
#: Row labels of the tables (``base`` is the reference row of the base model as shipped).
LABELS: dict[str, str] = {
    "tplp": "TpLP",
    "malp": "MaLP",
    "uelp": "UeLP",
    "milp": "MiLP",
    "milp-no-memory": "MiLP w/o memory injection",
    "milp-no-instruction": "MiLP w/o instruction tuning",
    "milp-num": "MiLP, search Num",
    "milp-size": "MiLP, search Size",
    "milp-layer": "MiLP, search Layer",
    "milp-num-size": "MiLP, search Num+Size",
    "milp-num-layer": "MiLP, search Num+Layer",
    "milp-size-layer": "MiLP, search Size+Layer",
    "base": "base model (no memory, no tuning)",
}
_MAIN = ("tplp", "malp", "uelp", "milp")
_ABLATION = ("milp", "milp-no-memory", "milp-no-instruction")
_SEARCH_TABLE = (*SEARCH_ABLATIONS, "milp")
_SEARCH_LABELS = {**{m: "+".join({"num": "Num", "size": "Size", "layers": "Layer"}[d] for d in sorted(
    dims, key=("num", "size", "layers").index)) for m, dims in SEARCH_ABLATIONS.items()},
    "milp": "Num+Size+Layer (MiLP)"}
#: Table columns (and ``_METRICS`` the plotted ones): the response CE is the mean cross-entropy
#: of the reference answer under the method's model, teacher-forced (lower is better): it reads
#: every reference token, not one greedy sample, so it separates methods on few test users.
_CE = ("response_ce", "Response CE ↓")
_METRICS = (("rouge1", "ROUGE-1"), ("rougeL", "ROUGE-L"), ("persona_f1", "Persona-F1"),
            ("win_rate", "Win rate vs TpLP"))
# settings that may change between a comparison and its continuation
_VOLATILE = {"output", "progress", "overwrite", "device", "slots", "eval_batch_size", "on_error", "seeds",
             "methods", "report", "report_only", "judge"}


#: ``"[rank R] "`` in a process of a torchrun job (set by :func:`run`), else empty
_LOG_PREFIX = ""


def _log(msg: str) -> None:
    print(f"milp.evaluate: {_LOG_PREFIX}{msg}", flush=True)


# --------------------------------------------------------------------------- CLI
def _seed_list(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    try:
        seeds = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 0 like 0,1,2, got {text!r}") from None
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {text!r}")
    if any(s > train._MAX_SEED for s in seeds):  # milp.train --seed's bound (torch, the search's seeding)
        raise argparse.ArgumentTypeError(f"seeds must be <= 2**62-1, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must not repeat, got {text!r}")
    return seeds


_method_list = train._name_list(ALL_METHODS, "method")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m milp.evaluate``: every flag of ``python -m milp.train``
    (``--seed`` becomes ``--seeds``) plus the comparison's own.

    Example:
        >>> build_parser().parse_args([]).methods == METHODS
        True
    """
    p = argparse.ArgumentParser(
        prog="python -m milp.evaluate",
        description="Compare MiLP with the TpLP, MaLP and UeLP baselines and its two ablations on the same base "
        "model, data, user split and instruction-tuning budget; writes comparison.{json,md,png}. The flags shared "
        "with python -m milp.train mean the same there; MiLP is exactly that pipeline.",
        parents=[train.build_parser()],
        conflict_handler="resolve",
        formatter_class=train.HelpFormatter,
    )
    p.set_defaults(output=DEFAULT_OUTPUT)
    g = p.add_argument_group("comparison")
    g.add_argument("--seeds", "--seed", dest="seeds", type=_seed_list, default=(0, 1, 2), metavar="S,S,...",
                   help="seeds; each draws its own --users sample and 70/10/20 split (as milp.train --seed S) and "
                   "seeds every method's initialisation and batches; results are mean ± std over them")
    g.add_argument("--methods", type=_method_list, default=METHODS, metavar="M,M,...",
                   help=f"methods to run: {', '.join(ALL_METHODS)} or all; milp-no-instruction reuses milp's "
                   "memory-injected users, so milp runs with it; the milp-<dims> search-space ablations "
                   "(paper Table 4) need --search N")
    g.add_argument("--context-tokens", type=train._pos(int, 1), default=256,
                   help="token budget of the TpLP / MaLP system-prompt context")
    g.add_argument("--k-long", type=train._pos(int, 0), default=3, help="MaLP: retrieved long-term memories")
    g.add_argument("--k-short", type=train._pos(int, 0), default=2, help="MaLP: most recent turns (short-term)")
    g.add_argument("--uelp-vectors", type=train._pos(int, 1), default=4, help="UeLP: soft-prompt vectors")
    g.add_argument("--judge", default="embedding", metavar="JUDGE",
                   help="win-rate judge: embedding (all-MiniLM-L6-v2 similarity to the reference and the user's "
                   "content), lm (the base model under comparison asked which answer is better, both orders), or a "
                   "path to any local Hugging Face causal LM used the same way")
    g.add_argument("--report-only", action="store_true",
                   help="train and generate nothing: write the tables from the predictions already in --output "
                   "(each cell averages the seeds that have the method; n is reported)")
    g.add_argument("--report", default=None, metavar="PREFIX",
                   help="also write the results as PREFIX.json, PREFIX.md and PREFIX.png "
                   "(e.g. bench/results/comparison_meddia)")
    return p


# --------------------------------------------------------------------------- UeLP prefix
class UelpPrefix(PrefixEncoder):
    """UeLP conditioning for the pipeline stages: records → user vectors (the embedder, cached
    per user content) → :class:`~milp.baselines.UserEncoder` → soft prompt ``[B, P, hidden]``.

    Only the encoder's parameters train; the embedder stays frozen (its vectors are cached).

    Example:
        >>> import milp, torch
        >>> class Emb:
        ...     def encode(self, texts): return torch.ones(len(texts), 8)
        >>> r = Record("u", "", ["I run."], "Knee?", "Rest.")
        >>> prefix = UelpPrefix.from_model(milp.tiny_model("llama"), Emb(), [r], num_vectors=2)
        >>> prefix([r, r]).shape
        torch.Size([2, 2, 32])
    """

    def __init__(self, encoder: UserEncoder, embedder: Any) -> None:
        super().__init__()
        self.encoder = encoder
        self.embedder = embedder
        self._cache: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}

    @classmethod
    def from_model(cls, model: Any, embedder: Any, records: Sequence[Record], *, num_vectors: int = 4) -> UelpPrefix:
        """An encoder sized for ``model`` and ``embedder``; embeds ``records``' users in one call."""
        vectors = user_vectors(list(records), embedder)
        prefix = cls(UserEncoder.from_model(model, embed_dim=int(vectors.shape[1]), num_vectors=num_vectors),
                     embedder)
        for r, v in zip(records, vectors):
            prefix._cache[cls._key(r)] = v
        return prefix

    @staticmethod
    def _key(record: Record) -> tuple[str, tuple[str, ...]]:
        return record.profile, tuple(record.history)

    def user_vectors(self, records: Sequence[Record]) -> torch.Tensor:
        """``[B, embed_dim]`` user vectors, embedding the users not seen before in one call."""
        missing = list({self._key(r): r for r in records if self._key(r) not in self._cache}.values())
        if missing:
            for r, v in zip(missing, user_vectors(missing, self.embedder)):
                self._cache[self._key(r)] = v
        return torch.stack([self._cache[self._key(r)] for r in records])

    def forward(self, records: Sequence[Record]) -> torch.Tensor:
        return self.encoder(self.user_vectors(records))


# --------------------------------------------------------------------------- files
def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _command(argv: Sequence[str]) -> str:
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return f"{env}python -m milp.evaluate {shlex.join(argv)}".rstrip()


def _check_output(out: Path, args: argparse.Namespace, device: torch.device) -> None:
    """Refuse, before any work and writing nothing, an ``--output`` this comparison cannot use:
    not a directory; a comparison of other settings (``run.json``; ``--dtype auto`` compared as
    the dtype it ran in, since ``--device`` may change) or a damaged one; ``--overwrite`` of a
    non-empty directory that holds no comparison (it would be deleted); ``--report-only``
    where there is no comparison to report (or with ``--overwrite``, which would delete it)."""
    run_file = out / "run.json"
    train._check_output_dir(out, args.output, "milp.evaluate")
    if args.report_only and args.overwrite:
        raise SystemExit("milp.evaluate: --report-only reports the predictions in --output; --overwrite would "
                         "delete them first")
    if args.overwrite:
        if out.is_dir() and any(out.iterdir()):
            ours = train._holds_run(out, "milp.evaluate", comparison=True)
            if not ours:
                raise SystemExit(f"milp.evaluate: --overwrite: {out} holds no milp.evaluate comparison (no "
                                 "run.json of one); refusing to delete it")
        return
    if not run_file.exists():
        if args.report_only:
            raise SystemExit(f"milp.evaluate: --report-only: {out} holds no comparison (no run.json); nothing "
                             "to report")
        return
    ran = train._read_run_file(run_file, "milp.evaluate", comparison=True, hint="; use another --output")
    lines = train._settings_changes(ran, args, build_parser(), _VOLATILE, device)
    if lines:
        raise SystemExit(f"milp.evaluate: {out} holds a comparison with other settings ({', '.join(lines)}); "
                         "continue it with the same settings, or pass --overwrite or another --output")


def _prepare_output(out: Path, args: argparse.Namespace, argv: Sequence[str], device: torch.device) -> None:
    """Start or continue ``--output`` (checked by :func:`_check_output`, once the rest of the
    input has been checked too): ``--overwrite`` deletes it; a new comparison writes
    ``run.json``, with the dtype it runs in."""
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    run_file = out / "run.json"
    if run_file.exists():
        _log(f"continuing the comparison in {out}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_json(run_file, {"settings": train._settings(args), "dtype": train._dtype_name(args, device),
                                "command": _command(argv), "started": time.time()})


_REPORT_SUFFIXES = (".json", ".md", ".png")


def _report_paths(prefix: str | Path) -> list[Path]:
    """``PREFIX.json``, ``PREFIX.md``, ``PREFIX.png``."""
    p = Path(prefix)
    return [p.with_name(p.name + suffix) for suffix in _REPORT_SUFFIXES]


def _check_report(prefix: str | None) -> None:
    """Refuse, before any work, a ``--report PREFIX`` whose files could not be written: an empty
    prefix or one naming a folder, a ``PREFIX.<suffix>`` that is a directory, a folder inside a
    file, or a folder this process may not write in."""
    if prefix is None:
        return
    p = Path(prefix)
    if not prefix.strip() or p.name in ("", ".", "..") or prefix.endswith(("/", os.sep)):
        raise SystemExit(f"milp.evaluate: --report: expected a file prefix like bench/results/comparison "
                         f"(PREFIX.json, .md and .png are written), got {prefix!r}")
    for t in _report_paths(p):
        if t.is_dir():
            raise SystemExit(f"milp.evaluate: --report: {t} is a directory")
    above = train._outside_files(p, "--report", "milp.evaluate")
    if above is not None and not os.access(above, os.W_OK | os.X_OK):
        raise SystemExit(f"milp.evaluate: --report: cannot write in {above}")


def _check_judge(judge: str) -> None:
    """Refuse, before any work, a ``--judge`` that is neither ``embedding``, ``lm`` nor a local
    checkpoint (a typo used to fail only once every method had run)."""
    if judge in ("embedding", "lm"):
        return
    path = Path(judge).expanduser()
    if not judge.strip() or not path.exists():
        raise FileNotFoundError(f"--judge: expected embedding, lm or a local checkpoint path, got {judge!r}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"--judge: {judge!r} has no config.json; expected a Hugging Face checkpoint directory")
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"--judge: {judge!r} is a file but not a .gguf; pass the checkpoint directory")


def _rows(records: Sequence[Record], answers: Sequence[str]) -> list[dict[str, str]]:
    return [{"user_id": r.user_id, "query": r.query, "reference": r.response, "prediction": a}
            for r, a in zip(records, answers)]


def _save_predictions(path: Path, method: str, seed: int, records: Sequence[Record], answers: Sequence[str],
                      **info: Any) -> None:
    _atomic_json(path, {"method": method, "seed": seed, **info, "rows": _rows(records, answers)})


def _predictions(path: Path, test: Sequence[Record]) -> list[str]:
    """The answers of ``path`` in ``test``'s order (a clear error if they do not match)."""
    rows = _read_json(path)["rows"]
    by_key = dict(zip(record_keys(rows), (r["prediction"] for r in rows)))
    keys = record_keys(test)
    missing = sorted({k[0] for k in keys if k not in by_key})
    if missing or len(rows) != len(test):
        raise ValueError(f"{path} does not hold this split's test answers (missing users {missing[:5]}); "
                         "delete it to evaluate again")
    return [by_key[k] for k in keys]


# --------------------------------------------------------------------------- one seed
class _Seed:
    """One seed's split and the methods run on it (models shared across seeds via ``_Models``).

    Made before the output is prepared, writing nothing (refused: too few users, a
    ``split.json`` of other users that ``--overwrite`` does not delete); :meth:`save` writes
    ``split.json``."""

    def __init__(self, args: argparse.Namespace, seed: int, records: Sequence[Record], out: Path) -> None:
        self.args, self.seed, self.dir = args, seed, out / f"seed{seed}"
        chosen = train._in_user_order(train.select_users(records, args.users, seed))  # as milp.train orders them
        n_users = len(group_by_user(chosen))
        if n_users < 3:
            raise SystemExit(f"milp.evaluate: need at least 3 users for the 70/10/20 split, got {n_users} (--users)")
        tr, va, te = split_users(chosen, train._SPLIT, seed=seed)
        self.split = {"train": tr, "val": va, "test": te}
        self.ids = {k: sorted(group_by_user(v)) for k, v in self.split.items()}
        path = self.dir / "split.json"
        if not args.overwrite and path.exists():
            try:
                same = _read_json(path) == self.ids
            except ValueError:
                raise SystemExit(f"milp.evaluate: {path} is not a split file; use another --output") from None
            if not same:
                raise SystemExit(f"milp.evaluate: {path} lists other users than this data gives; use another "
                                 "--output")
        self.sizes = {k: len(v) for k, v in self.ids.items()}

    def save(self) -> None:
        path = self.dir / "split.json"
        if not path.exists():
            _atomic_json(path, self.ids)

    def pred_path(self, method: str) -> Path:
        return self.dir / method / "predictions.json"

    def done(self, method: str) -> bool:
        return self.pred_path(method).is_file()


class _Models:
    """The base model (frozen, no adapters between methods), tokenizer and embedder, loaded once."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self._model: Any = None
        self._tok: Any = None
        self._embedder: Any = None

    def base(self) -> tuple[Any, Any]:
        if self._model is None:
            from .models import load_model

            model, tok = load_model(self.args.model, dtype=train._dtype(self.args, self.device), device=self.device)
            model.requires_grad_(False)  # only the shared adapter (and UeLP's encoder) train
            self._model, self._tok = model, tok
        return self._model, self._tok

    def embedder(self) -> Any:
        if self._embedder is None:
            from . import models

            self._embedder = models.load_default_embedder()
        return self._embedder


def _shared_adapter(model: Any, st: _Seed, models: _Models, path: Path | None = None) -> Any:
    """Exactly milp.train's shared instruction adapter (:func:`milp.train.run_instruction_adapter`)
    on ``model``, on the device; loaded from ``path`` when given."""
    return train.run_instruction_adapter(model, st.args.instruct_rank, st.seed, models.device, path)


def _uelp_prefix(st: _Seed, models: _Models, model: Any, encoder_path: Path | None = None) -> UelpPrefix:
    """UeLP's encoder for ``model`` over this seed's train + test users; loaded from
    ``encoder_path`` when given."""
    from safetensors.torch import load_file

    prefix = UelpPrefix.from_model(model, models.embedder(), st.split["train"] + st.split["test"],
                                   num_vectors=st.args.uelp_vectors)
    if encoder_path is not None:
        prefix.encoder.load_state_dict(load_file(str(encoder_path), device=str(models.device)))
    return prefix


def _over_injected_users(rt: Any, users_dir: Path, records: Sequence[Record], slots: int,
                         fn: Callable[[list[Record]], Sequence[Any]]) -> dict[tuple[str, str, int], Any]:
    """``fn(records of a group)`` with the group's memory-injected users (from ``users_dir``)
    loaded in ``rt``, ``slots`` users at a time; keyed by :func:`~milp.data.record_keys` of
    ``records`` (a group holds whole users in their order, so its keys are the same)."""
    rename_legacy_folders(users_dir)  # a run an older version saved: its case-sensitive folder names
    by_user = group_by_user(records)
    users = sorted(by_user)
    out: dict[tuple[str, str, int], Any] = {}
    for start in range(0, len(users), slots):
        group = users[start:start + slots]
        for u in group:
            rt.load_user(users_dir / train.user_dirname(u), u, load_optimizer=False)
        recs = [r for u in group for r in by_user[u]]
        out.update(zip(record_keys(recs), fn(recs)))
        for u in group:
            rt.remove_user(u)
    return out


def _run_milp(st: _Seed, method: str = "milp") -> None:
    """MiLP = ``python -m milp.train`` with this comparison's settings (its run directory
    ``seed<S>/milp_run``); also yields the base row. A search-space ablation (``milp-num``, ...)
    is the same run with ``--search-dims`` narrowed, in ``seed<S>/<method>_run``."""
    args = st.args
    targs = train.build_parser().parse_args([])
    for k in vars(targs):
        if hasattr(args, k):
            setattr(targs, k, getattr(args, k))
    targs.seed, targs.output, targs.overwrite = st.seed, str(st.dir / f"{method}_run"), False
    if method in SEARCH_ABLATIONS:
        targs.search_dims = SEARCH_ABLATIONS[method]
    t0 = time.perf_counter()
    metrics = train.run(targs, dist=train.Dist())  # in this process alone: a torchrun job deals out whole units
    run_dir = Path(targs.output)
    split = _read_json(run_dir / "split.json")
    if split != {k: sorted(group_by_user(v)) for k, v in st.split.items()}:
        raise SystemExit(f"milp.evaluate: {run_dir} used another user split than {st.dir / 'split.json'}")
    test = st.split["test"]
    rows = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines() if x]
    by_key = dict(zip(record_keys(rows), (r["prediction"] for r in rows)))
    info = _read_json(run_dir / "instruction.json") if (run_dir / "instruction.json").exists() else {}
    if method == "milp":
        _save_predictions(st.pred_path("base"), "base", st.seed, test,
                          _read_json(run_dir / "predictions_base.json"), trainable_parameters=0)
    # cost = MiLP's own stages (not the model load nor the base-model reference answers)
    timings = {k: v for k, v in (metrics.get("timings_s") or {}).items() if k != "load_model_s"}
    if metrics.get("search"):
        timings["search_s"] = metrics["search"]["wall_s"]
    _save_predictions(st.pred_path(method), method, st.seed, test, [by_key[k] for k in record_keys(test)],
                      invocation_wall_s=time.perf_counter() - t0, timings_s=timings,
                      memory_parameters_per_user=metrics.get("parameters_per_user"),
                      trainable_parameters=info.get("parameters"), memory_config=metrics.get("memory_config"),
                      search=metrics.get("search"), instruct_losses=info.get("losses"))


def _run_memory_only(st: _Seed, models: _Models) -> None:
    """"MiLP w/o instruction tuning": the MiLP run's memory-injected test users, no shared adapter."""
    from .runtime import MilpRuntime

    args, test = st.args, st.split["test"]
    users_dir = st.dir / "milp_run" / "users"
    by_user = group_by_user(test)
    rename_legacy_folders(users_dir)
    missing = [u for u in by_user if not (users_dir / train.user_dirname(u) / "user.json").is_file()]
    if missing:
        raise SystemExit(f"milp.evaluate: milp-no-instruction needs MiLP's memory-injected users, but "
                         f"{users_dir} lacks {missing[:3]}; delete {st.dir / 'milp'} so that MiLP runs again")
    t0 = time.perf_counter()
    base, tok = models.base()
    model = copy.deepcopy(base)
    rt = MilpRuntime(model, max_users=args.slots)
    answers = _over_injected_users(rt, users_dir, test, args.slots, lambda recs: generate_responses(
        model, tok, recs, runtime=rt, max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size,
        max_length=args.max_length + 128, progress=args.progress))
    _save_predictions(st.pred_path("milp-no-instruction"), "milp-no-instruction", st.seed, test,
                      [answers[k] for k in record_keys(test)], trainable_parameters=0,
                      timings_s={"generate_s": time.perf_counter() - t0}, reuses=str(users_dir))


def _context_fn(method: str, st: _Seed, models: _Models, tok: Any) -> Callable[[Record], str] | None:
    args = st.args
    if method == "tplp":
        return lambda r: tplp_context(r, tok, max_tokens=args.context_tokens)
    if method == "malp":
        mem = MemoryRetriever(models.embedder(), k_long=args.k_long, k_short=args.k_short,
                              max_tokens=args.context_tokens)
        mem.contexts(st.split["train"] + st.split["test"], tok)  # every embedding in one batch, then cached
        return lambda r: mem.context(r, tok)
    return None


def _run_tuned(method: str, st: _Seed, models: _Models) -> None:
    """TpLP, MaLP, UeLP or "MiLP w/o memory injection": shared adapter (+ UeLP encoder)
    instruction-tuned on the training users, then answers for the test users."""
    from safetensors.torch import save

    args, seed = st.args, st.seed
    model, tok = models.base()
    mdir = st.dir / method
    train_recs, test = st.split["train"], st.split["test"]
    torch.manual_seed(seed)
    context_fn = _context_fn(method, st, models, tok)
    trained = (mdir / "train.json").is_file()  # trained before: reload, do not train again
    prefix = _uelp_prefix(st, models, model, mdir / "prefix.safetensors" if trained else None) \
        if method == "uelp" else None
    # milp.train's shared adapter and tuning budget
    adapter = _shared_adapter(model, st, models, mdir / "adapter.safetensors" if trained else None)
    try:
        params = sum(p.numel() for p in adapter.parameters())
        params += sum(p.numel() for p in prefix.parameters() if p.requires_grad) if prefix is not None else 0
        t0 = time.perf_counter()
        if trained:
            meta = _read_json(mdir / "train.json")
            _log(f"seed {seed} {method}: trained before, adapter loaded")
        else:
            losses = []
            if args.instruct_steps:
                losses = instruction_tune(model, tok, train_recs, adapter=adapter, context_fn=context_fn,
                                          prefix=prefix, steps=args.instruct_steps, batch_size=args.batch_size,
                                          lr=args.instruct_lr, max_length=args.max_length + 128, seed=seed,
                                          progress=args.progress)
            tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
            atomic_write_bytes(mdir / "adapter.safetensors", save(tensors))
            if prefix is not None:
                enc = {k: v.detach().cpu().contiguous() for k, v in prefix.encoder.state_dict().items()}
                atomic_write_bytes(mdir / "prefix.safetensors", save(enc))
            meta = {"losses": losses, "train_s": time.perf_counter() - t0, "trainable_parameters": params}
            _atomic_json(mdir / "train.json", meta)
        t1 = time.perf_counter()
        answers = generate_responses(model, tok, test, context_fn=context_fn, prefix=prefix,
                                     max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size,
                                     max_length=args.max_length + 128, progress=args.progress)
        _save_predictions(st.pred_path(method), method, seed, test, answers, trainable_parameters=params,
                          timings_s={"train_s": meta["train_s"], "generate_s": time.perf_counter() - t1},
                          instruct_losses=meta["losses"])
    finally:
        remove_instruction_adapter(model)


# --------------------------------------------------------------------------- response CE
def _response_ce(method: str, st: _Seed, models: _Models) -> list[float]:
    """Cross-entropy of each test user's reference response under ``method``'s model, rebuilt
    from what the method saved (adapters, memory-injected users, UeLP encoder), in test order."""
    from .runtime import MilpRuntime

    args, test = st.args, st.split["test"]
    base, tok = models.base()
    kw: dict[str, Any] = {"batch_size": args.eval_batch_size, "max_length": args.max_length + 128}
    if method == "base":
        return response_losses(base, tok, test, **kw)
    if method == "milp-no-instruction" or method == "milp" or method in SEARCH_ABLATIONS:
        run_dir = st.dir / ("milp_run" if method == "milp-no-instruction" else f"{method}_run")
        model = copy.deepcopy(base)
        rt = MilpRuntime(model, max_users=args.slots)
        if method != "milp-no-instruction" and args.instruct_steps:
            _shared_adapter(model, st, models, run_dir / "instruction_adapter.safetensors")
        ce = _over_injected_users(rt, run_dir / "users", test, args.slots,
                                  lambda recs: response_losses(model, tok, recs, runtime=rt, **kw))
        return [ce[k] for k in record_keys(test)]
    mdir = st.dir / method
    context_fn = _context_fn(method, st, models, tok)
    prefix = _uelp_prefix(st, models, base, mdir / "prefix.safetensors") if method == "uelp" else None
    _shared_adapter(base, st, models, mdir / "adapter.safetensors")
    try:
        return response_losses(base, tok, test, context_fn=context_fn, prefix=prefix, **kw)
    finally:
        remove_instruction_adapter(base)


def _fill_response_ce(st: _Seed, models: _Models, methods: Sequence[str]) -> None:
    """Add the response CE to every predictions file of ``methods`` that lacks it."""
    for m in methods:
        path = st.pred_path(m)
        if not path.is_file():
            continue
        info = _read_json(path)
        if all("response_ce" in r for r in info["rows"]):
            continue
        _log(f"seed {st.seed}: response CE of {LABELS[m]}")
        test = st.split["test"]
        _predictions(path, test)  # the file holds this split's test answers
        ce = dict(zip(record_keys(test), _response_ce(m, st, models)))
        for row, key in zip(info["rows"], record_keys(info["rows"])):
            row["response_ce"] = ce[key]
        _atomic_json(path, info)


# --------------------------------------------------------------------------- aggregation
def _mean_std(xs: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for one value), correctly rounded: equal
    values give exactly that value and 0 (``sum(xs) / n`` gives 0.1 + 2⁻⁵⁶ for three 0.1s). The
    deviation is taken from the exact mean: ``stdev(xs, m)`` subtracts the rounded one, which gave
    1.16e-10 instead of 8.23e-11 for ``[1e6, 999999.9999999999]``."""
    m = float(statistics.mean(xs))
    return m, statistics.stdev(xs) if len(xs) > 1 else None


def aggregate(out: Path, seeds: Sequence[int], splits: dict[int, dict[str, list[Record]]], judge: Any,
              methods: Sequence[str] = (*METHODS, "base")) -> dict[str, Any]:
    """Score ``methods`` on every seed whose predictions file exists under ``out`` and
    summarise over seeds.

    Returns ``{"judge", "per_seed": {seed: {method: metrics}}, "summary": {method: {metric:
    {"mean", "std", "n"}}}, "paired": {"reference": "milp", "methods": {method: {metric:
    PairedDifference dict}}}, "examples": ...}``; the win rate is against TpLP's answers of the
    same seed (absent when TpLP has none). ``paired`` compares MiLP with each method per test
    example, pooled over seeds (empty without MiLP).

    Example:
        >>> res = aggregate(Path("runs/compare"), [0], {0: split}, EmbeddingJudge(), ["tplp", "milp"])  # doctest: +SKIP
        >>> res["summary"]["milp"]["rougeL"]["mean"]                                   # doctest: +SKIP
        14.2
    """
    from .metrics import win_rate

    per_seed: dict[str, dict[str, dict[str, Any]]] = {}
    per_example: dict[str, dict[str, dict[str, list[float]]]] = {}  # seed -> method -> metric -> scores
    examples: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        test = splits[seed]["test"]
        sdir = out / f"seed{seed}"
        answers = {m: _predictions(sdir / m / "predictions.json", test)
                   for m in methods if (sdir / m / "predictions.json").is_file()}
        if not answers:
            continue
        res: dict[str, dict[str, Any]] = {}
        each: dict[str, dict[str, list[float]]] = {}
        for m, preds in answers.items():
            res[m] = score(test, preds)
            each[m] = _scores_per_example(test, preds)
            info = _read_json(sdir / m / "predictions.json")
            res[m]["trainable_parameters"] = info.get("trainable_parameters")
            res[m]["timings_s"] = info.get("timings_s")
            if info.get("memory_parameters_per_user") is not None:
                res[m]["memory_parameters_per_user"] = info["memory_parameters_per_user"]
            # in the split's order, as every other per-example score (the saved rows may be in any order)
            ce_of = dict(zip(record_keys(info["rows"]), (r.get("response_ce") for r in info["rows"])))
            ces = [ce_of[k] for k in record_keys(test)]
            if ces and all(c is not None for c in ces):
                res[m][_CE[0]] = sum(ces) / len(ces)
                each[m][_CE[0]] = ces
            if (info.get("search") or {}).get("val_ce") is not None:
                res[m]["search_val_ce"] = info["search"]["val_ce"]
            if "tplp" in answers:
                wr = win_rate(preds, answers["tplp"], [r.query for r in test], [user_content(r) for r in test],
                              [r.response for r in test], judge=judge)
                res[m].update(win_rate=wr.win_rate, wins=wr.wins, losses=wr.losses, ties=wr.ties)
        per_seed[str(seed)] = res
        per_example[str(seed)] = each
        examples[str(seed)] = [{"user_id": r.user_id, "query": r.query, "reference": r.response,
                                "answers": {m: a[i] for m, a in answers.items()}} for i, r in enumerate(test)]
    summary: dict[str, dict[str, Any]] = {}
    for m in methods:
        rows = [res[m] for res in per_seed.values() if m in res]
        if not rows:
            continue
        summary[m] = {}
        for key in (*(k for k, _ in _METRICS), _CE[0], "memory_parameters_per_user", "search_val_ce"):
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                mean, std = _mean_std(vals)
                summary[m][key] = {"mean": mean, "std": std, "n": len(vals)}
        summary[m]["seeds"] = [int(s) for s, res in per_seed.items() if m in res]
    return {"judge": getattr(judge, "name", type(judge).__name__), "per_seed": per_seed, "summary": summary,
            "paired": _paired(per_example, methods), "examples": examples}


def _scores_per_example(test: Sequence[Record], preds: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1, ROUGE-L and Persona-F1 (×100) of each answer: what :func:`score` averages."""
    from .metrics import persona_f1_single, rouge_per_example

    out = rouge_per_example(list(preds), [r.response for r in test])
    out["persona_f1"] = [persona_f1_single(p, user_content(r)) for p, r in zip(preds, test)]
    return out


#: the per-example metrics the paired differences cover (the win rate is a pairwise measure already)
_PAIRED = (("rouge1", "ROUGE-1"), ("rougeL", "ROUGE-L"), ("persona_f1", "Persona-F1"), _CE)


def _paired(per_example: dict[str, dict[str, dict[str, list[float]]]], methods: Sequence[str],
            reference: str = "milp") -> dict[str, Any]:
    """MiLP's per-example scores against each other method's on the same test examples, pooled
    over the seeds that have both: mean difference (MiLP − method), 95% bootstrap interval and
    paired permutation p-value (:func:`milp.metrics.paired_difference`)."""
    from .metrics import paired_difference

    out: dict[str, Any] = {"reference": reference, "methods": {}}
    for m in methods:
        if m == reference:
            continue
        diffs = {}
        for key, _ in _PAIRED:
            a: list[float] = []
            b: list[float] = []
            # seeds in ascending order: the seeded bootstrap resamples positions, so the pooled
            # order must not depend on the order the seeds were given in
            for _, each in sorted(per_example.items(), key=lambda kv: int(kv[0])):
                if key in each.get(reference, {}) and key in each.get(m, {}):
                    a += each[reference][key]
                    b += each[m][key]
            if a:
                diffs[key] = paired_difference(a, b).to_dict()
        if diffs:
            out["methods"][m] = diffs
    return out


def _cell(stat: dict[str, Any] | None, digits: int = 2, seeds: int | None = None) -> str:
    """``mean ± std`` of ``stat``; ``(n of seeds seeds)`` where it averages fewer seeds than its
    row has (the win rate where TpLP lacks a seed, a response CE not computed on one)."""
    if stat is None:
        return "—"
    cell = f"{stat['mean']:.{digits}f}"
    if stat["std"] is not None:
        cell += f" ± {stat['std']:.{digits}f}"
    return cell if seeds is None or stat["n"] == seeds else f"{cell} ({stat['n']} of {seeds} seeds)"


def _table(methods: Sequence[str], summary: dict[str, Any]) -> list[str]:
    lines = ["| Method | " + " | ".join(label for _, label in (*_METRICS, _CE)) + " | seeds |",
             "|---|" + "---:|" * (len(_METRICS) + 2)]
    for m in methods:
        if m not in summary:
            continue
        cells = []
        for key, _ in (*_METRICS, _CE):
            cell = _cell(summary[m].get(key), digits=3 if key == _CE[0] else 2, seeds=len(summary[m]["seeds"]))
            cells.append(f"{cell} (ref.)" if key == "win_rate" and m == "tplp" and cell != "—" else cell)
        label = f"*{LABELS[m]}*" if m == "base" else LABELS[m]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(summary[m]['seeds'])} |")
    return lines


def _diff_cell(d: dict[str, Any] | None, digits: int, n: int | None = None) -> str:
    """``mean [interval] p value`` of a paired difference; ``(n N)`` where it pairs fewer examples
    than its row's ``n`` (a response CE not computed on every seed)."""
    if d is None:
        return "—"
    cell = f"{d['mean']:+.{digits}f}"
    if d["ci_low"] is not None:
        cell += f" [{d['ci_low']:+.{digits}f}, {d['ci_high']:+.{digits}f}]"
    cell = cell.replace("-", "−")
    cell = cell if d["p_value"] is None else f"{cell} p {d['p_value']:.2g}"
    return cell if n is None or d["n"] == n else f"{cell} (n {d['n']})"


def _paired_section(paired: dict[str, Any]) -> list[str]:
    """The paired differences table (absent when MiLP or any other method is missing)."""
    rows = paired.get("methods") or {}
    if not rows:
        return []
    ref = LABELS.get(paired.get("reference", "milp"), "MiLP")
    ns = sorted({d["n"] for diffs in rows.values() for d in diffs.values()})
    conf = next(iter(next(iter(rows.values())).values()))["confidence"]
    lines = [
        f"## Paired differences: {ref} − method",
        "",
        f"Per test example, {ref}'s score minus the method's on the same example, pooled over the seeds "
        f"(n = {', '.join(map(str, ns))} examples): mean [{conf:.0%} BCa bootstrap interval] and the two-sided "
        "p-value of a paired sign-flip permutation test (exact up to 10,000 sign patterns; not corrected for "
        f"multiple comparisons). Positive favours {ref}, except for the response CE, where lower is better.",
        "",
        "| Method | " + " | ".join(f"Δ {label}" for _, label in _PAIRED) + " | n |",
        "|---|" + "---:|" * (len(_PAIRED) + 1),
    ]
    order = [m for m in (*ALL_METHODS, "base") if m in rows]
    for m in order:
        n = max(d["n"] for d in rows[m].values())
        cells = [_diff_cell(rows[m].get(key), 3 if key == _CE[0] else 2, n) for key, _ in _PAIRED]
        label = f"*{LABELS[m]}*" if m == "base" else LABELS[m]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {n} |")
    return [*lines, ""]


def _search_table(summary: dict[str, Any]) -> list[str]:
    """Paper Table 4: what the search varied, the scores, and the picked configuration's size
    and validation loss (mean over seeds)."""
    lines = ["| Searched | " + " | ".join(label for _, label in (*_METRICS, _CE))
             + " | memory parameters per user | val CE of the pick | seeds |",
             "|---|" + "---:|" * (len(_METRICS) + 4)]
    for m in _SEARCH_TABLE:
        if m not in summary:
            continue
        p, ce = summary[m].get("memory_parameters_per_user"), summary[m].get("search_val_ce")
        k = len(summary[m]["seeds"])
        cells = [_cell(summary[m].get(key), digits=3 if key == _CE[0] else 2, seeds=k) for key, _ in (*_METRICS, _CE)]
        cells += ["—" if p is None else f"{p['mean']:,.0f}", _cell(ce, digits=4, seeds=k), str(k)]
        lines.append(f"| {_SEARCH_LABELS[m]} | " + " | ".join(cells) + " |")
    return lines


def _markdown(report: dict[str, Any]) -> str:
    s, summary = report["settings"], report["summary"]
    sizes = report["split_sizes"]
    size_text = "; ".join(f"seed {k}: {v['train']}/{v['val']}/{v['test']}" for k, v in sizes.items())
    lines = [
        "Command:",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"# Personalization comparison — {report['data']}, {report['model']}",
        "",
        f"Seeds {', '.join(str(x) for x in report['seeds'])}; each draws {s['users'] or 'all'} users and splits them "
        f"70/10/20 by user (train/val/test users — {size_text}; one test example per test user on MedDia). "
        "Mean ± sample std (n − 1) over seeds.",
        f"Every method: the same base model, data, split and instruction-tuning budget — {s['instruct_steps']} steps "
        f"× batch {s['batch_size']} at lr {s['instruct_lr']:g}, shared LoRA rank {s['instruct_rank']} on attention "
        f"q/v — and greedy answers of at most {s['max_new_tokens']} tokens. TpLP/MaLP contexts ≤ "
        f"{s['context_tokens']} tokens (MaLP: {s['k_long']} retrieved + {s['k_short']} recent turns); UeLP: "
        f"{s['uelp_vectors']} soft-prompt vectors; MiLP memory: {report['memory']}.",
        f"Win rate: against TpLP on the same test examples, ties count half; judge `{report['judge']}`.",
        "",
        "## Comparison",
        "",
        *_table((*_MAIN, "base"), summary),
        "",
        "## Ablation (paper Table 5)",
        "",
        *_table(_ABLATION, summary),
        "",
    ]
    lines += _paired_section(report.get("paired") or {})
    if any(m in summary for m in SEARCH_ABLATIONS):
        lines += [
            "## Search-space ablation (paper Table 4)",
            "",
            f"The configuration search (`--search {s['search']}`, picked on the validation users) varies only the "
            f"named dimensions; the others stay fixed (Num: {s['modules']} modules, Size: rank {s['rank']}, "
            "Layer: every layer on).",
            "",
            *_search_table(summary),
            "",
        ]
    lines += [
        "## Cost",
        "",
        "| Method | trainable parameters | wall time per seed (s) |",
        "|---|---:|---:|",
    ]
    for m in (*ALL_METHODS, "base"):
        if m in report["cost"]:
            c = report["cost"][m]
            params = "—" if c["trainable_parameters"] is None else f"{c['trainable_parameters']:,}" + (
                " (mean over seeds)" if c.get("trainable_parameters_per_seed") else "")
            if c.get("memory_parameters_per_user"):
                per_seed = c.get("memory_parameters_per_user_per_seed") or []
                params += f" shared + {c['memory_parameters_per_user']:,} per user" + (
                    " (mean over seeds)" if len(set(per_seed)) > 1 else "")
            wall = "—" if c["wall_s"] is None else f"{c['wall_s']:.0f}"
            lines.append(f"| {LABELS[m]} | {params} | {wall} |")
    lines += ["", f"Sum of the methods' wall times: {report['compute_s'] / 60:.1f} min "
              f"(this invocation: {report['wall_s'] / 60:.1f} min). The base model row comes from the MiLP run "
              "(the model as shipped, before any adapter).", ""]
    return "\n".join(lines)


def _plot(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    methods = [m for m in METHODS if m in summary]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        xs, ys, es = [], [], []
        for j, (key, _) in enumerate(_METRICS):
            st = summary[m].get(key)
            if st is None:
                continue
            xs.append(j + (i - (len(methods) - 1) / 2) * width)
            ys.append(st["mean"])
            es.append(st["std"] or 0.0)
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=LABELS[m])
    ax.set_xticks(range(len(_METRICS)), [label for _, label in _METRICS])
    ax.set_ylabel("score (×100); win rate in %")
    ax.set_title(f"{report['data']}, {report['model']}: mean ± std over seeds {report['seeds']}", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _cost(out: Path, seeds: Sequence[int], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    cost: dict[str, dict[str, Any]] = {}
    for m in methods:
        walls, params, mem, found = [], [], [], False
        for seed in seeds:
            p = out / f"seed{seed}" / m / "predictions.json"
            if not p.is_file():
                continue
            info, found = _read_json(p), True
            if info.get("trainable_parameters") is not None:  # a seed that recorded none does not blank the others
                params.append(info["trainable_parameters"])
            if info.get("memory_parameters_per_user") is not None:  # per seed: each seed's search picks its own
                mem.append(info["memory_parameters_per_user"])
            if info.get("timings_s") is not None:  # a seed that recorded no timings is not a seed of 0 s
                walls.append(sum(info["timings_s"].values()))
        if found:  # no timings at all (the base row, whose answers come from the MiLP run): 0 s
            cost[m] = {"trainable_parameters": round(sum(params) / len(params)) if params else None,
                       "trainable_parameters_per_seed": params if len(set(params)) > 1 else None,
                       "memory_parameters_per_user": round(sum(mem) / len(mem)) if mem else None,
                       "memory_parameters_per_user_per_seed": mem or None,
                       "wall_s": sum(walls) / len(walls) if walls else 0.0, "wall_s_total": sum(walls)}
    return cost


def _publish(files: dict[Path, bytes]) -> None:
    """Write ``files`` (path -> content) all or none: each to a temporary file beside it first
    (where a full disk or a folder that cannot be written fails, before anything changed),
    then all renamed into place. On failure the temporary files, and the folders made for
    them, are removed."""
    from search.trial_log import _final_mode, fsync_dir

    tmps: list[tuple[str, Path]] = []
    made: list[Path] = []
    try:
        for path, data in files.items():
            if path.is_dir():
                raise IsADirectoryError(f"{path} is a directory")
            made += [p for p in (path.parent, *path.parent.parents) if not p.exists() and p not in made]
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            tmps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _final_mode(path))
        for tmp, path in tmps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        for folder in sorted(made, key=lambda p: len(p.parts), reverse=True):  # deepest first, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    for folder in dict.fromkeys(path.parent for path in files):
        fsync_dir(folder)


def _write_results(out: Path, report: dict[str, Any], prefix: str | None) -> None:
    """``comparison.{json,md,png}`` in ``out`` and, with a ``prefix``, ``PREFIX.{json,md,png}``:
    all six written, or (a write failing) none changed."""
    md, js, png = _markdown(report), json.dumps(report, indent=2) + "\n", _plot(report)
    content = (js.encode("utf-8"), md.encode("utf-8"), png)  # in _REPORT_SUFFIXES order
    files: dict[Path, bytes] = {}
    for t in [out / "comparison"] + ([Path(prefix)] if prefix else []):
        files.update(zip(_report_paths(t), content))
    _publish(files)


def _describe_memory(out: Path, seeds: Sequence[int], args: argparse.Namespace) -> str:
    """The memory configuration of each seed's MiLP run (each seed's search picks its own)."""
    picks = []
    for seed in seeds:
        path = out / f"seed{seed}" / "milp_run" / "metrics.json"
        if not path.is_file():
            continue
        mm = _read_json(path)
        cfg = MemoryConfig.from_dict(mm["memory_config"])
        layers = cfg.active_layers
        modules = sorted({cfg.modules[i] for i in layers})
        ranks = sorted({r for i in layers for r in cfg.layer_ranks(i)})
        noun = "module" if modules == [1] else "modules"
        picks.append(f"seed {seed}: {len(layers)} of {cfg.num_layers} layers × {'/'.join(map(str, modules))} "
                     f"{noun} of rank {'/'.join(map(str, ranks))} ({mm['parameters_per_user']:,} parameters/user)")
    if not picks:
        return "not run"
    how = f"searched ({args.search} configurations per seed on its validation users)" if args.search else "uniform"
    return (f"{how} — {'; '.join(picks)}; {args.memory_steps} epochs over the history at lr {args.memory_lr:g}, "
            "on every FFN linear of the chosen layers")


def _judge(args: argparse.Namespace, models: _Models) -> Any:
    from .metrics import EmbeddingJudge, LMJudge

    if args.judge == "embedding":
        return EmbeddingJudge(models.embedder())
    if args.judge == "lm":
        model, tok = models.base()
        name = Path(args.model).name if args.model else "SmolLM2-135M-Instruct"
        return LMJudge(model, tok, batch_size=args.eval_batch_size,
                       name=f"lm-pairwise({name}; both orders, tie_band=0)")
    if not Path(args.judge).exists():
        raise FileNotFoundError(f"--judge: expected embedding, lm or a local checkpoint path, got {args.judge!r}")
    return LMJudge.from_pretrained(args.judge, device=models.device, batch_size=args.eval_batch_size)


def _plan_methods(args: argparse.Namespace) -> list[str]:
    """The methods to run: ``--methods``, with ``milp`` added where another method needs it;
    ``--methods all`` without ``--search`` leaves out the search-space ablations (they need
    one), any other request of them without ``--search`` is refused."""
    methods = list(args.methods)
    ablations = [m for m in methods if m in SEARCH_ABLATIONS]
    if ablations and not args.search:
        if tuple(args.methods) != ALL_METHODS:
            raise SystemExit(f"milp.evaluate: the search-space ablations {ablations} vary what the configuration "
                             "search varies: pass --search N (N configurations per search)")
        methods = [m for m in methods if m not in SEARCH_ABLATIONS]
        ablations = []
        _log("--methods all without --search: the search-space ablations (paper Table 4) need --search N; "
             "running the other methods")
    if "milp-no-instruction" in methods and "milp" not in methods:
        methods.insert(methods.index("milp-no-instruction"), "milp")
        _log("milp-no-instruction reuses MiLP's memory-injected users: running milp too")
    if ablations and "milp" not in methods:
        methods.insert(methods.index(ablations[0]), "milp")
        _log("the search-space ablation compares with full MiLP: running milp too")
    return methods


def _finished(st: _Seed, method: str) -> bool:
    """Whether ``method`` has its answers for seed ``st`` (MiLP also the base model's)."""
    return st.done(method) and (method != "milp" or st.done("base"))


def _check_models(models: _Models, args: argparse.Namespace, todo: Sequence[str]) -> None:
    """Load what the methods ``todo`` (those still to run) and the judge need, before anything
    is written: the base model (a missing or unsupported ``--model``, or a ``--layers`` it
    lacks, used to stop the first MiLP run only after ``run.json`` was written, and the
    corrected command was then refused as a comparison with other settings) and the sentence
    embedder (a missing one used to stop the comparison once every method had run)."""
    from .inject import ffn_targets

    try:
        if todo:
            model, _ = models.base()
            if any(m == "milp" or m in SEARCH_ABLATIONS for m in todo):  # a milp.train run to come
                try:
                    train._parse_layers(args.layers, len(ffn_targets(model)))
                except ValueError as e:
                    raise SystemExit(f"milp.evaluate: {e}") from None
        if args.judge == "embedding" or any(m in ("malp", "uelp") for m in todo):
            models.embedder()
    except ImportError as e:  # an optional package of the default model or embedder is missing
        raise SystemExit(f"milp.evaluate: {e}") from None


# --------------------------------------------------------------------------- the run
def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Run the comparison for parsed ``args`` (see :func:`build_parser`); returns the report
    (also written as ``comparison.json``).

    Example:
        >>> report = run(build_parser().parse_args(["--users", "10", "--seeds", "0"]))  # doctest: +SKIP
        >>> report["summary"]["milp"]["rougeL"]                                         # doctest: +SKIP
        {'mean': 13.1, 'std': None, 'n': 1}
    """
    global _LOG_PREFIX
    t_start = time.perf_counter()
    device = train._resolve_device(args.device, "milp.evaluate")
    dist = train.Dist.from_env(device)
    _LOG_PREFIX = f"[rank {dist.rank}] " if dist.world > 1 else ""
    try:
        return _run(args, argv, device, dist, t_start)
    finally:
        _LOG_PREFIX = ""
        dist.close()


def _units(seeds: Sequence[int], order: Sequence[str]) -> list[tuple[int, tuple[str, ...]]]:
    """The comparison's units of work, ``(seed, methods)``, in the order one process runs them:
    per seed, MiLP with its memory-only ablation (which answers with MiLP's memory-injected users:
    one unit), then each other main method; the search-space ablations (a whole search each)
    after every seed's main methods.

    Example:
        >>> _units([0, 1], ["milp", "milp-no-instruction", "tplp"])
        [(0, ('milp', 'milp-no-instruction')), (0, ('tplp',)), (1, ('milp', 'milp-no-instruction')), (1, ('tplp',))]
    """
    main = [m for m in order if m not in SEARCH_ABLATIONS]
    chain = tuple(m for m in main if m in ("milp", "milp-no-instruction"))
    units: list[tuple[int, tuple[str, ...]]] = []
    for seed in seeds:
        units += [(seed, chain)] if chain else []
        units += [(seed, (m,)) for m in main if m not in chain]
    return units + [(seed, (m,)) for seed in seeds for m in order if m in SEARCH_ABLATIONS]


def _my_units(units: Sequence[tuple[int, tuple[str, ...]]], order: Sequence[str], seeds: Sequence[int],
              rank: int, world: int) -> list[tuple[int, tuple[str, ...]]]:
    """Process ``rank``'s share of ``units`` (of :func:`_units`): dealt round-robin method by
    method — every seed's MiLP, then every seed's TpLP, ... — so that each process gets a share of
    every method's cost (MiLP's memory injection, the searches, the baselines' tuning), and run in
    the units' order. One process gets them all, in their order.

    Example:
        >>> units = _units([0], ["milp", "tplp", "malp"])
        >>> _my_units(units, ["milp", "tplp", "malp"], [0], 0, 2), _my_units(units, ["milp", "tplp", "malp"], [0], 1, 2)
        ([(0, ('milp',)), (0, ('malp',))], [(0, ('tplp',))])
    """
    dealt = sorted(range(len(units)), key=lambda i: (order.index(units[i][1][0]), seeds.index(units[i][0])))
    return [units[i] for i in sorted(dealt[rank::world])]


def _run(args: argparse.Namespace, argv: Sequence[str], device: torch.device, dist: train.Dist,
         t_start: float) -> dict[str, Any]:
    """:func:`run` in this process of the job ``dist``: its share of the comparison's units
    (:func:`_my_units`), then, in rank 0 once every process is done, the report (``{}`` in the
    others)."""
    from tqdm.auto import tqdm

    if not dist.main:  # one process draws the bars (its own units'); the others' would overwrite them
        args = copy.copy(args)
        args.progress = False
    out = Path(args.output)
    methods = _plan_methods(args)
    # every check of the input comes before the first file is written (or --overwrite deletes
    # one): a refused comparison leaves nothing behind, and its corrected command is not refused
    # as a continuation with other settings
    _check_report(args.report)
    _check_judge(args.judge)
    _check_output(out, args, device)
    records = train.load_records(args.data, args.data_format, on_error=args.on_error,
                                 progress=args.progress and dist.main)
    seeds = list(args.seeds)
    st_of = {seed: _Seed(args, seed, records, out) for seed in seeds}
    models = _Models(args, device)
    order = [m for m in ("milp", "milp-no-instruction", "tplp", "malp", "uelp", "milp-no-memory", *SEARCH_ABLATIONS)
             if m in methods]
    mine = _my_units(_units(seeds, order), order, seeds, dist.rank, dist.world)
    jobs = [] if args.report_only else [(seed, m) for seed, unit in mine for m in unit]
    _check_models(models, args, [m for seed, m in jobs if not _finished(st_of[seed], m)])
    dist.barrier()  # every process has checked the output before rank 0 deletes (--overwrite) or starts it
    if dist.main:
        _prepare_output(out, args, argv, device)
        for seed in seeds:  # every seed's split, before any process runs one of its methods
            st = st_of[seed]
            if not args.report_only:  # --report-only writes nothing but the tables
                st.save()
            _log(f"seed {seed}: {st.sizes['train']} train / {st.sizes['val']} val / {st.sizes['test']} test users")
        if args.report_only:
            _log("--report-only: tables from the predictions already in the output directory")
    dist.barrier()
    bar = tqdm(jobs, desc="comparison", disable=not (args.progress and dist.main), dynamic_ncols=True)
    for seed, m in bar:
        st = st_of[seed]
        bar.set_postfix(seed=seed, method=m)
        if _finished(st, m):
            continue
        _log(f"seed {seed}: {LABELS[m]}")
        torch.manual_seed(seed)
        if m == "milp" or m in SEARCH_ABLATIONS:
            _run_milp(st, m)
        elif m == "milp-no-instruction":
            _run_memory_only(st, models)
        else:
            _run_tuned(m, st, models)
    bar.close()
    shown = [*methods, "base"] if "milp" in methods else methods
    if not args.report_only:  # the response CEs of this process's methods (MiLP's unit writes the base row)
        owned = {(seed, m) for seed, unit in mine for m in (*unit, *(("base",) if "milp" in unit else ()))}
        for seed in seeds:
            if own := [m for m in shown if (seed, m) in owned]:
                _fill_response_ce(st_of[seed], models, own)
    dist.barrier()  # every seed's answers and response CEs are written
    if not dist.main:
        return {}
    judge = _judge(args, models)
    res = aggregate(out, seeds, {s: st.split for s, st in st_of.items()}, judge, shown)
    cost = _cost(out, seeds, shown)
    memory = _describe_memory(out, seeds, args)
    report = {
        "command": _command(argv),
        "model": args.model or "SmolLM2-135M-Instruct (embedded)",
        "data": args.data or "MedDia (shipped)",
        "seeds": seeds,
        "methods": {m: LABELS[m] for m in (*ALL_METHODS, "base") if m in res["summary"]},
        "split_sizes": {str(s): st.sizes for s, st in st_of.items()},
        "settings": train._settings(args),
        "memory": memory,
        "judge": res["judge"],
        "summary": res["summary"],
        "tables": {"comparison": [m for m in (*_MAIN, "base") if m in res["summary"]],
                   "ablation": [m for m in _ABLATION if m in res["summary"]],
                   "search_ablation": [m for m in _SEARCH_TABLE if m in res["summary"]
                                       and any(a in res["summary"] for a in SEARCH_ABLATIONS)]},
        "per_seed": res["per_seed"],
        "paired": res["paired"],
        "cost": cost,
        "compute_s": sum(c["wall_s_total"] for c in cost.values()),
        "wall_s": time.perf_counter() - t_start,
        "examples": res["examples"],
    }
    _write_results(out, report, args.report)
    print("\n" + _markdown(report), flush=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m milp.evaluate``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    ignored = train._ignored_flags(args, parser, searched_dims=False)  # its ablations search other dims
    if ignored:
        parser.error("; ".join(ignored))
    try:
        run(args, argv)
    except (OSError, ValueError) as e:  # a missing/unreadable file or folder, bad data: no traceback
        print(f"milp.evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
