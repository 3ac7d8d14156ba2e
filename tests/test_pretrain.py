"""launch/pretrain.py as a user runs it, with the shipped ds_configs/cpu.json on a tiny store."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from foldscale.data import write_store

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=64, d_model=32, n_head=4, n_local=1, n_global=1, segment_len=16)
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    rng = np.random.default_rng(0)
    write_store([rng.integers(4, 64, int(rng.integers(10, 100))) for _ in range(60)], tmp / "store", vocab_size=64,
                val_fraction=0.2)
    (tmp / "model.json").write_text(json.dumps(MODEL))
    return tmp


def command(setup, out, *args, ds=ROOT / "ds_configs" / "cpu.json"):
    return [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--ds-config", str(ds), "--model",
            str(setup / "model.json"), "--data", str(setup / "store"), "--out", str(out), *map(str, args)]


def pretrain(setup, out, *args, **kw):
    return subprocess.run(command(setup, out, *args, **kw), env=ENV, capture_output=True, text=True, timeout=300)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_a_smoke_run_then_rerun_resume_and_extend(setup, tmp_path):
    out = tmp_path / "run"
    p = pretrain(setup, out, "--steps", 10)
    assert p.returncode == 0, p.stderr[-2000:]
    assert any(r["step"] == 10 and "val/loss" in r for r in records(out))  # validation at the last step
    assert f"foldscale eval MODEL_DIR --data {setup / 'store'}" in p.stdout
    p = pretrain(setup, out, "--steps", 10)  # the same command again, without --resume
    assert p.returncode == 2 and "holds an earlier run: continue it with --resume auto" in p.stderr
    assert len(records(out)) > 1  # metrics.jsonl untouched
    p = pretrain(setup, out, "--steps", 20, "--resume", "auto")
    assert p.returncode == 2 and "add --extend-schedule" in p.stderr
    p = pretrain(setup, out, "--steps", 20, "--resume", "auto", "--extend-schedule", "--log-every", 1)
    assert p.returncode == 0, p.stderr[-2000:]
    lr = {r["step"]: r["train/lr"] for r in records(out) if "train/lr" in r}
    assert lr[11] > 2 * lr[20] and lr[20] == pytest.approx(1e-4)  # the cosine goes on from mid-way to its floor
    saved = json.loads((out / "checkpoints" / "step00000020" / "ds_config.json").read_text())["scheduler"]["params"]
    assert (saved["total_num_steps"], saved["warmup_num_steps"]) == (20, 1)
    assert json.loads((out / "checkpoints" / "step00000020" / "train.json").read_text())["extend_schedule"]
    p = pretrain(setup, out, "--steps", 10, "--overwrite")
    assert p.returncode == 0 and max(r["step"] for r in records(out)) == 10


@pytest.mark.e2e
def test_config_errors_leave_no_out(setup, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**json.loads((ROOT / "ds_configs" / "cpu.json").read_text()), "gradient_clippin": 1}))
    p = pretrain(setup, tmp_path / "run", "--steps", 10, ds=ds)
    assert p.returncode == 2 and "did you mean gradient_clipping?" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_a_second_training_into_a_busy_out_is_refused_and_ctrl_c_stops_cleanly(setup, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(command(setup, out, "--steps", 100000, "--log-every", 1), env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    for line in first.stdout:
        if line.startswith("step 2/"):
            break
    p = pretrain(setup, out, "--steps", 10)
    first.send_signal(signal.SIGINT)
    rest = first.stdout.read()
    assert first.wait(timeout=120) == 130 and "stopped cleanly, checkpoint saved: exit status 130" in rest
    assert p.returncode == 2 and f"is in use by the training of PID {first.pid} on host" in p.stderr


LEAVE_LAST = """
import importlib.util, sys, time
from mpi4py import MPI  # as DeepSpeed's MPI discovery imports it under mpirun
spec = importlib.util.spec_from_file_location("pretrain", sys.argv[1])
pretrain = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pretrain)
if MPI.COMM_WORLD.Get_rank() == 0:  # rank 1 leaves first, and rank 0 is still there 2 s after MPI_Finalize
    time.sleep(2)
    finalize = MPI.Finalize
    def finalize_and_linger():
        finalize()
        time.sleep(2)
        print("rank 0 left last", flush=True)
    MPI.Finalize = finalize_and_linger
pretrain.leave(int(sys.argv[2]))
"""


@pytest.mark.e2e
@pytest.mark.parametrize("status", [0, 2])
def test_under_mpirun_a_rank_that_leaves_last_is_not_killed(tmp_path, status):
    """The fast exit finalizes MPI after a run that ended as planned and says goodbye to the
    launcher: otherwise it kills a rank still leaving. After a failure it stops them at once."""
    (tmp_path / "leave.py").write_text(LEAVE_LAST)
    p = subprocess.run([str(Path(sys.executable).parent / "mpirun"), "-n", "2", sys.executable, str(tmp_path / "leave.py"),
                        str(ROOT / "launch" / "pretrain.py"), str(status)], env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == status and ("rank 0 left last" in p.stdout) == (status == 0), p.stdout + p.stderr
