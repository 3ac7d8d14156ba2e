"""Data pipeline: tokenizer, token store, segment stream sampler, built-in corpus.

`datasets` is imported only when preparing data; training needs numpy and torch alone."""
from foldscale.data.corpus import default_store, stdlib_files
from foldscale.data.sampler import Batch, SegmentStreamSampler, assign_documents
from foldscale.data.store import (DamagedStoreError, StoreError, TokenStore, load_documents,
                                  prepare, write_store)
from foldscale.data.tokenizer import Tokenizer, TokenizerError, train_tokenizer

__all__ = ["Batch", "DamagedStoreError", "SegmentStreamSampler", "StoreError", "TokenStore",
           "Tokenizer", "TokenizerError", "assign_documents", "default_store", "load_documents",
           "prepare", "stdlib_files", "train_tokenizer", "write_store"]
