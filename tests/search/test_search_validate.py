"""The validation experiment's driver (``python -m search.validate``) on a budget of seconds."""
from __future__ import annotations

import json

import pytest

from search import validate
from search.problems import DTLZ2Problem, LoRASynthetic


def test_validate_writes_table_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # keep main()'s thread setting out of later tests
    out = tmp_path / "res"
    res = validate.main(["--problems", "dtlz2,lora34", "--seeds", "2", "--n-init", "4", "--n-bo", "0",
                         "--q", "2", "--out", str(out), "--note", "smoke"])
    assert sorted(p.name for p in out.iterdir()) == [
        "search_validation.json", "search_validation.md", "search_validation.png"]
    saved = json.loads((out / "search_validation.json").read_text())
    assert saved["settings"] == res["settings"] and saved["settings"]["seeds"] == 2
    for pname, prob in (("dtlz2", DTLZ2Problem()), ("lora34", LoRASynthetic())):
        for method in ("bo", "sobol"):
            runs = saved["problems"][pname][method]
            assert [r["seed"] for r in runs] == [0, 1]
            for r in runs:
                assert len(r["trace"]) == 4 and r["trace"] == sorted(r["trace"])  # HV never drops
                assert 0.0 <= r["final_hv"] <= r["max_hv"] == pytest.approx(prob.max_hv)
        # no BO evaluation: the "BO" run is the same Sobol design as the baseline
        assert [r["final_hv"] for r in saved["problems"][pname]["bo"]] == [
            r["final_hv"] for r in saved["problems"][pname]["sobol"]]
    md = (out / "search_validation.md").read_text()
    assert "| dtlz2 | SAAS+qLogNEHVI | 2 |" in md and "| lora34 | Sobol | 2 |" in md
    assert "log-scale HV" in md and md.rstrip().endswith("smoke")
    assert (out / "search_validation.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--seeds", "0"], "--seeds"),
        (["--jobs", "0"], "--jobs"),
        (["--n-bo", "-1"], "--n-init and --n-bo"),
        (["--problems", "zdt1"], "unknown problem 'zdt1'"),
    ],
)
def test_validate_bad_arguments(argv, match):
    with pytest.raises(SystemExit, match=match):
        validate.main(argv)


def test_lora_synthetic_front_and_views():
    p = LoRASynthetic(seed=0)
    # the best loss needs both relevant layers; everything else only costs parameters
    assert p.best_loss < 1.54 and 0.5 < p.max_hv < 0.52 and 0.0 < p.max_hv_log < 1.0
    assert p.log_values([1.9, 0.0]) == [1.9, 0.0] and p.log_values([1.9, p.max_parameters]) == [1.9, 1.0]
    with pytest.raises(ValueError, match="relevant_layers"):
        LoRASynthetic(relevant_layers=(3, 3))
    with pytest.raises(ValueError, match="noise_std"):
        LoRASynthetic(noise_std=-1.0)
