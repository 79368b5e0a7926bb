"""Per-user AdamW over packed adapter banks, vectorised with a row → user map.

Every :class:`kernels.AdapterBank` packs many users' adapter rows into ``lora_a
[capacity, in]`` / ``lora_b [capacity, out]``. :class:`PackedAdamW` keeps AdamW's
moments in tensors of the same packed layout and, per bank, a ``row_user [capacity]``
map (``-1`` = free row). Each user has its own hyper-parameters, step count and
learning-rate schedule, all held in ``[max_users]`` tensors; one :meth:`PackedAdamW.step`
gathers them per row (``hyper[row_user]``) and updates each bank with a handful of
tensor ops over the row span holding the stepped users (the whole bank for a joint step,
one user's rows for a single-user step; the stepped users' rows alone, gathered, where they
are scattered over a span at least twice their size) — no Python loop over rows, no host
synchronisation. Rows of users not stepped (not in the batch) and free rows inside the
span get a zero weight and stay untouched, whatever their gradients hold (NaN and inf too).

Per user the update is exactly :class:`torch.optim.AdamW` (decoupled weight decay,
bias correction by the user's own step count) with, optionally, gradient clipping to
``max_grad_norm`` by the norm over *that user's* adapter gradients (like
``torch.nn.utils.clip_grad_norm_`` on its parameters alone), and the schedule of
:func:`lr_multiplier` (linear warm-up over ``warmup_ratio`` of the user's steps, then
linear decay or constant). Moments and arithmetic are float32, and float64 for float64 banks,
as torch's AdamW keeps them.

bf16/fp16 banks get float32 *master weights* (as Apex/Megatron mixed precision keep them): the
optimizer holds a float32 copy of their rows, in the moments' packed layout, updates that copy
and writes it back rounded to the bank's dtype. Without it, an update smaller than half an ulp
of the weight — most of them late in a decaying schedule, at bf16's 8-bit mantissa — would be
rounded away at every step. The master never goes stale: every :meth:`PackedAdamW.step` first
re-seeds it, elementwise over the stepped span, from the bank wherever it no longer rounds to the
bank's value bit for bit, so rows written outside the optimizer (a user added or loaded, a
``bank.lora_a.data[...] = ...``, ``model.to(dtype)``) simply continue from their new value.

float16 training loses gradients to underflow (float16's smallest normal is 6.1e-5): on the
embedded SmolLM2-135M in float16, the memory adapters' gradients of one batch of MedDia histories
were 12% off (relative L2 norm) the float32 model's, and 0.5% with the loss scaled by 256 or 4096
first. :class:`LossScaling` is the dynamic loss scaling of mixed-precision training
(``torch.amp.GradScaler``'s rule), kept *per user*: the backward runs on ``Σ_u s_u · loss_u``,
``step(slots, scaled=True)`` divides each user's gradients by its own ``s_u``, skips the users
whose gradients are not finite (no update, no step counted) and halves their scale, and doubles a
user's scale after ``growth_interval`` finite steps in a row. A user's rows get gradients from its
own tokens alone, so one user's overflow skips that user only, and a user trained in a mixed
batch gets the steps, and the scales, it would get trained alone.

Example:
    >>> import kernels, torch
    >>> bank = kernels.AdapterBank(8, 8, max_users=2); _ = bank.add(0, [4], init="random")
    >>> opt = PackedAdamW([bank], max_users=2)
    >>> opt.set_user(0, AdamWConfig(lr=1e-2), total_steps=10)
    >>> bank.lora_a.grad = torch.ones_like(bank.lora_a); bank.lora_b.grad = torch.ones_like(bank.lora_b)
    >>> _ = opt.step([0]); opt.step_count(0)
    1
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass
from typing import TypedDict, cast

import torch

from kernels import AdapterBank

from .config import _check_bool

__all__ = ["AdamWConfig", "LossScaling", "PackedAdamW", "lr_multiplier", "resolve_loss_scaling", "warmup_steps"]

_DECAYS = ("linear", "constant")


class _TensorKw(TypedDict):
    """The ``dtype`` and ``device`` keywords of a tensor factory."""

    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class AdamWConfig:
    """One user's optimizer settings (paper defaults: lr 5e-4, 10% warm-up, wd 1e-4).

    ``decay``: after warm-up, ``"linear"`` to 0 at ``total_steps`` (Hugging Face's default
    schedule) or ``"constant"``. ``max_grad_norm``: clip this user's gradient norm
    (``None`` = no clipping).

    Example:
        >>> AdamWConfig().lr
        0.0005
    """

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    warmup_ratio: float = 0.1
    decay: str = "linear"
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        def num(name: str, v: object, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
            # any real number (a numpy float32 too), kept as a float: to_dict writes it to JSON
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name} must be a finite number, got {v!r}")
            try:
                f = float(v)
            except OverflowError:  # an int beyond the float range
                f = math.inf
            if not math.isfinite(f):
                raise TypeError(f"{name} must be a finite number, got {v!r:.40}")
            if f < lo or f > hi or (lo_open and f == lo) or (hi_open and f == hi):
                a, b = "(" if lo_open else "[", ")" if hi_open else "]"
                raise ValueError(f"{name} must be in {a}{lo}, {hi}{b}, got {v}")
            return f

        lr = num("lr", self.lr, 0.0, math.inf)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        betas = (num("betas[0]", self.betas[0], 0.0, 1.0, hi_open=True),
                 num("betas[1]", self.betas[1], 0.0, 1.0, hi_open=True))
        eps = num("eps", self.eps, 0.0, math.inf, lo_open=True)
        wd = num("weight_decay", self.weight_decay, 0.0, math.inf)
        warmup = num("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        if not isinstance(self.decay, str) or self.decay not in _DECAYS:
            raise ValueError(f"decay must be one of {_DECAYS}, got {self.decay!r}")
        if self.max_grad_norm is not None:
            object.__setattr__(self, "max_grad_norm",
                               num("max_grad_norm", self.max_grad_norm, 0.0, math.inf, lo_open=True))
        for name, v in (("lr", lr), ("betas", betas), ("eps", eps), ("weight_decay", wd), ("warmup_ratio", warmup)):
            object.__setattr__(self, name, v)

    def to_dict(self) -> dict:
        """JSON-ready dict.

        Example:
            >>> AdamWConfig(lr=1e-3).to_dict()["lr"]
            0.001
        """
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AdamWConfig:
        """Inverse of :meth:`to_dict`.

        Example:
            >>> AdamWConfig.from_dict({"lr": 1e-3}).weight_decay
            0.0001
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"d must be a mapping of AdamWConfig fields, got {type(d).__name__}")
        d = dict(d)
        unknown = sorted(set(d) - set(cls.__dataclass_fields__), key=str)
        if unknown:
            raise ValueError(f"AdamWConfig dict has unknown keys {unknown}; expected some of "
                             f"{list(cls.__dataclass_fields__)}")
        if isinstance(d.get("betas"), list):  # JSON's list; anything else is the constructor's to refuse
            d["betas"] = tuple(d["betas"])
        return cls(**d)


