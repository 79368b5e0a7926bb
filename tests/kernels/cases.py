"""Problem builders and the per-dtype tolerance table shared by the kernel tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import AdapterBank, BatchPlan

#: relative error ‖out − ref‖ / ‖ref‖ allowed against the float64 reference
TOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,
    torch.float16: 3e-3,
    torch.bfloat16: 2e-2,
}
DTYPES = list(TOL)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "output has NaN/inf"
    denom = ref.norm()
    if denom == 0:
        return float(out.norm())
    return float((out - ref).norm() / denom)


@dataclass
class Case:
    bank: AdapterBank
    plan: BatchPlan
    ids: torch.Tensor
    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor | None


def make_case(
    num_tokens: int,
    k: int,
    n: int,
    user_ranks: dict[int, list[int]],
    *,
    max_users: int | None = None,
    none_share: float = 0.2,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    seed: int = 0,
    ids: torch.Tensor | None = None,
    device: str = "cpu",
) -> Case:
    """A bank with ``user_ranks`` (user -> module ranks) and a batch drawing users at random.

    Tokens pick a user from ``user_ranks`` plus users without adapters, and ``-1`` with
    probability ``none_share``. Weights are scaled so outputs stay O(1).
    """
    g = torch.Generator().manual_seed(seed)
    max_users = max_users or (max(user_ranks, default=0) + 2)
    bank = AdapterBank(k, n, max_users=max_users, dtype=dtype, device=device)
    for u, ranks in user_ranks.items():
        bank.add(u, ranks, alpha=8.0, init="random", generator=g)
    if ids is None:
        pool = torch.arange(max_users)
        ids = pool[torch.randint(0, max_users, (num_tokens,), generator=g)]
        none = torch.rand(num_tokens, generator=g) < none_share
        ids = torch.where(none, torch.full_like(ids, -1), ids)
    ids = ids.to(device)
    plan = BatchPlan.build(ids, max_users)
    x = (torch.randn(num_tokens, k, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
    w = (torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) if bias else None
    return Case(bank, plan, ids, x, w, b)


def mixed_ranks(num_users: int, seed: int = 0, choices=(1, 3, 8, 16, 32, 64, 96, 128, 256)) -> dict[int, list[int]]:
    """Users 0..num_users-1 with 1-3 modules of ranks drawn from ``choices`` (some users left out)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for u in range(num_users):
        if torch.rand(1, generator=g).item() < 0.15:
            continue  # a user with no adapter at this layer
        n_mod = int(torch.randint(1, 4, (1,), generator=g))
        out[u] = [choices[int(torch.randint(0, len(choices), (1,), generator=g))] for _ in range(n_mod)]
    return out
