"""Checkpoints (DESIGN.md §4): the one module that writes, finds, verifies, loads and prunes them.

    RUN/checkpoints/step00001000/
        mp_rank_00_model_states.pt, ...optim_states.pt   as DeepSpeed writes them; the trainer's
                                        state (step, tokens seen) is their client state
        foldscale_rank{r}.pt            rank r's sampler position, carried state and RNG states
        model.json train.json data.json ds_config.json    the resolved configs (the resolved
                                        learning-rate schedule is ds_config.json's "scheduler")
        tokenizer.model                 the token store's tokenizer, when it has one
        COMPLETE                        written last, by rank 0: tag, step, world size, and the
                                        size and BLAKE3 digest of every other file (the manifest),
                                        each rank hashing its share of the files (`_share`) on
                                        all its cores; checkpoints saved before 2026-12-07
                                        recorded sha256, which is still checked
    RUN/checkpoints/universal/step00001000/   DeepSpeed's universal form of it, made when a
                                        ZeRO 1-2 run resumes on another number of ranks

A run resumes on another number of ranks when the total number of streams is the same: the
streams' positions and carried states are re-dealt (`sampler.redeal`), the model and optimizer
re-sharded through DeepSpeed's universal checkpoint (ZeRO 1-2; ZeRO 0 keeps everything whole;
ZeRO 3 is refused, see `engine_config`).

Nothing in a checkpoint is read before its manifest is checked. foldscale's own files load with
`torch.load(weights_only=True)`; DeepSpeed's are unpickled by DeepSpeed itself, so the manifest
is what refuses a file changed after the save. It is a checksum, not a signature.
"""
import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import blake3
import torch
import torch.distributed as dist

from foldscale.config import ConfigError, FoldscaleError, ModelConfig
from foldscale.data.sampler import redeal, streams_to_set

_TAG = re.compile(r"^step(\d{8})$")
CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer.model"
UNIVERSAL = "universal"
STREAMS = "train_micro_batch_size_per_gpu"
DIGEST = "blake3"  # the key of each file's digest in COMPLETE


class CheckpointError(FoldscaleError):
    """A checkpoint that is missing, incomplete or damaged; the message names the file."""


def run_checkpoints(out) -> Path:
    """Where the run in directory OUT keeps its checkpoints: OUT/checkpoints."""
    return Path(out) / CHECKPOINTS


def configs(model_cfg, train_cfg, data_cfg, ds_config: dict) -> dict[str, dict]:
    """The resolved configs a checkpoint records, by file name (for `save` and `engine_config`)."""
    return {"model.json": dataclasses.asdict(model_cfg), "train.json": dataclasses.asdict(train_cfg),
            "data.json": dataclasses.asdict(data_cfg), "ds_config.json": ds_config}


