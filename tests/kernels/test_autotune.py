"""Launch configs as data: the autotuner's output is read back by get_config."""
import json

import pytest
import torch

from kernels import autotune, lora_linear, use_backend
from kernels.tuning import LaunchConfig, _load_table, choose_path, get_config, heuristic_config, use_config

from .cases import make_case


@pytest.fixture
def table_path(tmp_path, monkeypatch):
    path = tmp_path / "gpu.json"
    monkeypatch.setenv("MILP_KERNEL_CONFIGS", str(path))
    yield path
    _load_table.cache_clear()


def test_tuned_table_is_written_and_read_back(table_path, monkeypatch, device):
    dev = torch.device(device)  # the GPU, or the CPU interpreter
    with use_backend("triton"):
        table = autotune.tune(torch.float32, device=dev, tiny=True, progress=False)
    autotune.write_table(table, table_path)
    data = json.loads(table_path.read_text())
    assert set(data["ops"]) == {"fused_linear", "shrink", "expand", "grad_weights"}
    # the decode bucket (8 tokens) is tuned through partial sums + expand: it passed its check too
    assert {e["max_tokens"] for e in data["ops"]["shrink"]} == {8, 96}
    entry = data["ops"]["shrink"][0]
    cfg = get_config("shrink", num_tokens=entry["max_tokens"], n=entry["n"], k=entry["k"],
                     max_rank=entry["max_rank"], dtype=torch.float32, device=dev)
    assert cfg.split_k == entry["split_k"] and cfg.block_k == entry["block_k"]
    # a problem outside every bucket falls back to the heuristic
    big = get_config("shrink", num_tokens=10**6, n=1, k=1, max_rank=1, dtype=torch.float32, device=dev)
    assert big == heuristic_config("shrink", num_tokens=10**6, n=1, k=1, max_rank=1, dtype=torch.float32)
    # the dispatch threshold is read by choose_path
    rank = data["dispatch"]["fused_max_rank"]
    assert choose_path(4096, 16, device=dev) == ("fused" if rank >= 16 else "fused_t")
    # merging keeps entries of other dtypes
    other = dict(table, ops={op: [dict(e, dtype="bfloat16") for e in es] for op, es in table["ops"].items()})
    autotune.write_table(other, table_path)
    dtypes = {e["dtype"] for e in json.loads(table_path.read_text())["ops"]["shrink"]}
    assert dtypes == {"float32", "bfloat16"}


def test_use_config_forces_a_launch_config(device):
    case = make_case(40, 24, 20, {0: [8], 1: [3]}, max_users=2, device=device)
    with use_backend("triton"):
        ref = lora_linear(case.x, case.w, case.b, case.bank, case.plan, path="split")
        with use_config("shrink", LaunchConfig(block_m=16, block_r=16, block_k=16, split_k=2)):
            assert get_config("shrink", num_tokens=1, n=1, k=1, max_rank=1, dtype=torch.float32,
                              device=torch.device("cpu")).split_k == 2
            out = lora_linear(case.x, case.w, case.b, case.bank, case.plan, path="split")
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="op must be one of"):
        with use_config("gemm", LaunchConfig()):
            pass
    with pytest.raises(TypeError, match="LaunchConfig"):
        with use_config("shrink", {"block_m": 16}):
            pass


def test_bad_table_is_reported(table_path):
    table_path.write_text(json.dumps({"ops": [1, 2]}))
    with pytest.raises(ValueError, match="'ops' must be an object"):
        get_config("shrink", num_tokens=1, n=1, k=1, max_rank=1, dtype=torch.float32, device=torch.device("cpu"))
