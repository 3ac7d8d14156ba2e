"""Training end to end on the CPU with gloo: one process, the deepspeed launcher and mpirun."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from foldscale.data import write_store

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = dict(vocab_size=64, d_model=32, n_head=4, n_local=1, n_global=1, segment_len=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A token store of learnable documents (mostly counting up by a step of their own, with
    noise), and DeepSpeed configs for ZeRO 0-3."""
    tmp = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(120):
        n, stride = int(rng.integers(10, 130)), int(rng.integers(1, 4))
        doc = (rng.integers(0, 60) + stride * np.arange(n)) % 60 + 4
        noise = rng.random(n) < 0.1
        doc[noise] = rng.integers(4, 64, size=int(noise.sum()))
        docs.append(np.append(doc, 3))
    write_store(docs, tmp / "store", vocab_size=64, val_fraction=0.1)
    (tmp / "model.json").write_text(json.dumps(MODEL))
    base = json.loads((ROOT / "ds_configs" / "cpu.json").read_text())
    base["scheduler"]["params"]["warmup_num_steps"] = 2
    base["optimizer"]["params"]["lr"] = 1e-2
    for stage in range(4):
        for streams in (2, 4):
            cfg = {**base, "train_micro_batch_size_per_gpu": streams, "zero_optimization": {"stage": stage}}
            (tmp / f"z{stage}_b{streams}.json").write_text(json.dumps(cfg))
    cfg = json.loads((tmp / "z0_b4.json").read_text())
    cfg["scheduler"]["params"]["total_num_steps"] = 20  # one schedule for runs resumed with other --steps
    (tmp / "fixed20.json").write_text(json.dumps(cfg))
    return tmp


def run(setup, out, *args, ranks=1, launcher="python", ds="z0_b4.json", check=True, timeout=300):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = [str(ROOT / "launch" / "pretrain.py"), "--ds_config", str(setup / ds), "--model",
              str(setup / "model.json"), "--data", str(setup / "store"), "--out", str(out),
              "--log_every", "1", *map(str, args)]
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_accelerators", str(ranks), "--master_port", "29531", *script]
    elif launcher == "mpirun":
        cmd = [str(BIN / "mpirun"), "-n", str(ranks), sys.executable, *script]
    else:
        cmd = [sys.executable, *script]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def losses(out):
    lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in lines if "train/loss" in r]


def test_one_process_trains_and_writes_everything(setup, tmp_path):
    out = tmp_path / "run"
    p = run(setup, out, "--steps", 30, "--eval_every", 15, "--save_every", 10, "--keep_last", 2)
    curve = losses(out)
    assert len(curve) == 30 and np.mean(curve[-5:]) < np.mean(curve[:5]) - 0.3, curve
    assert "step 30/30 | loss" in p.stdout and "eta" in p.stdout and "val loss" in p.stdout
    done = sorted(c.name for c in (out / "checkpoints").iterdir())
    assert done == ["step00000020", "step00000030"]  # keep_last 2
    ckpt = out / "checkpoints" / "step00000030"
    for name in ("COMPLETE", "model.json", "ds_config.json", "foldscale_rank0.pt"):
        assert (ckpt / name).is_file(), name

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/perplexity", "train/lr", "train/grad_norm", "train/tokens_per_s",
                "train/state_norm", "train/padding_fraction", "val/loss", "train_by_segment/0",
                "train_by_segment/1", "val_by_segment/2-3", "memory/peak_host_rss_gib"):
        assert tag in tags, tag
    assert "loss_by_segment" in events.Tags()["images"]


def test_resume_continues_bit_for_bit(setup, tmp_path):
    straight = tmp_path / "straight"
    run(setup, straight, "--steps", 20, "--save_every", 100, "--eval_every", 100, ds="fixed20.json")
    split = tmp_path / "split"
    run(setup, split, "--steps", 10, "--save_every", 100, "--eval_every", 100, ds="fixed20.json")
    run(setup, split, "--steps", 20, "--resume", "auto", "--save_every", 100, "--eval_every", 100, ds="fixed20.json")
    assert losses(split) == losses(straight)
    assert len(losses(straight)) == 20