def save(engine, root, step: int, rank: int, world_size: int, *, trainer_state: dict, rank_state: dict,
         configs: dict[str, dict], tokenizer, keep_last: int) -> Path:
    """Write checkpoint ROOT/stepNNNNNNNN; every rank calls it. Returns its path.

    Every rank writes its DeepSpeed files and foldscale_rank{r}.pt (RANK_STATE and its RNG
    states), rank 0 CONFIGS and the tokenizer; then every rank hashes its share of the files, and
    rank 0 writes COMPLETE from the gathered digests, last, and prunes to the newest KEEP_LAST
    checkpoints up to this one. A directory already at this tag (an interrupted save, or a later
    checkpoint of a run resumed from an earlier one) is moved aside, not deleted.

    A save that cannot fit is refused before it starts when the free space is known to be short.
    A failure on any rank (a full disk, where torch's writer says only "unexpected pos", or any
    other error) reaches every rank at the end of that part of the save (`_failed_rank`): a
    CheckpointError on each saying what to do, and the partial directory deleted, so that the
    previous checkpoint stays the one `--resume auto` takes.
    """
    root = Path(root)
    path = root / f"step{step:08d}"
    root.mkdir(parents=True, exist_ok=True)
    done = [p for p in _checkpoint_dirs(root) if (p / "COMPLETE").is_file() and p != path]
    needed = sum(f.stat().st_size for f in done[-1].rglob("*") if f.is_file()) if done else \
        16 * sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())  # fp32 weights + Adam
    resume = f"--resume auto takes {done[-1]}" if done else "there is no earlier checkpoint"

    def agree(error: Exception | None, partial: bool = True):
        """Raise on every rank when ERROR (what this part of the save raised on this rank, or
        None) is set on any; rank 0 first deletes PATH unless it is complete (PARTIAL: PATH holds
        this save's files)."""
        failed = _failed_rank(error is not None, rank)
        if failed is None:
            return
        if partial and rank == 0 and not (path / "COMPLETE").is_file():
            shutil.rmtree(path, ignore_errors=True)
        if error is None:
            raise CheckpointError(f"rank {failed} could not write its part of {path} (see its error); fix that and "
                                  f"resume ({resume})")
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or \
                "unexpected pos" in str(error):  # torch's writer on a full disk
            raise CheckpointError(f"no space left on {root}: a checkpoint needs about {needed:,} bytes, "
                                  f"{shutil.disk_usage(root).free:,} are free; free some space (or lower --keep-last) "
                                  f"and resume ({resume})") from None
        if isinstance(error, (OSError, RuntimeError)):
            raise CheckpointError(f"cannot write {path} ({type(error).__name__}: {error}): fix that and resume "
                                  f"({resume})") from None
        raise error

    short = shutil.disk_usage(root).free < needed
    if rank == 0 and not short and path.exists():
        print(f"moved the earlier {path} aside to {_move_aside(path)}", flush=True)
    agree(OSError(errno.ENOSPC, "No space left") if short else None, partial=False)  # refused before any write
    error = None
    try:
        try:
            engine.save_checkpoint(str(root), tag=path.name, client_state={"trainer": trainer_state},
                                   save_latest=False)
        except Exception:
            dist.barrier()  # the one that ends DeepSpeed's save_checkpoint, where the other ranks wait
            raise
        _atomic_torch_save({**rank_state, "rng": _rng_state()}, path / f"foldscale_rank{rank}.pt")
        if rank == 0:
            for name, cfg in configs.items():
                _atomic_write_text(path / name, json.dumps(cfg, indent=2))
            if tokenizer and Path(tokenizer).is_file():
                shutil.copyfile(tokenizer, path / TOKENIZER)
        os.sync()  # on disk before COMPLETE says so, and before _prune deletes an older checkpoint
    except Exception as e:
        error = e
    agree(error)
    mine = None
    try:
        files = _files(path)
        sizes = {name: f.stat().st_size for name, f in files.items()}
        mine = {name: digest(files[name]) for name in _share(sizes, rank, world_size)}
    except Exception as e:
        error = e
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank == 0 and None not in gathered:
        try:
            digests = {name: d for share in gathered for name, d in share.items()}
            record = {"tag": path.name, "step": step, "world_size": world_size,
                      "files": {name: {"bytes": size, DIGEST: digests[name]} for name, size in sizes.items()}}
            _atomic_write_text(path / "COMPLETE", json.dumps(record, indent=1))
            _prune(root, keep_last, path)
        except Exception as e:
            error = e
    agree(error)
    # Every rank leaves together. Without this barrier (the save ending on agree's all-reduce), 1 in
    # 40 two-rank gloo runs aborted at exit after a finished run ("terminate called without an
    # active exception"); with it 0 in 40, as before the all-reduce came in (session 7).
    dist.barrier()
    return path


def _failed_rank(failed: bool, rank: int) -> int | None:
    """The highest rank where FAILED, agreed by every rank, or None. An all-reduce that every rank
    reaches at the end of a part of `save`, as it would a barrier: a failure on one rank reaches
    every rank there, instead of leaving the others waiting at the next collective until its
    timeout."""
    flag = torch.tensor(rank + 1 if failed else 0, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag) - 1 if int(flag) else None


