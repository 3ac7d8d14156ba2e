"""checkpoint.py: what a checkpoint holds, and every damage to any of its files refused or recovered from.

One tiny ZeRO 2 run (a token store with its tokenizer; checkpoints at steps 2 and 4) is trained once
and each case damages a copy of it. The cases are the files of that real checkpoint, so a file the
trainer starts writing is covered without touching this test.
"""
import errno
import hashlib
import json
import shutil
import time
from pathlib import Path

import blake3
import pytest
import torch
from click.testing import CliRunner

from foldscale import checkpoint as ckpt
from foldscale.cli import main
from foldscale.config import ConfigError
from run_helpers import TOKENIZED_MODEL, run, spawn_ranks, tokenized_store

ROOT = Path(__file__).resolve().parents[1]
STREAMS = 2
KINDS = {"COMPLETE", "foldscale_rank0.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "model.json", "train.json", "data.json", "ds_config.json", "tokenizer.model"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A directory as run_helpers.run wants it (model.json, store, z2.json) holding RUN, trained
    for 4 steps with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("checkpoint")
    tokenized_store(tmp / "store")
    (tmp / "model.json").write_text(json.dumps(TOKENIZED_MODEL))
    cfg = json.loads((ROOT / "ds_configs" / "cpu.json").read_text())
    cfg["scheduler"]["params"]["warmup_num_steps"] = 1
    cfg.update(train_micro_batch_size_per_gpu=STREAMS, zero_optimization={"stage": 2})
    (tmp / "z2.json").write_text(json.dumps(cfg))
    run(tmp, tmp / "run", "--steps", 4, "--save-every", 2, "--eval-every", 100, ds="z2.json")
    return tmp


def damage(f: Path, how: str):
    if how == "delete":
        f.unlink()
    elif how == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))


