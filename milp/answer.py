"""``python -m milp.answer``: ask the personalized model of a finished ``milp.train`` run.

Each user is answered with their own memory adapters (loaded on demand from the run's
``users/`` directory through a :class:`~milp.store.UserStore`, so any number of users fit the
run's slots) and the run's shared instruction adapter, the way the run's evaluation answered
its test users: the same model, dtype, prompt and greedy decoding. Queries of many users are
answered in mixed-user batches: one ``generate`` per batch (``--batching static``, the default), or
continuous batching (``--batching continuous``: a query takes the row of one whose answer ended,
fewer steps where answer lengths vary widely; the same answers).

    python -m milp.answer runs/milp --user meddia-d3-0294 "I have had a headache for three days. What should I do?"
    python -m milp.answer runs/milp --queries queries.jsonl --output answers.jsonl

``queries.jsonl``: one ``{"user_id": ..., "query": ...}`` per line (other fields are
ignored, so a dataset file works too). Answers are printed, or written as JSONL rows
``{"user_id", "query", "answer", "finish_reason", "prompt_tokens", "new_tokens"}`` to
``--output`` (atomically); with ``--logprobs K`` each row also holds its tokens as
``{"token": id, "logprob", "top": [[id, logprob], ...]}`` (:attr:`milp.pipeline.Answer.logprobs`).

Sampled answers instead of greedy ones: ``--temperature T`` (> 0), with ``--top-k``, ``--top-p``,
``--min-p`` as ``generate`` takes them, and ``--seed N``: each query samples with its own
generator seeded ``N`` (:mod:`milp.sampling`), so a query gets the same answer again whatever it
is asked with. Without ``--seed`` one is drawn and printed to stderr (and written with each row).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pipeline import Answer
    from .sampling import Sampling

__all__ = ["answer", "build_parser", "check_run", "load_run", "main"]

_PLACEHOLDER = "-"  # Record needs a history and a response; the MiLP prompt is the query alone


def build_parser() -> argparse.ArgumentParser:
    from .sampling import MAX_TOP_LOGPROBS

    p = argparse.ArgumentParser(prog="python -m milp.answer",
                                description="Ask the personalized model of a finished milp.train run.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("run", metavar="RUN", help="output directory of a finished `python -m milp.train` run")
    p.add_argument("queries", nargs="*", metavar="QUERY", help="questions for --user")
    p.add_argument("--user", default=None, help="the user who asks the QUERY arguments")
    p.add_argument("--queries", dest="queries_file", default=None, metavar="FILE",
                   help="JSONL file of {\"user_id\", \"query\"} rows to answer (instead of --user QUERY...)")
    p.add_argument("--output", default=None, metavar="FILE", help="write JSONL answers here instead of printing")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer length (default: the run's)")
    p.add_argument("--batch-size", type=int, default=None, help="queries per batch (default: the run's)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--batching", choices=("auto", "continuous", "static"), default="static",
                   help="static (default): one generate per batch, run to its longest answer; continuous: a query "
                        "takes the row of one whose answer ended (the same answers; fewer steps where answer "
                        "lengths vary widely, one more forward per query joining); auto: continuous where the "
                        "model allows it")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end an answer at this text, which is not part of it (repeatable)")
    p.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="with --output: each answer's tokens (ids of the run's tokenizer) with their "
                        f"log-probabilities and K alternatives (0 to {MAX_TOP_LOGPROBS})")
    g = p.add_argument_group("sampling (default: greedy, as the run's evaluation)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sample the answers at this temperature (> 0; default 0: greedy)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely tokens")
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample among the most likely tokens whose probabilities sum to P (nucleus)")
    g.add_argument("--min-p", type=float, default=None, metavar="P",
                   help="drop tokens less likely than P times the most likely one")
    g.add_argument("--seed", type=int, default=None, metavar="N",
                   help="each query's generator seed: the same answers again (default: one drawn, printed)")
    return p


def _sampling(args: argparse.Namespace) -> Sampling | None:
    """The command's sampling, its seed drawn where ``--seed`` is not given (``None``: greedy)."""
    from .sampling import Sampling

    given = {k: getattr(args, k) for k in ("top_k", "top_p", "min_p", "seed") if getattr(args, k) is not None}
    if args.temperature == 0:
        if given:
            raise _fail(f"--{next(iter(given)).replace('_', '-')} shapes sampled answers: give --temperature > 0 "
                        "too (without it the answers are greedy)")
        return None
    try:
        return Sampling(args.temperature, **given).resolved()
    except ValueError as e:
        raise _fail(f"--{str(e).replace('_', '-')}") from None


