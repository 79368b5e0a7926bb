"""What a user would run instead of the fused kernels, on a :class:`_util.Problem`'s inputs.

Every builder returns a zero-argument callable (the timed region); everything a serving or
training system would prepare once per batch or once per adapter load (index tensors, padded
weight stacks, the PEFT model) is built here, outside the timed region. The exception is PEFT,
whose mixed-batch forward derives its token lists from ``adapter_names`` on every call: that is
part of what PEFT costs, so it stays inside.

Implementations (``impl``):

``milp``    ours: ``kernels.lora_linear`` / ``lora_shrink`` / ``lora_expand_`` (Triton on CUDA,
            the ops' torch path on CPU);
``base``    ``x Wᵀ`` alone (the floor; for ``fwdbwd`` its forward + ``dx = dy W``, W frozen);
``loop``    per-user loop: ``y = x Wᵀ``; for each user select its tokens, two matmuls
            (``(x_u A_uᵀ ⊙ s_u) B_u``), scatter-add back (PEFT's mixed-batch algorithm, with the
            index tensors precomputed);
``padded``  every adapter padded to the batch's largest total rank and every user's tokens to
            the largest token count, two ``bmm`` over ``[users, tokens, ·]``, scatter-add back;
``peft``    PEFT itself: a ``LoraModel`` over one ``nn.Linear`` with one adapter per user (its
            modules stacked into one adapter of rank ``R_u``), ``model(x, adapter_names=...)``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from _util import Problem

import kernels

__all__ = ["forward_fn", "fwdbwd_fn", "shrink_fn", "expand_fn", "require_peft"]


# ----------------------------------------------------------------------------- helpers
def _loop_groups(p: Problem, leaf: bool = False):
    """``[(idx, A_u [R, k], B_u [R, n], s_u [R])]`` per user; ``leaf``: own grad-able copies."""
    b = p.bank
    out = []
    for idx, off, r in p.groups:
        a = b.lora_a.detach()[off : off + r]
        bb = b.lora_b.detach()[off : off + r]
        if leaf:
            a, bb = a.clone().requires_grad_(), bb.clone().requires_grad_()
        out.append((idx, a, bb, b.scale[off : off + r].to(p.dtype)))
    return out


def _loop_apply(x, y, groups):
    for idx, a, bb, s in groups:
        xu = x.index_select(0, idx)
        y.index_add_(0, idx, ((xu @ a.t()) * s) @ bb)
    return y


class _Padded:
    """Adapters padded to ``R_max``, token groups padded to ``T_max`` (built once)."""

    def __init__(self, p: Problem, leaf: bool = False) -> None:
        b, dev, dt = p.bank, p.device, p.dtype
        users = len(p.groups)
        self.r_max = max(r for _, _, r in p.groups)
        self.t_max = max(int(idx.numel()) for idx, _, _ in p.groups)
        gather = torch.zeros(users, self.t_max, dtype=torch.long, device=dev)
        valid = torch.zeros(users, self.t_max, dtype=torch.bool, device=dev)
        a = torch.zeros(users, self.r_max, p.wl.k, dtype=dt, device=dev)
        bb = torch.zeros(users, self.r_max, p.wl.n, dtype=dt, device=dev)
        s = torch.zeros(users, 1, self.r_max, dtype=dt, device=dev)
        with torch.no_grad():
            for j, (idx, off, r) in enumerate(p.groups):
                gather[j, : idx.numel()] = idx
                valid[j, : idx.numel()] = True
                a[j, :r] = b.lora_a[off : off + r]
                bb[j, :r] = b.lora_b[off : off + r]
                s[j, 0, :r] = b.scale[off : off + r].to(dt)
        self.users = users
        self.gather = gather.flatten()
        if bool(valid.all()):
            self.pos = None
            self.tok = self.gather
        else:
            self.pos = valid.flatten().nonzero().flatten()
            self.tok = self.gather[self.pos]
        self.a = a.requires_grad_() if leaf else a
        self.b = bb.requires_grad_() if leaf else bb
        self.s = s
        self.groups = p.groups

    def rows(self, d: torch.Tensor) -> torch.Tensor:
        d = d.reshape(-1, d.shape[-1])
        return d if self.pos is None else d.index_select(0, self.pos)

    def shrink(self, x: torch.Tensor) -> torch.Tensor:  # [U, T_max, R_max]
        xp = x.index_select(0, self.gather).view(self.users, self.t_max, x.shape[1])
        return torch.bmm(xp, self.a.transpose(1, 2)) * self.s

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, w)
        d = torch.bmm(self.shrink(x), self.b)
        return y.index_add_(0, self.tok, self.rows(d))

    def to_bank(self, ga: torch.Tensor, gb: torch.Tensor, cap_shape_a, cap_shape_b):
        da = ga.new_zeros(cap_shape_a)
        db = gb.new_zeros(cap_shape_b)
        for j, (_, off, r) in enumerate(self.groups):
            da[off : off + r] = ga[j, :r]
            db[off : off + r] = gb[j, :r]
        return da, db


_PEFT_ERROR: str | None = None


def require_peft() -> None:
    """Skip the current benchmark with the reason when ``peft`` does not import."""
    global _PEFT_ERROR
    if _PEFT_ERROR is None:
        try:
            import peft  # noqa: F401

            _PEFT_ERROR = ""
        except Exception as exc:  # noqa: BLE001 - optional extra, any import failure skips
            _PEFT_ERROR = (
                f"peft is not importable ({type(exc).__name__}: {exc}); pip install 'milp-toolkit[peft]'"
            )
    if _PEFT_ERROR:
        pytest.skip(_PEFT_ERROR)


class _One(torch.nn.Module):
    def __init__(self, lin: torch.nn.Linear) -> None:
        super().__init__()
        self.proj = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _Peft:
    """A PEFT ``LoraModel`` over ``nn.Linear(k, n)`` sharing ``W``, adapter ``u<i>`` per user.

    User ``u``'s modules become one adapter of rank ``R_u`` (``lora_A = A_u``,
    ``lora_B = (c ⊙ B_u)ᵀ``) with ``lora_alpha = σ R_u`` so PEFT's scaling is ``σ``; ``σ`` is the
    user's scale when all its modules share it (``c = 1``), else 1 with ``c = s_u`` folded in.
    ``autocast_adapter_dtype=False`` keeps the adapters in the benchmark dtype, as ours.
    """

    def __init__(self, p: Problem, trainable: bool = False) -> None:
        from peft import LoraConfig, get_peft_model

        b = p.bank
        with torch.device(p.device):
            lin = torch.nn.Linear(p.wl.k, p.wl.n, bias=False, device="meta")
            lin.weight = torch.nn.Parameter(p.w, requires_grad=False)
            model = None
            self.fold = []
            for u, (_, off, r) in enumerate(p.groups):
                s = b.scale[off : off + r]
                uniform = bool((s == s[0]).all())
                sigma = float(s[0]) if uniform else 1.0
                cfg = LoraConfig(r=r, lora_alpha=sigma * r, target_modules=["proj"], lora_dropout=0.0)
                if model is None:
                    model = get_peft_model(_One(lin), cfg, adapter_name=f"u{u}", autocast_adapter_dtype=False)
                else:
                    model.add_adapter(f"u{u}", cfg)
                self.fold.append(None if uniform else s.to(p.dtype))
        model.eval()  # adapter_names is refused in training mode; grads still flow (no dropout)
        layer = model.base_model.model.proj
        self.a_params, self.b_params = [], []
        with torch.no_grad():
            for u, (_, off, r) in enumerate(p.groups):
                la, lb = layer.lora_A[f"u{u}"].weight, layer.lora_B[f"u{u}"].weight
                la.copy_(b.lora_a[off : off + r])
                bu = b.lora_b[off : off + r]
                lb.copy_((bu if self.fold[u] is None else bu * self.fold[u][:, None]).t())
                la.requires_grad_(trainable)
                lb.requires_grad_(trainable)
                self.a_params.append(la)
                self.b_params.append(lb)
        self.model = model
        ids = p.ids_cpu.tolist()
        self.names = [f"u{i}" if i >= 0 else "__base__" for i in ids]
        self.groups = p.groups

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, adapter_names=self.names)

    def to_bank(self, ga, gb, shape_a, shape_b):
        da = ga[0].new_zeros(shape_a)
        db = gb[0].new_zeros(shape_b)
        for u, (_, off, r) in enumerate(self.groups):
            da[off : off + r] = ga[u]
            g = gb[u].t()
            db[off : off + r] = g if self.fold[u] is None else g * self.fold[u][:, None]
        return da, db


# ----------------------------------------------------------------------------- builders
def forward_fn(impl: str, p: Problem) -> Callable[[], torch.Tensor]:
    """``y = x Wᵀ + Σ s (x Aᵀ) B`` (inference: no autograd graph)."""
    x, w, bank, plan = p.x, p.w, p.bank, p.plan
    if impl == "milp":

        def fn():
            with torch.no_grad():
                return kernels.lora_linear(x, w, None, bank, plan)
    elif impl == "base":

        def fn():
            return F.linear(x, w)
    elif impl == "loop":
        groups = _loop_groups(p)

        def fn():
            with torch.no_grad():
                return _loop_apply(x, F.linear(x, w), groups)
    elif impl == "padded":
        pad = _Padded(p)

        def fn():
            with torch.no_grad():
                return pad.forward(x, w)
    elif impl == "peft":
        require_peft()
        model = _Peft(p)

        def fn():
            with torch.no_grad():
                return model(x)
    elif impl.startswith("milp-") and impl[5:] in kernels.PATHS:  # our op, path forced
        path = impl[5:]

        def fn():
            with torch.no_grad():
                return kernels.lora_linear(x, w, None, bank, plan, path=path)
    else:
        raise ValueError(f"unknown impl {impl!r}")
    return fn


def fwdbwd_fn(impl: str, p: Problem):
    """``(fn, to_bank)``: ``fn()`` runs the forward and ``autograd.grad`` of ``<dy, y>`` with
    respect to ``x`` and the adapters (``W`` frozen, as in LoRA training) and returns the raw
    grads; ``to_bank(grads)`` maps them to ``(dx, dA [cap, k], dB [cap, n])`` (``None`` for
    ``base``) to compare with the reference."""
    bank, plan, w, dy = p.bank, p.plan, p.w, p.dy
    x = p.x.detach().clone().requires_grad_()
    cap_a, cap_b = tuple(bank.lora_a.shape), tuple(bank.lora_b.shape)
    if impl == "milp":
        params = [x, bank.lora_a, bank.lora_b]

        def fn():
            y = kernels.lora_linear(x, w, None, bank, plan)
            return torch.autograd.grad(y, params, dy)

        def to_bank(g):
            return g[0], g[1], g[2]
    elif impl == "base":

        def fn():
            return torch.autograd.grad(F.linear(x, w), [x], dy)

        def to_bank(g):
            return g[0], None, None
    elif impl == "loop":
        groups = _loop_groups(p, leaf=True)
        params = [x] + [a for _, a, _, _ in groups] + [b for _, _, b, _ in groups]
        nu = len(groups)

        def fn():
            y = _loop_apply(x, F.linear(x, w), groups)
            return torch.autograd.grad(y, params, dy)

        def to_bank(g):
            da = g[1].new_zeros(cap_a)
            db = g[1].new_zeros(cap_b)
            for j, (_, off, r) in enumerate(p.groups):
                da[off : off + r] = g[1 + j]
                db[off : off + r] = g[1 + nu + j]
            return g[0], da, db
    elif impl == "padded":
        pad = _Padded(p, leaf=True)
        params = [x, pad.a, pad.b]

        def fn():
            return torch.autograd.grad(pad.forward(x, w), params, dy)

        def to_bank(g):
            return (g[0], *pad.to_bank(g[1], g[2], cap_a, cap_b))
    elif impl == "peft":
        require_peft()
        model = _Peft(p, trainable=True)
        params = [x] + model.a_params + model.b_params
        nu = len(model.a_params)

        def fn():
            return torch.autograd.grad(model(x), params, dy)

        def to_bank(g):
            return (g[0], *model.to_bank(g[1 : 1 + nu], g[1 + nu :], cap_a, cap_b))
    else:
        raise ValueError(f"unknown impl {impl!r}")
    return fn, to_bank


def shrink_fn(impl: str, p: Problem) -> Callable[[], torch.Tensor]:
    """``t [T, R_T] fp32``, ``t[i, :R_u] = s ⊙ x_i A_uᵀ`` (``base``: ``x Wᵀ`` for scale)."""
    x, bank, plan = p.x, p.bank, p.plan
    rt = bank.max_rank
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    if impl == "milp":

        def fn():
            with torch.no_grad():
                return kernels.lora_shrink(x, bank, plan)
    elif impl == "base":

        def fn():
            return F.linear(x, p.w)
    elif impl == "loop":
        groups = _loop_groups(p)

        def fn():
            t = torch.zeros(x.shape[0], rt, dtype=acc, device=x.device)
            for idx, a, _, s in groups:
                t[:, : a.shape[0]].index_copy_(0, idx, ((x.index_select(0, idx) @ a.t()) * s).to(acc))
            return t
    elif impl == "padded":
        pad = _Padded(p)

        def fn():
            t = torch.zeros(x.shape[0], rt, dtype=acc, device=x.device)
            t[:, : pad.r_max].index_copy_(0, pad.tok, pad.rows(pad.shrink(x)).to(acc))
            return t
    else:
        raise ValueError(f"unknown impl {impl!r}")
    return fn


def expand_fn(impl: str, p: Problem, y: torch.Tensor, t: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``y[i] += t[i, :R_u] B_u`` in place (``base``: ``x Wᵀ`` for scale)."""
    bank, plan = p.bank, p.plan
    if impl == "milp":

        def fn():
            with torch.no_grad():
                return kernels.lora_expand_(y, t, bank, plan)
    elif impl == "base":

        def fn():
            return F.linear(p.x, p.w)
    elif impl == "loop":
        groups = _loop_groups(p)

        def fn():
            for idx, _, bb, _ in groups:
                y.index_add_(0, idx, t.index_select(0, idx)[:, : bb.shape[0]].to(y.dtype) @ bb)
            return y
    elif impl == "padded":
        pad = _Padded(p)

        def fn():
            tp = (
                t.index_select(0, pad.gather)[:, : pad.r_max]
                .to(y.dtype)
                .view(pad.users, pad.t_max, pad.r_max)
            )
            return y.index_add_(0, pad.tok, pad.rows(torch.bmm(tp, pad.b)))
    else:
        raise ValueError(f"unknown impl {impl!r}")
    return fn
