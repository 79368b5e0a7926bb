"""Promises of the repository itself: README commands, CI, package layout."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", text)


def test_readme_has_the_two_commands():
    main, tests = _readme_commands()[:2]
    assert main.endswith("python -m milp.train")
    assert tests.endswith("python -m pytest tests")
    assert "pip install torch==2.13.0 &&" in main.split("pip install -e")[0]  # torch before anything else


def test_ci_runs_the_readme_test_command():
    _, tests = _readme_commands()[:2]
    after_venv = tests.split(". .venv/bin/activate && ", 1)[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert after_venv in ci.splitlines()


def test_top_level_layout():
    for name in ("kernels", "milp", "search", "bench", "tests", "setup.py", "README.md"):
        assert (ROOT / name).exists(), name


def test_layers_import_one_way():
    # kernels/ and search/ never import milp
    for pkg in ("kernels", "search"):
        for path in (ROOT / pkg).rglob("*.py"):
            src = path.read_text(encoding="utf-8")
            assert not re.search(r"^\s*(from|import)\s+milp\b", src, re.M), f"{path} imports milp"


def test_readme_keeps_the_gpu_results_markers():
    # bench/report.py --readme writes the latest GPU run between them
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = "<!-- bench:gpu:start (bench/report.py --readme writes between these lines) -->"
    end = "<!-- bench:gpu:end -->"
    assert text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end)
    assert start in (ROOT / "bench" / "report.py").read_text(encoding="utf-8")
