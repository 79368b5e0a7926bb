"""Continuous batching against static batching, on answers of different lengths.

What ``python -m milp.serve`` runs: :class:`milp.decode.ContinuousBatch` (``milp``: a request
joins the running rows as soon as one ends, and leaves at its own last token) against one
``generate`` per batch of requests (``static``: the batch runs to its longest answer, ended rows
keep their place; what ``milp.serve --batching static`` and ``milp.answer`` do). Both through
the multi-user runtime, every request with its own user's adapters. ``milp-sampled``: the
continuous batch with every request sampled (temperature 0.8, top-p 0.95, its own seed;
:mod:`milp.sampling`) instead of greedy: its ``ratio_vs_milp`` is what choosing tokens by
sampling costs (a sort and a cumulative sum over the vocabulary per row and step).
``milp-logprobs``: greedy, every token with its logprob and 5 alternatives
(``join(logprobs=5)``, what OpenAI's ``logprobs``/``top_logprobs`` ask): its ``ratio_vs_milp`` is
their cost (a log-softmax and a top-k over the vocabulary per row and step, and a second copy
to the host per step).

Workload: R requests queued at once (a loaded server), each of a user cycling over the decode
users of ``bench/test_runtime.py`` (the searched size: 2 modules of rank 8 on 60% of the
layers); prompts of 4–16 tokens (``full``: 16–64) and answers of N_i tokens drawn long-tailed
between 4 and 32 (``full``: 4–48), as chat answers are (most short, a few long); B rows at
once. Sizes (``MILP_BENCH_SIZE``): ``small`` (CPU default) the 2-layer hidden-128 LLaMA of
``test_runtime.py``, R = 24, B = 8, fp32 on CPU; ``full`` (CUDA default) its
TinyLlama-1.1B-shaped model in bf16, R = 32, B = 8 (about a minute on an H100: every repetition
answers the whole queue).

``tokens`` counts the answers' tokens (Σ N_i); ``steps`` the forward passes each
implementation made (static: Σ over batches of the longest answer; continuous: one per step, the
prefills of rows that joined inside the step they joined at); ``row_occupancy`` the share of the
rows of those steps that produced an answer token; ``mean_latency_steps`` and
``p90_latency_steps`` when the requests had their answers, counted in those steps (static: at the
end of their batch's ``generate``; continuous: at their own last token). FLOPs ``2·P·(Σ prompt + Σ N_i)`` and bytes (the
weights read once per step) are approximate, as in ``test_runtime.py``. Correctness first: each
answer of both equals the same request generated alone (fp32, small model); a sampled one, the
request sampled alone with its seed by ``generate`` (through :mod:`milp.sampling`'s processor).
"""
from __future__ import annotations

from typing import Any

import _util as U
import pytest
import torch
from test_runtime import CFG, build_model, compile_args, first_run, linear_params
from test_runtime import runtime as make_runtime
from transformers import LogitsProcessorList

from milp import pad_sequences
from milp.decode import ContinuousBatch
from milp.pipeline import _sample_rows
from milp.sampling import Sampling, row_sampler

pytestmark = U.PYTESTMARK

SIZES = {"small": dict(requests=24, rows=8, users=8, prompt=(4, 16), answer=(4, 32)),
         "full": dict(requests=32, rows=8, users=8, prompt=(16, 64), answer=(4, 48))}
W = SIZES["full" if U.SIZE == "full" else "small"]


def workload(requests: int, users: int, prompt: tuple[int, int], answer: tuple[int, int], vocab: int
             ) -> list[tuple[list[int], int, int]]:
    """``(prompt ids, answer length, user)`` per request, drawn once (seeded): answer lengths
    log-uniform squared between ``answer`` (most short, a long tail)."""
    g = torch.Generator().manual_seed(5)
    lo, hi = answer
    out = []
    for i in range(requests):
        n = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=g))
        u = float(torch.rand(1, generator=g))
        length = max(lo, min(hi, round(lo * (hi / lo) ** (u * u))))
        out.append((torch.randint(3, vocab, (n,), generator=g).tolist(), length, i % users))
    return out


def run_static(rt, reqs, rows: int) -> tuple[list[list[int]], int, list[int]]:
    """One ``generate`` per batch of ``rows`` requests in order, to the batch's longest answer:
    each request's tokens (cut to its length), the forward passes made, and the pass after which
    each request had its answer (its batch's last: ``generate`` returns them all at once)."""
    answers, steps, done = [], 0, []
    for s in range(0, len(reqs), rows):
        batch = reqs[s:s + rows]
        ids, mask = pad_sequences([p for p, _, _ in batch], 0, side="left", device=rt.model.device)
        longest = max(n for _, n, _ in batch)
        out = rt.generate(ids, [u for _, _, u in batch], attention_mask=mask, max_new_tokens=longest,
                          min_new_tokens=longest, do_sample=False, pad_token_id=0)
        answers += [row[ids.shape[1]:ids.shape[1] + n] for row, (_, n, _) in zip(out.tolist(), batch)]
        steps += longest
        done += [steps] * len(batch)
    return answers, steps, done


def sampling(i: int) -> Sampling:
    """How ``milp-sampled`` samples request ``i``."""
    return Sampling(0.8, top_p=0.95, seed=1000 + i)


LOGPROBS = 5  # the alternatives milp-logprobs asks for per token


def continuous_batch(rt, reqs, rows: int, static: bool = False, compile: Any = False) -> ContinuousBatch:
    """An empty :class:`ContinuousBatch` of ``rows`` rows for ``reqs`` (rows end at their length):
    with ``static``, a static cache of :func:`max_length` columns; ``compile``: its decode step
    compiled with these ``torch.compile`` arguments (a static cache too)."""
    return ContinuousBatch(rt.model, eos_token_id=[], pad_token_id=0, runtime=rt, max_rows=rows,
                           max_length=max_length(reqs) if static or compile else None, compile=compile)