def listing(run_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def resume(trained, run_dir, *args, check=True):
    return run(trained, run_dir, "--steps", 4, "--save-every", 2, "--eval-every", 100, "--resume", *args,
               ds="z2.json", check=check)


@pytest.mark.e2e
def test_a_checkpoint_holds_its_manifest_configs_and_rank_state(trained):
    path = trained / "run" / "checkpoints" / "step00000004"
    assert {p.name for p in path.iterdir()} == KINDS
    record = ckpt.verify(path)
    assert record["step"] == 4 and record["world_size"] == 1 and set(record["files"]) == KINDS - {"COMPLETE"}
    for name, entry in record["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "blake3": blake3.blake3(data).hexdigest()}
    assert ckpt.read_config(path, "ds_config.json")["scheduler"]["params"]["total_num_steps"] == 4
    mine = torch.load(path / "foldscale_rank0.pt", weights_only=True)
    assert mine["state"].shape == (STREAMS, TOKENIZED_MODEL["segment_len"], TOKENIZED_MODEL["d_model"])
    assert mine["sampler"]["steps"] == 4 and mine["rng"]["torch"].dtype == torch.uint8


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
def test_every_damaged_file_is_passed_over_by_resume_and_refused_by_export(trained, tmp_path, how):
    """Damage each file of the newest checkpoint in turn: `--resume auto` falls back to the one
    before and says which file it found damaged; export refuses with exit code 2 and one line
    naming the file; nothing is deleted."""
    names = sorted(p.name for p in (trained / "run" / "checkpoints" / "step00000004").iterdir())
    assert set(names) == KINDS
    for name in names:
        run_dir = tmp_path / name
        shutil.copytree(trained / "run", run_dir)
        root = run_dir / "checkpoints"
        damage(root / "step00000004" / name, how)
        before = listing(run_dir)

        warnings = []
        assert ckpt.find("auto", root, warn=warnings.append) == root / "step00000002", name
        named = "step00000004: no COMPLETE marker" if (name, how) == ("COMPLETE", "delete") else f"step00000004/{name}: "
        assert len(warnings) == 1 and named in warnings[0], (name, warnings)
        with pytest.raises(ckpt.CheckpointError, match="other checkpoints in .*: step00000002"):
            ckpt.find(str(root / "step00000004"), root)

        result = CliRunner().invoke(main, ["export", str(run_dir), "--out", str(tmp_path / "m")])
        assert result.exit_code == 2 and named in result.output, (name, result.output)
        assert result.output.count("\n") == 1 and "Traceback" not in result.output, result.output
        assert listing(run_dir) == before, name


@pytest.mark.e2e
def test_resume_auto_falls_back_and_continues_as_if_never_damaged(trained, tmp_path):
    """The fallback resumes from step 2 bit for bit: its new step 4 holds the weights of the
    undamaged run's. The damaged checkpoint is moved aside, not deleted."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "run", run_dir)
    root = run_dir / "checkpoints"
    damage(root / "step00000004" / "foldscale_rank0.pt", "flip")
    damaged = (root / "step00000004" / "foldscale_rank0.pt").read_bytes()
    p = resume(trained, run_dir, "auto")
    assert "--resume auto skips step00000004" in p.stdout and "step00000004/foldscale_rank0.pt: altered" in p.stdout
    assert f"resumed from {root / 'step00000002'} at step 2" in p.stdout
    assert (root / "step00000004.replaced1" / "foldscale_rank0.pt").read_bytes() == damaged
    assert {p.name for p in root.glob("step*")} == {"step00000002", "step00000004", "step00000004.replaced1"}
    ckpt.verify(root / "step00000004")
    original = ckpt.model_weights(trained / "run" / "checkpoints" / "step00000004")
    for k, v in ckpt.model_weights(root / "step00000004").items():
        assert torch.equal(v, original[k]), k


@pytest.mark.e2e
def test_resume_refuses_when_no_checkpoint_verifies(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "run", run_dir)
    root = run_dir / "checkpoints"
    shutil.rmtree(root / "step00000002")
    damage(root / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "truncate")
    before = listing(run_dir)
    p = resume(trained, run_dir, "auto", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "step00000004/zero_pp_rank_0_mp_rank_00_optim_states.pt: " in p.stdout
    assert "none of its checkpoints verifies" in p.stderr
    assert {k: v for k, v in listing(run_dir).items() if k.startswith("checkpoints")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoints")}


@pytest.mark.e2e
def test_resume_refuses_a_damaged_checkpoint_it_is_given(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "run", run_dir)
    newest = run_dir / "checkpoints" / "step00000004"
    (newest / "model.json").write_text((newest / "model.json").read_text().replace("32", "64"))
    p = resume(trained, run_dir, newest, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert f"{newest / 'model.json'}: altered since it was saved" in p.stderr
    assert f"--resume {run_dir / 'checkpoints' / 'step00000002'}" in p.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("change,message", [
    ("world size", r"written by 1 rank\(s\) but this run has 2, with 4 streams in all: this checkpoint has 2 "
                   r"streams in all \(1 rank\(s\) x 2\); with 2 rank\(s\) set train_micro_batch_size_per_gpu to 1"),
    ("model", r"model.d_model is 64 in this run but 32\): resume with --model .*step00000004/model.json"),
    ("streams", r"train_micro_batch_size_per_gpu is 4 in this run but 2\): set train_micro_batch_size_per_gpu to 2"),
    ("warmup", r"warmup_num_steps is 2 in this run but 1\): set scheduler.params.warmup_num_steps to 1 in the Deep"),
    ("steps", r"total_num_steps is 6 in this run but 4\): resume with --steps 4"),
])
def test_a_resume_refuses_another_run_before_building_anything(trained, change, message):
    path = trained / "run" / "checkpoints" / "step00000004"
    expect = {name: ckpt.read_config(path, name) for name in ("model.json", "ds_config.json")}
    world_size, ds = 2 if change == "world size" else 1, expect["ds_config.json"]
    if change == "model":
        expect["model.json"]["d_model"] = 64
    elif change == "streams":
        ds["train_micro_batch_size_per_gpu"] = 4
    elif change == "warmup":
        ds["scheduler"]["params"]["warmup_num_steps"] = 2
    elif change == "steps":
        ds["scheduler"]["params"]["total_num_steps"] = 6
    with pytest.raises(ConfigError, match=message):
        ckpt.engine_config(path, 0, world_size, ds, expect, log=lambda m: None)


@pytest.mark.e2e
def test_resume_refuses_another_schedule(trained, tmp_path):
    """--steps 6 would stretch the cosine schedule (total_num_steps "auto") under a run planned
    for 4 steps: refused, saying what to pass."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "run", run_dir)
    p = run(trained, run_dir, "--steps", 6, "--resume", "auto", ds="z2.json", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "scheduler.params.total_num_steps is 6 in this run but 4" in p.stderr
    assert "resume with --steps 4" in p.stderr


def test_a_manifest_of_sha256_digests_from_before_blake3_is_still_checked(tmp_path):
    """Checkpoints saved before COMPLETE recorded BLAKE3 recorded each file's sha256: they still
    verify, and a byte changed since is still found."""
    path = tmp_path / "step00000002"
    path.mkdir()
    files = {"mp_rank_00_model_states.pt": b"weights" * 1000, "model.json": b"{}", "empty": b""}
    for name, data in files.items():
        (path / name).write_bytes(data)
    manifest = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    (path / "COMPLETE").write_text(json.dumps({"tag": path.name, "step": 2, "world_size": 1, "files": manifest}))
    assert ckpt.verify(path)["files"] == manifest
    damage(path / "mp_rank_00_model_states.pt", "flip")
    with pytest.raises(ckpt.CheckpointError, match="mp_rank_00_model_states.pt: altered since it was saved"):
        ckpt.verify(path)


def test_the_ranks_share_the_hashing_largest_file_first():
    sizes = {"a": 10, "b": 6, "c": 5, "d": 1, "e": 0}
    assert ckpt._share(sizes, 0, 1) == ["a", "b", "c", "d", "e"]
    assert (ckpt._share(sizes, 0, 2), ckpt._share(sizes, 1, 2)) == (["a", "d", "e"], ["b", "c"])  # 11 and 11 bytes
    shares = [ckpt._share(sizes, r, 8) for r in range(8)]
    assert sorted(n for s in shares for n in s) == sorted(sizes) and max(map(len, shares)) == 1


@pytest.mark.e2e
def test_two_ranks_hash_their_shares_and_both_refuse_a_file_either_finds_altered(setup, tmp_path, monkeypatch):
    """Saved and verified by 2 ranks: a byte flipped in a file that rank 1 alone hashes (not rank 0,
    which prints) is found, and the resume refused on both ranks."""
    monkeypatch.setenv("FOLDSCALE_MPI_PORT", "29571")  # not the port other mpirun tests use
    two, out = dict(ranks=2, launcher="mpirun", ds="z2_b2.json"), tmp_path / "run"
    run(setup, out, "--steps", 3, "--eval-every", 100, **two)
    path = out / "checkpoints" / "step00000003"
    sizes = {name: f["bytes"] for name, f in json.loads((path / "COMPLETE").read_text())["files"].items()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(sizes)
    victim = ckpt._share(sizes, 1, 2)[0]
    damage(path / victim, "flip")
    p = run(setup, out, "--steps", 3, "--resume", "auto", "--eval-every", 100, check=False, **two)
    assert p.returncode != 0 and "none of its checkpoints verifies" in p.stderr, p.stderr[-3000:]
    assert f"{path / victim}: altered since it was saved" in p.stdout, p.stdout[-3000:]


class FullDiskEngine:
    """Saves like DeepSpeed's engine (a file per tag) until `full`, then fails as torch's writer
    does on a full disk, after writing part of the file."""
    module = torch.nn.Linear(4, 4)
    full = False

    def save_checkpoint(self, root, tag, **kwargs):
        (Path(root) / tag).mkdir(parents=True)
        if self.full:
            (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"PK")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 576 vs 470")
        torch.save(self.module.state_dict(), Path(root) / tag / "mp_rank_00_model_states.pt")


def test_a_full_disk_is_one_error_and_keeps_the_previous_checkpoint(dist, tmp_path, monkeypatch):
    import collections

    root, engine = tmp_path / "checkpoints", FullDiskEngine()
    args = dict(trainer_state={"step": 0}, rank_state={}, configs={}, tokenizer=None, keep_last=3)
    ckpt.save(engine, root, 2, 0, 1, **args)
    engine.full = True
    with pytest.raises(ckpt.CheckpointError, match=r"no space left on .*checkpoints: a checkpoint needs about "
                                                   r"[\d,]+ bytes, [\d,]+ are free; .*--resume auto takes"):
        ckpt.save(engine, root, 4, 0, 1, **args)
    assert not (root / "step00000004").exists() and ckpt.find("auto", root) == root / "step00000002"
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 10, 10))
    engine.full = False
    with pytest.raises(ckpt.CheckpointError, match=r", 10 are free"):  # refused before writing anything
        ckpt.save(engine, root, 4, 0, 1, **args)
    assert not (root / "step00000004").exists()


def test_the_checkpoints_folder_is_named_in_checkpoint_py_alone():
    """Every module finds a run's checkpoints through checkpoint.run_checkpoints."""
    sources = [f for folder in ("foldscale", "launch", "tools", "benchmarks", "experiments")
               for f in sorted((ROOT / folder).rglob("*.py"))]
    spelled = [f.relative_to(ROOT).as_posix() for f in sources
               if f.name != "checkpoint.py" and any(q + "checkpoints" + q in f.read_text() for q in "\"'")]
    assert spelled == [] and ckpt.run_checkpoints("runs/a") == Path("runs/a/checkpoints")


def test_the_checkpoint_leaves_an_extended_schedule_s_end_to_load_ds_config(tmp_path):
    """Under --extend-schedule the total is this run's (engine.load_ds_config alone refuses a
    shorter one); every other scheduler key is still checked."""
    from foldscale.config import ModelConfig
    from run_helpers import MODEL
    sched = {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_num_steps": 1}}
    ds = {"train_micro_batch_size_per_gpu": 2, "scheduler": sched}
    (tmp_path / "ds_config.json").write_text(json.dumps(ds))
    (tmp_path / "model.json").write_text(json.dumps(MODEL))
    (tmp_path / "COMPLETE").write_text(json.dumps({"tag": "step00000002", "step": 2, "world_size": 1, "files": {}}))
    expect = {"model.json": ModelConfig.from_dict(MODEL).to_dict(), "train.json": {"extend_schedule": True}}
    for total in (5, 20):
        changed = {**ds, "scheduler": {**sched, "params": {**sched["params"], "total_num_steps": total}}}
        assert ckpt.engine_config(tmp_path, 0, 1, changed, {**expect, "ds_config.json": changed}) == changed
    changed = {**ds, "scheduler": {**sched, "params": {**sched["params"], "warmup_num_steps": 2}}}
    with pytest.raises(ConfigError, match="warmup_num_steps is 2 in this run but 1"):
        ckpt.engine_config(tmp_path, 0, 1, changed, {**expect, "ds_config.json": changed})


class BarrierEngine:
    """Saves as DeepSpeed's engine does: a barrier, each rank's file, a barrier."""
    module = torch.nn.Linear(4, 4)

    def save_checkpoint(self, root, tag, **kwargs):
        torch.distributed.barrier()
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        rank = torch.distributed.get_rank()
        torch.save(self.module.state_dict(), Path(root) / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        torch.distributed.barrier()


def save_with_a_full_disk_on_rank_1(rank: int, root: Path, where: str):
    """Save step 2, then step 4 with rank 1's disk full in DeepSpeed's write or foldscale's;
    each rank records the error it got and how long it took."""
    args = dict(trainer_state={"step": 0}, rank_state={}, configs={"model.json": {}}, tokenizer=None, keep_last=3)
    ckpt.save(BarrierEngine(), root, 2, rank, 2, **args)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    if rank == 1 and where == "deepspeed":
        torch.save = no_space
    elif rank == 1:
        ckpt._atomic_torch_save = no_space
    t0, error = time.perf_counter(), None
    try:
        ckpt.save(BarrierEngine(), root, 4, rank, 2, **args)
    except ckpt.CheckpointError as e:
        error = str(e)
    (root.parent / f"rank{rank}.json").write_text(json.dumps({"error": error, "seconds": time.perf_counter() - t0}))


@pytest.mark.parametrize("where", ["deepspeed", "foldscale"])
def test_a_save_failing_on_one_rank_fails_on_every_rank_at_once(tmp_path, where):
    """Rank 1's disk is full: both ranks raise a CheckpointError saying what to do within
    seconds (not at the collective timeout, 30 s here), and the partial step 4 is gone, so
    --resume auto takes step 2."""
    root = tmp_path / "checkpoints"
    spawn_ranks(save_with_a_full_disk_on_rank_1, 2, root, where)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[1]["error"].startswith(f"no space left on {root}: a checkpoint needs about")
    assert got[1]["error"].endswith(f"and resume (--resume auto takes {root / 'step00000002'})")
    assert got[0]["error"] == (f"rank 1 could not write its part of {root / 'step00000004'} (see its error); fix "
                               f"that and resume (--resume auto takes {root / 'step00000002'})")
    assert max(g["seconds"] for g in got) < 15, got
    assert not (root / "step00000004").exists() and ckpt.find("auto", root) == root / "step00000002"
