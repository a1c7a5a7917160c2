"""Every lesson runs start to end in fast mode, writes its figures, and keeps the lesson format;
so does every worked solution in ``lessons/solutions/`` (one per lesson, one section per exercise,
ending with a check).

Each lesson runs as a subprocess (``python lessons/NN_name.py``) with ``TINYMOE_FAST=1`` and
``TINYMOE_LESSON_OUT`` pointing into one temporary folder for the session (also the working
directory), so nothing is written into the checkout. The folder is shared so that lessons
10-12 reuse the small model lesson 9 trains there (run alone, they train it themselves).
A failing self-check (an ``assert`` inside a lesson) fails the test and its message is shown.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LESSON_DIR = ROOT / "lessons"
LESSONS = sorted(LESSON_DIR.glob("[0-9][0-9]_*.py"))
SOLUTION_DIR = LESSON_DIR / "solutions"
SOLUTIONS = sorted(SOLUTION_DIR.glob("[0-9][0-9]_*.py"))
# Lessons whose worked solutions are still to be written.
AWAITING_SOLUTIONS: set[str] = set()


def _tail(text: str, n: int = 3000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def test_lessons_exist():
    assert len(LESSONS) >= 6, f"expected the numbered lessons in {LESSON_DIR}, found {[p.name for p in LESSONS]}"
    numbers = [int(p.name[:2]) for p in LESSONS]
    assert numbers == list(range(1, len(numbers) + 1)), f"lesson numbers must run 01, 02, ... without gaps: {numbers}"


def _check_cells(path: Path, text: str) -> None:
    """Markdown cells hold no code; torch is imported only inside try/except ImportError."""
    for cell in re.split(r"^# %%", text, flags=re.M)[1:]:
        if cell.startswith(" [markdown]"):
            code = [line for line in cell.splitlines()[1:] if line.strip() and not line.startswith("#")]
            assert not code, (f"{path.name}: code inside a markdown cell (it would not run in a notebook): "
                              f"{code[0]!r}; start a '# %%' cell before it")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*(import torch|from torch)", line):
            assert i > 0 and lines[i - 1].strip() == "try:", (
                f"{path.name}:{i + 1}: torch must be imported inside try/except ImportError (it is optional)")


def _exercise_numbers(lesson_text: str) -> list[int]:
    """The numbers of the exercises listed under a lesson's '## Exercises' heading."""
    section = re.split(r"^# ## Exercises", lesson_text, flags=re.M)[-1]
    return [int(n) for n in re.findall(r"^# (\d+)\. \*\*", section, re.M)]


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_format(path: Path):
    """Percent-cell format with prose, a learning goal, self-checks, exercises; torch optional."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# %% [markdown]\n"), f"{path.name}: must start with a markdown cell"
    assert text.count("# %%\n") >= 3, f"{path.name}: too few code cells"
    assert "What you will learn" in text, f"{path.name}: no 'What you will learn' section"
    assert re.search(r"^# ## Exercises", text, re.M), f"{path.name}: no Exercises section"
    assert len(_exercise_numbers(text)) >= 2, f"{path.name}: fewer than two numbered exercises"
    assert len(re.findall(r"^\s*assert ", text, re.M)) >= 2, f"{path.name}: fewer than two self-checks"
    assert "show(fig" in text, f"{path.name}: no figure"
    _check_cells(path, text)
    assert "from tinymoe" in text or "import tinymoe" in text, f"{path.name}: a lesson must use tinymoe"


def test_every_lesson_has_solutions():
    lesson_names = {p.name for p in LESSONS}
    solution_names = {p.name for p in SOLUTIONS}
    assert solution_names <= lesson_names, f"solutions without a lesson: {sorted(solution_names - lesson_names)}"
    missing = lesson_names - solution_names - AWAITING_SOLUTIONS
    assert not missing, f"lessons without worked solutions in lessons/solutions/: {sorted(missing)}"


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_solution_format(path: Path):
    """One '## Exercise N' section per exercise of the lesson, in order; ends with an assert."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# %% [markdown]\n"), f"solutions/{path.name}: must start with a markdown cell"
    wanted = _exercise_numbers((LESSON_DIR / path.name).read_text(encoding="utf-8"))
    found = [int(n) for n in re.findall(r"^# ## Exercise (\d+)\b", text, re.M)]
    assert found == wanted, (f"solutions/{path.name}: sections for exercises {found}, "
                             f"the lesson has exercises {wanted}")
    _check_cells(path, text)
    body = ast.parse(text).body
    assert body and isinstance(body[-1], ast.Assert), (
        f"solutions/{path.name}: must end with a check (its last statement should be an assert)")


def test_readme_lists_every_lesson():
    readme = (LESSON_DIR / "README.md").read_text(encoding="utf-8")
    for p in LESSONS:
        assert p.name in readme, f"lessons/README.md does not list {p.name}"


@pytest.fixture(scope="module")
def lesson_out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lesson_out")


def _run_fast(path: Path, lesson_out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(TINYMOE_FAST="1", TINYMOE_LESSON_OUT=str(lesson_out), MPLBACKEND="Agg",
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("TINYMOE_DEVICE", None)                 # lessons pick their device themselves
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")                    # small arrays; avoids BLAS spin on a busy machine
    proc = subprocess.run([sys.executable, str(path)], cwd=lesson_out, env=env,
                          capture_output=True, text=True, timeout=300)
    where = path.relative_to(LESSON_DIR)
    assert proc.returncode == 0, (
        f"{where} failed in fast mode (exit {proc.returncode})\n"
        f"--- stdout ---\n{_tail(proc.stdout)}\n--- stderr ---\n{_tail(proc.stderr)}")
    assert "Traceback" not in proc.stderr, f"{where} printed a traceback:\n{_tail(proc.stderr)}"
    return proc


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_fast(path: Path, lesson_out: Path):
    _run_fast(path, lesson_out)
    figures = sorted(lesson_out.glob(f"{path.name[:2]}_*.png"))
    assert figures, f"{path.name} wrote no figure {path.name[:2]}_*.png into TINYMOE_LESSON_OUT"
    for fig in figures:
        assert fig.stat().st_size > 5000, f"{fig.name} is suspiciously small ({fig.stat().st_size} bytes)"


@pytest.mark.parametrize("path", SOLUTIONS, ids=[f"solution_{p.stem}" for p in SOLUTIONS])
def test_solution_runs_fast(path: Path, lesson_out: Path):
    """Solutions run after the lessons, in the same output folder (9 and 10 reuse lesson 9's model)."""
    _run_fast(path, lesson_out)