def run_continuous(rt, reqs, rows: int, sampled: bool = False, logprobs: int | None = None,
                   batch: ContinuousBatch | None = None) -> tuple[list[list[int]], int, list[int]]:
    """The same requests through a :class:`ContinuousBatch` of ``rows`` rows, each joining as a
    row ends (``sampled``: each with :func:`sampling`; ``logprobs``: each token's logprob with that
    many alternatives, checked to name the token; ``batch``: this one, empty, instead of a new one
    of :func:`continuous_batch`): each request's tokens, the steps made, and the step after which
    each had its answer."""
    if batch is None:
        batch = continuous_batch(rt, reqs, rows)
    answers: dict[int, list[int]] = {}
    done: dict[int, int] = {}
    queue, steps = list(range(len(reqs))), 0
    while queue or len(batch):
        while queue and batch.can_join(reqs[queue[0]][2]):
            i = queue.pop(0)
            batch.join(i, reqs[i][0], reqs[i][1], reqs[i][2], sampling=sampling(i) if sampled else None,
                       logprobs=logprobs)
        steps += 1
        for u in batch.step():
            assert u.error is None, u.error
            assert logprobs is None or (u.logprob.token == u.tokens[-1] and len(u.logprob.top) == logprobs)
            if u.done:
                answers[int(u.key)], done[int(u.key)] = u.tokens, steps
    return [answers[i] for i in range(len(reqs))], steps, [done[i] for i in range(len(reqs))]


def test_continuous_correctness():
    """Correctness first: both implementations give every request the tokens it gets alone
    (fp32, the small model)."""
    model = build_model(torch.float32, num_hidden_layers=2, hidden_size=128, intermediate_size=352,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
    rt = make_runtime(model, W["users"], decode=True)
    reqs = workload(12, W["users"], (4, 16), (2, 12), model.config.vocab_size)
    static, _, _ = run_static(rt, reqs, 4)
    cont, _, _ = run_continuous(rt, reqs, 4)
    sampled, _, _ = run_continuous(rt, reqs, 4, sampled=True)
    assert run_continuous(rt, reqs, 4, batch=continuous_batch(rt, reqs, 4, static=True))[0] == cont  # static, eager
    compiled = continuous_batch(rt, reqs, 4, compile=compile_args())
    assert run_continuous(rt, reqs, 4, batch=compiled)[0] == cont  # ... and its step compiled
    assert run_continuous(rt, reqs, 4, logprobs=LOGPROBS)[0] == cont  # logprobs change no token
    for i, (p, n, u) in enumerate(reqs):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        ids = torch.tensor([p], device=model.device)
        alone = rt.generate(ids, [u], **kw)[0, len(p):].tolist()
        assert static[i] == alone, f"request {i}: static batching"
        assert cont[i] == alone, f"request {i}: continuous batching"
        processor = LogitsProcessorList([_sample_rows([row_sampler(sampling(i))])])
        assert sampled[i] == rt.generate(ids, [u], logits_processor=processor, **kw)[0, len(p):].tolist(), \
            f"request {i}: sampled in the continuous batch"
    assert sampled != cont  # it samples


def max_length(reqs) -> int:
    """The static cache's columns for ``reqs``: the longest prompt plus answer, rounded up to 64."""
    return -(-max(len(p) + n for p, n, _ in reqs) // 64) * 64


@pytest.mark.parametrize("impl", ["static", "milp", "milp-sampled", "milp-logprobs", "milp-static", "milp-compiled"])
def test_continuous_throughput(benchmark, peaks, impl):
    model = build_model()
    rt = make_runtime(model, W["users"], decode=True)
    reqs = workload(W["requests"], W["users"], W["prompt"], W["answer"], model.config.vocab_size)
    rows = W["rows"]
    # milp-static/-compiled: one batch for every repetition (its cache allocated and its step compiled once)
    batch = None if impl in ("static", "milp", "milp-sampled", "milp-logprobs") else continuous_batch(
        rt, reqs, rows, static=True, compile=compile_args() if impl == "milp-compiled" else False)
    fn = (lambda: run_static(rt, reqs, rows)) if impl == "static" else (
        lambda: run_continuous(rt, reqs, rows, sampled=impl == "milp-sampled",
                               logprobs=LOGPROBS if impl == "milp-logprobs" else None, batch=batch))
    compiled = first_run(fn) if impl == "milp-compiled" and U.CUDA else {}
    _, steps, done = fn()
    done = sorted(done)
    tokens = sum(n for _, n, _ in reqs)
    prompt_tokens = sum(len(p) for p, _, _ in reqs)
    elem = torch.finfo(U.DTYPE).bits // 8
    P = linear_params(model)
    workload_name = (f"runtime-continuous-R{W['requests']}-B{rows}-n{W['answer'][0]}-{W['answer'][1]}")
    U.run(benchmark, workload=workload_name, impl=impl, fn=fn, flops=2 * P * (prompt_tokens + tokens),
          nbytes=elem * P * steps, tokens=tokens, peaks=peaks, cpu_rounds=3,
          info=dict(op="serve", phase="decode", requests=W["requests"], rows=rows, users=W["users"], steps=steps,
                    answer_tokens=tokens, prompt_tokens=prompt_tokens, mean_latency_steps=sum(done) / len(done),
                    p90_latency_steps=done[int(0.9 * (len(done) - 1))],
                    row_occupancy=tokens / (steps * rows), model=f"{CFG['model']['num_hidden_layers']} layers",
                    **compiled))
