import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import context_use  # noqa: E402
from foldscale.config import ModelConfig  # noqa: E402


def test_variants_share_the_shape_and_differ_only_where_they_should():
    cfg = ModelConfig(n_local=2, n_global=3, segment_len=16, bptt_segments=4)
    v = context_use.variants(cfg, [8, 1])
    assert v["folded"] == cfg
    assert v["local_only"].use_state is False and v["local_only"].num_params() == cfg.num_params()
    assert list(v) == ["folded", "local_only", "full_8l", "full_1l"]
    for name, window in (("full_8l", 128), ("full_1l", 16)):
        full = v[name]
        assert (full.n_local, full.n_global, full.segment_len, full.bptt_segments) == (5, 0, window, 1)
        assert full.num_params() == cfg.num_params() - cfg.segment_len * cfg.d_model  # all but S0


def result(folded, local, full, l=10):
    labels = ["0", "1", "2-3", "4-7"]
    model = lambda name, losses: {"model": name, "by_position": dict(zip(labels, losses)),  # noqa: E731
                                  "tokens_by_position": dict(zip(labels, [10, 10, 20, 40]))}
    return {"position_unit": l, "models": [model("folded", folded), model("local_only", local),
                                           model("full_8l", full), model("full_1l", local)]}


def test_reach_is_the_last_bucket_with_the_margin():
    report = context_use.analyse(result([3.0, 2.0, 2.0, 2.0], [3.0, 2.5, 2.03, 2.01], [2.9, 1.9, 1.8, 1.9]), 0.01)
    assert [r["bucket"] for r in report["rows"]] == ["0", "1", "2-3", "4-7"]
    assert report["reach_bucket"] == "2-3" and report["reach_tokens"] == 20  # 2.03 -> 2.0 is 1.5%; 4-7 is 0.5%
    assert report["rows"][1]["gain_vs_local"] == pytest.approx(0.2)
    assert report["rows"][1]["gap_to_full"] == pytest.approx(0.1 / 1.9)  # to the first window
    assert report["full"] == ["full_8l", "full_1l"] and report["rows"][1]["full_1l"] == 2.5


def test_no_reach_when_the_state_never_helps():
    report = context_use.analyse(result([3.0, 2.0], [3.0, 2.0], [3.0, 2.0]), 0.01)
    assert report["reach_bucket"] is None and report["reach_tokens"] is None
