"""The long-context suite's tasks and their machinery; the runner is experiments/suite.py.

A task has a `name`, the `chance` of a uniform guess, and `story(rng)`, which tells one
instance as tokenized pieces (text.Story); text.py lays stories out in real text and reads
the documents slice by slice; train.py trains and scores through `foldscale.model.segments`.
"""
from experiments.longctx.babi import QA1, QA2
from experiments.longctx.multikey import MultiKey
from experiments.longctx.passkey import Passkey

TASKS = {"passkey": Passkey, "multikey": MultiKey, "qa1": QA1, "qa2": QA2}
