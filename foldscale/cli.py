"""The `foldscale` command line: one click group, one subcommand per job."""
import json
import sys

import click

from foldscale.config import ConfigError, ModelConfig


class UserError(click.ClickException):
    """A mistake the user can fix: printed on stderr as one line, exit code 1, no traceback."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """foldscale: pretrain and use folded context condensation transformers.

    \b
    Example:
      foldscale prepare --default          # tokenizer + token store of the built-in corpus
      foldscale info 125m                  # parameter counts and FLOPs of a preset
    """


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(model, as_json):
    """Config, parameter counts and FLOPs per token of MODEL (a preset, a .json, or a model dir).

    \b
    Example:
      foldscale info 350m
    """
    from pathlib import Path
    try:
        path = Path(model)
        cfg = ModelConfig.from_json(path / "config.json") if path.is_dir() else ModelConfig.load(model)
    except ConfigError as e:
        raise UserError(str(e)) from None
    counts = cfg.param_counts()
    result = {"config": cfg.to_dict(), "params": {**counts, "total": cfg.num_params()},
              "flops_per_token": cfg.flops_per_token()}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo("config:")
    for k, v in cfg.to_dict().items():
        click.echo(f"  {k:16s} {v}")
    click.echo("parameters:")
    for k, v in result["params"].items():
        click.echo(f"  {k:16s} {v:>15,d}  ({v / 1e6:.2f}M)")
    click.echo(f"model FLOPs per trained token (fwd+bwd): {cfg.flops_per_token() / 1e9:.3f} GFLOP")


def _register(module, *names):
    """Add subcommands from a module, if it is there yet."""
    import importlib
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        return
    for name in names:
        main.add_command(getattr(mod, name))


_register("foldscale.data.cli", "tokenizer", "prepare")


if __name__ == "__main__":
    sys.exit(main())
