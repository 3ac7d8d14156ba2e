"""`foldscale tokenizer train` and `foldscale prepare`.

Their errors are FoldscaleErrors, which the `foldscale` group prints as one line."""
import tempfile

import click


@click.group()
def tokenizer():
    """Train a sentencepiece tokenizer.

    \b
    Example:
      foldscale tokenizer train --input 'data/*.jsonl' --vocab-size 8192 --out tok.model
    """


@tokenizer.command()
@click.option("--input", "inputs", multiple=True, required=True,
              help="File, glob or directory (repeat for more); text files are one document each.")
@click.option("--vocab-size", type=int, default=8192, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Model file to write.")
@click.option("--text-field", default="text", show_default=True,
              help="Field holding the text in json/jsonl/parquet/csv inputs.")
def train(inputs, vocab_size, out, text_field):
    """Train a BPE tokenizer that reproduces text exactly (code whitespace included).

    \b
    Example:
      foldscale tokenizer train --input corpus.txt --input 'more/*.py' --vocab-size 8192 --out tok.model
    """
    from foldscale.data.store import load_documents
    from foldscale.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as cache:
        docs = load_documents(inputs, text_field, cache_dir=cache)
        tok = train_tokenizer((row["text"] or "" for row in docs), vocab_size, out)
    click.echo(f"wrote {tok.path}: {tok.vocab_size} tokens, sha256 {tok.hash[:12]}")


@click.command()
@click.option("--input", "inputs", multiple=True,
              help="File, glob, directory or Hugging Face dataset name (repeat for more).")
@click.option("--text-field", default="text", show_default=True,
              help="Field holding the text in json/jsonl/parquet/csv/hub inputs.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(dir_okay=False),
              help="Tokenizer model (foldscale tokenizer train).")
@click.option("--out", type=click.Path(file_okay=False), help="Token store directory to create.")
@click.option("--val-fraction", type=float, default=0.01, show_default=True,
              help="Fraction of documents held out for validation.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/val split.")
@click.option("--num-proc", type=int, default=None, help="Tokenising processes [default: all cores].")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing store at --out (with --default: rebuild the built-in corpus).")
@click.option("--default", "use_default", is_flag=True,
              help="Build (or find and check) the built-in corpus: the Python standard library source.")
@click.option("--vocab-size", type=int, default=8192, show_default=True,
              help="With --default: tokenizer size of the built-in corpus.")
@click.option("--max-files", type=click.IntRange(min=1), default=None,
              help="With --default: only the first N standard library files (quick tests).")
def prepare(inputs, text_field, tokenizer_path, out, val_fraction, seed, num_proc, overwrite,
            use_default, vocab_size, max_files):
    """Tokenise documents into a token store for training.

    \b
    Examples:
      foldscale prepare --input 'data/*.jsonl' --tokenizer tok.model --out data/store
      foldscale prepare --default
    """
    from foldscale.data import store as store_mod

    if use_default:
        if inputs or tokenizer_path or out:
            raise click.UsageError("--default builds the built-in corpus; it takes no --input, "
                                   "--tokenizer or --out")
        from foldscale.data.corpus import default_store

        path = default_store(vocab_size=vocab_size, max_files=max_files, num_proc=num_proc,
                             rebuild=overwrite)
        click.echo(f"built-in corpus store: {path}")
        return
    missing = [name for name, value in (("--input", inputs), ("--tokenizer", tokenizer_path),
                                        ("--out", out)) if not value]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (or use --default for the built-in "
                               "corpus)")
    store = store_mod.prepare(list(inputs), tokenizer_path, out, text_field=text_field,
                              val_fraction=val_fraction, seed=seed, num_proc=num_proc,
                              overwrite=overwrite)
    splits = store.meta["splits"]
    click.echo(f"wrote {store.path}: {store.n_docs} documents (train {splits['train']['docs']}, "
               f"val {splits['val']['docs']}), {store.n_tokens:,} tokens; dropped "
               f"{store.meta['dropped_empty_docs']} empty documents")
