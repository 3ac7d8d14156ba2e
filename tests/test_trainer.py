"""Training on the CPU with gloo: in this process, and end to end (e2e) in one process, under the
deepspeed launcher and mpirun."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from foldscale.checkpoint import run_checkpoints
from foldscale.config import DataConfig, ModelConfig, TrainConfig
from foldscale.data import SegmentStreamSampler, TokenStore
from foldscale.engine import load_ds_config
from foldscale.metrics import PositionLoss
from foldscale.model import FoldedLM
from foldscale.trainer import NonFiniteGuard, Trainer, TrainingError, take
from run_helpers import MODEL, ROOT, losses, run


def test_non_finite_guard_skips_and_stops_after_max_bad_steps_in_a_row():
    said = []
    guard = NonFiniteGuard(3, "lower --lr", said.append, what="gradient")
    assert guard.apply(torch.tensor(True), 1) and not said
    assert not guard.apply(torch.tensor(False), 2) and not guard.apply(False, 3)
    assert said[-1] == "warning: non-finite gradient at step 3: its update is skipped (2/3 in a row)"
    assert guard.apply(True, 4) and guard.bad_in_a_row == 0  # a good step starts the count again
    for step in (5, 6):
        guard.apply(False, step)
    with pytest.raises(TrainingError, match="^3 non-finite gradients in a row at step 7; lower --lr$"):
        guard.apply(torch.tensor(False), 7)


def in_process_trainer(setup, tmp_path, stage, accum=2, **ds_changes) -> Trainer:
    """A Trainer in this process (world size 1) on SETUP's store: 2 streams, ACCUM micro-batches a step."""
    cfg = {**json.loads((setup / f"z{stage}_b2.json").read_text()), "gradient_accumulation_steps": accum, **ds_changes}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    ds_config = load_ds_config(tmp_path / "ds.json", world_size=1, steps=20)
    return Trainer(ModelConfig.from_dict(MODEL), DataConfig(str(setup / "store")),
                   TrainConfig(out=str(tmp_path / "run"), steps=20, max_bad_steps=2), ds_config,
                   TokenStore.open(setup / "store"), rank=0, world_size=1)


