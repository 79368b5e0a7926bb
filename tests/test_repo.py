"""Promises of the repository itself: README commands, CI, package layout."""
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", text)


def test_readme_has_the_two_commands():
    main, tests = _readme_commands()[:2]
    assert main.endswith("python -m milp.train")
    assert tests.endswith("python -m pytest -n auto --maxprocesses 8 tests")  # pytest-xdist: every core
    assert "pip install torch==2.13.0 &&" in main.split("pip install -e")[0]  # torch before anything else


def test_ci_runs_the_readme_test_command():
    _, tests = _readme_commands()[:2]
    after_venv = tests.split(". .venv/bin/activate && ", 1)[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert after_venv in ci.splitlines()


def test_top_level_layout():
    for name in ("kernels", "milp", "search", "bench", "tests", "setup.py", "README.md"):
        assert (ROOT / name).exists(), name


def _can_build_wheels_offline() -> bool:
    """Whether ``pip wheel --no-build-isolation`` can build here: setuptools with ``bdist_wheel``
    (built in from 70.1, else the ``wheel`` package; a venv's bundled setuptools 65 has neither)."""
    import importlib.util

    try:
        import setuptools
    except ImportError:
        return False
    if importlib.util.find_spec("wheel") is not None:
        return True
    return tuple(int(p) for p in setuptools.__version__.split(".")[:2]) >= (70, 1)


def test_wheel_ships_the_packages_and_their_data(tmp_path):
    """A non-editable install (what ``pip install milp-toolkit`` gives) holds the GPU config files,
    the shipped MedDia data and the ``py.typed`` markers, and setuptools builds it without its
    "package would be ignored" warning (a data folder left out of ``packages``, which future
    setuptools drop). Built from the tracked files only, installed into a folder of its own and imported from there."""
    import shutil
    import subprocess
    import sys

    if not _can_build_wheels_offline():
        import pytest

        pytest.skip("building the wheel offline needs setuptools >= 70.1 (or setuptools and wheel) here")
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "setup.py", "pyproject.toml", "README.md", "kernels", "milp",
                              "search"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in tracked:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert "is absent from the `packages` configuration" not in built.stdout + built.stderr
    (wheel,) = wheels.glob("milp_toolkit-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], capture_output=True, text=True, check=True, timeout=600)
    code = (
        "import kernels, milp\n"
        "from kernels.tuning import CONFIG_DIR\n"
        "from milp.data import load_meddia, meddia_dir\n"
        f"assert kernels.__file__.startswith({str(site)!r}), kernels.__file__\n"
        "print(sorted(p.name for p in CONFIG_DIR.glob('*.json')))\n"
        "print(sorted(p.name for p in meddia_dir().iterdir()))\n"
        "print(len(load_meddia()) > 100)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    configs, meddia, loaded = out.stdout.splitlines()[-3:]
    want = sorted(p.name for p in (ROOT / "kernels" / "configs").glob("*.json"))
    assert configs == str(want) and want
    assert "LICENSE" in meddia and "README.md" in meddia and "profiles_4.json" in meddia
    assert loaded == "True"
    # PEP 561: without py.typed, users' type checkers ignore the packages' hints
    assert [(site / pkg / "py.typed").is_file() for pkg in ("kernels", "milp", "search")] == [True] * 3


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


def _cells(line: str) -> int:
    """Cells of a markdown table row: ``|`` separators outside backticks, ``\\|`` not one."""
    plain = re.sub(r"`[^`]*`", "``", line.replace("\\|", ""))
    return plain.strip().strip("|").count("|") + 1


def test_markdown_tables_are_whole():
    """Was: a paragraph inserted into the README's flag table cut it in two; the rows after it
    (``--output``, ``--device``) rendered as plain text. Every run of ``|`` lines in the repo's
    markdown is one table: a header, its ``|---|`` separator, rows of the header's width."""
    root = Path(__file__).resolve().parents[1]
    files = [p for p in root.rglob("*.md") if not {".venv", "node_modules", ".git"} & set(p.parts)]
    bad = []
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines()
        fence = False
        block: list[tuple[int, str]] = []
        for i, line in enumerate([*lines, ""], 1):
            if line.startswith("```"):
                fence = not fence
            if not fence and line.startswith("|"):
                block.append((i, line))
                continue
            if block:
                (n0, head), *rows = block
                if not rows or not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", rows[0][1].strip()):
                    bad.append(f"{path.relative_to(root)}:{n0}: a table without its |---| line")
                bad += [f"{path.relative_to(root)}:{n}: {_cells(r)} cells, the header has {_cells(head)}"
                        for n, r in rows if _cells(r) != _cells(head)]
                block = []
    assert bad == []


_ELAPSED_ASSERT = re.compile(r"\bassert\b[^\n]*\b(?:perf_counter|monotonic|time|perf_counter_ns|monotonic_ns)\(\)\s*-")


def test_no_timing_assertion_in_the_tests():
    """Speed is measured in bench/, never asserted in tests/ (issue 4): no ``assert`` on an
    elapsed time (a clock read minus another). A deadline guarding a wait against a hang is not
    a measurement and stays allowed."""
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _ELAPSED_ASSERT.search(line):
                found.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert not found, "timing assertions in tests/:\n" + "\n".join(found)


def test_the_timing_check_sees_an_elapsed_time_assertion():
    # the samples are cut in two, so that this file's own lines do not match
    assert _ELAPSED_ASSERT.search("assert time.monotonic()" + " - t0 < 5")
    assert _ELAPSED_ASSERT.search("    assert done and time.perf_counter()" + " - start < 1.0")
    assert not _ELAPSED_ASSERT.search("assert self.proc.is_alive() and time.monotonic() < deadline")