@dataclass(frozen=True)
class LossScaling:
    """Dynamic loss scaling for float16 training (the rule of ``torch.amp.GradScaler``), per user.

    A user starts at ``init_scale``; a step whose gradients are not finite is skipped and
    multiplies its scale by ``backoff_factor``; ``growth_interval`` finite steps in a row
    multiply it by ``growth_factor``. ``init_scale`` defaults to 2¹² rather than GradScaler's
    2¹⁶: on SmolLM2-135M in float16 a MedDia batch's gradients overflowed at 2¹⁶ and were already
    within 0.5% of float32's at 2⁸, and a user's memory injection is a few dozen steps, so each
    skipped step costs. Powers of two keep the scaling exact.

    Example:
        >>> LossScaling().init_scale
        4096.0
    """

    init_scale: float = 2.0 ** 12
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        for name, lo, hi in (("init_scale", 0.0, 2.0 ** 100), ("growth_factor", 1.0, 2.0 ** 10),
                             ("backoff_factor", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                raise TypeError(f"{name} must be a finite number, got {v!r}")
            if not lo < float(v) <= hi or (name == "backoff_factor" and float(v) == 1.0):
                b = ")" if name == "backoff_factor" else "]"
                raise ValueError(f"{name} must be in ({lo}, {hi}{b}, got {v!r}")
            object.__setattr__(self, name, float(v))
        gi = self.growth_interval
        if isinstance(gi, bool) or not isinstance(gi, int) or gi < 1:
            raise ValueError(f"growth_interval must be an int >= 1, got {gi!r}")


def resolve_loss_scaling(loss_scaling: LossScaling | bool | str | None, dtype: torch.dtype,
                         name: str = "loss_scaling") -> LossScaling | None:
    """The :class:`LossScaling` a training in ``dtype`` uses for a ``loss_scaling`` argument:
    ``"auto"`` — the defaults for float16, none for any other dtype (bfloat16 has float32's
    range); ``True`` — the defaults; ``False``/``None`` — none; a :class:`LossScaling` — itself.

    Example:
        >>> resolve_loss_scaling("auto", torch.float16).init_scale, resolve_loss_scaling("auto", torch.bfloat16)
        (4096.0, None)
    """
    _check_loss_scaling(loss_scaling, name)
    if loss_scaling is None:
        return None
    if isinstance(loss_scaling, LossScaling):
        return loss_scaling
    if isinstance(loss_scaling, bool):
        return LossScaling() if loss_scaling else None
    return LossScaling() if dtype == torch.float16 else None  # "auto"


def _check_loss_scaling(loss_scaling: object, name: str = "loss_scaling") -> None:
    """Refuse, by ``name``, a ``loss_scaling`` argument other than ``"auto"``, a bool, ``None``
    (off) or a :class:`LossScaling` (before anything is changed: :class:`~milp.MilpRuntime` checks
    it before it injects the model)."""
    if not (loss_scaling is None or isinstance(loss_scaling, (bool, LossScaling)) or loss_scaling == "auto"):
        raise TypeError(f"{name} must be 'auto', a bool, None or a milp.LossScaling, got {loss_scaling!r:.60}")


#: a user's loss scale stays in [_MIN_SCALE, _MAX_SCALE]: float32's range, with room for a loss of
#: 1e8, and a scale that a user whose loss itself is not finite (every step skipped) backs off to
#: without reaching 0 (whose inverse, the unscaling, would be inf)
_MIN_SCALE, _MAX_SCALE = 2.0 ** -100, 2.0 ** 100


def _take(t: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    """``t``'s ``rows``: a view of a slice, a copy of the rows an index tensor names."""
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU tensor ``t`` on ``device``; to a GPU from pinned memory, non-blocking: no host sync (the
    caching host allocator keeps the pinned block until the copy has run)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _segment_rows(segs: list[tuple[int, int]]) -> torch.Tensor:
    """The rows ``offset .. offset + rank - 1`` of every ``(offset, rank)`` in ``segs``, in order,
    as a CPU int64 tensor (built by tensor ops: a user of 32 rank-96 modules has 3072 rows)."""
    off = torch.tensor([o for o, _ in segs], dtype=torch.int64)
    rank = torch.tensor([r for _, r in segs], dtype=torch.int64)
    first = torch.cumsum(rank, 0) - rank  # each segment's first position in the result
    return torch.arange(int(rank.sum())) + torch.repeat_interleave(off - first, rank)


def warmup_steps(total_steps: int | None, warmup_ratio: float) -> int:
    """Warm-up length: ``ceil(warmup_ratio * total_steps)`` (0 without a step budget).

    Example:
        >>> warmup_steps(25, 0.1)
        3
    """
    _check_schedule(total_steps, warmup_ratio)
    if not total_steps:
        return 0
    return math.ceil(warmup_ratio * total_steps - 1e-9)


def _check_schedule(total_steps: object, warmup_ratio: object, decay: object = "linear") -> None:
    """The arguments of :func:`warmup_steps` / :func:`lr_multiplier`, as :class:`AdamWConfig` and
    :meth:`PackedAdamW.set_user` take them (``total_steps`` ``0`` too: no budget)."""
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral)
                                    or total_steps < 0):
        raise ValueError(f"total_steps must be an int >= 0 or None, got {total_steps!r}")
    # cast: numbers.Real's stub has no __ge__ (for 0 <= ratio); the ones the code takes (float, int, numpy) have it
    if isinstance(warmup_ratio, bool) or not isinstance(warmup_ratio, numbers.Real) \
            or not 0 <= cast(float, warmup_ratio) <= 1:
        raise ValueError(f"warmup_ratio must be a number in [0, 1], got {warmup_ratio!r}")
    if not isinstance(decay, str) or decay not in _DECAYS:
        raise ValueError(f"decay must be one of {_DECAYS}, got {decay!r}")


def lr_multiplier(step: int, total_steps: int | None, warmup_ratio: float = 0.1, decay: str = "linear") -> float:
    """Learning-rate factor of the ``step``-th update (1-based) of a user.

    Warm-up ``W`` = :func:`warmup_steps`: ``step / W`` for ``step <= W``; then
    ``(total - step + 1) / (total - W)`` (``"linear"``: 1 right after warm-up, ``1/(total-W)``
    at the last step, 0 beyond) or 1 (``"constant"``). Without ``total_steps``: always 1.

    Example:
        >>> [round(lr_multiplier(s, 10), 3) for s in (1, 2, 10)]
        [1.0, 1.0, 0.111]
    """
    _check_schedule(total_steps, warmup_ratio, decay)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the update's 1-based number), got {step!r}")
    W = warmup_steps(total_steps, warmup_ratio)
    if W and step <= W:
        return step / W
    if decay == "linear" and total_steps:
        return min(1.0, max(0.0, (total_steps - step + 1) / max(1, total_steps - W)))
    return 1.0


class PackedAdamW:
    """AdamW for all users' adapters in ``banks``, with per-user settings and schedules.

    Call :meth:`set_user` when a user gets adapters, :meth:`drop_user` when it goes, and
    :meth:`sync` after any change of a bank's layout (adding/removing users may move
    rows): moments follow their user's rows. :meth:`step` updates the given users only.

    Args:
        banks: the adapter banks (:class:`kernels.AdapterBank`) to train, each with ``max_users`` slots.
        max_users: size of the user-id space.
        master_weights: keep float32 master copies of the rows of bf16/fp16 banks (see the
            module docstring): the moments (2 tensors) and the master (1) are float32, the
            update is computed on the master in float32 and rounded to the bank's dtype once,
            so updates below the bank's precision accumulate. Costs 4 bytes per adapter element
            more (12 instead of 8 for the optimizer's state). ``False``: the old behaviour —
            the bank's rows are updated in float32 from their rounded value and rounded back at
            every step, no extra memory. float32 and float64 banks never have one (they are their
            own master; moments and arithmetic in float32 resp. float64): the flag does not
            change their updates.
        loss_scaling: per-user dynamic loss scaling (:class:`LossScaling`; ``None``: none).
            Train with the backward of :meth:`scale_losses` and ``step(..., scaled=True)``.

    Example:
        >>> import kernels, torch
        >>> banks = [kernels.AdapterBank(8, 4, max_users=3) for _ in range(2)]
        >>> for b in banks: _ = b.add(2, [2, 2], init="random")
        >>> opt = PackedAdamW(banks, max_users=3); opt.set_user(2, AdamWConfig(), total_steps=100)
        >>> for b in banks: b.lora_a.grad = torch.zeros_like(b.lora_a)
        >>> _ = opt.step([2]); opt.zero_grad(); opt.step_count(2)
        1
        >>> bf = kernels.AdapterBank(8, 4, max_users=1, dtype=torch.bfloat16); _ = bf.add(0, [2])
        >>> opt = PackedAdamW([bf], max_users=1); opt.set_user(0)
        >>> sorted(k for k in opt.user_state(0) if "master" in k)  # float32 master rows of the user
        ['0.master_a', '0.master_b']
    """

    def __init__(self, banks: Sequence[AdapterBank], max_users: int, *, master_weights: bool = True,
                 loss_scaling: LossScaling | None = None) -> None:
        _check_bool("master_weights", master_weights)
        if loss_scaling is not None and not isinstance(loss_scaling, LossScaling):
            raise TypeError(f"loss_scaling must be a LossScaling or None, got {type(loss_scaling).__name__}")
        self.loss_scaling = loss_scaling
        if isinstance(max_users, bool) or not isinstance(max_users, int) or max_users < 1:
            raise ValueError(f"max_users must be an int >= 1, got {max_users!r}")
        self.master_weights = master_weights
        if isinstance(banks, (str, bytes, AdapterBank)) or not isinstance(banks, Sequence):
            raise TypeError(f"banks must be a sequence of kernels.AdapterBank, got {type(banks).__name__}")
        banks = list(banks)
        for i, b in enumerate(banks):
            if not isinstance(b, AdapterBank):
                raise TypeError(f"banks[{i}] must be a kernels.AdapterBank, got {type(b).__name__}")
            if b.max_users != max_users:
                raise ValueError(f"banks[{i}].max_users={b.max_users} differs from max_users={max_users}")
        self.banks = banks
        self.max_users = max_users
        dev = banks[0].lora_a.device if banks else torch.device("cpu")
        self.device = dev
        U = max_users
        f32: _TensorKw = dict(dtype=torch.float32, device=dev)
        # the settings as given (float64): float64 banks are updated with them as they are, like
        # torch.optim.AdamW; the float32 arithmetic of the other banks rounds them first (_factors)
        f64: _TensorKw = dict(dtype=torch.float64, device=dev)
        self._lr = torch.zeros(U, **f64)
        self._beta1 = torch.full((U,), 0.9, **f64)
        self._beta2 = torch.full((U,), 0.999, **f64)
        self._eps = torch.full((U,), 1e-8, **f64)
        self._wd = torch.zeros(U, **f64)
        self._warmup = torch.zeros(U, **f32)
        self._total = torch.zeros(U, **f32)  # 0 = no budget
        self._linear = torch.zeros(U, dtype=torch.bool, device=dev)
        self._max_norm = torch.full((U,), math.inf, **f64)
        self._step = torch.zeros(U, dtype=torch.int64, device=dev)
        # its host copy, kept alongside: step_count reads it without a device sync (a store-backed
        # runtime asks for the step count of every loaded user when it picks users to evict)
        self._host_step = [0] * U
        # per user: loss scale (1 without loss scaling) on the device, for scale_losses, and on the
        # host with the finite steps in a row since its last change (step decides on the host)
        self._scale = torch.ones(U, **f32)
        self._host_scale = [1.0] * U
        self._clean = [0] * U
        self._configs: dict[int, tuple[AdamWConfig, int | None]] = {}
        # per bank: layout {user: (offset, rank)}, capacity, row_user, moments (+ master_a/_b)
        self._layout: list[dict[int, tuple[int, int]]] = [{} for _ in banks]
        self._row_user: list[torch.Tensor] = [
            torch.full((b.capacity,), -1, dtype=torch.int64, device=dev) for b in banks]
        self._moments: list[dict[str, torch.Tensor]] = [self._zeros(b) for b in banks]
        self._dirty: set[int] = set()
        self._marks: list[tuple[int, int] | None] = [None] * len(banks)  # per bank: its layout_changes mark
        self.sync()

    # --------------------------------------------------------------- users
    def _check_slot(self, slot: object) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise TypeError(f"user slot must be an int, got {type(slot).__name__}")
        if not 0 <= slot < self.max_users:
            raise ValueError(f"user slot must be in [0, {self.max_users}), got {slot}")
        return slot

    def set_user(self, slot: int, config: AdamWConfig | None = None, total_steps: int | None = None) -> None:
        """(Re)start ``slot``'s optimizer: settings, ``total_steps`` (for the schedule),
        step count 0 and zero moments.

        Example:
            >>> opt = PackedAdamW([], max_users=1); opt.set_user(0, AdamWConfig(lr=1e-3), 50)
            >>> opt.current_lr(0)
            0.0002
        """
        self._check_slot(slot)
        config = AdamWConfig() if config is None else config
        if not isinstance(config, AdamWConfig):
            raise TypeError(f"config must be an AdamWConfig, got {type(config).__name__}")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"total_steps must be an int >= 1 or None, got {total_steps!r}")
        self._configs[slot] = (config, total_steps)
        self._lr[slot] = config.lr
        self._beta1[slot], self._beta2[slot] = config.betas
        self._eps[slot] = config.eps
        self._wd[slot] = config.weight_decay
        self._warmup[slot] = warmup_steps(total_steps, config.warmup_ratio)
        self._total[slot] = total_steps or 0
        self._linear[slot] = config.decay == "linear"
        self._max_norm[slot] = math.inf if config.max_grad_norm is None else config.max_grad_norm
        self._step[slot] = 0
        self._host_step[slot] = 0
        self._set_scale(slot, 1.0 if self.loss_scaling is None else self.loss_scaling.init_scale, 0)
        self._dirty.add(slot)
        self.sync()

    def set_total_steps(self, slot: int, total_steps: int | None) -> None:
        """Change ``slot``'s step budget (its schedule) without resetting its state."""
        config, _ = self.config(slot)
        step = self._host_step[slot]
        moments = self.user_state(slot)
        self.set_user(slot, config, total_steps)
        self.load_user_state(slot, moments)
        self._step[slot] = step
        self._host_step[slot] = step

    def drop_user(self, slot: int) -> None:
        """Forget ``slot``'s settings and state (call :meth:`sync` after removing its rows)."""
        self._check_slot(slot)
        self._configs.pop(slot, None)
        self._lr[slot] = 0
        self._step[slot] = 0
        self._host_step[slot] = 0
        self._set_scale(slot, 1.0, 0)
        self._dirty.add(slot)

    def config(self, slot: int) -> tuple[AdamWConfig, int | None]:
        """``(AdamWConfig, total_steps)`` of ``slot``."""
        self._check_slot(slot)
        if slot not in self._configs:
            raise KeyError(f"user slot {slot} has no optimizer settings (set_user)")
        return self._configs[slot]

    def step_count(self, slot: int) -> int:
        """Updates applied to ``slot`` so far (a host value: no device sync)."""
        self._check_slot(slot)
        return self._host_step[slot]

    def loss_scale(self, slot: int) -> float:
        """The factor ``slot``'s loss is multiplied by before the backward (1.0 without loss
        scaling; a host value: no device sync).

        Example:
            >>> opt = PackedAdamW([], max_users=1, loss_scaling=LossScaling()); opt.set_user(0); opt.loss_scale(0)
            4096.0
        """
        self._check_slot(slot)
        return self._host_scale[slot]

    def scale_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """``Σ_u s_u · losses[u]`` for per-slot losses ``[max_users]`` (as
        :func:`milp.runtime.user_losses_from_ce` gives them): backward through it, then
        ``step(slots, scaled=True)``. Without loss scaling, ``losses.sum()``.

        Example:
            >>> opt = PackedAdamW([], max_users=2, loss_scaling=LossScaling(init_scale=8.0)); opt.set_user(1)
            >>> opt.scale_losses(torch.tensor([0.0, 0.5])).item()
            4.0
        """
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (self.max_users,):
            raise ValueError(f"losses must be a [max_users] = [{self.max_users}] tensor of per-slot losses, "
                             f"got {list(getattr(losses, 'shape', [])) or type(losses).__name__}")
        if self.loss_scaling is None:
            return losses.sum()
        return (losses * self._scale.to(device=losses.device, dtype=losses.dtype)).sum()

    def _set_scale(self, slot: int, scale: float, clean: int) -> None:
        self._host_scale[slot], self._clean[slot] = scale, clean
        self._scale[slot] = scale

    def _rescale(self, stepped: Sequence[int], skipped: AbstractSet[int]) -> None:
        """After a scaled step: back off the skipped users' scales, grow those of users finite for
        ``growth_interval`` steps in a row; the changed values reach the device in one copy."""
        ls = self.loss_scaling
        assert ls is not None
        changed: dict[int, float] = {}
        for s in stepped:
            if s in skipped:
                self._host_scale[s] = max(self._host_scale[s] * ls.backoff_factor, _MIN_SCALE)
                self._clean[s] = 0
                changed[s] = self._host_scale[s]
            else:
                self._clean[s] += 1
                if self._clean[s] >= ls.growth_interval:
                    self._host_scale[s] = min(self._host_scale[s] * ls.growth_factor, _MAX_SCALE)
                    self._clean[s] = 0
                    changed[s] = self._host_scale[s]
        if changed:
            idx = _to_device(torch.tensor(list(changed), dtype=torch.int64), self.device)
            self._scale[idx] = _to_device(torch.tensor(list(changed.values()), dtype=torch.float32), self.device)

    def current_lr(self, slot: int) -> float:
        """Learning rate ``slot``'s next update will use."""
        config, total = self.config(slot)
        return config.lr * lr_multiplier(self.step_count(slot) + 1, total, config.warmup_ratio, config.decay)

    # ---------------------------------------------------------- layout sync
    @staticmethod
    def _compute_dtype(b: AdapterBank) -> torch.dtype:
        """float64 for float64 banks; float32 otherwise (bf16/fp16 rows are updated in float32)."""
        return torch.float64 if b.lora_a.dtype == torch.float64 else torch.float32

    def _has_master(self, b: AdapterBank) -> bool:
        """Whether ``b``'s rows get float32 master weights (bf16/fp16 banks, ``master_weights``)."""
        return self.master_weights and b.lora_a.dtype in (torch.bfloat16, torch.float16)

    def _zeros(self, b: AdapterBank) -> dict[str, torch.Tensor]:
        """Zero moments (and master: zeros are stale, :meth:`step` re-seeds them from the bank)."""
        kw: _TensorKw = dict(dtype=self._compute_dtype(b), device=b.lora_a.device)
        cap = b.capacity
        names = ("exp_avg", "exp_avg_sq", "master") if self._has_master(b) else ("exp_avg", "exp_avg_sq")
        return {f"{n}_{s}": torch.zeros(cap, w, **kw) for n in names for s, w in (("a", b.in_features),
                                                                                   ("b", b.out_features))}

    def _conform(self, i: int) -> dict[str, torch.Tensor]:
        """Bank ``i``'s state, recast if the bank's dtype changed since (``model.to(...)``): moments
        to its compute dtype; a master added (zeros, re-seeded by :meth:`step`) or dropped."""
        b, mom = self.banks[i], self._moments[i]
        want = self._has_master(b)
        if mom["exp_avg_a"].dtype != self._compute_dtype(b) or want != ("master_a" in mom):
            mom = {k: v if k.startswith("master") else v.to(self._compute_dtype(b))
                   for k, v in mom.items() if want or not k.startswith("master")}
            if want and "master_a" not in mom:
                mom.update({f"master_{s}": torch.zeros_like(mom[f"exp_avg_{s}"]) for s in "ab"})
            self._moments[i] = mom
        return mom

    @staticmethod
    def _heal(master: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """Re-seed ``master`` (in place, returned) from the bank's rows ``data`` wherever it does
        not round to them bit for bit (so ``±0`` and NaNs count too): the elements written since
        outside the optimizer."""
        stale = master.to(data.dtype).view(torch.int16) != data.view(torch.int16)
        return master.copy_(torch.where(stale, data.to(master.dtype), master))

    def sync(self) -> None:
        """Re-align moments and row maps with the banks' current layouts (needed after adapters
        were added/removed). Host work in proportion to the users changed since the last sync
        (:meth:`kernels.AdapterBank.layout_changes`), not to all users: :meth:`step` calls it on
        every step. A bank whose rows moved (compaction, growth, a loaded state) is re-read whole."""
        dirty = self._dirty
        for i, b in enumerate(self.banks):
            mark, changed = b.layout_changes(self._marks[i])
            mom = self._conform(i)
            same_cap = mom["exp_avg_a"].shape[0] == b.capacity == self._row_user[i].shape[0]
            # users not known one by one: every user the state or the bank holds
            users = set(self._layout[i]) | set(b.users) if changed is None else changed
            if not (same_cap and self._sync_users(i, users | dirty, dirty)):
                self._rebuild(i, dirty)
            self._marks[i] = mark
        self._dirty = set()

    def _sync_users(self, i: int, users: set[int], dirty: set[int]) -> bool:
        """Bank ``i``'s state for ``users`` alone (the others' rows have not moved): the rows of
        users gone or moved freed, those of users new, moved or reset zeroed and theirs. ``False``
        (nothing changed) when a user's rows moved without a reset: :meth:`_rebuild` carries its
        moments over."""
        b, old = self.banks[i], self._layout[i]
        new: dict[int, tuple[int, int] | None] = {}
        for u in users:
            seg = b.segment(u) if b.has(u) else None
            new[u] = None if seg is None else (seg.offset, seg.rank)
            if new[u] is not None and u in old and new[u] != old[u] and u not in dirty:
                return False
        ru, mom = self._row_user[i], self._moments[i]
        for u, v in new.items():  # first free every row left: another of these users may take it
            if u in old and v != old[u]:
                off, r = old[u]
                ru[off : off + r] = -1
        for u, v in new.items():
            if v is None:
                old.pop(u, None)
                continue
            if u in dirty or old.get(u) != v:
                off, r = v
                for t in mom.values():
                    t[off : off + r].zero_()
                ru[off : off + r] = u
            old[u] = v
        return True

    def _rebuild(self, i: int, dirty: set[int]) -> None:
        """Bank ``i``'s state made anew for its whole segment table (a grown bank, or users whose
        rows moved): the moments of users whose rows moved carried over, reset users' zeroed."""
        b, old, mom = self.banks[i], self._layout[i], self._moments[i]
        layout = {u: (s.offset, s.rank) for u in b.users for s in (b.segment(u),)}
        new = self._zeros(b)
        for u, (off, r) in layout.items():
            if u in dirty or old.get(u, (None, None))[1] != r:
                continue
            o_off = old[u][0]
            for k in new:
                new[k][off : off + r] = mom[k][o_off : o_off + r]
        row_user = torch.full((b.capacity,), -1, dtype=torch.int64)
        for u, (off, r) in layout.items():
            row_user[off : off + r] = u
        self._row_user[i] = row_user.to(b.lora_a.device)
        self._moments[i] = new
        self._layout[i] = layout

    def seed_master(self, slot: int, bank: AdapterBank, a: torch.Tensor, b: torch.Tensor) -> bool:
        """Set ``slot``'s float32 master rows of ``bank`` from ``a [R, in]`` and ``b [R, out]``,
        the values its rows were rounded from (float32 adapters written into a bf16 bank by
        :meth:`kernels.AdapterBank.set_adapter_weights`), so training continues from them and
        not from the rounded rows. Returns whether ``bank`` has a master (bf16/fp16 bank,
        ``master_weights``); without one there is nothing to seed. An element that does not
        round to the bank's row (written since, or a float64 source double-rounded) is re-seeded
        from the bank by :meth:`step`, as always.

        Example:
            >>> import kernels, torch
            >>> bf = kernels.AdapterBank(4, 2, max_users=1, dtype=torch.bfloat16); _ = bf.add(0, [1])
            >>> opt = PackedAdamW([bf], max_users=1); opt.set_user(0)
            >>> a, b = torch.full((1, 4), 1 + 2**-10), torch.zeros(1, 2)
            >>> bf.set_adapter_weights(0, a, b); opt.seed_master(0, bf, a, b)
            True
            >>> opt.user_state(0)["0.master_a"][0, 0].item() == 1 + 2**-10  # the bank holds 1.0
            True
        """
        self._check_slot(slot)
        for sfx, src in (("a", a), ("b", b)):
            if not isinstance(src, torch.Tensor) or not src.dtype.is_floating_point:
                raise TypeError(f"{sfx} must be a float tensor [R, features], got "
                                f"{getattr(src, 'dtype', type(src).__name__)}")
        i = next((j for j, x in enumerate(self.banks) if x is bank), None)
        if i is None:
            raise ValueError("bank is not one of the optimizer's banks")
        self.sync()
        if slot not in self._layout[i]:
            raise ValueError(f"user slot {slot} has no rows in bank {i}")
        mom = self._moments[i]
        if "master_a" not in mom:
            return False
        off, r = self._layout[i][slot]
        pairs = [(mom["master_" + sfx][off : off + r], sfx, src) for sfx, src in (("a", a), ("b", b))]
        for dst, sfx, src in pairs:  # both checked before either is written
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"{sfx} has shape {list(src.shape)}, expected {list(dst.shape)}")
        for dst, _, src in pairs:
            dst.copy_(src.detach().to(dst))
        return True

    # ---------------------------------------------------------------- step
    def _multiplier(self, t: torch.Tensor) -> torch.Tensor:
        W, T = self._warmup, self._total
        in_warm = (W > 0) & (t <= W)
        mult = torch.where(in_warm, t / W.clamp(min=1), torch.ones_like(t))
        lin = self._linear & (T > 0) & ~in_warm
        dec = ((T - t + 1) / (T - W).clamp(min=1)).clamp(0, 1)
        return torch.where(lin, dec, mult)

    @torch.no_grad()
    def step(self, slots: Sequence[int] | torch.Tensor, *, scaled: bool = False) -> list[int]:
        """One AdamW update for each user in ``slots`` (others are left untouched); a
        missing gradient counts as zero. Returns the slots skipped (none unless ``scaled``).

        ``scaled``: the gradients are those of :meth:`scale_losses` (each user's times its
        :meth:`loss_scale`); each user's are divided by its scale, and a user whose gradients are
        not all finite gets no update and no step counted (its scale backs off, see
        :class:`LossScaling`). Needs ``loss_scaling``, and reads one flag per user back to the
        host (a device sync, as ``GradScaler.step`` has).

        Example:
            >>> opt = PackedAdamW([], max_users=2); opt.set_user(1); _ = opt.step([1]); opt.step_count(1)
            1
        """
        _check_bool("scaled", scaled)
        if scaled and self.loss_scaling is None:
            raise ValueError("scaled=True needs a PackedAdamW made with loss_scaling= (a LossScaling)")
        if isinstance(slots, (str, bytes, AbstractSet, Mapping)) or not isinstance(slots, (Iterable, torch.Tensor)):
            raise TypeError(f"slots must be a sequence (or 1-D tensor) of int user slots, got {type(slots).__name__}")
        try:
            idx = torch.as_tensor(slots if not isinstance(slots, torch.Tensor) else slots.tolist())
        except (TypeError, ValueError, RuntimeError):  # None entries, nested ragged lists
            raise TypeError(f"slots must hold int user slots, got {slots!r:.60}") from None
        if idx.numel() and (idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool):
            # as_tensor(..., dtype=int64) would truncate 0.5 to user 0 and step a user nobody named
            raise TypeError(f"slots must hold int user slots, got {idx.dtype} values")
        idx = idx.to(torch.int64)
        if idx.dim() != 1:
            raise ValueError(f"slots must be a 1-D list of user slots, got shape {tuple(idx.shape)}")
        host = idx.unique().tolist()
        for s in host:
            self._check_slot(s)
            if s not in self._configs:
                raise KeyError(f"user slot {s} has no optimizer settings (call set_user first)")
        if not host:
            return []
        self.sync()
        dev = self.device

        # per bank, the rows to update (host layout, no sync): the span [lo, hi) covering the
        # stepped users' rows, updated in place, or, where their rows are scattered over a span at
        # least twice as long (a few users of a big bank), just those rows, gathered and written
        # back; the update is elementwise per row, so both give the same values. A step of a few
        # users thus costs in proportion to their rows, not to the bank's; a joint step takes the span.
        spans: list[tuple[int, slice | torch.Tensor]] = []
        for i, layout in enumerate(self._layout):
            segs = [layout[s] for s in host if s in layout]
            if segs:
                lo, hi = min(o for o, _ in segs), max(o + r for o, r in segs)
                if 2 * sum(r for _, r in segs) <= hi - lo:
                    spans.append((i, _segment_rows(sorted(segs))))
                else:
                    spans.append((i, slice(lo, hi)))
        # the stepped slots and every gathered row list reach the device in one copy, without a
        # sync (a copy from pageable host memory waits for the stream: one sync per bank)
        lists = [torch.tensor(host, dtype=torch.int64)] + [sl for _, sl in spans if isinstance(sl, torch.Tensor)]
        flat = _to_device(torch.cat(lists), dev).split([len(v) for v in lists])
        gathered = iter(flat[1:])
        spans = [(i, next(gathered) if isinstance(sl, torch.Tensor) else sl) for i, sl in spans]
        row_users = {i: _take(self._row_user[i], sl) for i, sl in spans}  # each row's user (-1: free)
        active = torch.zeros(self.max_users, dtype=torch.bool, device=dev)
        active[flat[0]] = True
        dtypes = {self._compute_dtype(b) for b in self.banks}

        # the users' gradient norms (squared, of the gradients as they are): for clipping, and for
        # a scaled step, whose non-finite users are skipped
        norm2 = None
        clipping = any(self._configs[s][0].max_grad_norm is not None for s in host)
        if clipping or scaled:
            nd = torch.float64 if torch.float64 in dtypes else torch.float32
            norm2 = torch.zeros(self.max_users, dtype=nd, device=dev)
            for i, sl in spans:
                ru = row_users[i]
                ru0 = ru.clamp(min=0)
                for p in (self.banks[i].lora_a, self.banks[i].lora_b):
                    if p.grad is not None:  # free rows add 0 (not 0 · their gradient: NaN · 0 is NaN)
                        norm2.index_add_(0, ru0, torch.where(ru >= 0, _take(p.grad, sl).to(nd).pow(2).sum(1), 0))
        skipped: list[int] = []
        unscale = None
        if scaled:
            assert norm2 is not None
            # a user whose squared norm overflows (a float32 bank's huge finite gradient) counts
            # as not finite too: skipped, and its scale backs off
            finite = torch.isfinite(norm2)
            skipped = [s for s, ok in zip(host, finite[flat[0]].tolist()) if not ok]
            if skipped:
                active[_to_device(torch.tensor(skipped, dtype=torch.int64), dev)] = False
            unscale = 1.0 / self._scale.to(nd)
        self._step += active.to(torch.int64)
        for s in set(host) - set(skipped):
            self._host_step[s] += 1
        factors = {cd: self._factors(active, cd) for cd in dtypes}

        clip = None
        if clipping:  # by the norm of the unscaled gradients
            assert norm2 is not None
            if unscale is not None:
                norm2 = norm2 * unscale * unscale
            clip = (self._max_norm.to(norm2.dtype) / (norm2.sqrt() + 1e-6)).clamp(max=1.0)
        if unscale is not None:  # one factor per user: the unscaling, and the clipping after it
            clip = unscale if clip is None else clip * unscale

        for i, sl in spans:
            b, ru = self.banks[i], row_users[i]
            cd = self._compute_dtype(b)
            lr_step, bc2_sqrt, decay, beta1, beta2, eps = factors[cd]
            ru0 = ru.clamp(min=0)
            on = (active[ru0] & (ru >= 0)).to(cd)[:, None]  # [rows, 1]: 1 = update this row
            w1 = (1 - beta1[ru0])[:, None] * on
            w2 = (1 - beta2[ru0])[:, None] * on
            row_decay = torch.where(on > 0, decay[ru0][:, None], torch.ones_like(on))
            row_step = lr_step[ru0][:, None] * on
            row_bc2 = bc2_sqrt[ru0][:, None].clamp(min=1e-30)
            row_eps = eps[ru0][:, None]
            mom = self._moments[i]  # conformed to the bank's dtype by sync()
            for p, sfx in ((b.lora_a, "a"), (b.lora_b, "b")):
                data = _take(p.data, sl)
                if p.grad is not None:
                    g = _take(p.grad, sl).to(cd)
                else:
                    g = torch.zeros(data.shape, dtype=cd, device=dev)
                if clip is not None:
                    g = g * clip[ru0][:, None].to(cd)
                # rows not stepped see a zero gradient, whatever theirs holds (NaN/inf · 0 weight is NaN)
                g = torch.where(on > 0, g, 0)
                m, v = _take(mom["exp_avg_" + sfx], sl), _take(mom["exp_avg_sq_" + sfx], sl)
                m.lerp_(g, w1)
                v.add_((g * g - v) * w2)
                if "master_" + sfx in mom:  # bf16/fp16: update the float32 master, re-seeded where stale
                    work = self._heal(_take(mom["master_" + sfx], sl), data)
                else:  # float32/64 in place; bf16/fp16 without master: exact round trip for rows left alone
                    work = data if p.dtype == cd else data.to(cd)
                work.mul_(row_decay)
                denom = (v.sqrt() / row_bc2).add_(row_eps)
                work.addcdiv_(m * row_step, denom, value=-1.0)
                if work is not data:
                    data.copy_(work)
                if not isinstance(sl, slice):  # gathered copies: write the rows back
                    for name, rows in (("exp_avg_", m), ("exp_avg_sq_", v), ("master_", work)):
                        if name + sfx in mom:
                            mom[name + sfx].index_copy_(0, sl, rows)
                    p.data.index_copy_(0, sl, data)
        if scaled:
            self._rescale(host, set(skipped))
        return skipped

    def _factors(self, active: torch.Tensor, cd: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Per user (``[max_users]`` in ``cd``): ``lr / bias correction 1``, ``sqrt(bias correction
        2)``, the decoupled decay ``1 - lr·wd``, beta1, beta2, eps, with ``lr`` 0 for users not
        stepped. float32 keeps the arithmetic it always had; float64 runs all of it in float64."""
        if cd == torch.float64:
            t = self._step.to(torch.float64).clamp(min=1)
            lr = torch.where(active, self._lr * self._multiplier(t), torch.zeros_like(t))
            bc1, bc2 = 1 - self._beta1 ** t, 1 - self._beta2 ** t
            return lr / bc1, bc2.sqrt(), 1 - lr * self._wd, self._beta1, self._beta2, self._eps
        lr32, beta1, beta2, eps, wd = (h.float() for h in (self._lr, self._beta1, self._beta2, self._eps, self._wd))
        t = self._step.to(torch.float32).clamp(min=1)
        lr = torch.where(active, lr32 * self._multiplier(t), torch.zeros_like(t))
        bc1 = 1 - beta1.double() ** t.double()
        bc2 = 1 - beta2.double() ** t.double()
        return (lr.double() / bc1).float(), bc2.sqrt().float(), 1 - lr * wd, beta1, beta2, eps

    def zero_grad(self) -> None:
        """Drop the banks' gradients."""
        for b in self.banks:
            b.lora_a.grad = None
            b.lora_b.grad = None

    # ------------------------------------------------------------- export
    def user_state(self, slot: int) -> dict[str, torch.Tensor]:
        """``slot``'s moments per bank (``"{bank}.exp_avg_a"`` …, rows in bank order), float32
        master rows of bf16/fp16 banks (``"{bank}.master_a"``/``"_b"``, re-seeded from the bank
        where stale) and its step count, as CPU tensors (for saving); with loss scaling,
        ``"loss_scale"``: its scale and its finite steps in a row (float64 ``[2]``).

        Example:
            >>> opt = PackedAdamW([], max_users=1); opt.set_user(0); opt.user_state(0)["step"].item()
            0
        """
        self._check_slot(slot)
        self.sync()
        out = {"step": self._step[slot].detach().cpu().reshape(1).clone()}  # on CPU .cpu() is a view
        if self.loss_scaling is not None:
            out["loss_scale"] = torch.tensor([self._host_scale[slot], float(self._clean[slot])], dtype=torch.float64)
        for i, layout in enumerate(self._layout):
            if slot in layout:
                off, r = layout[slot]
                for k, t in self._moments[i].items():
                    t = t[off : off + r].clone()
                    if k.startswith("master_"):
                        self._heal(t, getattr(self.banks[i], "lora_" + k[-1]).data[off : off + r])
                    out[f"{i}.{k}"] = t.detach().cpu()
        return out

    def load_user_state(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`user_state` (the user's rows must already be in the banks). Master
        rows are optional (a state without them: :meth:`step` re-seeds the master from the
        bank), and skipped for banks without a master (float32/64, ``master_weights=False``);
        so is ``"loss_scale"``, skipped without loss scaling (a state without it keeps the
        user's scale as it is)."""
        self._check_slot(slot)
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of names to tensors (user_state), got {type(state).__name__}")
        self.sync()
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # every entry checked before any is loaded
        step = None
        scale: tuple[float, int] | None = None
        for key, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"optimizer state {key!r} must be a tensor, got {type(t).__name__}")
            if key == "loss_scale":
                vals = t.reshape(-1).tolist() if t.dtype.is_floating_point and t.numel() == 2 else []
                if not (vals and _MIN_SCALE <= vals[0] <= _MAX_SCALE and math.isfinite(vals[1]) and vals[1] >= 0
                        and vals[1] == int(vals[1])):
                    raise ValueError("optimizer state 'loss_scale' must hold [scale in [2**-100, 2**100], finite steps "
                                     f"in a row >= 0] (floats), got {t.tolist() if t.numel() <= 4 else list(t.shape)}")
                scale = (float(vals[0]), int(vals[1]))
                continue
            if key == "step":
                if t.numel() != 1 or t.is_complex() or t.dtype == torch.bool:
                    raise ValueError(f"optimizer state 'step' must hold one step count, got shape {list(t.shape)}")
                v = t.reshape(-1)[0].item()
                if not (math.isfinite(v) and v >= 0 and v == int(v)):
                    raise ValueError(f"optimizer state 'step' must be an int >= 0 (a step count), got {v}")
                step = int(v)
                continue
            i_str, _, name = key.partition(".")
            i = int(i_str) if i_str.isascii() and i_str.isdigit() else -1
            if not 0 <= i < len(self.banks) or slot not in self._layout[i]:
                raise ValueError(f"optimizer state {key!r} names bank {i_str!r}, where user slot {slot} has no rows")
            if name not in self._moments[i]:
                if name in ("master_a", "master_b"):
                    continue
                raise ValueError(f"optimizer state {key!r}: unknown entry {name!r}, expected one of "
                                 f"{sorted(self._moments[i])}, 'step' or 'loss_scale'")
            off, r = self._layout[i][slot]
            dst = self._moments[i][name][off : off + r]
            if tuple(t.shape) != tuple(dst.shape):
                raise ValueError(f"optimizer state {key!r} has shape {list(t.shape)}, expected {list(dst.shape)}")
            if not (t.dtype.is_floating_point and bool(torch.isfinite(t).all())):
                raise ValueError(f"optimizer state {key!r} must hold finite floats, got dtype {t.dtype}"
                                 + ("" if not t.dtype.is_floating_point else " with NaN or inf"))
            if name.startswith("exp_avg_sq") and bool((t < 0).any()):
                raise ValueError(f"optimizer state {key!r} (a second moment) must be >= 0, got a negative value")
            copies.append((dst, t))
        for dst, t in copies:
            dst.copy_(t.to(dst))
        if step is not None:
            self._step[slot] = step
            self._host_step[slot] = step
        if scale is not None and self.loss_scaling is not None:
            self._set_scale(slot, *scale)