def find(resume: str, root, warn=print, rank: int = 0, world_size: int = 1) -> Path | None:
    """The checkpoint to resume from, verified; with WORLD_SIZE > 1 every rank calls it, and
    hashes its share of the files (`verify`).

    `auto`: the newest checkpoint under ROOT that verifies; each newer one that does not is
    skipped with a warning (through WARN) naming its damaged file, and none is deleted. None when
    there is nothing to resume (no checkpoint, or only interrupted saves); CheckpointError when
    there are complete checkpoints but none verifies. Otherwise RESUME is a checkpoint directory,
    refused unless it verifies.
    """
    if resume != "auto":
        verify(resume, rank, world_size)
        return Path(resume)
    damaged = 0
    for path in reversed(_checkpoint_dirs(root)):
        problem = _problem(path, rank, world_size)
        if problem is None:
            return path
        warn(f"warning: --resume auto skips {path.name}: {problem}")
        damaged += (path / "COMPLETE").is_file()
    if damaged:
        raise CheckpointError(f"{root}: none of its checkpoints verifies (see the warnings above); move the "
                              f"damaged ones out of {root} to start afresh")
    return None


def newest_complete(root) -> Path | None:
    """The newest checkpoint under ROOT with a COMPLETE marker, not verified (cheap: no hashing;
    `find` verifies the one a resume takes), or None."""
    return next((p for p in reversed(_checkpoint_dirs(root)) if _record(p) is not None), None)


def newest(root) -> Path:
    """The newest checkpoint directory under ROOT, complete or not (check it with `verify`)."""
    found = _checkpoint_dirs(root)
    if not found:
        raise CheckpointError(f"{root}: no checkpoint here (is {Path(root).parent} a run directory of "
                              "launch/pretrain.py?)")
    return found[-1]


def verify(path, rank: int = 0, world_size: int = 1) -> dict:
    """The checkpoint's COMPLETE record, once every file in it is as saved: none missing, none
    added, none of another size or content. Otherwise CheckpointError naming the first file at
    fault and the other checkpoints there are. With WORLD_SIZE > 1 every rank calls it and hashes
    its share of the files (`_share`)."""
    path = Path(path)
    problem = _problem(path, rank, world_size)
    if problem is not None:
        others = [p.name for p in _checkpoint_dirs(path.parent) if p != path]
        hint = (f"other checkpoints in {path.parent}: {', '.join(others)} (export one with --tag {others[-1]}, "
                f"or resume from one with --resume {path.parent / others[-1]})" if others
                else f"there is no other checkpoint in {path.parent}")
        raise CheckpointError(f"{problem}; {hint}")
    return _record(path)


