"""The package ``tinymoe.parallel`` (no MPI needed): its names, its import floors, and that
importing it never loads mpi4py (docs/architecture.md §3)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tinymoe" / "parallel"

# the modules lowest first: each may import only the ones before it ("cost" none of them)
FLOORS = {"comm": set(), "exchange": {"comm"}, "layer": {"comm", "exchange"},
          "hooks": {"comm", "exchange", "layer"}, "cost": set()}

# every public name the single-file tinymoe/parallel.py had, with the module that holds it now
NAMES = {
    "comm": ["Comm", "ParallelError", "mpi_world_size"],
    "exchange": ["ToOwners", "ToSources", "exchange_to_owners", "exchange_to_sources"],
    "layer": ["ExpertParallelMoE", "is_expert_param", "shard_experts"],
    "hooks": ["MODES", "FAULT_ENV", "Parallel", "setup", "run_train", "call_on_every_rank"],
    "cost": ["alltoall_bytes", "exchange_bytes_per_step", "project_step"],
}


def test_every_old_name_is_reexported_by_the_package() -> None:
    """``tinymoe.parallel.X`` is the very object its module defines, for every old name."""
    import importlib  # noqa: PLC0415

    import tinymoe.parallel as par  # noqa: PLC0415
    for module, names in NAMES.items():
        mod = importlib.import_module(f"tinymoe.parallel.{module}")
        for name in names:
            assert getattr(par, name) is getattr(mod, name), (module, name)
    assert set(par.__all__) <= {n for names in NAMES.values() for n in names}


def test_modules_import_only_the_floors_below_them() -> None:
    for module, allowed in FLOORS.items():
        tree = ast.parse((PKG / f"{module}.py").read_text(encoding="utf-8"))
        used = {node.module.rsplit(".", 1)[1] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module
                and node.module.startswith("tinymoe.parallel.")}
        assert used <= allowed, (module, used - allowed)


def test_importing_the_package_does_not_load_mpi4py() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("import sys, tinymoe.parallel as p; p.setup('none'); "
            "print('mpi4py' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False", res.stdout
