"""Multi-user runtime: many users' memory adapters trained and served in the same batch.

:class:`MilpRuntime` injects a model (:func:`milp.inject.apply_milp`), maps user keys
(any hashable: ``"alice"``, ``42``) to bank slots, and runs

* :meth:`~MilpRuntime.train_step` — one forward/backward/optimizer step over a batch
  whose rows belong to different users, each with its own :class:`MemoryConfig`. The loss
  is the **sum over users of each user's mean token loss**, so every user's gradient is
  the one training that user alone on its rows would give; the per-user AdamW of
  :mod:`milp.optim` then updates exactly the users of the batch.
* :meth:`~MilpRuntime.generate` — ``model.generate`` with one user per row (greedy,
  sampling, beams; left padding and the KV cache work as usual).
* :meth:`~MilpRuntime.save_user` / :meth:`~MilpRuntime.load_user` /
  :meth:`~MilpRuntime.evict_user` — a user's adapters as safetensors plus its
  ``MemoryConfig`` JSON (and optimizer state), written atomically.

Example:
    >>> import torch
    >>> from milp.inject import tiny_model
    >>> rt = MilpRuntime(tiny_model("llama"), max_users=4)
    >>> rt.add_user("alice", MemoryConfig.uniform(2, modules=2, rank=8), total_steps=10)
    >>> rt.add_user("bob", MemoryConfig((True, False), (1, 0), (16, 8)), total_steps=10)
    >>> ids = torch.randint(3, 90, (4, 12))
    >>> losses = rt.train_step(ids, users=["alice", "bob", "alice", "bob"])
    >>> sorted(losses)
    ['alice', 'bob']
"""
from __future__ import annotations

import contextlib
import functools
import heapq
import json
import math
import numbers
import os
import stat
import threading
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import torch
from torch import nn

from kernels import nvtx_range

from .config import MemoryConfig, _check_bool, _check_path, _safetensors_bytes, atomic_directory
from .inject import MilpState, apply_milp, batch_users, get_milp, is_injected
from .losses import _cached, _check_labels, check_token_inputs, token_losses, values_checked
from .optim import AdamWConfig, LossScaling, PackedAdamW, _check_loss_scaling, resolve_loss_scaling
from .store import CacheInfo, UserStore

__all__ = [
    "ADAPTERS_FILE",
    "CONFIG_FILE",
    "MilpRuntime",
    "OPTIMIZER_FILE",
    "USER_FILE",
    "mixed_batches",
    "pad_sequences",
    "user_losses",
    "user_losses_from_ce",
]

ADAPTERS_FILE = "adapters.safetensors"
CONFIG_FILE = "memory_config.json"
USER_FILE = "user.json"
OPTIMIZER_FILE = "optimizer.safetensors"
_FORMAT = "milp.user/1"
try:  # every cache_implementation that makes generate build a StaticCache (compiled decode)
    from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS as _STATIC_CACHES
except ImportError:  # pragma: no cover - older transformers
    _STATIC_CACHES = ("static", "offloaded_static", "sliding_window", "hybrid", "hybrid_chunked",
                      "offloaded_hybrid", "offloaded_hybrid_chunked")


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_token_id: int, *, side: str = "right",
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, S], attention_mask [B, S])`` from token lists, padded on ``side``
    (``"right"`` for training, ``"left"`` for generation).

    Example:
        >>> pad_sequences([[5, 6, 7], [8]], pad_token_id=0, side="left")[0].tolist()
        [[5, 6, 7], [0, 0, 8]]
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral):
        raise TypeError(f"pad_token_id must be an int, got {pad_token_id!r} "
                        "(does the tokenizer have a pad or eos token?)")
    if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Iterable):
        raise TypeError(f"sequences must be a sequence of token-id lists, got {type(sequences).__name__}")
    seqs = []
    for i, s in enumerate(sequences):
        if isinstance(s, (str, bytes)) or not isinstance(s, Iterable):
            raise TypeError(f"sequences[{i}] must be a list of int token ids, got {type(s).__name__}")
        s = list(s)
        for v in s:  # a float id would be truncated by the long tensor, a bool taken as 0/1
            if isinstance(v, torch.Tensor) and v.dim() == 0 and not (v.dtype.is_floating_point or v.is_complex()
                                                                      or v.dtype == torch.bool):
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"sequences[{i}] must hold int token ids, got {v!r}")
        seqs.append(s)
    if not seqs:
        raise ValueError("sequences must hold at least one sequence")
    if any(len(s) == 0 for s in seqs):
        raise ValueError("sequences must not be empty")
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros(len(seqs), S, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(S - len(s), S)
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)


def mixed_batches(
    per_user: Mapping[Hashable, Sequence[Sequence[int]]],
    pad_token_id: int,
    *,
    rows_per_user: int = 8,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[Hashable]]]:
    """Mixed-user training batches ``(input_ids, attention_mask, users)`` (right-padded): batch
    ``i`` holds rows ``i*rows_per_user …`` of every user that still has them, so each user
    sees exactly the batches of ``rows_per_user`` it would see trained alone (paper: batch 8).
    A user's order is shuffled by ``(seed, epoch, user)`` alone, independent of the others.
    ``ceil(len(per_user[u]) / rows_per_user)`` batches per epoch involve user ``u``.

    Example:
        >>> data = {"a": [[5, 6], [7, 8, 9], [10, 11]], "b": [[12, 13, 14]]}
        >>> [users for _, _, users in mixed_batches(data, 0, rows_per_user=2, shuffle=False)]
        [['a', 'a', 'b'], ['a']]
    """
    if isinstance(rows_per_user, bool) or not isinstance(rows_per_user, int) or rows_per_user < 1:
        raise ValueError(f"rows_per_user must be an int >= 1, got {rows_per_user!r}")
    if not isinstance(per_user, Mapping):
        raise TypeError(f"per_user must be a mapping {{user: sequences}}, got {type(per_user).__name__}")
    _check_bool("shuffle", shuffle)
    for name, v in (("seed", seed), ("epoch", epoch)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {v!r}")
    orders: dict[Hashable, list[int]] = {}
    for u, seqs in per_user.items():
        if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Sequence):
            raise TypeError(f"per_user[{u!r}] must be a sequence of token-id lists, got {type(seqs).__name__}")
        if len(seqs) == 0:
            raise ValueError(f"user {u!r} has no sequences")
        idx = list(range(len(seqs)))
        if shuffle:
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{epoch}:{u!r}".encode()))
            idx = torch.randperm(len(seqs), generator=g).tolist()
        orders[u] = idx
    n_batches = max(math.ceil(len(v) / rows_per_user) for v in orders.values()) if orders else 0
    for i in range(n_batches):
        rows, users = [], []
        for u, idx in orders.items():
            for j in idx[i * rows_per_user : (i + 1) * rows_per_user]:
                rows.append(per_user[u][j])
                users.append(u)
        ids, mask = pad_sequences(rows, pad_token_id, side="right", device=device)
        yield ids, mask, users


