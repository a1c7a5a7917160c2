"""Expert and data parallelism under MPI: P = 2 ranks launched with ``mpiexec -n 2``.

Each test starts a subprocess job with a timeout (a hang fails the test instead of the
suite). The workers compare P ranks with one process (tests/parallel_worker.py) or run
``python -m tinymoe train --parallel ...``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpi4py mpich)")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("TINYMOE_THREADS", "1")
    return env


def mpirun(args: list[str], n: int = 2, timeout: float = 240, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``mpiexec -n n python args...``; a job still running after ``timeout`` fails."""
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("mode", ["data", "expert", "expert dropless"])
def test_two_ranks_match_one_process(mode: str) -> None:
    """3 AdamW steps on 2 ranks (micro-batch 2) == one process on the batch of 4: losses,
    aux/z, gradient norm, every gradient and every weight, float64 to 1e-9."""
    res = mpirun([str(ROOT / "tests" / "parallel_worker.py"), *mode.split()])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith(f"OK {mode.split()[0]} P=2"), res.stdout + res.stderr


# ----------------------------------------------------------------------------- the CLI
COMMON = ["--config", "toy", "--dtype", "float64", "--seq-len", "32", "--max-chars", "20000",
          "--eval-every", "0", "--eval-batches", "1", "--snapshot-every", "2", "--log-every", "1",
          "--save-every", "2", "--capacity-factor", "1.0", "--quiet"]


