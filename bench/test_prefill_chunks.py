"""Chunked prefill: what a long prompt that joins a running batch costs the rows already running.

:class:`milp.decode.ContinuousBatch` prefills a joining prompt in the step after it joins, after
the running rows' decode: whole (``whole``, ``prefill_chunk=None``), the running rows wait for
the whole prefill before their next token; in chunks (``milp``, ``prefill_chunk=CHUNK``, what
``milp.serve --prefill-chunk`` sets), each step runs the decode and one chunk, so the running rows
wait a chunk's time per step, and the new row gets its first token later. Workload: R rows of
short prompts decoding (each its own user of ``bench/test_runtime.py``'s decode users, the
searched size), then one prompt of P tokens joins; the steps run until the new row has its
first token and N more steps.

Sizes (``MILP_BENCH_SIZE``): ``small`` (CPU default) the 2-layer hidden-128 LLaMA, R = 8,
P = 448, CHUNK = 64, fp32; ``full`` (CUDA default) the TinyLlama-1.1B-shaped model in bf16,
R = 32, P = 1920, CHUNK = 256.

Correctness first: every row's tokens are the same both ways, as far as both went (fp32; in
bf16, where the chunked prefill's rounding differs from the whole one's, the running rows' first
tokens). Figures: ``time_ms`` (all the steps), ``max_step_ms`` and ``median_step_ms``
(the running rows' inter-token latency over the steps from the join to the new row's first
token: what chunking bounds), ``ttft_ms`` (the new row's time to its first token: what it pays),
``steps_to_first_token``.
"""
from __future__ import annotations

import statistics
import time

import _util as U
import pytest
import torch
from test_runtime import CFG, build_model, linear_params
from test_runtime import runtime as make_runtime

from milp.decode import ContinuousBatch

pytestmark = U.PYTESTMARK

SIZES = {"small": dict(rows=8, prompt=448, chunk=64, after=4), "full": dict(rows=32, prompt=1920, chunk=256, after=8)}
W = SIZES["full" if U.SIZE == "full" else "small"]
IMPLS = {"whole": None, "milp": W["chunk"]}


@pytest.fixture(scope="module")
def rt():
    model = build_model()
    return make_runtime(model, W["rows"], decode=True)


def scenario(rt, chunk: int | None, timed: bool = False) -> tuple[dict, list[float], float, int]:
    """Run the workload: each row's tokens, the step times (s) from the join to the long row's
    first token, the time to that token (s), and the steps it took."""
    vocab = rt.model.config.vocab_size
    g = torch.Generator().manual_seed(9)
    batch = ContinuousBatch(rt.model, runtime=rt, eos_token_id=[], pad_token_id=0, max_rows=W["rows"] + 1,
                            prefill_chunk=chunk)
    for i in range(W["rows"]):
        batch.join(i, torch.randint(3, vocab, (8,), generator=g).tolist(), 10_000, i)
    tokens: dict = {}
    tokens.update((u.key, u.tokens) for u in batch.step())
    long = torch.randint(3, vocab, (W["prompt"],), generator=g).tolist()
    batch.join("long", long, W["after"] + 1, 0)
    steps: list[float] = []
    t0 = time.perf_counter()
    while "long" not in tokens:
        s = time.perf_counter()
        tokens.update((u.key, u.tokens) for u in batch.step())
        if timed and U.CUDA:
            torch.cuda.synchronize()
        steps.append(time.perf_counter() - s)
    ttft = time.perf_counter() - t0
    for _ in range(W["after"]):
        tokens.update((u.key, u.tokens) for u in batch.step())
    batch.close()
    return tokens, steps, ttft, len(steps)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_long_prompt_joining_running_rows(benchmark, peaks, rt, impl):
    chunk = IMPLS[impl]
    got, *_ = scenario(rt, chunk)
    if chunk is not None:  # correctness first: the tokens of the whole prefill
        want, *_ = scenario(rt, None)
        if U.DTYPE == torch.float32:  # the running rows ran more steps chunked: the same tokens as far as both went
            assert got["long"] == want["long"]
            assert all(got[i][:len(want[i])] == want[i] for i in range(W["rows"]))
        else:  # bf16: rounding may flip a near tie over the steps; the running rows' first tokens agree
            assert all(got[i][:1] == want[i][:1] for i in range(W["rows"]))
    _, steps, ttft, n = scenario(rt, chunk, timed=True)
    P = linear_params(rt.model)
    elem = torch.finfo(U.DTYPE).bits // 8
    total_steps = n + W["after"] + 1
    tokens = W["rows"] * total_steps + W["prompt"]
    U.run(benchmark, workload=f"prefill-chunks-R{W['rows']}-P{W['prompt']}", impl=impl,
          fn=lambda: scenario(rt, chunk), flops=2 * P * tokens, nbytes=elem * P * (total_steps + n),
          tokens=tokens, peaks=peaks, cpu_rounds=3,
          info=dict(op="serve", phase="prefill+decode", rows=W["rows"], prompt=W["prompt"], prefill_chunk=chunk,
                    max_step_ms=max(steps) * 1e3, median_step_ms=statistics.median(steps) * 1e3,
                    ttft_ms=ttft * 1e3, steps_to_first_token=n, model=f"{CFG['model']['num_hidden_layers']} layers"))
