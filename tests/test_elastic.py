"""Elastic resume (DESIGN.md §4): a run checkpointed on N ranks goes on on N/2 ranks, then on N again
(2 -> 1 -> 2 and 4 -> 2 -> 4), with the same total number of streams, and reads what one
uninterrupted N-rank run reads."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from foldscale import checkpoint as ckpt
from foldscale.config import ConfigError, ModelConfig
from foldscale.data import SegmentStreamSampler, write_store
from foldscale.data.sampler import redeal
from run_helpers import MODEL, losses, run

STEPS = 6  # 2 on 2 ranks, 2 on 1 rank, 2 on 2 ranks


def placements(out) -> dict[tuple[int, int], tuple]:
    """(step, global stream) -> (segment indices, token checksums), from every rank's file."""
    found = {}
    for f in sorted((Path(out) / "placement").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            record = json.loads(line)
            for s in record["streams"]:
                key = (record["step"], s["stream"])
                assert key not in found, key
                found[key] = (s["seg_index"], s["crc"])
    return found


@pytest.mark.e2e
@pytest.mark.parametrize("ranks,stage", [(2, 0), (4, 2)])
def test_ranks_halved_and_back_read_and_learn_as_one_run(setup, tmp_path, monkeypatch, ranks, stage):
    """N ranks x 2 streams -> N/2 ranks x 4 -> N ranks x 2, against one N x 2 run: every (step, stream)
    reads the same tokens, and the losses are the same: the loss is normalised by the step's target
    tokens on all ranks, so N/2 ranks compute the gradient N ranks do, up to the order of the
    float sums (rtol 1e-6, eight times fp32's epsilon; measured differences are ~1e-8). 4 -> 2 -> 4
    takes ~65 s on 2 cores, so 8 -> 4 -> 8 is left to `python -m tools.elastic --gpus 8` on GPUs."""
    monkeypatch.setenv("FOLDSCALE_MPI_PORT", "29563")  # not the port test_trainer's mpirun runs use
    for streams in (2, 4):
        cfg = json.loads((setup / f"z{stage}_b{streams}.json").read_text())
        cfg["scheduler"]["params"]["total_num_steps"] = STEPS  # one schedule for every leg
        (setup / f"elastic_z{stage}_b{streams}.json").write_text(json.dumps(cfg))
    total, half = 2 * ranks, ranks // 2
    full = dict(ranks=ranks, launcher="mpirun", ds=f"elastic_z{stage}_b2.json")
    halved = dict(ranks=half, launcher="mpirun" if half > 1 else "python", ds=f"elastic_z{stage}_b4.json")
    flags = ["--eval-every", 100, "--save-every", 100, "--log-placement"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(setup, straight, "--steps", STEPS, *flags, **full)
    run(setup, split, "--steps", 2, *flags, **full)
    p = run(setup, split, "--steps", 4, "--resume", "auto", *flags, **halved)
    converts = f"converting the ZeRO-{stage} checkpoint to DeepSpeed's universal format" if stage else \
        "loading the ZeRO-0 model and optimizer whole"
    assert f"re-dealing {total} streams from {ranks} rank(s) to {half}; {converts}" in p.stdout, p.stdout[-3000:]
    p = run(setup, split, "--steps", STEPS, "--resume", "auto", *flags, **full)
    assert f"re-dealing {total} streams from {half} rank(s) to {ranks}" in p.stdout, p.stdout[-3000:]
    if stage:
        universal = split / "checkpoints" / "universal"
        assert {d.name for d in universal.iterdir() if d.is_dir()} == {"step00000002", "step00000004"}

    assert placements(split) == placements(straight) and len(placements(straight)) == STEPS * total
    a, b = np.array(losses(straight)), np.array(losses(split))
    assert len(a) == len(b) == STEPS
    np.testing.assert_allclose(b[:3], a[:3], rtol=1e-5)  # same weights, data and carried state
    np.testing.assert_allclose(b, a, rtol=1e-6)
    rank0 = [json.loads(line) for line in (split / "placement" / "rank0.jsonl").read_text().splitlines()]
    assert [len(r["streams"]) for r in rank0] == [2, 2, 4, 4, 2, 2]  # the middle leg ran on half the ranks


@pytest.mark.e2e
def test_a_changed_total_of_streams_is_refused_saying_what_to_set(setup, tmp_path):
    out = tmp_path / "run"
    run(setup, out, "--steps", 2, "--eval-every", 100, ds="fixed20.json")  # 1 rank x 4 streams
    p = run(setup, out, "--steps", 4, "--resume", "auto", ranks=2, launcher="mpirun", ds="z0_b4.json", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr.split("pretrain: error:")[0][-200:]
    assert ("written by 1 rank(s) but this run has 2, with 8 streams in all: this checkpoint has 4 streams in all "
            "(1 rank(s) x 4); with 2 rank(s) set train_micro_batch_size_per_gpu to 2") in p.stderr, p.stderr[-3000:]


def test_a_zero3_checkpoint_is_refused_on_another_number_of_ranks(tmp_path):
    """Refused before any conversion: DeepSpeed's universal checkpoint does not restore ZeRO-3's
    optimizer state exactly (see checkpoint.engine_config)."""
    ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}}
    (tmp_path / "ds_config.json").write_text(json.dumps(ds))
    (tmp_path / "model.json").write_text(json.dumps(MODEL))
    (tmp_path / "COMPLETE").write_text(json.dumps({"tag": "step00000002", "step": 2, "world_size": 2, "files": {}}))
    expect = {"model.json": dataclasses.asdict(ModelConfig.from_dict(MODEL)),
              "ds_config.json": {**ds, "train_micro_batch_size_per_gpu": 4}}
    with pytest.raises(ConfigError, match="ZeRO-3 checkpoint of 2 rank.* this run has 1: resume it with 2 ranks"):
        ckpt.engine_config(tmp_path, 0, 1, expect["ds_config.json"], expect, log=lambda m: None)
    assert ckpt.engine_config(tmp_path, 0, 2, ds, {**expect, "ds_config.json": ds}) == ds  # same ranks: as it is


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 50, size=int(rng.integers(3, 60))) for _ in range(40)]
    return write_store(docs, tmp_path_factory.mktemp("elastic") / "store", vocab_size=50, val_fraction=0.0)


