import hashlib
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_helpers import CODE_SAMPLE, train_small_tokenizer
from foldscale.cli import main
from foldscale.data.corpus import stdlib_files
from foldscale.data.tokenizer import Tokenizer, TokenizerError, _sample, _training_failure, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("tok") / "tok.model")


def test_code_round_trips_exactly(tok):
    ids = tok.encode(CODE_SAMPLE)
    assert tok.decode(ids) == CODE_SAMPLE
    assert tok.unk_id not in ids


# U+2581 is sentencepiece's space marker and decodes as " " (documented); surrogates are not text.
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581")))
def test_any_text_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_newline_is_one_token_and_special_ids_are_fixed(tok):
    assert len(tok.encode("\n")) == 1
    assert len(tok.encode("\n\n")) == 2
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 512


def test_encode_batch_matches_encode(tok):
    texts = [CODE_SAMPLE, "", "x = 1\n"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode("") == []


def test_hash_is_sha256_of_file_and_no_temp_files_left(tok):
    assert tok.hash == hashlib.sha256(tok.path.read_bytes()).hexdigest()
    assert [p.name for p in tok.path.parent.iterdir()] == ["tok.model"]


def test_pickle_round_trip(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(CODE_SAMPLE) == tok.encode(CODE_SAMPLE)
    assert clone.hash == tok.hash


def test_train_from_iterator_of_texts(tmp_path):
    texts = (f"def func_{i}(a, b):\n    return a * {i} + b\n" for i in range(300))
    tok = train_tokenizer(texts, 300, tmp_path / "it.model")
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode("def func_7(a, b):\n")) == "def func_7(a, b):\n"


SAMPLED_TRAINING = """
import hashlib, random, sys
from foldscale.data.tokenizer import train_tokenizer
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(3000)]
lines = [" ".join(rng.choice(words) for _ in range(12)) + "\\n" for _ in range(20000)]
tok = train_tokenizer(iter(lines), 1000, sys.argv[1], input_sentence_size=2000)
print(hashlib.sha256(tok.path.read_bytes()).hexdigest())
"""


@pytest.mark.e2e
def test_a_sampled_training_gives_the_same_tokenizer_in_every_process(tmp_path):
    """More lines than input_sentence_size: foldscale samples them itself, the same way every time
    (sentencepiece's own sample differs from process to process, and so did the tokenizer)."""
    runs = [subprocess.run([sys.executable, "-c", SAMPLED_TRAINING, str(tmp_path / f"{i}.model")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120) for i in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout


def test_the_sample_is_the_same_for_the_same_lines():
    lines = [f"line {i}" for i in range(1000)]
    sample = _sample(iter(lines), 100)
    assert len(sample) == 100 and len(set(sample)) == 100 and set(sample) <= set(lines)
    assert sample == _sample(iter(lines), 100) != lines[:100]
    assert _sample(iter(lines), 0) == lines and _sample(iter(lines[:50]), 100) == lines[:50]


def test_refusals(tmp_path):
    with pytest.raises(TokenizerError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="bad.model"):
        Tokenizer(tmp_path / "bad.model")
    with pytest.raises(TokenizerError, match="no text"):
        train_tokenizer(iter(["", "\n\n"]), 300, tmp_path / "empty.model")
    with pytest.raises(TokenizerError, match="nope.txt"):
        train_tokenizer([tmp_path / "nope.txt"], 300, tmp_path / "x.model")


SMALL_TEXT = "".join(f"for i in range({n}):\n\tprint(i, {n})\n" for n in range(400))


def train_error(vocab_size, out):
    with pytest.raises(TokenizerError) as e:
        train_tokenizer(iter([SMALL_TEXT]), vocab_size, out)
    assert "character_coverage" not in str(e.value)  # an option foldscale does not have
    return str(e.value)


def test_vocab_size_bounds_are_told_for_this_input(tmp_path):
    """The minimum is 256 byte pieces + 5 special pieces + one per common character (26 here):
    it works and one less does not; the maximum is what BPE merges of this text can make."""
    out = tmp_path / "t.model"
    least = 256 + 5 + len(set(SMALL_TEXT) - {"\n"})
    for too_small in (10, 261, least - 1):
        assert train_error(too_small, out) == (
            f"vocab size {too_small} is too small for this input: it needs at least {least} (256 "
            "byte pieces, 5 special pieces and one per common character of the text); use "
            f"--vocab-size {least} or more")
    assert train_tokenizer(iter([SMALL_TEXT]), least, out).vocab_size == least
    message = train_error(400, out)
    most = int(message.split("at most ")[1].split()[0])
    assert message.startswith("vocab size 400 is too large for this input") and least < most < 400
    assert train_tokenizer(iter([SMALL_TEXT]), most, out).vocab_size == most
    assert train_error(most + 1, out).startswith(f"vocab size {most + 1} is too large")
    assert train_error(0, out) == "vocab size must be positive, got 0"


def test_other_sentencepiece_failures_name_no_options_foldscale_lacks():
    message = ("INTERNAL: src/trainer_interface.cc(99) [a <= b] Something else broke. Decrease "
               "character_coverage with --character_coverage option.")
    assert _training_failure(message, 500) == "sentencepiece training failed: Something else broke."


def test_300_on_little_code_works_or_gets_its_minimum(tmp_path):
    files = stdlib_files(40)
    with pytest.raises(TokenizerError, match=r"at least (\d+) .*--vocab-size \1 or more") as e:
        train_tokenizer(files, 300, tmp_path / "t.model")
    least = int(str(e.value).split("at least ")[1].split()[0])
    assert train_tokenizer(files, least, tmp_path / "t.model").vocab_size == least


def test_cli_train(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("".join(f"for i in range({n}):\n\tprint(i, {n})\n" for n in range(400)))
    out = tmp_path / "cli.model"
    result = CliRunner().invoke(main, ["tokenizer", "train", "--input", str(src),
                                       "--vocab-size", "300", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Tokenizer(out).vocab_size == 300


def test_cli_train_refuses_missing_input(tmp_path):
    result = CliRunner().invoke(main, ["tokenizer", "train", "--input", str(tmp_path / "*.txt"),
                                       "--out", str(tmp_path / "t.model")])
    assert result.exit_code == 2
    assert result.output.strip().startswith("Error: no input files matched")
    assert "Traceback" not in result.output
    assert not (tmp_path / "t.model").exists()


def test_cli_train_too_small_vocab_is_one_line_with_a_value_that_works(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text(SMALL_TEXT)
    args = ["tokenizer", "train", "--input", str(src), "--out", str(tmp_path / "t.model")]
    result = CliRunner().invoke(main, args + ["--vocab-size", "10"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.splitlines()[-1].startswith("Error: vocab size 10 is too small")
    suggested = result.output.split("use --vocab-size ")[1].split()[0]
    assert CliRunner().invoke(main, args + ["--vocab-size", suggested]).exit_code == 0


def test_help_has_examples():
    for args in (["tokenizer", "--help"], ["tokenizer", "train", "--help"], ["prepare", "--help"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and "Example" in result.output