def _train_one(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinymoe", "train", *COMMON, "--out", str(out), *extra],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)


def _train_mpi(out: Path, mode: str, *extra: str, n: int = 2, env: dict | None = None,
               timeout: float = 240) -> subprocess.CompletedProcess:
    e = _env()
    e.update(env or {})
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, "-m", "tinymoe", "train", *COMMON,
                           "--parallel", mode, "--out", str(out), *extra],
                          cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def _losses(out: Path, key: str = "loss") -> list[float]:
    import json
    return [e[key] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if e["event"] == "train"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """One process, batch 4, 4 steps: the reference of the CLI tests."""
    out = tmp_path_factory.mktemp("one") / "run"
    res = _train_one(out, "--batch-size", "4", "--steps", "4")
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.parametrize("mode", ["data", "expert"])
def test_train_cli_matches_one_process(mode: str, one_process: Path, tmp_path: Path) -> None:
    """mpiexec -n 2 train --parallel mode --batch-size 2 == train --batch-size 4: the
    logged losses, the checkpoint's weights and optimizer state (rank 0 gathered the
    expert shards into one ordinary checkpoint), the routing snapshots; only rank 0 logs."""
    import json

    import numpy as np

    from tinymoe.checkpoint import load_checkpoint, load_model
    out = tmp_path / mode
    res = _train_mpi(out, mode, "--batch-size", "2", "--steps", "4")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("mean:") == 1, res.stdout                  # rank 0 prints, once
    np.testing.assert_allclose(_losses(out), _losses(one_process), rtol=1e-12)
    # every logged statistic is the global batch's: the busiest expert's share from the
    # loads summed over ranks (not a mean of the ranks' shares), the gradient norm ...
    for key in ("ce", "aux", "z", "dropped", "busiest", "grad_norm"):
        np.testing.assert_allclose(_losses(out, key), _losses(one_process, key), rtol=1e-10,
                                   atol=1e-14, err_msg=key)
    start = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert start["parallel"] == {"mode": mode, "ranks": 2, "micro_batch": 2, "global_batch": 4}
    a, b = load_checkpoint(out), load_checkpoint(one_process)
    assert a.model_state.keys() == b.model_state.keys()
    for k in b.model_state:
        np.testing.assert_allclose(a.model_state[k], b.model_state[k], rtol=1e-9, atol=1e-12, err_msg=k)
    for i, s in b.optimizer_state["state"].items():
        for k, v in s.items():
            np.testing.assert_allclose(a.optimizer_state["state"][i][k], v, rtol=1e-9, atol=1e-15)
    assert a.sampler_state["rng"] == b.sampler_state["rng"]
    load_model(out / "checkpoint.npz")                                  # loads in one process
    sa, sb = np.load(out / "snapshots" / "step_2.npz"), np.load(one_process / "snapshots" / "step_2.npz")
    np.testing.assert_array_equal(sa["expert_index"], sb["expert_index"])


def test_expert_resume_is_bit_exact(tmp_path: Path) -> None:
    """Expert parallel: 2 steps, stop, resume to 4 (same P) == 4 steps straight, bit for bit."""
    import numpy as np

    from tinymoe.checkpoint import load_checkpoint
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train_mpi(straight, "expert", "--batch-size", "2", "--steps", "4").returncode == 0
    res = _train_mpi(split, "expert", "--batch-size", "2", "--steps", "4", "--stop-at", "2")
    assert res.returncode == 0, res.stderr
    res = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "tinymoe", "train", "--resume",
                          str(split), "--parallel", "expert", "--quiet"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    a, b = load_checkpoint(split), load_checkpoint(straight)
    assert a.step == b.step == 4
    for k in b.model_state:
        np.testing.assert_array_equal(a.model_state[k], b.model_state[k], err_msg=k)
    assert _losses(split) == _losses(straight)
    # the file does not depend on the layout: data parallelism continues the expert run
    res = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "tinymoe", "train", "--resume",
                          str(straight), "--parallel", "data", "--steps", "5", "--quiet"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert load_checkpoint(straight).step == 5


# ----------------------------------------------------------------------------- faults
def test_parallel_without_mpiexec_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in _env().items() if not k.startswith(("PMI_", "HYDRA", "MPI"))}
    res = subprocess.run([sys.executable, "-m", "tinymoe", "train", *COMMON, "--parallel", "expert",
                          "--steps", "1", "--out", str(tmp_path / "x")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "mpiexec -n P" in lines[0], res.stderr


@pytest.mark.parametrize("experts, top_k, words", [(3, 1, "not divisible by 2 ranks"),
                                                   (1, 1, "2 ranks > n_experts=1")])
def test_bad_expert_split_aborts_every_rank(tmp_path: Path, experts: int, top_k: int, words: str) -> None:
    res = _train_mpi(tmp_path / "x", "expert", "--steps", "1", "--n-experts", str(experts),
                     "--top-k", str(top_k), timeout=120)
    assert res.returncode != 0
    assert words in res.stderr, res.stderr
    assert not (tmp_path / "x" / "checkpoint.npz").exists()


@pytest.mark.parametrize("flags, words", [
    (("--router-type", "expert_choice"), "router_type=expert_choice"),
    (("--router-noise", "true"), "router_noise"),
    (("--router-bias-rate", "0.01"), "router_bias_rate"),
    (("--router-score", "sigmoid", "--renormalize", "true"), "router_score=sigmoid")])
def test_routing_variants_are_refused_in_one_line(tmp_path: Path, flags: tuple, words: str) -> None:
    """The routing variants draw noise / move a bias per batch: not exact across ranks yet."""
    res = _train_mpi(tmp_path / "x", "data", "--steps", "1", *flags, timeout=120)
    assert res.returncode != 0
    assert words in res.stderr and "not supported with --parallel" in res.stderr, res.stderr
    assert not (tmp_path / "x" / "checkpoint.npz").exists()


def test_openmoe_ffn_kind_shards(tmp_path: Path) -> None:
    """Expert sharding copies the weights of either FFN form (the original code's wi_0/wi_1/wo)."""
    res = _train_mpi(tmp_path / "x", "expert", "--steps", "2", "--ffn-kind", "openmoe", timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "x" / "checkpoint.npz").exists()


@pytest.mark.parametrize("kind", ["raise", "sysexit", "segv", "exit"])
def test_a_failing_rank_ends_the_job_and_keeps_the_last_checkpoint(tmp_path: Path, kind: str) -> None:
    """Rank 1 raises, calls sys.exit, segfaults, or dies by os._exit after update 3;
    save_every 2: the job ends on every rank within the timeout (no hang) and the step-2
    checkpoint is intact. The first three say what happened on stderr; os._exit (like a C
    library's exit()) leaves nothing to run in the rank, and mpiexec reports only its
    exit status (the documented gap)."""
    from tinymoe.checkpoint import load_checkpoint
    out = tmp_path / "run"
    res = _train_mpi(out, "expert", "--batch-size", "2", "--steps", "6",
                     env={"TINYMOE_FAULT": f"1:3:{kind}"}, timeout=120)
    assert res.returncode != 0
    if kind == "raise":
        assert "error (rank 1 of 2): RuntimeError: injected fault on rank 1 after step 3" in res.stderr, res.stderr
    if kind == "sysexit":
        assert "error (rank 1 of 2): SystemExit: 3" in res.stderr, res.stderr
    if kind == "segv":
        assert "Fatal Python error: Segmentation fault" in res.stderr, res.stderr   # the rank's stack
        assert "signal 11" in res.stdout + res.stderr                                 # mpiexec's line
    ckpt = load_checkpoint(out)
    assert ckpt.step == 2


def _rank_pid(root_pid: int, rank: int) -> int | None:
    """The pid of MPI rank ``rank`` among the descendants of ``root_pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    todo, seen = [root_pid], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(children.get(pid, []))
    for pid in seen[1:]:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in env and b"tinymoe" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc to find a rank")
def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step_and_saves(tmp_path: Path) -> None:
    """SIGINT to rank 1 only (the worst case of ranks seeing a Ctrl-C at different steps):
    the ranks agree on stopping (one Allreduce per step), rank 0 saves one checkpoint,
    the job ends within the timeout."""
    import json
    import signal
    import time

    from tinymoe.checkpoint import load_checkpoint
    out = tmp_path / "run"
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "tinymoe", "train", *COMMON, "--parallel", "expert",
           "--batch-size", "2", "--steps", "100000", "--save-every", "0", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "log.jsonl").exists() or \
                '"train"' not in (out / "log.jsonl").read_text():
            time.sleep(0.2)
            assert time.time() < deadline, "the run did not start training"
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "checkpoint saved" in err, err
    end = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["status"] == "interrupted"
    assert load_checkpoint(out).step == end["step"] > 0


# ----------------------------------------------------------------------------- bench
@pytest.mark.parametrize("mode", ["expert", "data"])
def test_bench_parallel_counts_the_formula_bytes_and_splits_the_step(mode: str, tmp_path: Path) -> None:
    """mpiexec -n 2 bench --parallel: the bytes each rank hands to MPI per step equal the
    formulas (all-to-all per MoE layer and exchange: the buffer E x n_groups C x d, which is
    n k d bytes padding; gradient all-reduce: the replicated parameters), and each rank's
    step splits into compute + all-to-all + all-reduce with every part >= 0 (the MPI timers
    nest inside the step timer). No timing values are asserted."""
    import json
    import math

    from tinymoe import routing
    from tinymoe.config import get_preset
    from tinymoe.nn.model import OpenMoE
    from tinymoe.parallel import is_expert_param

    p, b, t = 2, 2, 32
    out = tmp_path / "bench.json"
    res = mpirun(["-m", "tinymoe", "bench", "--parallel", mode, "--config", "toy", "--batch", str(b),
                  "--seq", str(t), "--steps", "3", "--warmup", "1", "--threads", "1", "--json", str(out)],
                 n=p, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("tinymoe bench --parallel") == 1, res.stdout          # rank 0 prints, once
    assert "tokens/s" in res.stdout and "all-to-all" in res.stdout
    rep = json.loads(out.read_text())["parallel"]
    cfg = get_preset("toy")
    item = 4                                                                       # float32
    e, k, d, n_moe = cfg.n_experts, cfg.top_k, cfg.d_model, len(cfg.moe_layers)
    # all-to-all: the dispatch buffer [E, (b T / G) C, d] of one rank, G = T (one sequence)
    c = routing.capacity(t, e, k, cfg.capacity_factor, cfg.min_capacity, cfg.capacity_mode)
    buffer_bytes = e * (b * t // t) * c * d * item
    assert math.isclose(buffer_bytes, b * t * k * d * item * (e * c / (k * t)))   # = n k d bytes padding
    # gradient all-reduce: every replicated parameter once (expert mode: all but the experts)
    model = OpenMoE(cfg, seed=0)
    replicated = sum(prm.data.size for name, prm in model.named_parameters()
                     if not (mode == "expert" and is_expert_param(name)))
    assert rep["allreduce_bytes"] == replicated * item
    for q in rep["per_rank"]:
        kinds = ("dispatch", "combine", "dispatch_backward", "combine_backward")
        if mode == "expert":
            assert all(q["bytes"][kd] == n_moe * buffer_bytes for kd in kinds), q["bytes"]
            assert q["bytes"]["dispatch_mask"] == n_moe * buffer_bytes // (d * item)   # 1 byte a row
            assert q["alltoall_s"] > 0
        else:
            assert not any(kd in q["bytes"] for kd in kinds) and q["alltoall_s"] == 0
        assert q["bytes"]["allreduce"] == replicated * item
        parts = (q["compute_s"], q["alltoall_s"], q["allreduce_s"])
        assert all(v >= 0 for v in parts) and q["allreduce_s"] > 0, q
        assert math.isclose(sum(parts), q["step_s"], rel_tol=1e-9)
        assert q["step_s"] == sorted(q["all_step_s"])[1]                          # the median of 3
    if mode == "expert":
        assert rep["alltoall_bytes_per_layer"] == {kd: buffer_bytes for kd in kinds}
    assert rep["alltoall_matches_formula"] and rep["allreduce_matches_formula"]
    assert math.isclose(rep["tokens_per_s"], p * b * t / max(q["step_s"] for q in rep["per_rank"]))


def test_bench_parallel_without_mpiexec_is_one_line() -> None:
    env = {k: v for k, v in _env().items() if not k.startswith(("PMI_", "HYDRA", "MPI"))}
    res = subprocess.run([sys.executable, "-m", "tinymoe", "bench", "--parallel", "expert", "--config", "toy"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "mpiexec -n P python -m tinymoe bench" in lines[0], res.stderr
