import argparse
import dataclasses

import pytest

from experiments import context_use, passkey, suite
from experiments.longctx.train import TrainArgs
from foldscale.config import ModelConfig, TrainConfig
from foldscale.flags import add_fields, field_docs, from_args


def test_field_docs_are_the_strings_under_the_fields():
    docs = field_docs(ModelConfig)
    assert docs["segment_len"] == "Tokens per segment (l), also the number of carried state vectors unless `state_rows`."
    assert docs["state_gate_hard"].startswith("With `state_gate`: g = clamp(1.2 sigmoid(z) - 0.1, 0, 1)")
    assert "\n" not in docs["state_norm"] and "  " not in docs["state_norm"]
    assert set(docs) <= {f.name for f in dataclasses.fields(ModelConfig)}


def test_every_field_is_a_typed_flag_with_both_spellings_and_its_docstring():
    p = argparse.ArgumentParser()
    add_fields(p, ModelConfig, skip=("vocab_size",), d_model=64)
    args = p.parse_args(["--n-head", "2", "--segment_len", "16", "--state-gate", "--no-tie-embeddings",
                         "--ffn-mult", "2.5"])
    cfg = from_args(ModelConfig, args, vocab_size=100)
    assert (cfg.vocab_size, cfg.d_model, cfg.n_head, cfg.segment_len) == (100, 64, 2, 16)
    assert cfg.state_gate and not cfg.tie_embeddings and cfg.ffn_mult == 2.5 and not cfg.state_norm
    assert "--vocab-size" not in p.format_help()
    assert "also the number of carried state vectors" in " ".join(p.format_help().split())
    with pytest.raises(SystemExit):
        p.parse_args(["--n-head", "two"])


def test_optional_fields_take_their_scalar_type():
    p = argparse.ArgumentParser()
    add_fields(p, TrainConfig)
    assert p.parse_args(["--gpu-mem-gib", "24"]).gpu_mem_gib == 24.0
    assert p.parse_args([]).gpu_mem_gib is None
    add_fields(q := argparse.ArgumentParser(), TrainArgs)
    assert q.parse_args(["--steps", "7"]).steps == 7


@pytest.mark.parametrize("script", [suite, passkey, context_use])
def test_every_model_flag_reaches_every_script(script):
    """The scripts take ModelConfig's fields, so no flag is missing from one of them (passkey.py
    once lacked --state-gate-hard)."""
    args = script.parse_args(["--state-gate", "--state-gate-hard", "--state-norm", "--dropout", "0.1",
                              "--bptt-segments", "3"])
    assert args.state_gate_hard and args.state_gate and args.dropout == 0.1 and args.bptt_segments == 3