def test_a_step_back_propagates_the_mean_over_all_its_micro_batches_tokens(setup, dist, tmp_path):
    """The gradient a step applies is that of the token mean over all its micro-batches (not the
    mean of the micro-batches' means, which would weigh a micro-batch with more padding more)."""
    trainer = in_process_trainer(setup, tmp_path, 0, gradient_clipping=0.0)
    k = trainer.model_cfg.bptt_segments
    sampler = SegmentStreamSampler(trainer.store, "train", 0, 1, trainer.streams, trainer.model_cfg.segment_len,
                                   trainer.cfg.seed)
    for _ in range(20):  # on to a step whose micro-batches hold different numbers of targets
        sampler.load_state_dict(trainer.sampler.state_dict())
        batches = [take(sampler, k) for _ in range(2)]
        if int((batches[0].targets != -100).sum()) != int((batches[1].targets != -100).sum()):
            break
        trainer.train_step(PositionLoss(trainer.device))
    else:
        raise AssertionError("no step with micro-batches of different sizes: the mean of means would be the same")
    model = FoldedLM(trainer.model_cfg)
    model.load_state_dict(trainer.engine.module.state_dict())
    state, total, count = trainer.state, 0.0, 0
    for batch in batches:
        out = model.forward_stream(batch.ids, batch.targets, state, batch.reset, keep_logits=False)
        state, total, count = out.state, total + out.loss * out.n_tokens, count + out.n_tokens
    (total / count).backward()
    applied, optimizer_step = {}, trainer.engine.optimizer.step

    def recording_step(*args):
        applied.update({n: p.grad.clone() for n, p in trainer.engine.module.named_parameters()})
        return optimizer_step(*args)
    trainer.engine.optimizer.step = recording_step
    assert trainer.try_step(PositionLoss(trainer.device))
    for name, p in model.named_parameters():
        torch.testing.assert_close(applied[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def weights_and_optimizer_state(engine) -> list[torch.Tensor]:
    weights = [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return weights + [v.clone() for state in inner.state.values() for v in state.values() if torch.is_tensor(v)]


@pytest.mark.parametrize("stage, accum", [(0, 1), (0, 2), (2, 2), (3, 2)])
@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_non_finite_step_changes_no_weight_optimizer_state_or_schedule(setup, dist, tmp_path, stage, accum, what):
    """ZeRO 0 in fp32 (a plain torch optimizer) and DeepSpeed's ZeRO optimizers alike: the
    step is skipped whole (with 2 micro-batches, the first one's gradient too), and
    max_bad_steps of them in a row stop training. A NaN made in the backward pass (a gradient
    hook here) with a finite loss is skipped as a NaN loss is."""
    trainer = in_process_trainer(setup, tmp_path, stage, accum)
    window = PositionLoss(trainer.device)
    trainer.train_step(window)
    before, lr = weights_and_optimizer_state(trainer.engine), trainer.engine.get_lr()
    forward_stream, calls, bad = trainer.engine.module.forward_stream, [0], {accum}  # the step's last micro-batch

    def poisoned(*args, **kwargs):
        out = forward_stream(*args, **kwargs)
        calls[0] += 1
        if calls[0] not in bad:
            return out
        if what == "gradient":
            out.loss.register_hook(lambda g: g * float("nan"))
            return out
        return out._replace(loss=out.loss * float("nan"))
    trainer.engine.module.forward_stream = poisoned
    assert not trainer.try_step(window)
    after = weights_and_optimizer_state(trainer.engine)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
    assert trainer.engine.get_lr() == lr and trainer.engine.skipped_steps == 1
    assert trainer.try_step(window)  # the next step applies its update
    assert not all(torch.equal(a, b) for a, b in zip(weights_and_optimizer_state(trainer.engine), before))
    bad.update(range(100))
    with pytest.raises(TrainingError, match=f"2 non-finite {what}e?s in a row"):
        trainer.train_step(window)


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_resume_continues_bit_for_bit(setup, tmp_path):
    straight = tmp_path / "straight"
    run(setup, straight, "--steps", 20, "--save_every", 100, "--eval_every", 100, ds="fixed20.json")
    split = tmp_path / "split"
    run(setup, split, "--steps", 10, "--save_every", 100, "--eval_every", 100, ds="fixed20.json")
    run(setup, split, "--steps", 20, "--resume", "auto", "--save_every", 100, "--eval_every", 100, ds="fixed20.json")
    assert losses(split) == losses(straight)
    assert len(losses(straight)) == 20


@pytest.mark.e2e
def test_a_state_of_fewer_rows_resumes_bit_for_bit(setup, tmp_path):
    """state_rows < l: the carried (B, m, d) states go into the checkpoint and come back."""
    rows = tmp_path / "setup"
    shutil.copytree(setup, rows)
    (rows / "model.json").write_text(json.dumps({**MODEL, "state_rows": 4}))
    args = ("--save_every", 100, "--eval_every", 100)
    run(rows, tmp_path / "straight", "--steps", 12, *args, ds="fixed20.json")
    run(rows, tmp_path / "split", "--steps", 6, *args, ds="fixed20.json")
    run(rows, tmp_path / "split", "--steps", 12, "--resume", "auto", *args, ds="fixed20.json")
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    (saved,) = run_checkpoints(tmp_path / "straight").glob("step*")
    assert torch.load(saved / "foldscale_rank0.pt", weights_only=False)["state"].shape == (4, 4, MODEL["d_model"])


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_non_finite_gradients_stop_the_run_and_keep_the_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    run(setup, out, "--steps", 4, "--save_every", 2, ds="fixed20.json")
    # An absurd learning rate drives the gradient to inf within a few steps (while the loss is
    # finite: the guard skips that update, which would have made the weights and the loss NaN).
    bad = json.loads((setup / "fixed20.json").read_text())
    bad["optimizer"]["params"]["lr"] = 1e30
    (setup / "bad.json").write_text(json.dumps(bad))
    p = run(setup, out, "--steps", 50, "--resume", "auto", "--max_bad_steps", 3, "--save_every", 100,
            ds="bad.json", check=False)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "3 non-finite gradients in a row" in p.stderr and "warning: non-finite gradient" in p.stdout
    newest = sorted(c.name for c in (out / "checkpoints").iterdir() if (c / "COMPLETE").is_file())[-1]
    assert newest == "step00000004"


@pytest.mark.e2e
@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_rank(setup, tmp_path, launcher, stage):
    """2 ranks x 2 streams see the same documents as 1 rank x 4 streams (streams are numbered
    globally), and the loss is normalised by the step's target tokens on all ranks: the losses
    are the same up to the order of the float sums (rtol 1e-6, eight times fp32's epsilon;
    measured differences are ~1e-8)."""
    one = tmp_path / "one"
    run(setup, one, "--steps", 8, "--eval_every", 100, "--save_every", 100, ds="z0_b4.json")
    two = tmp_path / "two"
    run(setup, two, "--steps", 8, "--eval_every", 100, "--save_every", 100, ranks=2, launcher=launcher,
        ds=f"z{stage}_b2.json")
    a, b = np.array(losses(one)), np.array(losses(two))
    assert a[0] == pytest.approx(b[0], rel=1e-5)  # same data, same initial weights
    np.testing.assert_allclose(b, a, rtol=1e-6)


@pytest.fixture(scope="module")
def one_rank_eight_streams(setup, tmp_path_factory):
    """The losses of 8 steps on 1 rank x 8 streams, ZeRO-0: what 4 and 8 ranks must reproduce."""
    out = tmp_path_factory.mktemp("one_rank") / "run"
    run(setup, out, "--steps", 8, "--eval_every", 100, "--save_every", 100, ds="z0_b8.json")
    return np.array(losses(out))


@pytest.mark.e2e
@pytest.mark.parametrize("ranks,launcher,stage", [(4, "deepspeed", 3), (8, "mpirun", 3)])
def test_four_and_eight_ranks_match_one_rank(setup, tmp_path, monkeypatch, one_rank_eight_streams, ranks, launcher,
                                             stage):
    """Issue 29 on the CPU: 4 ranks x 2 streams and 8 ranks x 1 against 1 rank x 8, the same losses
    up to the order of the float sums, as for 2 ranks above (~40 s each on 2 cores)."""
    monkeypatch.setenv("FOLDSCALE_MPI_PORT", "29583")  # not the port other mpirun tests use
    many = tmp_path / "many"
    run(setup, many, "--steps", 8, "--eval_every", 100, "--save_every", 100, ranks=ranks, launcher=launcher,
        ds=f"z{stage}_b{8 // ranks}.json")
    b = np.array(losses(many))
    assert len(b) == len(one_rank_eight_streams) == 8
    np.testing.assert_allclose(b, one_rank_eight_streams, rtol=1e-6)


@pytest.mark.e2e
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


def test_a_resume_checks_the_run_against_its_checkpoint_once(setup, dist, tmp_path, monkeypatch):
    from foldscale import checkpoint as ckpt
    trainer = in_process_trainer(setup, tmp_path, 0, accum=1)
    trainer.train_step(PositionLoss(trainer.device))
    trainer.step = 1
    trainer.save()
    checks, check = [], ckpt._check_same_run
    monkeypatch.setattr(ckpt, "_check_same_run", lambda *args: checks.append(args[0]) or check(*args))
    resumed = Trainer(trainer.model_cfg, trainer.data_cfg, trainer.cfg, trainer.ds_config, trainer.store, rank=0,
                      world_size=1, resume="auto")
    assert resumed.step == 1 and checks == [ckpt.run_checkpoints(tmp_path / "run") / "step00000001"]
