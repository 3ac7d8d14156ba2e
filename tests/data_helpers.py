"""Shared helpers of the data tests (tests/test_data_*.py)."""
from foldscale.data.corpus import stdlib_files
from foldscale.data.tokenizer import train_tokenizer

CODE_SAMPLE = (
    "#!/usr/bin/env python3\n"
    "def f(x, y=2):\n"
    "\tif x:\n"
    "        return  x ** y   # two spaces, trailing spaces   \n"
    "\n\n\n"
    "    elif y:\r\n"
    "\t\tpass\n"
    "s = 'héllo wörld 日本語 🙂 \\t tab\\n'\n"
    "  \n"
    "x=[1,2,3]; y = 1234567890\n"
    "\n"
)


def train_small_tokenizer(out, vocab_size=512, n_files=40):
    """A real (tiny) tokenizer trained on a few standard library files: well under a second."""
    return train_tokenizer(stdlib_files(n_files), vocab_size, out)


def random_docs(rng, n_docs, max_len, vocab_size=1000):
    """Token lists with ids >= 4, so that 0 (padding) never occurs inside a document."""
    return [rng.integers(4, vocab_size, int(rng.integers(1, max_len + 1))) for _ in range(n_docs)]
