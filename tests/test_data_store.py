import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from click.testing import CliRunner

from data_helpers import CODE_SAMPLE, random_docs, train_small_tokenizer
from foldscale.cli import main
from foldscale.data import store as store_mod
from foldscale.data.store import DamagedStoreError, StoreError, TokenStore, prepare, write_store


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("tok") / "tok.model")


@pytest.fixture
def small_store(tmp_path):
    docs = random_docs(np.random.default_rng(0), 50, 40)
    return write_store(docs, tmp_path / "store", vocab_size=1000), docs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A jsonl (with an empty and a null document), two text files and a parquet file."""
    d = tmp_path_factory.mktemp("inputs")
    rows = [{"text": CODE_SAMPLE, "id": 1}, {"text": "", "id": 2}, {"text": None, "id": 3},
            {"text": "print('hi')\n", "id": 4}]
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "b.txt").write_text("line one\nline two\n\n\tindented\n")
    (d / "c.txt").write_text("x = 1\n")
    datasets.Dataset.from_dict({"text": ["import os\n", "def g():\n    pass\n"]}).to_parquet(d / "e.parquet")
    return d


def test_write_store_round_trip_drops_empties(small_store, tmp_path):
    store, docs = small_store
    st = write_store([[5, 6, 7], [], [8], []], tmp_path / "s2", vocab_size=100, val_fraction=0)
    assert [st.doc(i).tolist() for i in range(st.n_docs)] == [[5, 6, 7], [8]]
    assert st.meta["dropped_empty_docs"] == 2
    assert st.tokens.dtype == np.uint16
    assert st.doc_lengths.tolist() == [3, 1]
    assert all(np.array_equal(store.doc(i), d) for i, d in enumerate(docs))
    assert store.n_tokens == sum(len(d) for d in docs)


def test_large_vocab_uses_uint32(tmp_path):
    st = write_store([[70000, 1]], tmp_path / "s", vocab_size=70001)
    assert st.tokens.dtype == np.uint32 and st.doc(0).tolist() == [70000, 1]


def test_split_by_whole_documents_deterministic(tmp_path):
    docs = [[i + 4] for i in range(200)]
    a = write_store(docs, tmp_path / "a", 1000, val_fraction=0.2, seed=1)
    b = write_store(docs, tmp_path / "b", 1000, val_fraction=0.2, seed=1)
    c = write_store(docs, tmp_path / "c", 1000, val_fraction=0.2, seed=2)
    assert np.array_equal(a.docs("val"), b.docs("val"))
    assert not np.array_equal(a.docs("val"), c.docs("val"))
    assert sorted(a.docs("val").tolist() + a.docs("train").tolist()) == list(range(200))
    assert 20 <= len(a.docs("val")) <= 60
    assert a.meta["splits"]["val"]["docs"] == len(a.docs("val"))
    tiny = write_store([[4], [5]], tmp_path / "t", 10, val_fraction=0.001)
    assert (len(tiny.docs("train")), len(tiny.docs("val"))) == (1, 1)


def test_refuses_overwrite_and_bad_tokens(small_store, tmp_path):
    store, docs = small_store
    with pytest.raises(StoreError, match="already exists.*--overwrite"):
        write_store([[4]], store.path, vocab_size=1000)
    assert TokenStore.open(store.path).n_docs == 50
    write_store([[4]], store.path, vocab_size=1000, overwrite=True)
    assert TokenStore.open(store.path).n_docs == 1
    with pytest.raises(StoreError, match="out of range"):
        write_store([[5, 1000]], tmp_path / "oor", vocab_size=1000)
    with pytest.raises(StoreError, match="no documents"):
        write_store([[], []], tmp_path / "empty", vocab_size=1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_open_refuses_truncated_tokens(small_store):
    store, _ = small_store
    data = (store.path / "tokens.bin").read_bytes()
    (store.path / "tokens.bin").write_bytes(data[:-2])
    with pytest.raises(StoreError, match="tokens.bin.*truncated.*foldscale prepare"):
        TokenStore.open(store.path)


def test_open_refuses_edited_old_and_missing_meta(small_store, tmp_path):
    store, _ = small_store
    meta_file = store.path / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "n_docs": 49}, indent=2) + "\n")  # valid JSON
    with pytest.raises(DamagedStoreError, match="meta.json does not match its own checksum"):
        TokenStore.open(store.path)
    del meta["checksum"], meta["files"]
    meta_file.write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(DamagedStoreError, match="meta.json has no checksum: .*older foldscale"):
        TokenStore.open(store.path)
    meta_file.unlink()
    with pytest.raises(DamagedStoreError, match="meta.json is missing.*foldscale prepare"):
        TokenStore.open(store.path)
    with pytest.raises(StoreError, match="not found"):
        TokenStore.open(tmp_path / "nowhere")


def test_check_compatible(small_store):
    store, _ = small_store
    store.check_compatible(1000, "none")
    with pytest.raises(StoreError, match="model vocab_size 512 .*vocab_size 1000"):
        store.check_compatible(512)
    with pytest.raises(StoreError, match="tokenizer mismatch"):
        store.check_compatible(1000, "abc")


def test_prepare_mixed_inputs(tok, inputs, tmp_path):
    st = prepare([inputs / "a.jsonl", str(inputs / "*.txt"), inputs / "e.parquet"], tok,
                 tmp_path / "store", val_fraction=0, num_proc=2)
    texts = [CODE_SAMPLE, "print('hi')\n", "line one\nline two\n\n\tindented\n", "x = 1\n",
             "import os\n", "def g():\n    pass\n"]
    assert st.n_docs == len(texts)  # text files are one document each, not one per line
    assert st.meta["dropped_empty_docs"] == 2
    for i, text in enumerate(texts):
        doc = st.doc(i)
        assert doc[-1] == tok.eos_id and tok.decode(doc[:-1]) == text
    assert st.tokenizer_hash == tok.hash
    assert st.tokenizer_path.read_bytes() == tok.path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no temp dirs left


def test_prepare_single_process_matches_parallel(tok, inputs, tmp_path):
    one = prepare(str(inputs / "*.txt"), tok.path, tmp_path / "one", num_proc=1)
    two = prepare(str(inputs / "*.txt"), tok.path, tmp_path / "two", num_proc=2)
    assert np.array_equal(one.tokens, two.tokens) and np.array_equal(one.offsets, two.offsets)


def test_prepare_refusals(tok, inputs, tmp_path):
    with pytest.raises(StoreError, match="no input files matched"):
        prepare(str(tmp_path / "*.jsonl"), tok, tmp_path / "s")
    with pytest.raises(StoreError, match="input not found: .*missing.jsonl is no file"):
        prepare(str(tmp_path / "missing.jsonl"), tok, tmp_path / "s")
    with pytest.raises(StoreError, match="'body' not found.*fields there: text, id"):
        prepare(inputs / "a.jsonl", tok, tmp_path / "s", text_field="body")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(StoreError, match="no documents.*2 empty"):
        prepare(tmp_path / "empty.jsonl", tok, tmp_path / "s")
    assert not (tmp_path / "s").exists()
    assert not list(tmp_path.glob("s.tmp-*"))


def test_prepare_refuses_non_utf8_inputs_by_file_and_offset(tok, inputs, tmp_path):
    bad = {"bad.txt": b"hello\nworld \xff\xfe\n",
           "bad.jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
           "bad.csv": b"text\nok\nbad \xff\n",
           "python.bin": Path(sys.executable).read_bytes()[:4096]}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(StoreError, match=r"bad.txt is not UTF-8 text: byte 0xff at offset 12 "):
        prepare([inputs / "b.txt", tmp_path / "bad.txt"], tok, tmp_path / "s")
    with pytest.raises(StoreError, match=r"bad.jsonl is not UTF-8 text: byte 0xe9 at offset 28 "):
        prepare(tmp_path / "bad.jsonl", tok, tmp_path / "s")
    with pytest.raises(StoreError, match=r"bad.csv is not UTF-8 text: byte 0xff at offset 12 "):
        prepare(tmp_path / "bad.csv", tok, tmp_path / "s")
    with pytest.raises(StoreError, match=r"python.bin is not UTF-8 text: byte 0x[0-9a-f]{2} at offset"):
        prepare(tmp_path / "python.bin", tok, tmp_path / "s")
    (tmp_path / "not.jsonl").write_text("this is not json\n")
    with pytest.raises(StoreError, match=r"could not read .*not.jsonl as json \(\w+: "):
        prepare(tmp_path / "not.jsonl", tok, tmp_path / "s")
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob("s.tmp-*"))


def test_first_bad_byte_across_chunks(tmp_path):
    f = tmp_path / "t.txt"
    head = b"a" * ((1 << 20) - 1) + "é".encode()  # é is cut by the 1 MiB chunk boundary
    f.write_bytes(head + b"b" * 10)
    assert store_mod._first_bad_byte(f) is None
    f.write_bytes(head + b"b" * 10 + b"\x80")
    assert store_mod._first_bad_byte(f) == (len(head) + 10, 0x80)
    f.write_bytes(b"abc\xc3")  # a character cut by the end of the file
    assert store_mod._first_bad_byte(f) == (3, 0xc3)


def test_interrupted_prepare_leaves_no_store(tok, inputs, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod._Writer, "finish", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(inputs / "b.txt", tok, tmp_path / "s", num_proc=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.e2e
def test_reading_needs_no_datasets(small_store):
    store, _ = small_store
    code = ("import sys; sys.modules['datasets'] = None\n"
            "from foldscale.data import TokenStore, SegmentStreamSampler\n"
            f"s = SegmentStreamSampler(TokenStore.open({str(store.path)!r}), 'train', 0, 1, 2, 8)\n"
            "print(next(s).n_tokens)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 0


def test_cli_prepare(tok, inputs, tmp_path):
    out = tmp_path / "store"
    args = ["prepare", "--input", str(inputs / "*.txt"), "--tokenizer", str(tok.path),
            "--out", str(out), "--num-proc", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert TokenStore.open(out).n_docs == 2
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "already exists" in again.output
    assert "Traceback" not in again.output
    assert CliRunner().invoke(main, args + ["--overwrite"]).exit_code == 0
    missing = CliRunner().invoke(main, ["prepare", "--out", str(out)])
    assert missing.exit_code == 2 and "missing --input, --tokenizer" in missing.output
    bad_tok = tmp_path / "bad.model"
    bad_tok.write_text("garbage")
    corrupt = CliRunner().invoke(main, args[:3] + ["--tokenizer", str(bad_tok), "--out", str(tmp_path / "x")])
    assert corrupt.exit_code == 2 and "bad.model" in corrupt.output
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\xff binary")
    binary = CliRunner().invoke(main, ["prepare", "--input", str(tmp_path / "bin.txt"), "--tokenizer",
                                       str(tok.path), "--out", str(tmp_path / "y")])
    assert binary.exit_code == 2 and "Traceback" not in binary.output
    assert binary.output.strip() == (f"Error: {tmp_path / 'bin.txt'} is not UTF-8 text: byte 0xff at offset "
                                     "2 does not decode; leave binary files out of --input, and convert "
                                     "text to UTF-8 first (e.g. `iconv -f latin1 -t utf-8`)")


def test_unreachable_hub_dataset_is_a_clear_error(tok, tmp_path, monkeypatch):
    # Offline, datasets retries for ~30 s before failing; the wrapping is what is tested here.
    def offline(name, **kwargs):
        assert name == "someone/corpus"
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("foldscale.data.store._check_hub_reachable", lambda name: None)
    with pytest.raises(StoreError, match="could not load dataset 'someone/corpus'.*pass its files"):
        prepare("someone/corpus", tok, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_a_local_looking_name_is_not_sent_to_the_hub_and_an_offline_hub_fails_at_once(tok, tmp_path, monkeypatch):
    import socket
    import time

    def never(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(datasets, "load_dataset", never)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for typo in ("mycorpus", "data/corpus"):  # no owner/name, or a local folder's name first
        with pytest.raises(StoreError, match=f"input not found: {typo} is no file, directory or glob here"):
            prepare(typo, tok, tmp_path / "s")

    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    t0 = time.perf_counter()
    with pytest.raises(StoreError, match="cannot reach .* to load dataset 'someone/corpus'.*HF_HUB_OFFLINE=1"):
        prepare("someone/corpus", tok, tmp_path / "s")
    assert time.perf_counter() - t0 < 5


def test_local_files_are_not_said_to_be_downloaded(tok, tmp_path, capfd):
    for i in range(20):  # datasets shows its bar from 16 files on
        (tmp_path / f"f{i}.py").write_text(f"x = {i}\n")
    prepare(str(tmp_path / "*.py"), tok, tmp_path / "s", num_proc=1)
    err = capfd.readouterr().err
    assert "reading input files" in err and "Downloading" not in err