def engine_config(path, rank: int, world_size: int, ds_config: dict, expect: dict[str, dict], log=print) -> dict:
    """The DeepSpeed config to build the engine with that will `load` checkpoint PATH (verified)
    on WORLD_SIZE ranks; every rank calls it, before deepspeed.initialize.

    DS_CONFIG itself when PATH was saved by WORLD_SIZE ranks or under ZeRO 0 (its one module file
    holds the whole model and optimizer). Otherwise (ZeRO 1-2 on another number of ranks) a copy
    with checkpoint.load_universal set, once rank 0 has converted PATH with DeepSpeed's
    ds_to_universal into ROOT/universal/TAG (a complete conversion there is reused).

    Refused first, with a ConfigError saying what to pass, when the total number of streams, the
    model or the schedule differ from EXPECT (the `configs` this run would save): the one check
    that the run can continue PATH, made before anything is built or loaded. Refused too for
    ZeRO 3 on another number of ranks.
    """
    path = Path(path)
    _check_same_run(path, world_size, expect)
    saved_world = _record(path)["world_size"]
    if saved_world == world_size:
        return ds_config
    stage = read_config(path, "ds_config.json").get("zero_optimization", {}).get("stage", 0)
    total = saved_world * read_config(path, "ds_config.json")[STREAMS]
    if stage == 3:
        # Measured on the CPU: resumed from its universal form, even on the same number of ranks,
        # a ZeRO-3 run's loss departs from the uninterrupted run's after the first step (~2e-3).
        raise ConfigError(f"{path} is a ZeRO-3 checkpoint of {saved_world} rank(s) and this run has {world_size}: "
                          f"resume it with {saved_world} ranks (DeepSpeed's universal checkpoint does not restore "
                          "ZeRO-3's optimizer state exactly, so foldscale re-shards only ZeRO 0-2)")
    action = "loading the ZeRO-0 model and optimizer whole" if stage == 0 else \
        f"converting the ZeRO-{stage} checkpoint to DeepSpeed's universal format in {_universal(path)}"
    log(f"re-dealing {total} streams from {saved_world} rank(s) to {world_size}; {action}")
    if stage == 0:
        return ds_config
    if rank == 0:
        _convert_to_universal(path, log)
    dist.barrier()
    if not (_universal(path) / "DONE").is_file():
        raise CheckpointError(f"{_universal(path)}: the conversion to DeepSpeed's universal format failed on rank 0 "
                              "(see its output)")
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def load(engine, path, rank: int, world_size: int) -> tuple[dict, dict]:
    """Load checkpoint PATH into ENGINE, built with `engine_config` (which refused a run that
    cannot continue PATH) after `find` verified PATH; returns (trainer state, this rank's state:
    its streams' sampler state and carried state).

    On another number of ranks than saved, every rank reads all foldscale_rank{r}.pt and takes
    its own global streams' sampler positions and carried states. RNG states: a rank restores
    those of the file with its own rank number and, when there is none (more ranks than saved),
    keeps its own (training with dropout 0 uses none).
    """
    path = Path(path)
    universal = engine.load_universal_checkpoint()
    root = _universal(path).parent if universal else path.parent
    loaded, client = engine.load_checkpoint(str(root), tag=path.name)
    if loaded is None:
        raise CheckpointError(f"{root / path.name}: DeepSpeed found no checkpoint to load there")
    if universal:
        _fused_steps_beside_parameters(engine.optimizer)
    saved_world = _record(path)["world_size"]
    saved = [_torch_load(path / f"foldscale_rank{r}.pt") for r in range(saved_world)] \
        if saved_world != world_size else {rank: _torch_load(path / f"foldscale_rank{rank}.pt")}
    if rank < saved_world:
        _set_rng_state(saved[rank]["rng"])
    if saved_world == world_size:
        mine = saved[rank]
        mine.pop("rng")
        return client["trainer"], mine
    streams = engine.train_micro_batch_size_per_gpu()
    states = [s["state"] for s in saved]
    carried = None if states[0] is None else torch.cat(states)[rank * streams:(rank + 1) * streams]  # (B, l, d)
    return client["trainer"], {"sampler": redeal([s["sampler"] for s in saved], rank, world_size, streams),
                               "state": carried}


