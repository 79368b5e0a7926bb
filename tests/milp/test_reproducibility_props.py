"""Results reproduce from the seed: the same outputs, bit for bit on CPU, whatever the process's
hash seed (``PYTHONHASHSEED``), the order of the data file's lines, or how many times a process
saved a user.

Each "Was:" names what a test caught before its fix. What held without a fix (store indexes,
``user_dirname``, ``split_users``/``select_users`` with str ids under any hash seed, the seeded
bootstrap and permutation tests, Sobol and BO proposals from a seed, two pipelines in one
process against two processes, ``--seeds`` order in ``milp.evaluate``'s numbers) is not repeated
here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from run_outputs import run_outputs  # tests/milp is on sys.path (pytest's rootdir-relative import)
from safetensors import safe_open
from safetensors.torch import load

import milp.evaluate as ev
import milp.train as train
from milp.config import MemoryConfig, _safetensors_bytes
from milp.data import Record, write_jsonl
from milp.inject import tiny_model
from milp.pipeline import memory_inject
from milp.runtime import ADAPTERS_FILE, MilpRuntime

#: a small, fast run (its 5 training users fit in one instruction-tuning batch)
TINY = ["--users", "7", "--memory-steps", "1", "--instruct-steps", "2", "--max-new-tokens", "2",
        "--max-length", "64", "--no-progress"]


# --------------------------------------------------------------------------- safetensors bytes
def test_a_user_saved_again_has_the_same_bytes(tmp_path):
    """Was: ``adapters.safetensors`` took its metadata (``format``, ``user``) in the order of a
    Rust hash map drawn anew for each save, so saving the same user twice, in one process or in
    two runs of the same command, wrote files with other bytes (other checksums)."""
    rt = MilpRuntime(tiny_model("llama"), max_users=1)
    rt.add_user("u", MemoryConfig.uniform(2, 1, 4), init="random", seed=0)
    files = [(rt.save_user("u", tmp_path / f"u{i}", include_optimizer=False) / ADAPTERS_FILE).read_bytes()
             for i in range(10)]
    assert all(f == files[0] for f in files)
    with safe_open(str(tmp_path / "u0" / ADAPTERS_FILE), "pt") as f:
        assert f.metadata() == {"format": "milp.user/1", "user": "u"}
    back = MilpRuntime(tiny_model("llama"), max_users=1)
    back.load_user(tmp_path / "u0", load_optimizer=False)
    assert {k: v.tolist() for k, v in back.adapter_state("u").items()} == \
        {k: v.tolist() for k, v in rt.adapter_state("u").items()}


_text = st.text(st.characters(codec="utf-8"), max_size=6)


@settings(max_examples=30, deadline=None)
@given(meta=st.dictionaries(_text, _text, max_size=5), data=st.data(),
       shapes=st.lists(st.lists(st.integers(0, 3), max_size=2), min_size=1, max_size=3))
def test_safetensors_bytes_are_a_function_of_the_contents(meta, data, shapes):
    """The same tensors and metadata, in any insertion order, give the same bytes, which load back
    to them (any text in the metadata; empty tensors; data still 8-byte aligned)."""
    tensors = {f"t{i}": torch.arange(float(torch.Size(s).numel())).reshape(s).to(dt)
               for i, (s, dt) in enumerate(zip(shapes, [torch.float32, torch.float64, torch.int8]))}
    got = _safetensors_bytes(tensors, meta or None)
    shuffled = dict(data.draw(st.permutations(list(meta.items()))))
    assert _safetensors_bytes(dict(reversed(list(tensors.items()))), shuffled or None) == got
    assert int.from_bytes(got[:8], "little") % 8 == 0
    back = load(got)
    assert {k: (v.dtype, v.tolist()) for k, v in back.items()} == {k: (v.dtype, v.tolist()) for k, v in tensors.items()}
    header = json.loads(got[8 : 8 + int.from_bytes(got[:8], "little")])
    assert header.get("__metadata__", {}) == meta


def _bytes_of(out: Path) -> dict[str, bytes]:
    """Every file of a run by its bytes, but the files that hold timings or the output's path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("run.json", "metrics.json", "results.md")}


