"""Fixtures shared by several test modules. Tests marked `e2e` start processes (launch/pretrain.py,
benchmarks, experiments); `pytest -m "not e2e"` leaves them out."""
import json
import os

import numpy as np
import pytest
import torch

from foldscale.data import write_store
from foldscale.engine import init_distributed
from run_helpers import MODEL, ROOT


@pytest.fixture
def one_thread():
    """Toy tensors run several times faster on one thread than on two contended cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def dist():
    """A process group of one in this process (made by the first test that asks; it lasts).
    init_distributed writes RANK, MASTER_PORT, ... into the environment, which DeepSpeed reads
    again while building engines; put it back after each test, or every later subprocess would
    think it was launched into this process's group and try to bind its port."""
    saved = dict(os.environ)
    yield init_distributed()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """For run_helpers.run: a token store of learnable documents (mostly counting up by a step of
    their own, with noise), model.json (MODEL), and DeepSpeed configs z{stage}_b{streams per rank}.json for ZeRO 0-3
    and 1, 2, 4 or 8 streams."""
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
        for streams in (1, 2, 4, 8):
            cfg = {**base, "train_micro_batch_size_per_gpu": streams, "zero_optimization": {"stage": stage}}
            (tmp / f"z{stage}_b{streams}.json").write_text(json.dumps(cfg))
    cfg = json.loads((tmp / "z0_b4.json").read_text())
    cfg["scheduler"]["params"]["total_num_steps"] = 20  # one schedule for runs resumed with other --steps
    (tmp / "fixed20.json").write_text(json.dumps(cfg))
    return tmp
