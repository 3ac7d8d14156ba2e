import json

import pytest
from click.testing import CliRunner

from foldscale.cli import main
from foldscale.config import PRESETS, ConfigError, ModelConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_round_trip_json(name, tmp_path):
    cfg = ModelConfig.load(name)
    cfg.to_json(tmp_path / "m.json")
    assert ModelConfig.from_json(tmp_path / "m.json") == cfg
    assert ModelConfig.load(str(tmp_path / "m.json"), segment_len=7).segment_len == 7


def test_large_presets_have_long_segments_and_their_size():
    sizes = {name: ModelConfig.load(name).num_params() / 1e6 for name in ("125m", "350m", "1b", "3b")}
    assert 100 < sizes["125m"] < 150 and 300 < sizes["350m"] < 400
    assert 900 < sizes["1b"] < 1300 and 2800 < sizes["3b"] < 3500
    assert ModelConfig.load("paper").segment_len == 12
    assert all(ModelConfig.load(n).segment_len in (512, 1024) for n in sizes)


@pytest.mark.parametrize("kw,message", [
    (dict(d_model=100, n_head=3), "divisible by n_head=3: change n_head"),
    (dict(d_model=36, n_head=4), "must be even"),
    (dict(n_local=0, n_global=0), "not both 0"),
    (dict(bptt_segments=0), "bptt_segments"),
    (dict(segment_len=0), "segment_len"),
])
def test_bad_configs_say_what_to_change(kw, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**kw)


def test_unknown_keys_and_names_are_refused(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"d_model": 64, "n_heads": 4}))
    with pytest.raises(ConfigError, match="unknown keys \\['n_heads'\\]"):
        ModelConfig.from_json(tmp_path / "m.json")
    with pytest.raises(ConfigError, match="unknown model 'huge'"):
        ModelConfig.load("huge")


def test_info_command():
    result = CliRunner().invoke(main, ["info", "350m", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    cfg = ModelConfig.load("350m")
    assert info["params"]["total"] == cfg.num_params()
    assert info["params"]["local"] + info["params"]["global"] + info["params"]["embedding"] + info["params"]["head"] == cfg.num_params()
    bad = CliRunner().invoke(main, ["info", "nope"])
    assert bad.exit_code != 0 and "unknown model 'nope'" in bad.output and "Traceback" not in bad.output