def user_losses(
    logits: torch.Tensor, labels: torch.Tensor, row_slots: torch.Tensor, max_users: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of a mixed-user batch, per user.

    ``logits [B, S, V]``, ``labels [B, S]`` (``-100`` = ignored; shifted here like Hugging
    Face's causal-LM loss), ``row_slots [B]`` (``-1`` rows are ignored). Returns
    ``(total, mean [max_users], count [max_users])`` with ``total = Σ_u mean_u`` over users
    with at least one target token.

    Example:
        >>> total, mean, count = user_losses(torch.zeros(2, 3, 5), torch.ones(2, 3, dtype=torch.long),
        ...                                  torch.tensor([0, 1]), max_users=2)
        >>> round(float(total), 4), count.tolist()
        (3.2189, [2, 2])
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"logits and labels must be tensors, got {type(logits).__name__}, {type(labels).__name__}")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, S, V] and labels [B, S]; got {list(logits.shape)}, {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer token ids (-100 = no target), got dtype {labels.dtype}")
    B, S, V = logits.shape
    _check_labels(labels, V)
    labels = labels.long()
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1).to(logits.device),
        ignore_index=-100, reduction="none",
    ).view(B, S - 1)
    return user_losses_from_ce(ce, labels[:, 1:].to(logits.device) != -100, row_slots, max_users)


def user_losses_from_ce(
    ce: torch.Tensor, valid: torch.Tensor, row_slots: torch.Tensor, max_users: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`user_losses` from per-position losses ``ce [B, S-1]`` and their target mask
    (:func:`milp.losses.token_losses`), without the logits.

    Example:
        >>> ce = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
        >>> total, mean, count = user_losses_from_ce(ce, ce > 0, torch.tensor([0, 1]), max_users=2)
        >>> float(total), mean.tolist(), count.tolist()
        (4.0, [2.0, 2.0], [2, 1])
    """
    for name, t in (("ce", ce), ("valid", valid), ("row_slots", row_slots)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not ce.dtype.is_floating_point:
        raise TypeError(f"ce must hold float per-position losses, got dtype {ce.dtype}")
    if ce.dim() != 2:
        raise ValueError(f"ce must be [B, S-1] per-position losses, got shape {list(ce.shape)}")
    B, S1 = ce.shape
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool mask (True = a target), got dtype {valid.dtype}")
    if tuple(valid.shape) != (B, S1):
        raise ValueError(f"valid must have ce's shape {[B, S1]}, got {list(valid.shape)}")
    if isinstance(max_users, bool) or not isinstance(max_users, int) or max_users < 1:
        raise ValueError(f"max_users must be an int >= 1, got {max_users!r}")
    if row_slots.dtype.is_floating_point or row_slots.is_complex() or row_slots.dtype == torch.bool:
        raise TypeError(f"row_slots must hold integer user slots, got dtype {row_slots.dtype}")
    if row_slots.dim() != 1 or row_slots.shape[0] != B:
        raise ValueError(f"row_slots must be [B] = [{B}] (one slot per row), got shape {list(row_slots.shape)}")
    if B and values_checked(row_slots) and (int(row_slots.min()) < -1 or int(row_slots.max()) >= max_users):
        raise ValueError(f"row_slots must be slots in [-1, {max_users}) (-1 = no user), got values in "
                         f"[{int(row_slots.min())}, {int(row_slots.max())}]")
    slots = row_slots.to(ce.device).view(B, 1).expand(B, S1)
    valid = valid.to(ce.device) & (slots >= 0)
    tok_user = slots.clamp(min=0).reshape(-1)
    # where, not ce * valid: an ignored position (a row of slot -1) holding inf/NaN must not reach slot 0
    kept = torch.where(valid.reshape(-1), ce.reshape(-1), torch.zeros((), dtype=ce.dtype, device=ce.device))
    sums = torch.zeros(max_users, dtype=ce.dtype, device=ce.device).index_add(0, tok_user, kept)
    counts = torch.zeros(max_users, dtype=torch.int64, device=ce.device).index_add(
        0, tok_user, valid.reshape(-1).to(torch.int64))
    mean = sums / counts.clamp(min=1).to(ce.dtype)
    return mean.sum(), mean, counts


def _read_saved(d: Path, names: Sequence[str], optional: Sequence[str]) -> dict[str, bytes]:
    """The bytes of the files ``names`` (each must exist) and ``optional`` of the save_user
    directory ``d``, all read through one open handle of the directory, so all from one save:
    another process re-saving the user swaps in a new folder and deletes the old one
    (:func:`~milp.config.atomic_directory`), and a file gone from the folder being read (that
    folder no longer at ``d``) reads the new one from the start, never a mix of two saves."""
    for _ in range(20):
        try:
            dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise FileNotFoundError(f"{str(d)!r} does not exist (not a directory written by save_user)") from None
        except NotADirectoryError:
            raise FileNotFoundError(f"{str(d)!r} is not a directory (not a directory written by save_user)") from None
        try:
            out: dict[str, bytes] = {}
            for name in (*names, *optional):
                try:
                    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
                except FileNotFoundError:
                    fd = -1
                if fd >= 0:
                    try:
                        if stat.S_ISREG(os.fstat(fd).st_mode):  # a folder of that name is no file
                            with os.fdopen(fd, "rb", closefd=False) as f:
                                out[name] = f.read()
                    finally:
                        os.close(fd)
                if name in out or name in optional and _same_directory(d, dir_fd):
                    continue
                if _same_directory(d, dir_fd):
                    raise FileNotFoundError(f"{str(d / name)!r} does not exist (not a directory written by save_user)")
                break  # replaced while being read: read the new folder
            else:
                return out
        finally:
            os.close(dir_fd)
    raise OSError(f"{str(d)!r} was replaced again and again while being read (a process re-saving it in a loop?)")


def _same_directory(d: Path, dir_fd: int) -> bool:
    """Whether the folder open as ``dir_fd`` is (still) the one at ``d``."""
    try:
        st = os.stat(d)
    except OSError:
        return False
    here = os.fstat(dir_fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def _saved_json(path: Path, data: bytes) -> Any:
    """The JSON ``data`` read from ``path`` of a saved user, a malformed one named by the file."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON ({exc}): a damaged save_user directory") from None