def test_redeal_gives_each_rank_its_global_streams(store):
    """1 rank x 4 streams, after some steps, == 2 ranks x 2 streams re-dealt (and back), batch for batch."""
    one = SegmentStreamSampler(store, "train", 0, 1, 4, segment_len=5, seed=3)
    two = [SegmentStreamSampler(store, "train", r, 2, 2, segment_len=5, seed=3) for r in range(2)]
    for _ in range(7):
        a, parts = next(one), [next(s) for s in two]
        assert np.array_equal(a.ids, np.concatenate([b.ids for b in parts]))
    for r, s in enumerate(two):
        moved = SegmentStreamSampler(store, "train", r, 2, 2, segment_len=5, seed=3)
        moved.load_state_dict(redeal([one.state_dict()], r, 2, 2))
        assert moved.state_dict()["streams"] == s.state_dict()["streams"]
    back = SegmentStreamSampler(store, "train", 0, 1, 4, segment_len=5, seed=3)
    back.load_state_dict(redeal([s.state_dict() for s in two], 0, 1, 4))
    for _ in range(30):  # across documents and epochs
        a, parts = next(back), [next(s) for s in two]
        for key in ("ids", "targets", "reset", "seg_index"):
            assert np.array_equal(getattr(a, key), np.concatenate([getattr(b, key) for b in parts])), key


def test_redeal_refuses_a_changed_total_or_missing_ranks(store):
    two = [SegmentStreamSampler(store, "train", r, 2, 2, segment_len=5, seed=3).state_dict() for r in range(2)]
    with pytest.raises(ConfigError, match=r"4 streams in all \(2 rank\(s\) x 2\) but this run has 3 \(1 x 3\): "
                                          r"with 1 rank\(s\) set train_micro_batch_size_per_gpu to 4"):
        redeal(two, 0, 1, 3)
    with pytest.raises(ConfigError, match="4 streams cannot be shared by 3 ranks: run on 1, 2, 4 rank"):
        redeal(two, 0, 3, 1)
    with pytest.raises(ConfigError, match="expected the states of ranks 0..1"):
        redeal(two[:1], 0, 1, 4)
