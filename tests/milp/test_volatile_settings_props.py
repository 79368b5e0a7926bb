"""``milp.train``'s volatile settings (``_VOLATILE``: a run may be resumed with them changed)
change none of a run's results: not the users' adapters, the instruction adapter, the
predictions or the metrics, at most their float rounding (which flips no generated token here).

``--slots`` (users held at once: memory injection trains in other groups, instruction tuning and
evaluation load users in other groupings), ``--eval-batch-size`` (other padding of the greedy
generation batches), ``--on-error`` (on clean data), ``--no-progress``, and all of them changed
on the resumption of a stopped run. Joint training equals training alone to rounding
(tests/milp/test_runtime.py), so adapters are compared to a tolerance; the instruction adapter
is float32 whatever the model's dtype, so it is too. Predictions are compared as strings.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_config  # tests/milp is on sys.path (pytest's rootdir-relative import)
from run_outputs import untimed
from safetensors.torch import load_file

import milp.train as train
from milp.config import MemoryConfig
from milp.data import collate, write_jsonl
from milp.inject import tiny_model
from milp.pipeline import add_instruction_adapter
from milp.runtime import MilpRuntime

#: 10 users -> 7 train / 1 val / 2 test; lrs large enough that the adapters steer generation
FLAGS = ["--users", "10", "--memory-steps", "2", "--instruct-steps", "4", "--batch-size", "4",
         "--memory-lr", "5e-3", "--instruct-lr", "5e-3", "--max-new-tokens", "6", "--max-length", "64",
         "--no-progress"]
#: adapters of float32 runs: trained in other groups, a user's gradients differ in their last
#: bits, which AdamW's first steps turn into update differences of up to ~1e-3 of the lr where a
#: gradient is near zero (B starts at 0; tests/milp/test_runtime.py); 20 users gave 3e-6 at lr 5e-3
ATOL = 1e-5


@pytest.fixture(scope="module")
def ckpt(tiny_chat_tokenizer, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("volatile") / "ckpt"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_tiny_config("llama", len(tiny_chat_tokenizer))).save_pretrained(path)
    tiny_chat_tokenizer.save_pretrained(path)
    return path


def _main(ckpt: Path, out: Path, *extra: str, flags: list[str] = FLAGS) -> Path:
    assert train.main(["--model", str(ckpt), "--output", str(out), *flags, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory) -> Path:
    """The run with the default volatile settings (64 slots, eval batches of 8)."""
    return _main(ckpt, tmp_path_factory.mktemp("volatile") / "ref")


def _close(a: object, b: object, where: str, rel: float = 1e-5) -> None:
    """JSON values equal, floats to a tolerance (losses of the runs' float32 sums: ``rel``)."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), where
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=1e-6), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}", rel)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]", rel)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_results(got: Path, want: Path, atol: float = ATOL, rel: float = 1e-5) -> None:
    """The two runs' outputs: the same files; tensors to ``atol``; predictions (the generated
    text), split, configurations and scores equal; losses to float32 rounding (``rel``)."""
    def listed(d: Path) -> list[str]:
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != "run.json")

    files = listed(want)
    assert listed(got) == files
    for name in files:
        a, b = got / name, want / name
        if name.endswith(".safetensors"):
            x, y = load_file(str(a)), load_file(str(b))
            assert x.keys() == y.keys(), name
            for k in y:
                torch.testing.assert_close(x[k], y[k], atol=atol, rtol=1e-4, msg=f"{name}: {k}")
        elif name.endswith(".json"):
            _close(untimed(json.loads(a.read_text())), untimed(json.loads(b.read_text())), name, rel)
        elif name.endswith(".jsonl"):  # predictions, a search's trial log (timings aside)
            _close([untimed(json.loads(x)) for x in a.read_text().splitlines()],
                   [untimed(json.loads(x)) for x in b.read_text().splitlines()], name, rel)
        elif name.endswith(".png"):
            continue
        else:  # results.md: its scores and losses as printed
            assert [x for x in a.read_text().splitlines() if not x.startswith(("wall time:", "MiLP on"))] == \
                   [x for x in b.read_text().splitlines() if not x.startswith(("wall time:", "MiLP on"))], name
    for name in ("predictions.jsonl", "predictions_base.json"):
        assert (got / name).read_text() == (want / name).read_text(), name


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_fewer_slots_give_the_same_run(ckpt, reference, tmp_path, slots):
    """Regression: instruction tuning ran window by window of ``--slots`` training users, each
    window with its share of the steps and a seed of its own, so with fewer slots than training
    users the instruction adapter (and so the predictions) depended on ``--slots``: with 2 slots
    it differed by ~1e-2 and the predictions by whole tokens. Every step now draws from all
    training users, the runtime loading them from the run's user store, and a step naming more
    users than slots runs in groups whose gradients add up to the step's."""
    got = _main(ckpt, tmp_path / "run", "--slots", str(slots))
    assert_same_results(got, reference)