def _fused_steps_beside_parameters(optimizer):
    """DeepSpeed's universal load leaves Adam's step counts on the CPU, which torch's fused AdamW
    refuses on a GPU ("state_steps is on cpu"; seen on the H100): move them to their parameters."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        if group.get("fused"):
            for p in group["params"]:
                state = inner.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(p.device)


def read_config(path, name: str) -> dict:
    """Config NAME (e.g. model.json) of checkpoint PATH."""
    f = Path(path) / name
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot be read ({e})") from None


def tokenizer(path) -> Path | None:
    f = Path(path) / TOKENIZER
    return f if f.is_file() else None


def model_weights(path) -> dict[str, torch.Tensor]:
    """The model's fp32 weights in checkpoint PATH (verified), whatever the ZeRO stage.

    ZeRO 0 keeps the whole module state dict in mp_rank_00_model_states.pt. ZeRO 1-3 keep the
    fp32 master weights in the optimizer partitions (under ZeRO 3 the module file holds only
    placeholders), which DeepSpeed's own zero_to_fp32 consolidates.
    """
    path = Path(path)
    if read_config(path, "ds_config.json").get("zero_optimization", {}).get("stage", 0) == 0:
        state = _torch_load(path / "mp_rank_00_model_states.pt")["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress on stdout
            state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return {k: v.float() for k, v in state.items()}


def _check_same_run(path: Path, world_size: int, expect: dict[str, dict]):
    """Refuse, saying what to pass, a run that cannot continue checkpoint PATH."""
    saved_world = _record(path)["world_size"]
    saved_ds, ds = read_config(path, "ds_config.json"), expect["ds_config.json"]
    total = saved_world * saved_ds.get(STREAMS)
    if saved_world != world_size and total != world_size * ds.get(STREAMS):
        raise ConfigError(f"{path} was written by {saved_world} rank(s) but this run has {world_size}, with "
                          f"{world_size * ds.get(STREAMS)} streams in all: this checkpoint has {total} streams in all "
                          f"({saved_world} rank(s) x {saved_ds.get(STREAMS)}); {streams_to_set(total, world_size)} "
                          f"(or resume with {saved_world} ranks)")
    saved_model = dataclasses.asdict(ModelConfig.from_dict(read_config(path, "model.json")))
    changed = _differences(saved_model, expect["model.json"], "model")
    if changed:
        raise ConfigError(f"this run's model differs from {path / 'model.json'} ({_described(changed)}): resume "
                          f"with --model {path / 'model.json'}")
    changed = _differences(saved_ds.get(STREAMS), ds.get(STREAMS), STREAMS)
    if saved_world == world_size and changed:
        raise ConfigError(f"the streams per rank differ from {path / 'ds_config.json'} ({_described(changed)}): set "
                          f"{STREAMS} to {saved_ds.get(STREAMS)} in the DeepSpeed JSON (each stream's position and "
                          "carried state are in the checkpoint)")
    changed = _differences(saved_ds.get("scheduler"), ds.get("scheduler"), "scheduler")
    if expect.get("train.json", {}).get("extend_schedule"):  # its end is this run's (engine.load_ds_config checks it)
        changed = [c for c in changed if c[0] != "scheduler.params.total_num_steps"]
    if changed:
        saved = {key: old for key, old, _ in changed}
        fix = "set " + ", ".join(f"{k} to {json.dumps(v)}" for k, v in saved.items()) + " in the DeepSpeed JSON"
        total = saved.get("scheduler.params.total_num_steps")
        if total is not None:
            fix = (f"resume with --steps {total} (where total_num_steps is \"auto\"), or {fix}, or add "
                   "--extend-schedule to stretch the schedule to the new --steps")
        raise ConfigError(f"the learning-rate schedule differs from the one in {path / 'ds_config.json'} "
                          f"({_described(changed)}): {fix}; a run keeps the schedule it started with")


def _universal(path: Path) -> Path:
    """Where checkpoint PATH's universal form goes: beside the checkpoints, not in PATH (whose
    manifest refuses extra files)."""
    return path.parent / UNIVERSAL / path.name


def _convert_to_universal(path: Path, log):
    """Convert checkpoint PATH with DeepSpeed's ds_to_universal into `_universal(PATH)`, marked
    complete by a DONE file written last; a complete conversion is reused, a partial one redone."""
    out = _universal(path)
    if (out / "DONE").is_file():
        log(f"reusing the universal checkpoint {out}")
        return
    import argparse
    from deepspeed.checkpoint import ds_to_universal
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(input_folder=str(path), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
        ds_to_universal.main(args)
    (out / "DONE").write_text(path.name)
    log(f"converted {path} to {out}")


def _differences(old, new, key: str) -> list[tuple]:
    """(dotted key, old value, new value) for every leaf where OLD and NEW differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{key}.{k}")]
    return [] if old == new else [(key, old, new)]


def _described(changed: list[tuple]) -> str:
    return "; ".join(f"{key} is {json.dumps(new)} in this run but {json.dumps(old)}" for key, old, new in changed)