def _read_user_info(path: Path, data: bytes) -> dict[str, Any]:
    """``user.json`` of a saved user (its bytes ``data``, read from ``path``), with each way it
    can be broken named by the file."""
    info = _saved_json(path, data)
    if not isinstance(info, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(info).__name__}")
    if info.get("format") != _FORMAT:
        raise ValueError(f"{str(path)!r} has format {info.get('format')!r}, expected {_FORMAT!r}")
    missing = [k for k in ("user", "target_shapes", "optimizer") if k not in info]
    if missing:
        raise ValueError(f"{str(path)!r} lacks {missing}: a damaged save_user directory")
    shapes = info["target_shapes"]
    if not (isinstance(shapes, list) and all(isinstance(layer, list) and all(
            isinstance(s, list) and len(s) == 2 and all(_is_count(v) for v in s) for s in layer) for layer in shapes)):
        raise ValueError(f"{str(path)!r}: target_shapes must be a list per layer of [in, out] pairs")
    if not isinstance(info["optimizer"], dict):
        raise ValueError(f"{str(path)!r}: optimizer must be an object of AdamW settings")
    return info


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _read_tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    """A safetensors file of a saved user (its bytes ``data``, read from ``path``), a damaged one
    named (safetensors says only "Error while deserializing header")."""
    from safetensors.torch import load

    try:
        # the bytes, not load_file: safetensors' mmap reader (0.8) keeps ~56 bytes per tensor alive
        # after every call, which a store loading users for days piles up without bound
        return load(data)
    except Exception as exc:  # SafetensorError (not exported by every safetensors release)
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({exc}): a damaged save_user "
                         f"directory") from None


def _not_a_key(user: object) -> bool:
    """A bool or a non-integral number: equal (and hashed alike) to an int id (``True == 1``,
    ``1.0 == 1``), so it would silently name that user."""
    return isinstance(user, bool) or (isinstance(user, numbers.Number) and not isinstance(user, numbers.Integral))