def _fail(msg: str) -> SystemExit:
    return SystemExit(f"milp.answer: {msg}")


def _check_output(path: str) -> None:
    """Refuse, before the model is loaded, an ``--output`` the answers could not be written to
    (they used to be lost once all were generated)."""
    from .train import _outside_files

    p = Path(path)
    if not path.strip():
        raise _fail(f"--output: expected a file path, got {path!r}")
    if p.is_dir():
        raise _fail(f"--output: {path!r} is a directory; expected a file path")
    _outside_files(p, "--output", "milp.answer")


def _read_queries(path: str) -> list[tuple[str, str]]:
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise _fail(f"--queries: cannot read {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise _fail(f"--queries: {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(f"{path}:{no}: not JSON ({e.msg})") from None
        user, query = (obj.get("user_id"), obj.get("query")) if isinstance(obj, dict) else (None, None)
        if not isinstance(user, str) or not user.strip() or not isinstance(query, str) or not query.strip():
            raise _fail(f"{path}:{no}: needs non-empty string fields \"user_id\" and \"query\"")
        rows.append((user, query))
    if not rows:
        raise _fail(f"--queries: {path!r} holds no queries")
    return rows


def _run_settings(run: Path, prog: str = "milp.answer") -> tuple[dict[str, Any], str | None]:
    """The settings of the ``milp.train`` run in ``run`` (its ``run.json``; a flag added since
    reads as its default, which is what ran) and the dtype it ran in (``None`` for a run.json
    from before the dtype was recorded); refused by name when the file is damaged."""
    from .train import _read_run_file, _settings, build_parser

    ran = _read_run_file(run / "run.json", prog)
    settings, dtype = ran["settings"], ran.get("dtype")
    return {**_settings(build_parser().parse_args([])), **settings}, dtype


def check_run(run: Path, prog: str = "milp.answer") -> dict[str, Any]:
    """The settings of the finished ``milp.train`` run in ``run``, refused by name (``SystemExit``
    starting with ``prog``) where there is no run, no user, or an unfinished instruction tuning
    (its answers would lack the run's shared adapter)."""
    return _checked_run(run, prog)[0]


def _checked_run(run: Path, prog: str) -> tuple[dict[str, Any], str | None]:
    """:func:`check_run`'s settings and the dtype the run ran in (one read of ``run.json``)."""
    if not (run / "run.json").is_file():
        raise SystemExit(f"{prog}: {str(run)!r} is not a milp.train output directory (no run.json)")
    if not (run / "users").is_dir():
        raise SystemExit(f"{prog}: {str(run)!r} has no users/ directory: the run has not injected any user yet")
    settings, ran_dtype = _run_settings(run, prog)
    if settings["instruct_steps"] and not ((run / "instruction.json").is_file()
                                           and (run / "instruction_adapter.safetensors").is_file()):
        raise SystemExit(f"{prog}: {str(run)!r} has not finished instruction tuning (no instruction.json): its "
                         "answers would lack the run's shared adapter; finish the run first (its own python -m "
                         "milp.train command)")
    return settings, ran_dtype


def load_run(run: Path, device: str = "auto", prog: str = "milp.answer") -> tuple[Any, Any, Any, dict[str, Any]]:
    """``(model, tokenizer, runtime, settings)`` of the finished run in ``run``, as its evaluation
    answered: the run's model in the dtype it ran in, its shared instruction adapter, and a
    :class:`~milp.runtime.MilpRuntime` of the run's ``--slots`` serving ``users/`` through a
    :class:`~milp.store.UserStore`."""
    from .models import load_model
    from .runtime import MilpRuntime
    from .store import UserStore
    from .train import _dtype, _resolve_device, run_instruction_adapter

    settings, ran_dtype = _checked_run(run, prog)
    dev = _resolve_device(device, prog)
    # the dtype the run ran in: --dtype auto follows the device, which may differ here
    dtype = ran_dtype if ran_dtype is not None else _dtype(argparse.Namespace(**settings), dev)
    model, tok = load_model(settings.get("model"), dtype=dtype, device=dev)
    adapter_file = run / "instruction_adapter.safetensors"
    if adapter_file.is_file():
        run_instruction_adapter(model, settings["instruct_rank"], settings["seed"], dev, adapter_file)
    return model, tok, MilpRuntime(model, max_users=settings["slots"], store=UserStore(run / "users")), settings


def answer(run: str | Path, queries: Sequence[tuple[str, str]], *, max_new_tokens: int | None = None,
           batch_size: int | None = None, device: str = "auto", progress: bool = True,
           stream: Callable[[int, str], None] | None = None, sampling: Sampling | None = None,
           batching: str = "static", stop_strings: Sequence[str] | None = None,
           logprobs: int | None = None) -> list[Answer]:
    """Answers to ``(user_id, query)`` pairs with the personalized model of the run in ``run``,
    in order (each a :class:`milp.pipeline.Answer`: its text, its token counts, why it ended).
    Any number of distinct users: they are answered the run's ``--slots`` users at a time (a
    generation batch may name at most that many), loaded from the run's store.
    ``max_new_tokens`` / ``batch_size``: ``None`` for the run's. ``stream(i, text)``: query
    ``i``'s answer so far as it is generated (:func:`milp.pipeline.generate_responses`).
    ``sampling``: sample every answer so (:class:`milp.sampling.Sampling`; each query with its
    own generator, seeded by its seed, or by one drawn per query where it has none); ``None``: greedy.
    ``batching``: as :func:`milp.pipeline.generate_responses` takes it (the answers are the
    same either way). ``stop_strings``: texts that end every answer, which is its text before
    the first of them. ``logprobs``: every answer's :attr:`~milp.pipeline.Answer.logprobs` hold
    its tokens' log-probabilities with this many alternatives (0 to 20); ``None``: none.

    Raises ``ValueError`` for a query that is not a pair of non-empty strings or a count that
    is not an int >= 1; ``SystemExit`` (a message) for a run directory without a finished run or
    a user the run does not hold.

    Example:
        >>> answer("runs/milp", [("meddia-d2-0001", "What should I eat?")])  # doctest: +SKIP
        ['...']
    """
    from .data import Record
    from .pipeline import _stops_per_record, generate_responses
    from .sampling import check_logprobs, row_sampler
    from .store import UserStore

    if isinstance(queries, (str, bytes)) or not isinstance(queries, Sequence):
        raise ValueError(f"queries must be a sequence of (user_id, query) pairs, got {type(queries).__name__}")
    queries = list(queries)
    for i, q in enumerate(queries):
        if not (isinstance(q, (tuple, list)) and len(q) == 2 and all(isinstance(v, str) and v.strip() for v in q)):
            raise ValueError(f"queries[{i}] must be a (user_id, query) pair of non-empty strings, got {q!r}")
    for name, v in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be an int >= 1 (or None for the run's), got {v!r}")
    row_sampler(sampling)  # a TypeError before the model loads
    if batching not in ("auto", "continuous", "static"):
        raise ValueError(f"batching must be 'auto', 'continuous' or 'static', got {batching!r:.40}")
    _stops_per_record(stop_strings, 1)
    check_logprobs(logprobs)
    run = Path(run)
    settings = check_run(run)
    store = UserStore(run / "users")
    known = None
    for user, _ in queries:
        if user not in store:
            known = known if known is not None else sorted(map(str, store.users()))
            raise _fail(f"unknown user {user!r}: the run holds {len(known)} users, e.g. {known[:5]}")
    if not queries:
        return []
    model, tok, rt, settings = load_run(run, device)
    slots = settings["slots"]
    records = [Record(user, "", [_PLACEHOLDER], query, _PLACEHOLDER) for user, query in queries]
    # a generation batch may name at most `slots` distinct users (the runtime refuses more), so
    # the users are answered `slots` at a time, in order of first appearance, each loaded once
    users = list(dict.fromkeys(user for user, _ in queries))
    answers: dict[int, Answer] = {}
    for start in range(0, len(users), slots):
        window = set(users[start:start + slots])
        idx = [i for i, (user, _) in enumerate(queries) if user in window]
        def stream_of(j: int, text: str, idx: list[int] = idx) -> None:  # a window's record j is query idx[j]
            assert stream is not None
            stream(idx[j], text)

        out = generate_responses(model, tok, [records[i] for i in idx], runtime=rt,
                                 max_new_tokens=max_new_tokens or settings["max_new_tokens"],
                                 batch_size=batch_size or settings["eval_batch_size"],
                                 max_length=settings["max_length"] + 128, progress=progress,
                                 stream=stream_of if stream is not None else None, sampling=sampling,
                                 batching=batching, stop_strings=stop_strings, logprobs=logprobs)
        answers.update(zip(idx, out))
    return [answers[i] for i in range(len(queries))]


def main(argv: Sequence[str] | None = None) -> int:
    from .config import atomic_write_text
    from .sampling import MAX_TOP_LOGPROBS

    args = build_parser().parse_intermixed_args(argv)
    if not args.run.strip():
        raise _fail(f"RUN: expected the output directory of a milp.train run, got {args.run!r}")
    if args.user is not None and not args.user.strip():
        raise _fail(f"--user: expected a user id, got {args.user!r}")
    if args.output is not None:
        _check_output(args.output)
    if args.queries_file is not None:
        if args.queries or args.user is not None:
            raise _fail("give either --queries FILE or --user with QUERY arguments, not both")
        queries = _read_queries(args.queries_file)
    else:
        if args.user is None or not args.queries:
            raise _fail("give --user USER and at least one QUERY (or --queries FILE)")
        queries = [(args.user, q) for q in args.queries]
        if any(not q.strip() for q in args.queries):
            raise _fail("each QUERY must be non-empty text")
    for name in ("max_new_tokens", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise _fail(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.stop is not None and not all(args.stop):
        raise _fail("--stop must be a non-empty text")
    if args.logprobs is not None and (args.output is None or not 0 <= args.logprobs <= MAX_TOP_LOGPROBS):
        raise _fail(f"--logprobs must be an int in [0, {MAX_TOP_LOGPROBS}] and comes with --output (the JSONL holds "
                    f"them), got {args.logprobs}" + ("" if args.output is not None else " without --output"))
    sampling = _sampling(args)
    if sampling is not None and args.seed is None:
        print(f"milp.answer: sampled with --seed {sampling.seed} (give it to get these answers again)", file=sys.stderr)
    # one printed answer comes as it is generated (the same text in the end); several would
    # interleave, so they are printed once all are made
    streamed = args.output is None and len(queries) == 1
    shown = [""]

    def show(_: int, text: str) -> None:
        if shown[0] == "":
            print(_printed(*queries[0], ""), end="", flush=True)
        print(text[len(shown[0]):], end="", flush=True)
        shown[0] = text

    try:
        answers = answer(args.run, queries, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         device=args.device, progress=args.progress and not streamed,
                         stream=show if streamed else None, sampling=sampling, batching=args.batching,
                         stop_strings=args.stop, logprobs=args.logprobs)
        rows = [{"user_id": u, "query": q, "answer": a} for (u, q), a in zip(queries, answers)]
        details = [{"finish_reason": a.finish_reason, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
                    **({"logprobs": [{"token": e.token, "logprob": e.logprob, "top": [list(t) for t in e.top]}
                                     for e in a.logprobs]} if a.logprobs is not None else {})} for a in answers]
        lines = [{**r, **({"seed": sampling.seed} if sampling is not None else {}), **d} for r, d in zip(rows, details)]
        if args.output is not None:
            atomic_write_text(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    except (OSError, ValueError) as e:  # a model that is gone or unreadable, a folder that cannot be written
        print(f"milp.answer: error: {e}", file=sys.stderr)
        return 2
    if args.output is not None:
        print(f"milp.answer: {len(rows)} answers -> {args.output}")
    elif streamed and shown[0]:
        a = rows[0]["answer"]  # the stream hands it all (nothing left), unless a tokenizer re-spelled it
        print((a[len(shown[0]):] if a.startswith(shown[0]) else f"\n-> {a}") + "\n")
    else:
        for r in rows:
            print(_printed(r["user_id"], r["query"], r["answer"]) + "\n")
    return 0


def _printed(user: str, query: str, answer: str) -> str:
    """How a printed answer reads (a streamed one: its first part, ``answer=""``, then the pieces)."""
    return f"[{user}] {query}\n-> {answer}"


if __name__ == "__main__":
    sys.exit(main())
