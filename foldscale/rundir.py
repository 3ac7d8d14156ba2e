"""The run directory (`--out`): one training at a time in it, and a run in it is never started
over by accident.

Rank 0 takes a lock on RUN/.lock (flock, released when the process ends, however it ends) that
names its PID and host, and checks that RUN holds no earlier run unless it is resumed or
`--overwrite` is given. A run that fails before it logs or saves anything leaves no directory it made.
"""
import contextlib
import fcntl
import os
import shutil
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from foldscale.checkpoint import CHECKPOINTS, run_checkpoints
from foldscale.config import ConfigError

LOCK = ".lock"
RUN_FILES = (CHECKPOINTS, "metrics.jsonl", "tensorboard", "placement")
"""What a training writes into RUN, and all that --overwrite deletes."""


def holds_run(out: Path) -> bool:
    """Whether OUT holds an earlier training's checkpoints or metrics."""
    checkpoints = run_checkpoints(out)
    metrics = out / "metrics.jsonl"
    return (checkpoints.is_dir() and any(checkpoints.iterdir())) or (metrics.is_file() and metrics.stat().st_size > 0)


@contextlib.contextmanager
def claimed(out, rank: int, resume: str | None, overwrite: bool):
    """Hold RUN for this training (every rank enters; rank 0 decides, the others follow)."""
    out = Path(out)
    made = not out.exists()
    lock, problem = None, None
    if rank == 0:
        try:
            lock = _lock(out, resume, overwrite)
        except ConfigError as e:
            problem = e
        except OSError as e:  # --out a file, or not writable
            problem = ConfigError(f"--out {out}: {e.strerror or e}; give a directory this user can write")
    if dist.is_initialized():
        failed = torch.tensor([float(problem is not None)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(failed, src=0)
        if failed.item() and problem is None:
            raise ConfigError(f"{out}: refused by rank 0 (see its message)")
    if problem is not None:
        raise problem
    try:
        yield
    except BaseException:
        if rank == 0 and made and not holds_run(out):  # nothing trained yet: leave no directory behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.close()


def _lock(out: Path, resume: str | None, overwrite: bool):
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"{out} is in use by {holder} (lock {out / LOCK}): wait for that training to end, "
                          "or give this one another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"the training of PID {os.getpid()} on host {socket.gethostname()}\n")
    f.flush()
    if not resume and holds_run(out):
        if not overwrite:
            f.close()
            raise ConfigError(f"{out} holds an earlier run: continue it with --resume auto, start it afresh with "
                              f"--overwrite (deletes its {', '.join(RUN_FILES)}), or give another --out")
        for name in RUN_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return f
