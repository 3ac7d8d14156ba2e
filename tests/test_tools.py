"""The tools run as a user runs them, from the repository root (`python -m tools.NAME`)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.run_helpers import ROOT


@pytest.mark.e2e
def test_parity_of_two_ranks_and_one(tmp_path):
    """2 gloo ranks x 2 streams against 1 rank x 4: the same losses up to float order, every
    stream reading the same segments, documents in order."""
    out = tmp_path / "parity.json"
    proc = subprocess.run([sys.executable, "-m", "tools.parity", "--quick", "--json", str(out)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["zero"] for r in rows] == [2]
    assert all(r["ok"] and r["same_segments"] and r["documents_in_order"] and r["max_rel_diff"] < 1e-6 for r in rows)


@pytest.mark.e2e
def test_scaling_model(tmp_path):
    """Analytic, no --quick: efficiency in (0, 1], falling as the GPUs grow, for each ZeRO stage."""
    out = tmp_path / "scaling.json"
    proc = subprocess.run([sys.executable, "-m", "tools.scaling_model", "--presets", "350m", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    for zero in (1, 2, 3):
        eff = [r["efficiency"] for r in rows if r["zero"] == zero]
        assert len(eff) == 4 and all(0 < e <= 1 for e in eff) and eff == sorted(eff, reverse=True)


class SavingEngine:
    """Saves as DeepSpeed's engine does, a directory per tag (ckpt.save's part of it is real)."""
    module = torch.nn.Linear(4, 4)

    def save_checkpoint(self, root, tag, **kwargs):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(self.module.state_dict(), Path(root) / tag / "mp_rank_00_model_states.pt")


def test_inspect_checkpoint_reports_and_verifies(dist, tmp_path, capsys):
    from foldscale import checkpoint as ckpt
    from foldscale.config import ModelConfig
    from tools import inspect_checkpoint
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "scheduler": {"type": "WarmupCosineLR"}}
    configs = {"model.json": ModelConfig(segment_len=32).to_dict(), "ds_config.json": ds}
    for step in (2, 4):
        ckpt.save(SavingEngine(), tmp_path / "run" / "checkpoints", step, 0, 1, trainer_state={"step": step},
                  rank_state={}, configs=configs, tokenizer=None, keep_last=3)
    info = inspect_checkpoint.inspect(tmp_path / "run")
    assert info["verifies"] and info["step"] == 4 and info["world_size"] == 1
    assert info["model"]["segment_len"] == 32 and info["batch"]["gradient_accumulation_steps"] == 2
    assert "mp_rank_00_model_states.pt" in info["files"] and info["bytes"] == sum(info["files"].values())
    newest = tmp_path / "run" / "checkpoints" / "step00000004"
    with open(newest / "mp_rank_00_model_states.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(SystemExit) as stop:
        inspect_checkpoint.main([str(tmp_path / "run")])
    assert stop.value.code == 1 and "does not verify" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        inspect_checkpoint.main([str(tmp_path / "run" / "checkpoints" / "step00000002")])
    assert stop.value.code == 0 and "step 2" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        inspect_checkpoint.main([str(tmp_path / "nothing")])
    assert stop.value.code == 2 and "no such run or checkpoint directory" in capsys.readouterr().err


SPHINX_PAGE = b"""<html><head><script>var nav = "SCRIPT";</script></head><body>
<div class="related" role="navigation"><a href="index.html">RELATED NAV</a></div>
<div class="document"><div class="body" role="main">
<h1>Folding<a class="headerlink" href="#f">\xc2\xb6</a></h1>
<p>The carried state is condensed.</p><p>It crosses segments.</p>
<pre>x = fold(y)\n    return x</pre>
</div><div class="sphinxsidebar">SIDEBAR</div></div>
<div class="footer">FOOTER (c) 2024</div></body></html>"""


def test_html_text_keeps_the_main_content_as_blocks():
    from tools import prose_corpus as pc
    text = pc.tidy(pc.html_text(SPHINX_PAGE))
    assert text.startswith("Folding\n")
    assert "The carried state is condensed.\n" in text and "\nIt crosses segments." in text
    assert "x = fold(y)\n    return x" in text  # preformatted text keeps its lines and indent
    for noise in ("SCRIPT", "RELATED NAV", "SIDEBAR", "FOOTER", "\u00b6"):
        assert noise not in text
    assert pc.html_text(b"") == ""


def test_man_and_pod_pages_render_through_their_own_tools(tmp_path):
    from tools import prose_corpus as pc
    page = tmp_path / "fold.1"
    page.write_text('.TH FOLD 1\n.SH NAME\nfold \\- condense\n.SH DESCRIPTION\nSome \\fBbold\\fR words,\n'
                    'joined in one line.\n')
    text = pc.render("man", page)
    assert "Some bold words, joined in one line." in text and "\b" not in text and "\x1b" not in text
    assert "\nNAME\nfold - condense\n" in text  # the 7-space body indent is taken off
    pod = tmp_path / "fold.pod"
    pod.write_text("=head1 NAME\n\nfold - condense\n\n=head1 TEXT\n\nSome B<bold> words.\n\n=cut\n")
    assert "Some bold words." in pc.render("pod", pod) and "B<" not in pc.render("pod", pod)


def make_deb(debs: Path, version: str) -> Path:
    """A package `foldscale-doc` of VERSION in DEBS, holding one HTML page."""
    src = debs.parent / f"src-{version}"
    (src / "DEBIAN").mkdir(parents=True)
    (src / "DEBIAN" / "control").write_text(f"Package: foldscale-doc\nVersion: {version}\nArchitecture: all\n"
                                            "Maintainer: x <x@example.org>\nDescription: test\n")
    (src / "usr/share/doc/fold").mkdir(parents=True)
    (src / "usr/share/doc/fold/index.html").write_text(f"<p>folded {version}</p>")
    debs.mkdir(parents=True, exist_ok=True)
    deb = debs / f"foldscale-doc_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(src), str(deb)], check=True, capture_output=True)
    return deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is Debian's")
def test_unpack_into_a_fresh_directory(tmp_path, monkeypatch):
    """A package already downloaded is unpacked into OUT/root/PKG when OUT/root does not exist yet
    (dpkg-deb makes its target directory but not the parents), and only once."""
    from tools import prose_corpus as pc
    monkeypatch.setattr(pc, "PROGRAMS", {})
    out = tmp_path / "out"
    make_deb(out / "debs", "1")
    root = pc.unpack(["foldscale-doc"], out, {})["foldscale-doc"]
    assert (root / "usr/share/doc/fold/index.html").read_text() == "<p>folded 1</p>"
    (root / "usr/share/doc/fold/index.html").unlink()
    pc.unpack(["foldscale-doc"], out, {})  # unpacked before: left as it is
    assert not (root / "usr/share/doc/fold/index.html").exists()


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is Debian's")
def test_packages_come_at_their_pinned_version_and_another_is_refused(tmp_path, monkeypatch):
    """A pinned package is asked of apt as PKG=VERSION; a build folder holding it at another version
    (its text would be of that version) is refused before anything is unpacked."""
    from tools import prose_corpus as pc
    monkeypatch.setattr(pc, "PROGRAMS", {})
    run, asked = pc._run, []

    def apt(args, cwd=None, what=""):  # apt-get download, offline: builds the version asked for
        if args[:2] != ["apt-get", "download"]:
            return run(args, cwd, what)
        asked.append(args[2:])
        make_deb(Path(cwd), args[2].split("=")[1])
    monkeypatch.setattr(pc, "_run", apt)
    out = tmp_path / "out"
    root = pc.unpack(["foldscale-doc"], out, {"foldscale-doc": "2"})["foldscale-doc"]
    assert asked == [["foldscale-doc=2"]]
    assert (root / "usr/share/doc/fold/index.html").read_text() == "<p>folded 2</p>"
    with pytest.raises(pc.CorpusError, match="foldscale-doc_2_all.deb is version 2, not 3: build into an empty folder"):
        pc.unpack(["foldscale-doc"], out, {"foldscale-doc": "3"})
    assert pc.deb_version(make_deb(tmp_path / "other", "1:4.5-6+deb12u1")) == "1:4.5-6+deb12u1"  # epoch kept


def test_page_kinds():
    from tools.prose_corpus import page_kind
    assert page_kind("usr/share/doc/x/html/a/b.html") == "html"
    assert page_kind("usr/share/man/man3/printf.3.gz") == "man"
    assert page_kind("usr/share/man/de/man3/printf.3.gz") is None  # a translation
    assert page_kind("usr/share/perl/5.36.0/pod/perlfunc.pod") == "pod"
    for junk in ("usr/share/doc/x/html/genindex-A.html", "usr/share/doc/x/html/_sources/a.rst.txt",
                 "usr/share/doc/x/html/_static/a.html", "usr/share/doc/x/copyright", "usr/share/doc/x/a.png"):
        assert page_kind(junk) is None, junk


def test_documents_keep_pages_whole_per_folder_and_split_at_page_boundaries():
    from tools.prose_corpus import documents
    pages = [(f"a/p{i}.html", f"page {i} " + "w" * 100) for i in range(10)] + [("b/only.html", "alone")]
    docs = documents(pages[::-1], max_chars=450)  # any input order: pages follow their file names
    assert docs["b-00"] == "alone"
    parts = [docs[k] for k in sorted(docs) if k.startswith("a-")]
    assert len(parts) == 3 and all(len(p) <= 450 + 110 for p in parts)
    assert "\n\n".join(parts) == "\n\n".join(text for _, text in pages[:10])  # whole pages, in order


def test_deduper_drops_repeats_stubs_and_translations():
    from tools import prose_corpus as pc
    prose = "The carried state crosses segment boundaries. " * 10
    dedup = pc.Deduper()
    assert dedup.keep(prose)
    assert not dedup.keep("  " + prose.upper().replace(" ", "\n"))  # same words, other case and spacing
    assert not dedup.keep("too short")
    assert not dedup.keep("Der übertragene Zustand überquert Segmentgrenzen, läuft über Größen. " * 10)
    assert dedup.keep(prose + "One more sentence.")
    assert dedup.dropped == {"duplicate": 1, "short": 1, "not English": 1}


def test_gutenberg_and_bible_books():
    from tools.prose_corpus import bible_books, gutenberg_books
    big = ("header\n*** START OF THIS PROJECT GUTENBERG EBOOK ONE ***\nFirst book.\n*** END OF THIS PROJECT\n"
           "licence\n*** START OF THE PROJECT GUTENBERG EBOOK TWO ***\nSecond book.\n")
    assert gutenberg_books(big) == ["First book.", "Second book."]
    imp = ('$$$Genesis 1:1\n<w lemma="x">In</w> the beginning<note n="a">a note</note>\n'
           "$$$Genesis 1:2\nAnd the earth\n$$$Exodus 1:1\nNow these\n")
    assert bible_books(imp) == {"Genesis": "In the beginning\nAnd the earth", "Exodus": "Now these"}


def test_store_and_stats_count_every_source(tmp_path, monkeypatch):
    """The store holds each text file as one document, and stats give each source its tokens. Built
    again with the tokenizer kept (what the reference build does with TOKENIZER), it is the same store."""
    from tools import prose_corpus as pc
    for source, n in (("manpages", 3), ("manpages-dev", 2)):  # "manpages-dev/" sorts before "manpages/"
        (tmp_path / "text" / source).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "text" / source / f"d{i}.txt").write_text(f"{source} document {i}. " * (50 * (i + 1)))
    store = pc.build_store(tmp_path, vocab_size=300)
    result = pc.stats(store, tmp_path / "text")
    rows = result["sources"]
    assert rows["manpages"]["docs"] == 3 and rows["manpages-dev"]["docs"] == 2
    assert rows["manpages"]["licence"].startswith("GPL-2+")
    assert rows["manpages"]["tokens"] + rows["manpages-dev"]["tokens"] == result["tokens"] == store.n_tokens
    from foldscale.data.tokenizer import Tokenizer
    tok = Tokenizer(tmp_path / "tokenizer.model")
    for source in ("manpages", "manpages-dev"):  # each file's own tokens + eos
        files = (tmp_path / "text" / source).glob("*.txt")
        assert rows[source]["tokens"] == sum(len(tok.encode(f.read_text())) + 1 for f in files)
    assert result["doc_tokens"]["max"] == int(store.doc_lengths.max())
    again = tmp_path / "again"  # the same text again, with the tokenizer kept: the same store
    shutil.copytree(tmp_path / "text", again / "text")
    monkeypatch.setattr(pc, "TOKENIZER", tmp_path / "tokenizer.model")
    assert pc.build_store(again).fingerprint == store.fingerprint


def test_the_reference_builds_tokenizer_is_kept_in_the_repository():
    from foldscale.data.tokenizer import Tokenizer
    from tools import prose_corpus as pc
    tok = Tokenizer(pc.TOKENIZER)
    assert tok.vocab_size == pc.VOCAB_SIZE
    assert tok.decode(tok.encode("The carried state crosses segments.\n")) == "The carried state crosses segments.\n"