def _checkpoint_dirs(root) -> list[Path]:
    """Checkpoint directories under ROOT, complete or not, oldest first."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if _TAG.match(p.name) and p.is_dir()) if root.is_dir() else []


def _files(path: Path) -> dict[str, Path]:
    """Every file of checkpoint PATH but COMPLETE, by its path relative to PATH."""
    found = {f.relative_to(path).as_posix(): f for f in path.rglob("*") if f.is_file()}
    found.pop("COMPLETE", None)
    return dict(sorted(found.items()))


def _record(path: Path) -> dict | None:
    """PATH/COMPLETE as rank 0 wrote it, or None when it is malformed."""
    try:
        record = json.loads((path / "COMPLETE").read_bytes())
        good = (record["tag"] == f"step{record['step']:08d}" and isinstance(record["world_size"], int)
                and all(isinstance(f["bytes"], int) and isinstance(f[_algorithm(f)], str)
                        for f in record["files"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        good = False
    return record if good else None


def _problem(path: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """What is wrong with checkpoint PATH, naming the file; None when every file is as saved.
    With WORLD_SIZE > 1 every rank calls it (the checks before hashing read only sizes and
    names, so every rank reaches the same one), and the ranks hash their shares of the files."""
    if not path.is_dir():
        return f"{path}: no such checkpoint directory"
    if not (path / "COMPLETE").is_file():
        return f"{path}: no COMPLETE marker (the save was interrupted, or is still running)"
    record = _record(path)
    if record is None:
        return (f"{path / 'COMPLETE'}: damaged, or written by a foldscale that did not record checksums "
                "(it must hold the tag, step, world size and every file's size and digest)")
    saved, found = record["files"], _files(path)
    for name, f in saved.items():
        if name not in found:
            return f"{path / name}: missing"
        if found[name].stat().st_size != f["bytes"]:
            return f"{path / name}: {found[name].stat().st_size} bytes, not the {f['bytes']} saved (truncated?)"
    for name in found:
        if name not in saved:
            return f"{path / name}: not part of the checkpoint as saved"
    share = _share({name: f["bytes"] for name, f in saved.items()}, rank, world_size)
    altered = []
    for name in share:
        algorithm = _algorithm(saved[name])
        if digest(found[name], algorithm) != saved[name][algorithm]:
            altered.append(name)
    if world_size > 1:
        everyone = [None] * world_size
        dist.all_gather_object(everyone, altered)
        altered = [name for names in everyone for name in names]
    for name in saved:
        if name in altered:
            return f"{path / name}: altered since it was saved (its digest differs from the one in COMPLETE)"
    return None


def _share(sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
    """The files (names, with their SIZES) that RANK hashes: the largest first, each to the rank
    with the fewest bytes so far, so that the slowest rank's share is as small as it can be
    (the files a rank writes are not: under ZeRO 0-2 rank 0 alone writes the module's)."""
    load = [0] * world_size
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = load.index(min(load))
        load[r] += sizes[name]
        if r == rank:
            mine.append(name)
    return mine


def _algorithm(entry: dict) -> str:
    """Which digest a file's ENTRY in COMPLETE holds: DIGEST, or sha256 in a checkpoint saved
    before it came in."""
    return DIGEST if DIGEST in entry else "sha256"


def digest(f: Path, algorithm: str = DIGEST) -> str:
    """File F's digest (hex) as COMPLETE records it."""
    if algorithm == "sha256":
        with open(f, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    # BLAKE3 hashes one file on every core: a 3b's 45 GB under 24gb.json took 44 s with sha256
    # (BENCHMARKS.md, session 18)
    return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(f).hexdigest()


def _prune(root: Path, keep_last: int, newest: Path):
    """Delete complete checkpoints older than the newest KEEP_LAST up to NEWEST; later ones (left
    by a run resumed from an earlier checkpoint) and incomplete ones are left alone."""
    done = [p for p in _checkpoint_dirs(root) if p.name <= newest.name and (p / "COMPLETE").is_file()]
    for old in done[:-keep_last]:
        (old / "COMPLETE").unlink()  # first, so a crash mid-delete never leaves a "complete" husk
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(_universal(old), ignore_errors=True)


def _move_aside(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.replaced{n}").exists():
        n += 1
    aside = path.with_name(f"{path.name}.replaced{n}")
    os.rename(path, aside)
    return aside


def _torch_load(f: Path):
    """A file foldscale wrote, or DeepSpeed's module file: tensors and plain python only."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})") from None


def _atomic_torch_save(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
