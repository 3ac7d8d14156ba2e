"""Does the model keep its context? Run from the repository root: `python -m experiments.context_use --quick`."""