def test_interrupted_save_and_wrong_world_size(setup, tmp_path):
    out = tmp_path / "run"
    run(setup, out, "--steps", 4, "--save_every", 2, ds="fixed20.json")
    # A newer checkpoint without COMPLETE (a crash mid-save) is passed over by --resume auto.
    shutil.copytree(out / "checkpoints" / "step00000004", out / "checkpoints" / "step00000006")
    (out / "checkpoints" / "step00000006" / "COMPLETE").unlink()
    p = run(setup, out, "--steps", 5, "--resume", "auto", ds="fixed20.json")
    assert "resumed from" in p.stdout and "step00000004 at step 4" in p.stdout
    p = run(setup, out, "--steps", 9, "--resume", str(out / "checkpoints" / "step00000006"), check=False,
            ds="fixed20.json")
    assert p.returncode == 2 and "no COMPLETE marker" in p.stderr
    meta = out / "checkpoints" / "step00000005" / "COMPLETE"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "world_size": 2}))
    p = run(setup, out, "--steps", 9, "--resume", "auto", check=False, ds="fixed20.json")
    assert p.returncode == 2 and "written by 2 rank(s) but this run has 1" in p.stderr


def test_sigterm_saves_a_checkpoint_and_stops(setup, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--ds_config", str(setup / "z0_b4.json"),
                          "--model", str(setup / "model.json"), "--data", str(setup / "store"), "--out", str(out),
                          "--steps", "100000", "--log_every", "1"], env=env, stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("step 3/"):
            break
    p.send_signal(signal.SIGTERM)
    rest = p.stdout.read()
    assert p.wait(timeout=120) == 130  # a clean stop before --steps: 128 + SIGINT, as a shell reports Ctrl-C
    saved = [c for c in (out / "checkpoints").iterdir() if (c / "COMPLETE").is_file()]
    assert len(saved) == 1 and "stopped by signal" in rest and "stopped cleanly, checkpoint saved" in rest
    step = json.loads((saved[0] / "COMPLETE").read_text())["step"]
    assert 3 <= step < 100000


def test_non_finite_losses_stop_the_run_and_keep_the_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    run(setup, out, "--steps", 4, "--save_every", 2, ds="fixed20.json")
    # An absurd learning rate drives the weights, then the loss, to inf/NaN within a few steps.
    bad = json.loads((setup / "fixed20.json").read_text())
    bad["optimizer"]["params"]["lr"] = 1e30
    (setup / "bad.json").write_text(json.dumps(bad))
    p = run(setup, out, "--steps", 50, "--resume", "auto", "--max_bad_steps", 3, "--save_every", 100,
            ds="bad.json", check=False)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "non-finite losses in a row" in p.stderr and "warning: non-finite loss" in p.stdout
    newest = sorted(c.name for c in (out / "checkpoints").iterdir() if (c / "COMPLETE").is_file())[-1]
    assert newest == "step00000004"


@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_rank(setup, tmp_path, launcher, stage):
    """2 ranks x 2 streams see the same documents as 1 rank x 4 streams (streams are numbered
    globally); the losses agree up to how the gradient is averaged (per-rank token means)."""
    one = tmp_path / "one"
    run(setup, one, "--steps", 8, "--eval_every", 100, "--save_every", 100, ds="z0_b4.json")
    two = tmp_path / "two"
    run(setup, two, "--steps", 8, "--eval_every", 100, "--save_every", 100, ranks=2, launcher=launcher,
        ds=f"z{stage}_b2.json")
    a, b = np.array(losses(one)), np.array(losses(two))
    assert a[0] == pytest.approx(b[0], rel=1e-5)  # same data, same initial weights
    np.testing.assert_allclose(a, b, rtol=2e-2)


def test_a_dead_rank_stops_the_other_instead_of_hanging(setup, tmp_path):
    """Two ranks started by hand (no launcher to clean up after them): kill one mid-run, and
    the survivor must fail its next collective and exit, well within the collective timeout."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29547"}
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--ds_config", str(setup / "z1_b2.json"),
           "--model", str(setup / "model.json"), "--data", str(setup / "store"), "--out", str(tmp_path / "run"),
           "--steps", "100000", "--log_every", "1", "--collective_timeout", "60"]
    ranks = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for r in (0, 1)]
    for line in ranks[0].stdout:
        if line.startswith("step 3/"):
            break
    ranks[1].kill()
    t0 = time.time()
    try:
        code = ranks[0].wait(timeout=120)
    finally:
        ranks[0].kill()
    assert code != 0 and time.time() - t0 < 60
