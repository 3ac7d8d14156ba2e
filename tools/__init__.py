"""Command-line tools beside the package: `python -m tools.<name>`."""
