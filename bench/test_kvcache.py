"""Decode steps at a long context: Hugging Face's ``DynamicCache`` against :class:`milp.kvcache.GrowingCache`.

``dynamic`` appends each step's keys and values with ``torch.cat``: every step copies the whole
cache of every layer (read and write), on top of reading it for attention. ``milp`` writes them
in place into buffers with room (``milp.kvcache``; what :class:`milp.decode.ContinuousBatch`,
``milp.serve`` and ``generate_responses``' static batching now use), so a step reads the cache
once. The model is ``bench/test_runtime.py``'s base model (no adapters: the cache is what
differs), R rows prefilled with L tokens (untimed), then T greedy decode steps timed, then the
cache cut back to L (``crop``: a view in both, no copy) so that every repetition decodes the
same steps.

Sizes (``MILP_BENCH_SIZE``): ``small`` (CPU default) the 2-layer hidden-128 LLaMA, R = 8,
L ∈ {128, 448}, T = 32, fp32; ``full`` (CUDA default) the TinyLlama-1.1B-shaped model in bf16
(22 layers, 4 key/value heads of 64), R = 32, L ∈ {512, 1920}, T = 64: at L = 1920 the cache
holds 1.4 GB, which ``dynamic`` copies once per step beside the 2.2 GB of weights every step
reads.

Correctness first: both give the same logits at every step (per-dtype tolerance; the same
tokens in fp32). Figures: ``tokens_per_s`` (R·T over the time), ``ms_per_step``,
``kv_cache_gb`` (the cache at L), ``copied_gb_per_step`` (what ``dynamic``'s ``torch.cat``
moves per step: the cache read and written), and bytes (the weights and the cache read once per
step: the floor both share) for GB/s and % of peak.
"""
from __future__ import annotations

import _util as U
import pytest
import torch
from test_runtime import CFG, build_model, linear_params
from transformers import DynamicCache

from milp.kvcache import GrowingCache, cache_argument

pytestmark = U.PYTESTMARK

SIZES = {"small": dict(rows=8, contexts=(128, 448), steps=32), "full": dict(rows=32, contexts=(512, 1920), steps=64)}
W = SIZES["full" if U.SIZE == "full" else "small"]
CACHES = {"dynamic": DynamicCache, "milp": GrowingCache}


class Decode:
    """R rows prefilled with L tokens into a cache of one kind; :meth:`run` decodes T steps from
    there and cuts the cache back to L."""

    def __init__(self, model, impl: str, context: int) -> None:
        self.model, self.context, self.steps = model, context, W["steps"]
        rows, vocab = W["rows"], model.config.vocab_size
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(3, vocab, (rows, context), generator=g).to(U.DEVICE)
        self.cache = CACHES[impl]()
        self.arg = cache_argument(model)
        self.mask = torch.ones(rows, context + self.steps, dtype=torch.long, device=U.DEVICE)
        with torch.no_grad():
            logits = self._forward(ids, torch.arange(context, device=U.DEVICE).expand(rows, -1), context)
        self.first = logits.argmax(-1, keepdim=True)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=self.mask[:, :length], position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self.arg: self.cache})
        return out.logits[:, -1]

    @torch.no_grad()
    def run(self, keep: bool = False) -> list[torch.Tensor]:
        nxt, seen = self.first, []
        rows = nxt.shape[0]
        for t in range(self.steps):
            pos = torch.full((rows, 1), self.context + t, device=U.DEVICE)
            logits = self._forward(nxt, pos, self.context + t + 1)
            if keep:
                seen.append(logits.float())
            nxt = logits.argmax(-1, keepdim=True)
        self.cache.crop(-self.steps)
        return seen


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.mark.parametrize("context", W["contexts"])
@pytest.mark.parametrize("impl", list(CACHES))
def test_decode_at_long_context(benchmark, peaks, model, impl, context):
    run = Decode(model, impl, context)
    ref = Decode(model, "dynamic", context) if impl != "dynamic" else None
    if ref is not None:  # correctness first: the same logits at every step, read through either cache
        got, want = run.run(keep=True), ref.run(keep=True)
        for t, (a, b) in enumerate(zip(got, want)):
            U.check(f"step {t} logits", a, b, U.DTYPE)
            if U.DTYPE == torch.float32:
                assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {t}: another token"
        del ref
    rows, steps = W["rows"], W["steps"]
    cfg = model.config
    elem = torch.finfo(U.DTYPE).bits // 8
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem  # bytes per row and token
    mean_len = context + (steps + 1) / 2
    P = linear_params(model)
    attn_flops = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * mean_len  # per row and step
    workload = f"kvcache-decode-R{rows}-L{context}-T{steps}"
    extra = U.run(benchmark, workload=workload, impl=impl, fn=run.run, flops=rows * steps * (2 * P + attn_flops),
                  nbytes=steps * (P * elem + rows * kv_token * mean_len), tokens=rows * steps, peaks=peaks,
                  cpu_rounds=3,
                  info=dict(op="kvcache", phase="decode", rows=rows, context=context, steps=steps,
                            cache=type(run.cache).__name__, kv_cache_gb=rows * kv_token * context / 1e9,
                            copied_gb_per_step=2 * rows * kv_token * mean_len / 1e9,
                            model=f"{CFG['model']['num_hidden_layers']} layers"))
    extra["ms_per_step"] = extra["time_ms"] / steps