def _as_key(user: object) -> Hashable:
    if user is None or _not_a_key(user) or not isinstance(user, Hashable):
        raise TypeError(f"user must be a hashable id (str or int), got {user!r}")
    return user


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _serialized(method: Callable[Concatenate[MilpRuntime, _P], _R]) -> Callable[Concatenate[MilpRuntime, _P], _R]:
    """Run ``method`` holding the runtime's lock: one call at a time per runtime, across threads
    (a server answering requests from a thread pool); re-entrant, so the runtime's own nested
    calls (a store load inside a batch, :meth:`MilpRuntime.using` around a forward) go through.
    Typed to keep the method's signature (an untyped decorator made every one of them ``Any``
    to a type checker)."""
    @functools.wraps(method)
    def locked(self: MilpRuntime, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


def _outside_inference_mode(method: Callable[Concatenate[MilpRuntime, _P], _R]
                            ) -> Callable[Concatenate[MilpRuntime, _P], _R]:
    """Run ``method`` outside ``torch.inference_mode()`` (and without autograd) when called inside
    it: what it allocates (adapter banks, optimizer state) outlives the call, and an inference
    tensor can neither be updated in place nor saved for backward by a later call outside
    inference mode (a store load during inference-mode serving, then a training step)."""
    @functools.wraps(method)
    def normal(self: MilpRuntime, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not torch.is_inference_mode_enabled():
            return method(self, *args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            return method(self, *args, **kwargs)
    return normal


class MilpRuntime:
    """Trains and serves many users' memory adapters on one base model, in mixed batches.

    Thread-safe: calls from several threads take turns (one re-entrant lock per runtime), as
    the users' slots, the banks, the batch's plan and the adapters' gradients are shared by all
    of them; a :meth:`using` block holds the runtime until it ends. Batch requests together for
    throughput. A model driven directly through :class:`~milp.inject.MilpState` has no lock.

    Args:
        model: a supported Hugging Face causal LM (injected here unless it already is).
        max_users: how many users may be loaded at once (bank slots).
        optim: default :class:`AdamWConfig` of new users.
        capacity: rank rows to preallocate per target linear.
        store: a :class:`~milp.store.UserStore`; batches may then name any user saved there
            (loaded on demand, least recently used store users evicted: :mod:`milp.store`).
        master_weights: float32 master copies of bf16/fp16 adapters in the optimizer
            (:class:`~milp.optim.PackedAdamW`; default on: updates below bf16's precision
            accumulate). ``False`` saves 4 bytes per adapter element and rounds every update.
            No effect on float32/float64 models.
        loss_scaling: dynamic loss scaling of :meth:`train_step`, per user (:class:`~milp.optim.LossScaling`;
            see :mod:`milp.optim`). ``"auto"`` (default): on when the adapters are float16 (a
            float16 model), where unscaled gradients underflow; ``True``/``False`` (or ``None``); or a
            :class:`~milp.optim.LossScaling` of your own. A user whose gradients overflow skips
            that step (:attr:`skipped_steps` counts them).

    Example:
        >>> from milp.inject import tiny_model
        >>> rt = MilpRuntime(tiny_model("gpt2"), max_users=2)
        >>> rt.add_user(7, MemoryConfig.uniform(2, 1, 8)); rt.users
        [7]
    """

    def __init__(self, model: nn.Module, *, max_users: int = 64, optim: AdamWConfig | None = None,
                 capacity: int = 0, store: UserStore | None = None, master_weights: bool = True,
                 loss_scaling: LossScaling | bool | str | None = "auto") -> None:
        _check_bool("master_weights", master_weights)
        _check_loss_scaling(loss_scaling)
        if store is not None and not isinstance(store, UserStore):
            raise TypeError(f"store must be a milp.UserStore, got {type(store).__name__}")
        if optim is not None and not isinstance(optim, AdamWConfig):  # before the model is injected
            raise TypeError(f"optim must be an AdamWConfig, got {type(optim).__name__}")
        self.model = model
        if is_injected(model):
            self.state: MilpState = get_milp(model)
            if self.state.users():
                raise ValueError("model already holds MiLP adapters; start the runtime on a model without users")
        else:
            self.state = apply_milp(model, max_users=max_users, capacity=capacity)
        self.default_optim = optim or AdamWConfig()
        banks = self.state.banks()
        dtype = banks[0].lora_a.dtype if banks else torch.float32
        self.optimizer = PackedAdamW(banks, self.state.max_users, master_weights=master_weights,
                                     loss_scaling=resolve_loss_scaling(loss_scaling, dtype))
        #: users' steps skipped by loss scaling (gradients not finite), per user, since the runtime began
        self.skipped_steps: dict[Hashable, int] = {}
        self._slots: dict[Hashable, int] = {}
        self._slot_user: dict[int, Hashable] = {}  # the inverse of _slots (per batch: no scan of all users)
        # free slots: the freed ones below _next_slot (a heap) and every slot from _next_slot up, so
        # add_user takes the lowest without a scan of all slots
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._configs: dict[Hashable, MemoryConfig] = {}
        self.store = store
        self._from_store: dict[Hashable, int] = {}  # users the store loaded -> their step count then
        # store users -> batch counter of last use, kept in eviction order (least recently used
        # first, ties in load order), so a batch finds its victims without sorting every loaded user
        self._last_used: dict[Hashable, int] = {}
        self._load_seq: dict[Hashable, int] = {}  # store users -> when loaded (the ties' order)
        self._batches = 0
        self._cache = [0, 0, 0, 0]  # hits, loads, evictions, write_backs
        self._active: list[frozenset[Hashable]] = []  # users of the open using() blocks (never evicted)
        # the users' slots, the banks, the batch's plan and the gradients are shared by every call:
        # calls from several threads take turns (a thread's batch would otherwise run on another's plan)
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- users
    @property
    def max_users(self) -> int:
        return self.state.max_users

    @property
    def num_layers(self) -> int:
        return self.state.num_layers

    @property
    def users(self) -> list[Hashable]:
        """Loaded users, in the order they were added."""
        return list(self._slots)

    def has_user(self, user: Hashable) -> bool:
        return not _not_a_key(user) and isinstance(user, Hashable) and user in self._slots

    def check_user(self, user: Hashable) -> None:
        """``KeyError`` naming ``user`` unless it is loaded or, with a store, saved there (a
        batch may name it)."""
        if _not_a_key(user) or not isinstance(user, Hashable):
            raise TypeError(f"user must be a hashable id (str or int), got {user!r}")
        if user in self._slots or (self.store is not None and _as_key(user) in self.store):
            return
        where = f", nor saved in {self.store}" if self.store is not None else ""
        raise KeyError(f"unknown user {user!r}: not loaded{where}; loaded users: {self.users[:20]}")

    def slot(self, user: Hashable) -> int:
        """The bank slot of ``user`` (``KeyError`` when not loaded; ``TypeError`` for a bool or a
        float, which would otherwise name the int user it equals)."""
        if _not_a_key(user):
            raise TypeError(f"user must be a hashable id (str or int), got {user!r}")
        try:
            return self._slots[user]
        except (KeyError, TypeError):
            raise KeyError(f"unknown user {user!r}; loaded users: {self.users[:20]}") from None

    def config(self, user: Hashable) -> MemoryConfig:
        """``user``'s :class:`MemoryConfig`."""
        return self._configs[self._user(user)]

    def _user(self, user: Hashable) -> Hashable:
        self.slot(user)
        return user

    def num_parameters(self, user: Hashable) -> int:
        """Trainable adapter parameters of ``user`` (as held in the banks)."""
        return self.state.num_parameters(self.slot(user))

    @_serialized
    @_outside_inference_mode
    def add_user(
        self,
        user: Hashable,
        config: MemoryConfig,
        *,
        total_steps: int | None = None,
        optim: AdamWConfig | None = None,
        init: str = "lora",
        seed: int | None = None,
    ) -> None:
        """Load a new user with fresh adapters laid out by ``config`` and a fresh optimizer
        (``total_steps`` sets its warm-up/decay schedule; ``init`` as
        :meth:`kernels.AdapterBank.add`; ``seed`` makes the draw reproducible).

        Example:
            >>> from milp.inject import tiny_model
            >>> rt = MilpRuntime(tiny_model("llama"), max_users=1)
            >>> rt.add_user("u", MemoryConfig.uniform(2, 1, 4), seed=0); rt.num_parameters("u")
            2304
        """
        user = _as_key(user)
        if not isinstance(config, MemoryConfig):
            raise TypeError(f"config must be a MemoryConfig, got {type(config).__name__}")
        if optim is not None and not isinstance(optim, AdamWConfig):  # named here, not as set_user's `config`
            raise TypeError(f"optim must be an AdamWConfig or None, got {type(optim).__name__}")
        config.check_num_layers(self.num_layers)
        if user in self._slots:
            raise ValueError(f"user {user!r} is already loaded; remove_user({user!r}) first")
        if self._free_slots:
            free: int | None = self._free_slots[0]
        else:
            free = self._next_slot if self._next_slot < self.max_users else None
        if free is None:
            raise ValueError(
                f"the runtime holds max_users={self.max_users} users; remove or evict one before adding {user!r}"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        try:
            gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        except (RuntimeError, ValueError, OverflowError):  # beyond torch's 64-bit seeds
            raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}") from None
        self.optimizer.zero_grad()
        layer_ranks = {li: config.layer_ranks(li) for li in config.active_layers}
        self.state.add_adapters(free, layer_ranks, config.lora_alpha, init=init, generator=gen)
        try:
            self.optimizer.set_user(free, optim or self.default_optim, total_steps)
        except BaseException:
            self.state.remove_adapters(free, missing_ok=True)
            self.optimizer.sync()
            raise
        if self._free_slots and self._free_slots[0] == free:
            heapq.heappop(self._free_slots)
        else:
            self._next_slot = free + 1
        self._slots[user] = free
        self._slot_user[free] = user
        self._configs[user] = config

    @_serialized
    @_outside_inference_mode
    def remove_user(self, user: Hashable) -> None:
        """Drop ``user``'s adapters and optimizer state; its slot becomes free.

        Example:
            >>> from milp.inject import tiny_model
            >>> rt = MilpRuntime(tiny_model("llama"), max_users=1)
            >>> rt.add_user("u", MemoryConfig.uniform(2)); rt.remove_user("u"); rt.users
            []
        """
        slot = self.slot(user)
        self.optimizer.zero_grad()
        self.state.remove_adapters(slot, missing_ok=True)
        self.optimizer.drop_user(slot)
        self.optimizer.sync()
        del self._slots[user], self._configs[user], self._slot_user[slot]
        heapq.heappush(self._free_slots, slot)
        self._from_store.pop(user, None)
        self._last_used.pop(user, None)
        self._load_seq.pop(user, None)

    @_serialized
    def reserve(self, configs: Iterable[MemoryConfig], users: int | None = None) -> None:
        """Size every adapter bank for ``users`` users (default: ``max_users``) of the largest of
        ``configs`` at each layer: rows for all of them, and the largest total rank a user has
        there (:meth:`kernels.AdapterBank.reserve`). Users of those configurations then load and
        evict without growing a bank or raising its ``max_rank``: a compiled decode step traced
        after this (``ContinuousBatch.warm_up``) serves them all without re-tracing.

        Example:
            >>> from milp.inject import tiny_model
            >>> rt = MilpRuntime(tiny_model("llama"), max_users=4)
            >>> rt.reserve([MemoryConfig.uniform(2, modules=2, rank=8)])
            >>> bank = rt.state.layers[0][0].bank
            >>> bank.capacity >= 4 * 16, bank.max_rank
            (True, 16)
        """
        users = self.max_users if users is None else users
        if isinstance(users, bool) or not isinstance(users, int) or not 1 <= users <= self.max_users:
            raise ValueError(f"users must be an int in [1, max_users={self.max_users}], got {users!r}")
        configs = list(configs)
        if not configs or not all(isinstance(c, MemoryConfig) for c in configs):
            raise TypeError(f"configs must be MemoryConfigs (at least one), got {configs!r:.80}")
        for c in configs:
            c.check_num_layers(self.state.num_layers)
        for li, modules in enumerate(self.state.layers):
            rank = max(sum(c.layer_ranks(li)) for c in configs)
            for m in modules:
                m.bank.reserve(rank * users, max_rank=rank)
        self.optimizer.sync()

    @_serialized
    def evict_user(self, user: Hashable, directory: str | os.PathLike[str]) -> Path:
        """:meth:`save_user` then :meth:`remove_user`; returns the directory."""
        self.slot(user)
        path = self.save_user(user, directory)
        self.remove_user(user)
        return path

    @_serialized
    def set_total_steps(self, user: Hashable, total_steps: int | None) -> None:
        """Change ``user``'s step budget (its learning-rate schedule)."""
        self.optimizer.set_total_steps(self.slot(user), total_steps)

    # ------------------------------------------------------------ weights
    @_serialized
    def adapter_state(self, user: Hashable) -> dict[str, torch.Tensor]:
        """``user``'s adapters as CPU tensors: ``"layers.{l}.{target}.lora_A"`` ``[Σr, in]`` and
        ``".lora_B"`` ``[Σr, out]`` (modules stacked, ``B`` stored transposed; unscaled).

        Example:
            >>> from milp.inject import tiny_model
            >>> rt = MilpRuntime(tiny_model("gpt2"), max_users=1)
            >>> rt.add_user("u", MemoryConfig((True, False), (2, 0), (4, 4)))
            >>> {k: tuple(v.shape) for k, v in rt.adapter_state("u").items()}["layers.0.mlp.c_fc.lora_A"]
            (8, 32)
        """
        slot = self.slot(user)
        out: dict[str, torch.Tensor] = {}
        for m in self.state.modules():
            if m.bank.has(slot):
                a, b, _ = m.bank.adapter_weights(slot)
                out[f"layers.{m.layer}.{m.target}.lora_A"] = a.detach().cpu().clone().contiguous()
                out[f"layers.{m.layer}.{m.target}.lora_B"] = b.detach().cpu().clone().contiguous()
        return out

    @_serialized
    @_outside_inference_mode
    def load_adapter_state(self, user: Hashable, tensors: dict[str, torch.Tensor]) -> None:
        """Copy :meth:`adapter_state`-style tensors into ``user``'s rows (shapes checked). Into
        bf16/fp16 banks the optimizer's float32 master rows take the tensors as given
        (:meth:`~milp.optim.PackedAdamW.seed_master`), so float32 adapters keep training from
        their own values, not from the rounded rows. Refused (``KeyError``/``ValueError``) with
        the user's adapters as they were: a missing or extra target, a wrong shape, NaN/inf."""
        slot = self.slot(user)
        if not isinstance(tensors, Mapping):
            raise TypeError(f"tensors must be a mapping of names to tensors (adapter_state), "
                            f"got {type(tensors).__name__}")
        expected = set()
        pairs = []
        for m in self.state.modules():
            if not m.bank.has(slot):
                continue
            key = f"layers.{m.layer}.{m.target}"
            expected |= {key + ".lora_A", key + ".lora_B"}
            if key + ".lora_A" not in tensors or key + ".lora_B" not in tensors:
                raise KeyError(f"adapter tensors lack {key}.lora_A/.lora_B for user {user!r}")
            pairs.append((m.bank, tensors[key + ".lora_A"], tensors[key + ".lora_B"]))
        extra = set(tensors) - expected
        if extra:
            raise ValueError(f"adapter tensors name targets user {user!r} has no adapters at: {sorted(extra)[:5]}")
        # a module refused (shape, NaN) after others were written: those get their rows back
        old = []
        for bank, _, _ in pairs:
            wa, wb, _ = bank.adapter_weights(slot)
            old.append((bank, wa.detach().clone(), wb.detach().clone()))
        try:
            for bank, a, b in pairs:
                bank.set_adapter_weights(slot, a, b)
        except BaseException:
            with torch.no_grad():
                for bank, a, b in old:
                    wa, wb, _ = bank.adapter_weights(slot)
                    wa.copy_(a)
                    wb.copy_(b)
            raise
        for bank, a, b in pairs:  # any other dtype, not only a wider one: fp16 into bf16 rounds too
            if a.dtype != bank.lora_a.dtype or b.dtype != bank.lora_b.dtype:
                self.optimizer.seed_master(slot, bank, a, b)

    @_serialized
    def save_user(self, user: Hashable, directory: str | os.PathLike[str], *,
                  include_optimizer: bool = True) -> Path:
        """Write ``user``'s adapters (``adapters.safetensors``), its ``memory_config.json``,
        ``user.json`` (id, optimizer settings) and, optionally, ``optimizer.safetensors``
        into ``directory``, atomically (the directory is replaced as a whole: a failed save
        leaves the previous one, except an interrupt during the last fsync, which leaves the
        new one; see :func:`milp.config.atomic_directory`).

        Example:
            >>> import tempfile; from milp.inject import tiny_model
            >>> rt = MilpRuntime(tiny_model("llama"), max_users=1); rt.add_user("u", MemoryConfig.uniform(2))
            >>> sorted(p.name for p in rt.save_user("u", tempfile.mkdtemp() + "/u").iterdir())
            ['adapters.safetensors', 'memory_config.json', 'optimizer.safetensors', 'user.json']
        """
        from safetensors.torch import save_file

        _check_bool("include_optimizer", include_optimizer)
        _check_path("directory", directory)
        slot = self.slot(user)
        cfg = self._configs[user]
        opt_cfg, total = self.optimizer.config(slot)
        if isinstance(user, (str, int)):
            meta_user: Any = user
        else:
            raise TypeError(f"only str or int user ids can be saved, got {type(user).__name__}")
        info = {
            "format": _FORMAT,
            "user": meta_user,
            "model_type": self.state.model_type,
            "target_shapes": self.state.target_shapes(),
            "optimizer": opt_cfg.to_dict(),
            "total_steps": total,
            "step": self.optimizer.step_count(slot),
        }
        with atomic_directory(directory) as tmp:
            tensors = self.adapter_state(user)
            # the metadata's keys in order: the same adapters, the same bytes in every process
            (tmp / ADAPTERS_FILE).write_bytes(_safetensors_bytes(tensors, {"format": _FORMAT, "user": str(user)}))
            cfg.to_json(tmp / CONFIG_FILE)
            (tmp / USER_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            if include_optimizer:
                state = {k: v.contiguous() for k, v in self.optimizer.user_state(slot).items()}
                save_file(state, str(tmp / OPTIMIZER_FILE), metadata={"format": _FORMAT})
        return Path(directory)

    @_serialized
    @_outside_inference_mode
    def load_user(self, directory: str | os.PathLike[str], user: Hashable | None = None, *,
                  load_optimizer: bool = True) -> Hashable:
        """Load a user saved by :meth:`save_user` (as ``user``, or under its saved id);
        returns the id. The model must have the saved target shapes.

        Example:
            >>> import tempfile; from milp.inject import tiny_model
            >>> rt = MilpRuntime(tiny_model("llama"), max_users=2); rt.add_user("u", MemoryConfig.uniform(2))
            >>> d = rt.save_user("u", tempfile.mkdtemp() + "/u"); rt.load_user(d, "v")
            'v'
        """
        _check_bool("load_optimizer", load_optimizer)
        _check_path("directory", directory)
        d = Path(directory)
        files = _read_saved(d, (USER_FILE, CONFIG_FILE, ADAPTERS_FILE), (OPTIMIZER_FILE,) if load_optimizer else ())
        info = _read_user_info(d / USER_FILE, files[USER_FILE])
        shapes = [[tuple(s) for s in layer] for layer in info["target_shapes"]]
        if shapes != self.state.target_shapes():
            raise ValueError(
                f"user in {str(d)!r} was saved for a model with FFN target shapes {shapes}, "
                f"this model has {self.state.target_shapes()}"
            )
        cfg = MemoryConfig.from_dict(_saved_json(d / CONFIG_FILE, files[CONFIG_FILE]))
        key = _as_key(info["user"] if user is None else user)
        tensors = _read_tensors(d / ADAPTERS_FILE, files[ADAPTERS_FILE])
        moments = _read_tensors(d / OPTIMIZER_FILE, files[OPTIMIZER_FILE]) if OPTIMIZER_FILE in files else None
        self.add_user(key, cfg, total_steps=info.get("total_steps"),
                      optim=AdamWConfig.from_dict(info["optimizer"]), init="zeros")
        try:
            self.load_adapter_state(key, tensors)
            if moments is not None:
                self.optimizer.load_user_state(self._slots[key], moments)
        except BaseException:
            self.remove_user(key)
            raise
        return key

    @_serialized
    @_outside_inference_mode
    def load_peft(self, directory: str | os.PathLike[str], user: Hashable, *, total_steps: int | None = None,
                  optim: AdamWConfig | None = None) -> MemoryConfig:
        """Load a PEFT LoRA adapter of the FFN linears as the new user ``user`` (see
        :func:`milp.export.import_peft`); returns its :class:`MemoryConfig`.

        Example:
            >>> import tempfile; from milp.inject import tiny_model; from milp.export import export_peft
            >>> rt = MilpRuntime(tiny_model("llama"), max_users=2); rt.add_user("u", MemoryConfig.uniform(2))
            >>> rt.load_peft(export_peft(rt, "u", tempfile.mkdtemp() + "/a"), "v").layer_ranks(1)
            (8,)
        """
        from .export import import_peft

        return import_peft(self, user, directory, total_steps=total_steps, optim=optim)

    # ------------------------------------------------------------- batches
    @_serialized
    def row_slots(self, users: Hashable | Sequence[Hashable | None] | None, batch_size: int) -> torch.Tensor:
        """``[B]`` slots of per-row user ids (``None`` = base model; one ``str``/``int`` id = every
        row). Any other sequence, a tuple included, lists one id per row: pass a tuple-valued
        user id as ``[uid] * batch_size``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1 (the batch's rows), got {batch_size!r}")
        rows: list[Hashable | None]
        if users is None or isinstance(users, (str, int)) and not isinstance(users, bool):
            rows = [users] * batch_size
        elif isinstance(users, Sequence):
            rows = list(users)
        else:
            raise TypeError(f"users must be a user id or a sequence with one id per row, got {type(users).__name__}")
        if len(rows) != batch_size:
            raise ValueError(f"users has {len(rows)} entries but the batch has {batch_size} rows")
        if self.store is not None:
            self._admit(rows)
        return torch.tensor([-1 if u is None else self.slot(u) for u in rows], dtype=torch.int64)

    # -------------------------------------------------------------- store
    @_serialized
    def cache_info(self) -> CacheInfo:
        """What the store did so far (:class:`milp.store.CacheInfo`)."""
        return CacheInfo(*self._cache)

    def _dirty(self, user: Hashable) -> bool:
        """Whether a store user was trained since the store loaded it."""
        return self.optimizer.step_count(self._slots[user]) != self._from_store[user]

    def _evictable(self, user: Hashable) -> bool:
        """Whether the store may evict loaded ``user``: loaded from it, and written back first
        or untrained since loading, and not a user of an open :meth:`using` block (whose rows
        would then run another user's adapters)."""
        return (user in self._from_store and self.store is not None  # a store loaded it, so there is one
                and (self.store.write_back or not self._dirty(user))
                and not self._in_use(user))

    def _in_use(self, user: Hashable) -> bool:
        """Whether ``user`` is a user of an open :meth:`using` block."""
        return any(user in users for users in self._active)

    def row_batches(self, users: Sequence[Hashable | None], batch_size: int,
                    order: Sequence[int] | None = None) -> Iterator[list[int]]:
        """Row indices of ``users`` (one id or ``None`` per row) in consecutive groups of at most
        ``batch_size`` rows that the runtime can place, taken in ``order`` (default: row order).

        Without a store every group is just the next ``batch_size`` rows. With one, a group
        also ends before it would name more store users than the slots that users added
        directly (never evicted) and store users trained since loading (kept without
        ``write_back``) leave free, so a list naming any number of stored users can be
        served group by group. A group that cannot be placed even alone (one store user and
        no slot to put it in) is still yielded: :meth:`using` then refuses it by name.

        Example:
            >>> from milp.inject import tiny_model
            >>> rt = MilpRuntime(tiny_model("llama"), max_users=2)
            >>> list(rt.row_batches(["a", "b", None, "a"], 3))
            [[0, 1, 2], [3]]
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(users, (str, bytes)) or not isinstance(users, Sequence):
            raise TypeError(f"users must be a sequence with one id (or None) per row, got {type(users).__name__}")
        if order is None:
            order = range(len(users))
        elif (isinstance(order, (str, bytes)) or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool)
                                                         for i in order)
              or sorted(order) != list(range(len(users)))):
            raise ValueError(f"order must be a permutation of range({len(users)}) (the rows of users)")
        free: int | None = None
        pinned: set[Hashable] = set()
        if self.store is not None:
            pinned = {u for u in self._slots if not self._evictable(u)}
            free = self.max_users - len(pinned)
        group: list[int] = []
        named: set[Hashable] = set()  # the group's users that take an evictable slot
        for i in order:
            u = users[i]
            evictable = free is not None and u is not None and u not in pinned
            # "new to the group" is decided against the group the row joins: after a group ends at
            # batch_size, a user of the ended group is new to the next one again
            if group and (len(group) == batch_size
                          or (evictable and free is not None and u not in named and len(named) >= free)):
                yield group
                group, named = [], set()
            group.append(i)
            if evictable:
                named.add(u)
        if group:
            yield group

    @_outside_inference_mode
    def _admit(self, rows: Sequence[Hashable | None]) -> None:
        """Load the batch's users that are not loaded from the store, first evicting the least
        recently used store users the batch does not need; refuses (changing nothing) a batch
        that cannot be placed. A damaged store file raises from :meth:`load_user` after the
        evictions: the evicted users were written back first where trained, so nothing is lost,
        and the users loaded before it stay loaded."""
        store = self.store
        assert store is not None
        need = list(dict.fromkeys(_as_key(u) for u in rows if u is not None))
        if len(need) > self.max_users:
            raise ValueError(f"the batch names {len(need)} distinct users but the runtime holds at most "
                             f"max_users={self.max_users} at once; split the batch")
        missing = [u for u in need if u not in self._slots]
        paths: dict[Hashable, Path] = {}
        for u in missing:
            found = store.path(u)
            if found is None:
                raise KeyError(f"unknown user {u!r}: not loaded, and {store} has no such user")
            paths[u] = found
        free = self.max_users - len(self._slots)
        victims: list[Hashable] = []
        if len(missing) > free:
            wanted = set(need)
            order: Iterable[Hashable] = self._last_used
            if len(self._from_store) != len(self._last_used):  # loaded by a batch that then failed: never used
                order = [*(u for u in self._from_store if u not in self._last_used), *self._last_used]
            for u in order:  # least recently used first, up to the slots needed
                if u not in wanted and self._evictable(u):
                    victims.append(u)
                    if len(victims) == len(missing) - free:
                        break
            if len(victims) < len(missing) - free:
                movable = [u for u in self._from_store if u not in wanted and self._evictable(u)]
                busy = [u for u in self._from_store if u not in wanted and self._in_use(u)]
                kept = [u for u in self._from_store if u not in wanted and u not in movable and u not in busy]
                raise ValueError(
                    f"the batch needs {len(missing)} users loaded from the store but only {free + len(victims)} "
                    f"slots can be freed (max_users={self.max_users}; users added directly are never evicted"
                    + (f"; {len(kept)} store users were trained since loading, e.g. {kept[:3]}: open the store "
                       f"with write_back=True, or save and remove them" if kept else "")
                    + (f"; {len(busy)} store users are in use by an enclosing using() block, e.g. {busy[:3]}"
                       if busy else "") + ")")
        for u in victims:
            if self._dirty(u):
                self.save_user(u, store.save_path(u))
                self._cache[3] += 1
            self.remove_user(u)
            self._cache[2] += 1
        for u in missing:
            self.load_user(paths[u], u)
            self._from_store[u] = self.optimizer.step_count(self._slots[u])
            self._load_seq[u] = self._cache[1]
            self._cache[1] += 1
        self._cache[0] += len(need) - len(missing)
        self._batches += 1
        # to the end of the eviction order, in load order (the order of ties)
        for u in sorted((u for u in need if u in self._from_store), key=self._load_seq.__getitem__):
            self._last_used.pop(u, None)
            self._last_used[u] = self._batches

    @contextlib.contextmanager
    def using(self, users: Hashable | Sequence[Hashable | None] | None, batch_size: int | None = None
              ) -> Iterator[torch.Tensor]:
        """Run the model inside the block with these per-row users; yields the row slots. A call
        of the runtime inside the block (a nested batch) never evicts the block's users. The block
        holds the runtime's lock: another thread's call waits until it ends.

        Example:
            >>> from milp.inject import tiny_model
            >>> rt = MilpRuntime(tiny_model("llama"), max_users=1); rt.add_user("u", MemoryConfig.uniform(2))
            >>> with rt.using(["u", None]):
            ...     out = rt.model(torch.ones(2, 3, dtype=torch.long))
        """
        if batch_size is None:
            if users is None or isinstance(users, (str, int)):
                raise ValueError("batch_size is needed when users is a single id")
            if not isinstance(users, Sequence):
                raise TypeError(f"users must be a sequence with one id per row, got {type(users).__name__}")
            batch_size = len(users)
        with self._lock:  # the block's batch keeps the model until it ends (other threads wait)
            slots = self.row_slots(users, batch_size)
            taken = set(slots.tolist())
            inside = frozenset(self._slot_user[s] for s in taken if s in self._slot_user)
            self._active.append(inside)
            try:
                with batch_users(self.model, slots):
                    yield slots
            finally:
                self._active.remove(inside)

    @_serialized
    def forward(self, input_ids: torch.Tensor, users: Any, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        """``model(input_ids, attention_mask, **kwargs)`` with per-row users.

        Example:
            >>> from milp.inject import tiny_model
            >>> rt = MilpRuntime(tiny_model("llama"), max_users=1); rt.add_user("u", MemoryConfig.uniform(2))
            >>> rt.forward(torch.ones(1, 3, dtype=torch.long), ["u"]).logits.shape
            torch.Size([1, 3, 96])
        """
        ids = self._check_ids(input_ids, attention_mask, kwargs)
        with self.using(users, ids.shape[0]):
            return self.model(input_ids=ids, attention_mask=attention_mask, **kwargs)

    def _check_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):  # shape and dtype: check_token_inputs
            raise ValueError(f"input_ids must be a [B, S] tensor, got {type(input_ids)}")
        check_token_inputs(self.model, input_ids, attention_mask, cached=_cached(kwargs or {}))
        return input_ids

    def _labels(self, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            labels = ids.clone()
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)
        elif not isinstance(labels, torch.Tensor) or labels.shape != ids.shape:
            raise ValueError(f"labels must be a tensor of input_ids' shape {list(ids.shape)}, "
                             f"got {list(getattr(labels, 'shape', []))}")
        return labels

    def _user_losses(self, ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                     slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`user_losses_from_ce` of the batch; rows without a user (slot -1) get no target,
        so the head never computes their logits."""
        labels = labels.masked_fill((slots < 0).to(labels.device)[:, None], -100)
        ce, valid = token_losses(self.model, input_ids=ids, attention_mask=attention_mask, labels=labels)
        return user_losses_from_ce(ce, valid, slots, self.max_users)

    def _per_user(self, slots: torch.Tensor, mean: torch.Tensor, counts: torch.Tensor
                  ) -> dict[Hashable, torch.Tensor]:
        slot_user = self._slot_user
        present = sorted(set(slots.tolist()) - {-1})
        nonzero = counts[present].tolist() if present else []
        return {slot_user[s]: mean[s] for s, c in zip(present, nonzero) if c > 0}

    @_serialized
    def loss(self, input_ids: torch.Tensor, users: Any, attention_mask: torch.Tensor | None = None,
             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[Hashable, torch.Tensor]]:
        """``(Σ_u mean_u, {user: mean_u})`` of a mixed-user batch (differentiable).
        ``labels`` default to ``input_ids`` with padding (``attention_mask == 0``) ignored.
        Call ``backward`` inside :meth:`using` when the model recomputes activations
        (gradient checkpointing); :meth:`train_step` does.

        Example:
            >>> from milp.inject import tiny_model
            >>> rt = MilpRuntime(tiny_model("llama"), max_users=2)
            >>> rt.add_user("a", MemoryConfig.uniform(2)); rt.add_user("b", MemoryConfig.uniform(2))
            >>> total, per_user = rt.loss(torch.randint(3, 90, (2, 6)), ["a", "b"])
            >>> sorted(per_user)
            ['a', 'b']
        """
        ids = self._check_ids(input_ids, attention_mask)
        labels = self._labels(ids, attention_mask, labels)
        with self.using(users, ids.shape[0]) as slots:
            total, mean, counts = self._user_losses(ids, attention_mask, labels, slots)
        return total, self._per_user(slots, mean, counts)

    @_serialized
    def train_step(self, input_ids: torch.Tensor, users: Any, attention_mask: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> dict[Hashable, float]:
        """One forward/backward/AdamW step over a mixed-user batch; updates the users with at
        least one target token and returns their mean token losses (before the update). A user
        whose configuration has no adapter (every layer off, or 0 modules) gets its loss and no
        update, also when no user of the batch has one (the base model's loss; no backward).
        The model's train/eval mode is left as it is (dropout, gradient checkpointing). A
        caller's ``torch.no_grad()`` does not stop the step; ``torch.inference_mode()`` is refused.
        With loss scaling (a float16 model), each user's loss is scaled by its own scale before
        the backward, and a user whose gradients overflow gets no update this step
        (:attr:`skipped_steps`); its loss is returned all the same.

        Example:
            >>> from milp.inject import tiny_model
            >>> rt = MilpRuntime(tiny_model("llama"), max_users=1)
            >>> rt.add_user("a", MemoryConfig.uniform(2), total_steps=5)
            >>> _ = rt.train_step(torch.randint(3, 90, (2, 6)), "a"); rt.optimizer.step_count(rt.slot("a"))
            1
        """
        ids = self._check_ids(input_ids, attention_mask)
        labels = self._labels(ids, attention_mask, labels)
        if torch.is_inference_mode_enabled():
            raise RuntimeError("train_step cannot train under torch.inference_mode(); call it outside")
        self.optimizer.zero_grad()
        # under a caller's torch.no_grad() too: else the loss would not require grad and the step be skipped
        with self.using(users, ids.shape[0]) as slots, torch.enable_grad():
            with nvtx_range("milp.runtime.forward"):
                total, mean, counts = self._user_losses(ids, attention_mask, labels, slots)
                per_user = self._per_user(slots, mean, counts)
            if not per_user:
                raise ValueError("the batch has no target tokens of any loaded user (all labels -100 or rows None)")
            if not total.requires_grad:  # only users without adapters (and nothing else trainable)
                return {u: float(v.detach()) for u, v in per_user.items()}
            scaled = self.optimizer.loss_scaling is not None
            with nvtx_range("milp.runtime.backward"):
                # inside the block: recomputed activations see the same users
                (self.optimizer.scale_losses(mean) if scaled else total).backward()
        with nvtx_range("milp.runtime.optimizer"):
            # a user without adapters gets no update, so no step (as in a batch of only such users)
            skipped = self.optimizer.step([self._slots[u] for u in per_user if self._configs[u].active_layers],
                                          scaled=scaled)
            self.optimizer.zero_grad()
        for s in skipped:
            u = self._slot_user[s]
            self.skipped_steps[u] = self.skipped_steps.get(u, 0) + 1
        return {u: float(v.detach()) for u, v in per_user.items()}

    @_serialized
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, users: Any, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> Any:
        """``model.generate`` where row ``b`` uses ``users[b]``'s adapters (``None`` = base).
        Pad prompts on the left (:func:`pad_sequences` with ``side="left"``).

        With a static cache (``cache_implementation="static"`` or another that builds one,
        a compileable ``cache``/``past_key_values``, or a ``compile_config``)
        ``transformers`` compiles the decode step (on a GPU with CUDA graphs,
        ``mode="reduce-overhead"``); the decode shape's static plan is registered first
        (:meth:`MilpState.prepare_static`), so one compiled graph serves every later batch
        of the same size whatever its users. Each other size (rows × beams or returned
        sequences) traces a graph of its own, dynamic shapes or not (the static plan is
        looked up by shape): pad batches to a few sizes. The prefill runs eagerly as usual,
        except a chunked one (``prefill_chunk_size``): its chunks' shapes are registered too.

        Example:
            >>> from milp.inject import tiny_model
            >>> rt = MilpRuntime(tiny_model("llama"), max_users=2)
            >>> rt.add_user("a", MemoryConfig.uniform(2), init="random", seed=0)
            >>> out = rt.generate(torch.ones(2, 3, dtype=torch.long), ["a", None], max_new_tokens=4,
            ...                   do_sample=False, pad_token_id=0)
            >>> out.shape
            torch.Size([2, 7])
        """
        ids = self._check_ids(input_ids, attention_mask, kwargs)
        # no mask: model.generate's own (from pad_token_id: left padding is masked), not all ones
        with self.using(users, ids.shape[0]), nvtx_range("milp.runtime.generate"):
            if self._compiles_decode(kwargs):
                rows = ids.shape[0] * self._rows_per_prompt(kwargs)
                # evictable: a server meeting ever new batch sizes and prompt chunks keeps a bounded set
                self.state.prepare_static((rows, 1), ids.device, evictable=True)
                for length in self._prefill_chunks(kwargs, ids.shape[1]):  # a chunked prefill is compiled too
                    self.state.prepare_static((rows, length), ids.device, evictable=True)
            # a Hugging Face model's GenerationMixin.generate: nn.Module's __getattr__ types it Tensor | Module
            generate = cast(Callable[..., Any], self.model.generate)
            return generate(input_ids=ids, attention_mask=attention_mask, **kwargs)

    def _generation_setting(self, kwargs: Mapping[str, Any], name: str, default: Any = None) -> Any:
        """``generate``'s setting ``name``: from its arguments, else from the generation config."""
        gc = kwargs.get("generation_config") or self.model.generation_config
        return kwargs.get(name, getattr(gc, name, default))

    @staticmethod
    def _given_cache(kwargs: Mapping[str, Any]) -> Any:
        """The Cache passed to ``generate``: ``cache`` (transformers >= 5.x), or its older name
        ``past_key_values``; ``None`` without one."""
        return kwargs.get("cache") if kwargs.get("cache") is not None else kwargs.get("past_key_values")

    def _compiles_decode(self, kwargs: Mapping[str, Any]) -> bool:
        """Whether ``generate`` with these arguments may run a compiled decode step."""
        past = self._given_cache(kwargs)
        return (self._generation_setting(kwargs, "cache_implementation") in _STATIC_CACHES
                or kwargs.get("compile_config") is not None
                or (past is not None and bool(getattr(past, "is_compileable", False))))

    def _prefill_chunks(self, kwargs: Mapping[str, Any], length: int) -> list[int]:
        """Lengths of the chunks a chunked prefill (``prefill_chunk_size``) runs the prompt in
        (the tokens past a given cache's length: restarting from it)."""
        chunk = self._generation_setting(kwargs, "prefill_chunk_size")
        if not chunk:
            return []
        chunk = int(chunk)
        past = self._given_cache(kwargs)
        lengths = {length}
        if past is not None and hasattr(past, "get_seq_length"):
            lengths.add(length - int(past.get_seq_length()))
        return sorted({c for n in lengths if n > 0 for c in (min(chunk, n), n % chunk) if c > 0})

    def _rows_per_prompt(self, kwargs: Mapping[str, Any]) -> int:
        """Rows ``generate`` decodes per prompt: the beams, else the returned sequences."""
        beams = int(self._generation_setting(kwargs, "num_beams", 1) or 1)
        seqs = int(self._generation_setting(kwargs, "num_return_sequences", 1) or 1)
        return beams if beams > 1 else seqs