def test_eval_batch_size_changes_no_prediction(ckpt, tmp_path):
    """Greedy generation of left-padded batches (attention mask, position ids from it) gives each
    prompt the tokens it gets alone: 4 test users' prompts of different lengths, one per batch,
    or in batches of the groups of 3 and 1 users that 3 slots evaluate (the base model's answers
    too, all 4 in one batch)."""
    flags = [*FLAGS, "--users", "20", "--memory-steps", "1", "--instruct-steps", "2"]
    one = _main(ckpt, tmp_path / "one", "--eval-batch-size", "1", flags=flags)
    many = _main(ckpt, tmp_path / "many", "--eval-batch-size", "8", "--slots", "3", flags=flags)
    assert json.loads((one / "metrics.json").read_text())["n_test_users"] == 4
    lengths = {len(json.loads(x)["query"]) for x in (one / "predictions.jsonl").read_text().splitlines()}
    assert len(lengths) > 1  # the batch of 8 was padded
    assert_same_results(many, one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padding_changes_no_logit_of_a_batch_with_the_instruction_adapter(dtype):
    """The logits of a left-padded mixed-user batch through memory and instruction adapters
    equal each row's alone: to float64's rounding in float64 (~1e-16: the batch's matmuls sum in
    another order), to float32's in float32. Regression: the
    instruction adapter cast a float64 model's activations to float32 (its weights' dtype), so in
    float64 the logits depended on the batch's shape in float32's last bits (~1e-8), and generated
    tokens on the padding."""
    model = tiny_model("llama").to(dtype).eval()
    rt = MilpRuntime(model, max_users=3)
    for i, u in enumerate("abc"):
        rt.add_user(u, MemoryConfig.uniform(2, 2, 8), init="random", seed=i)
    adapter = add_instruction_adapter(model, rank=4, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in adapter.lora_B.values():
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    rows = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (9, 3, 6)]
    batch = collate([{"input_ids": r} for r in rows], 0, padding_side="left")
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), rt.using(list("abc")):
        mixed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos).logits
    tol = dict(atol=1e-13, rtol=1e-11) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    for r, (u, row) in enumerate(zip("abc", rows)):
        with torch.no_grad(), rt.using([u]):
            alone = model(input_ids=torch.tensor([row])).logits[0]
        torch.testing.assert_close(mixed[r, -len(row):], alone, **tol, msg=f"row {r}")


def test_the_instruction_adapter_computes_in_the_models_float64():
    """``_SharedLoRA`` on a float64 model: ``y + s (x Aᵀ) Bᵀ`` in float64 (it ran in float32)."""
    model = tiny_model("llama").to(torch.float64)
    adapter = add_instruction_adapter(model, rank=4, seed=1)
    with torch.no_grad():
        for b in adapter.lora_B.values():
            b.normal_(0, 0.1)
    wrapped = model.get_submodule("model.layers.0.self_attn.q_proj")
    key = "model__layers__0__self_attn__q_proj"
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    a, b = adapter.lora_A[key].double(), adapter.lora_B[key].double()
    want = wrapped.base(x) + (x @ a.t() @ b.t()) * adapter.scale
    torch.testing.assert_close(wrapped(x), want, atol=1e-14, rtol=1e-12)


def _stop_at(monkeypatch, name: str, call: int = 1) -> None:
    """``train.<name>`` raises ``KeyboardInterrupt`` on its ``call``-th call (the earlier ones run)."""
    real, calls = getattr(train, name), []

    def stop(*a, **k):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, name, stop)


@pytest.mark.parametrize("stage, call, before, after", [
    ("instruction_tune", 1, ["--slots", "2"], ["--slots", "64", "--eval-batch-size", "1", "--on-error", "skip"]),
    ("generate_responses", 2, ["--slots", "1", "--eval-batch-size", "1"], ["--slots", "3"]),
    ("memory_inject", 2, ["--slots", "3", "--on-error", "skip"], ["--slots", "1", "--eval-batch-size", "2"]),
])
def test_a_run_resumed_with_other_volatile_settings_gives_the_same_results(ckpt, reference, tmp_path, monkeypatch,
                                                                          stage, call, before, after):
    """Stopped after memory injection, between the two test users' generation, or between two
    groups of memory injection, and resumed with other slots, eval batch size, on-error and
    progress: the results of the run never stopped (with the default settings)."""
    out = tmp_path / "run"
    _stop_at(monkeypatch, stage, call)
    with pytest.raises(KeyboardInterrupt):
        _main(ckpt, out, *before)
    assert not (out / "metrics.json").exists()
    monkeypatch.undo()
    flags = [f for f in FLAGS if f != "--no-progress"]  # progress bars on, too
    _main(ckpt, out, *after, flags=flags)
    assert_same_results(out, reference)