def test_runs_under_other_hash_seeds_write_the_same_bytes(tiny_checkpoint, tmp_path):
    """Two processes with other ``PYTHONHASHSEED``s (str hashes, set orders) run the same command
    to the same files, byte for byte (timings aside). Was: every user's ``adapters.safetensors``
    differed in its header (see above)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for h in ("0", "1"):
        cmd = [sys.executable, "-m", "milp.train", "--model", str(tiny_checkpoint), "--output",
               str(tmp_path / f"h{h}"), *TINY]
        procs.append(subprocess.Popen(cmd, env={**env, "PYTHONHASHSEED": h}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    a, b = _bytes_of(tmp_path / "h0"), _bytes_of(tmp_path / "h1")
    assert sorted(a) == sorted(b) and any(k.endswith(ADAPTERS_FILE) for k in a)
    assert [k for k in a if a[k] != b[k]] == []
    assert run_outputs(tmp_path / "h0") == run_outputs(tmp_path / "h1")


# --------------------------------------------------------------------------- the data's line order
def _records() -> list[Record]:
    """8 users (one with two records, asked in this order), in no user-id order."""
    recs = [Record(f"user-{i}", f"likes {i}", [f"I had pain number {i}.", f"It got worse on day {i}."],
                   f"What should I do about pain {i}?", f"Rest and drink water, {i}.")
            for i in (3, 7, 0, 5, 1, 6, 2, 4)]
    recs.append(Record("user-5", "likes 5", ["I had pain number 5."], "And my knee?", "See a doctor."))
    return recs


def test_a_run_does_not_depend_on_the_order_of_the_data_lines(tiny_checkpoint, tmp_path):
    """The same records in another line order (a user's own records in their order) give the
    same run. Was: the split kept the file's order, so instruction tuning's seeded shuffle (by
    position) drew other batches, the search took other validation and fallback users, and
    the scores summed in another order: another instruction adapter and losses."""
    recs = _records()
    data = tmp_path / "d.jsonl"
    outs = []
    for i, order in enumerate([recs, [*reversed(recs[:-1]), recs[-1]]]):
        write_jsonl(order, data)  # one path: the runs differ by the lines' order alone
        outs.append(tmp_path / f"run{i}")
        assert train.main(["--model", str(tiny_checkpoint), "--data", str(data), "--output", str(outs[-1]),
                           *TINY]) == 0
    assert run_outputs(outs[0]) == run_outputs(outs[1])


def test_the_comparison_splits_do_not_depend_on_the_order_of_the_data_lines(tmp_path):
    """``milp.evaluate``'s per-seed splits (what its baselines tune on and are scored on) hold
    the records in user-id order, as ``milp.train`` does. Was: in the file's order."""
    recs = _records()
    args = ev.build_parser().parse_args(["--users", "7"])
    for seed in (0, 1):
        a = ev._Seed(args, seed, recs, tmp_path).split
        b = ev._Seed(args, seed, [*reversed(recs[:-1]), recs[-1]], tmp_path).split
        assert a == b
        assert [r.user_id for r in a["train"]] == sorted(r.user_id for r in a["train"])
        assert [r.query for r in a["train"] + a["val"] + a["test"] if r.user_id == "user-5"] in (
            [], ["What should I do about pain 5?", "And my knee?"])


# --------------------------------------------------------------------------- memory_inject's history
@settings(max_examples=12, deadline=None)
@given(users=st.lists(st.text("abcdefghij-0123456789", min_size=1, max_size=8), min_size=2, max_size=7,
                      unique=True))
def test_memory_inject_lists_skipped_users_in_the_records_order(users):
    """Users whose configuration has no adapter are skipped, in the history in the records' order.
    Was: in the order of a set of str ids, which changes with ``PYTHONHASHSEED`` (a caller
    writing the history out wrote another file in every process)."""
    rt = MilpRuntime(tiny_model("llama"), max_users=len(users))
    for u in users:
        rt.add_user(u, MemoryConfig.uniform(2, 0, 4))
    recs = [Record(u, "", ["h"], "q", "r") for u in users for _ in range(2)]
    assert list(memory_inject(rt, recs, None, steps=1, progress=False).items()) == [(u, []) for u in users]