def test_on_error_changes_nothing_on_clean_data(ckpt, tmp_path):
    """``--on-error skip`` and ``raise`` read a clean JSONL file alike: every output equal."""
    data = tmp_path / "data.jsonl"
    write_jsonl([{"user_id": f"u{i}", "profile": f"I am {20 + i} years old", "history": [f"I like tea {i}",
                  "My knee hurts when I run."], "query": "What should I do?", "response": "Rest, and drink water."}
                 for i in range(6)], data)
    flags = [*FLAGS, "--data", str(data), "--users", "0"]
    a = _main(ckpt, tmp_path / "raise", "--on-error", "raise", flags=flags)
    b = _main(ckpt, tmp_path / "skip", "--on-error", "skip", flags=flags)
    assert_same_results(a, b, atol=0.0)
    for p in (a / "users").rglob("*.safetensors"):  # bit for bit
        x, y = load_file(str(p)), load_file(str(b / p.relative_to(a)))
        assert all(torch.equal(x[k], y[k]) for k in x)



@pytest.mark.parametrize("slots", [1, 2, 3, 6])
def test_instruction_tuning_over_a_store_with_few_slots_is_the_same_training(tiny_chat_tokenizer, tmp_path, slots):
    """:func:`instruction_tune` with a store-backed runtime of ``slots`` slots (steps naming more
    users than that run in groups, users loaded as the batches name them) trains the adapter of
    a runtime holding every user: the same losses and weights, to float32's rounding. With 6
    slots the users load over the first steps, growing the banks between two steps: the step
    before held its loss's graph until the next, whose backward then failed ("invalid gradient
    ... got [128, 64] but expected shape compatible with [64, 64]")."""
    from milp.data import Record
    from milp.pipeline import instruction_tune
    from milp.store import UserStore, user_dirname

    def model():
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_config(make_tiny_config("llama", len(tiny_chat_tokenizer)))

    recs = [Record(f"u{i}", "", [f"My knee hurts {i}."], "What should I do?" + " Now?" * i, "Rest and drink water.")
            for i in range(6)]
    full = MilpRuntime(model(), max_users=6)
    for i, r in enumerate(recs):
        full.add_user(r.user_id, MemoryConfig.uniform(2, 2, 8), init="random", seed=i)
        full.save_user(r.user_id, tmp_path / user_dirname(r.user_id), include_optimizer=False)
    runs = {}
    for name, rt in (("full", full), ("store", MilpRuntime(model(), max_users=slots, store=UserStore(tmp_path)))):
        adapter = add_instruction_adapter(rt.model, rank=4, seed=1)
        losses = instruction_tune(rt.model, tiny_chat_tokenizer, recs, runtime=rt, adapter=adapter, steps=4,
                                  batch_size=4, lr=1e-2, seed=3, progress=False)
        runs[name] = losses, {k: v.detach().clone() for k, v in adapter.state_dict().items()}
    assert runs["store"][0] == pytest.approx(runs["full"][0], rel=1e-6)
    for k, v in runs["full"][1].items():
        torch.testing.assert_close(runs["store"][1][k], v, atol=1e-5, rtol=1e-4, msg=k)  # ATOL's rule, lr 1e-2


def test_the_search_picks_alike_with_fewer_slots_than_validation_users(ckpt, tmp_path):
    """``--search`` with 2 validation users: 1 slot (fewer than the users; it failed, "the runtime
    holds max_users=1 users") and 3 slots (a configuration's pairs split across chunks) give the
    trials and pick of 64 slots. Each (configuration, validation user) pair is a virtual user
    named by the configuration's place in its round, no longer in a chunk of ``--slots // 2``
    configurations: that name shuffles its memory batches, so a configuration's validation CE
    depended on ``--slots``."""
    flags = ["--users", "20", "--memory-steps", "2", "--instruct-steps", "1", "--max-new-tokens", "2",
             "--max-length", "48", "--rows-per-user", "1", "--memory-lr", "5e-2", "--no-progress",
             "--search", "3", "--search-q", "3", "--search-surrogate", "gp", "--search-init", "3",
             "--search-modules", "1-2", "--search-ranks", "4,8"]
    want = _main(ckpt, tmp_path / "s64", flags=flags)
    for slots in (1, 3):
        got = _main(ckpt, tmp_path / f"s{slots}", "--slots", str(slots), flags=flags)
        # the users' adapters, trained at lr 5e-2 for 16 steps, to 1% of the lr (AdamW amplifies rounding where a
        # gradient is near zero: 1.2e-4 seen), and the validation losses of adapters so trained to 2e-4 relative
        # (1.03e-4 seen on an AVX-512 CPU, where MKL rounds batches of other sizes otherwise; within 1e-5 on the
        # CPUs before it); the configurations searched and picked, equal
        assert_same_results(got, want, atol=5e-4, rel=2e-4)
