"""The `foldscale` command line: one click group, one subcommand per job."""
import json
import sys

import click

from foldscale.config import FoldscaleError, ModelConfig


class UserError(click.ClickException):
    """A mistake the user can fix: printed on stderr as one line, exit code 2, no traceback."""
    exit_code = 2


class Group(click.Group):
    """Every FoldscaleError a command raises becomes one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FoldscaleError as e:
            raise UserError(str(e)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """foldscale: pretrain and use folded context condensation transformers.

    \b
    Example:
      foldscale prepare --default          # tokenizer + token store of the built-in corpus
      foldscale info 125m                  # parameter counts and FLOPs of a preset
      foldscale export runs/x --out models/x
      foldscale generate models/x --prompt "def main("
      foldscale eval models/x --data store --plot loss.png
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
    path = Path(model)
    cfg = ModelConfig.from_json(path / "config.json") if path.is_dir() else ModelConfig.load(model)
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


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--tag", help="Checkpoint to export, e.g. step00000100 (default: the newest complete one).")
@click.option("--out", type=click.Path(), required=True,
              help="Directory to write (safetensors), or the .pt file to write (torch).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["safetensors", "torch", "hf"]), default="safetensors",
              show_default=True, help="safetensors: config.json + model.safetensors (+ tokenizer.model); "
                                      "torch: one .pt file {'config', 'state_dict'}; hf: safetensors plus the "
                                      "modelling code and tokenizer transformers loads (needs the hf extra).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export(run_dir, tag, out, dtype, fmt, as_json):
    """Turn a DeepSpeed checkpoint of RUN_DIR (any ZeRO stage), or a safetensors export, into a
    plain model.

    The export loads with FoldedLM.from_pretrained without DeepSpeed; with --format hf also with
    transformers' AutoModelForCausalLM (trust_remote_code) and AutoTokenizer, no foldscale needed.
    It checks itself: its loss on a fixed batch (the run's validation data, or random ids when
    the store is gone) must equal the checkpoint's.

    \b
    Example:
      foldscale export runs/small --out models/small
      foldscale export runs/small --tag step00001000 --dtype bf16 --format torch --out small.pt
      foldscale export models/small --format hf --out models/small-hf
    """
    from foldscale.export import export as run_export
    result = run_export(run_dir, out, tag=tag, dtype=dtype, fmt=fmt, progress=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    step = "" if result["step"] is None else f" (step {result['step']})"
    click.echo(f"exported {result['checkpoint']}{step} to {out} as {fmt} {dtype}"
               + (" with tokenizer.model" if result["tokenizer"] else ""))
    click.echo(f"self-check on {result['check_batch']}: loss {result['loss_deepspeed']:.6f} ({result['reference']}) "
               f"vs {result['loss_exported']:.6f} (export): match")


def _device(name):
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU is available here; use --device cpu")
    return torch.device(name)


def _load_model(path, device, need_tokenizer=False):
    """An exported model directory, a run directory (its newest complete checkpoint) or a checkpoint
    directory -> (model in eval mode on DEVICE, Tokenizer or None)."""
    from pathlib import Path

    from foldscale import checkpoint as ckpt
    from foldscale.data import Tokenizer
    from foldscale.export import checkpoint_model
    from foldscale.model import FoldedLM
    path = Path(path)
    root = ckpt.run_checkpoints(path)
    if root.is_dir() or (path / "COMPLETE").is_file():
        warn = lambda message: click.echo(message, err=True)  # noqa: E731 (stdout may be --json)
        checkpoint = (ckpt.find("auto", root, warn=warn) if root.is_dir()
                      else ckpt.find(str(path), path.parent, warn=warn))
        if checkpoint is None:
            raise UserError(f"{path}: a run directory with no complete checkpoint yet")
        model, tok_file = checkpoint_model(checkpoint).to(device), ckpt.tokenizer(checkpoint)
        where = f"{checkpoint} has no tokenizer.model (its token store had none)"
    else:
        if (path / "meta.json").is_file():
            raise UserError(f"{path} is a token store, not a model: give it as --data (MODEL comes first)")
        if path.is_dir() and not (path / "config.json").is_file():
            raise UserError(f"{path} holds no model (no config.json): give an exported model, or a run "
                            f"directory, or export one with `foldscale export RUN --out DIR`")
        model = FoldedLM.from_pretrained(path).to(device).eval()
        tok_file = path / "tokenizer.model"
        where = f"{tok_file}: missing; this command needs the tokenizer next to the model (export a run whose " \
                "token store has one, or copy it there)"
    if tok_file is None or not tok_file.is_file():
        if need_tokenizer:
            raise UserError(where)
        return model, None
    tok = Tokenizer(tok_file)
    if tok.vocab_size != model.cfg.vocab_size:
        raise UserError(f"{tok_file} has {tok.vocab_size} tokens but the model's vocab_size is "
                        f"{model.cfg.vocab_size}: this tokenizer does not belong to this model")
    return model, tok


def _store_mismatch(model_path, vocab_size: int, tok, store) -> str | None:
    """Why STORE cannot evaluate the model at MODEL_PATH (None when it can), with the command
    that makes one that can: the store's own `foldscale prepare` line with the model's tokenizer."""
    import shlex
    if vocab_size == store.vocab_size and (tok is None or tok.hash == store.tokenizer_hash):
        return None
    if tok is None:
        return (f"{store.path} was made with another tokenizer ({store.vocab_size} tokens) than {model_path} was "
                "trained with, and the model ships no tokenizer.model: evaluate it on a store made with the tokenizer "
                "of its run (export the run again to get it beside the model)")
    args = shlex.split(store.meta.get("command") or "")
    if "--tokenizer" in args and "--out" in args:
        args[args.index("--tokenizer") + 1] = str(tok.path)
        args[args.index("--out") + 1] = f"{store.path}-{model_path.name}"
        command = shlex.join(args)
    else:
        command = f"foldscale prepare --input YOUR_FILES --tokenizer {tok.path} --out STORE"
    return (f"{store.path} was made with another tokenizer ({store.vocab_size} tokens, sha256 "
            f"{store.tokenizer_hash[:12]}) than {model_path} ({tok.vocab_size} tokens, sha256 {tok.hash[:12]}): "
            f"make a store with the model's own: {command}")


@main.command()
@click.argument("model", type=click.Path())
@click.option("--prompt", help="Text to continue.")
@click.option("--prompt-file", type=click.Path(dir_okay=False), help="Read the prompt from a file (any length).")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=200, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True,
              help="0 picks the most likely token (greedy).")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Sample among the K most likely tokens.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--compile/--no-compile", "compile_step", default=None,
              help="Compile the one-token step with torch.compile (default: on cuda; the first use compiles for a minute).")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"prompt_tokens", "new_tokens", "text", "tokens_per_s"} at the end instead '
                   '(tokens_per_s after the first new token, so reading the prompt is left out).')
def generate(model, prompt, prompt_file, max_new_tokens, temperature, top_k, seed, device, compile_step, as_json):
    """Continue a prompt with MODEL (an exported directory with tokenizer.model), printing
    text as it comes. The prompt may be far longer than the segment length: whole segments
    only update the carried state, so memory does not grow with it. Stops at end of document.

    \b
    Example:
      foldscale generate models/small --prompt "import os" --max-new-tokens 100 --top-k 50
      foldscale generate models/small --prompt-file big.py --temperature 0 --json
    """
    import time

    import torch

    from foldscale.generate import stream_generate
    if (prompt is None) == (prompt_file is None):
        raise UserError("give exactly one of --prompt and --prompt-file")
    if prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompt-file: {e}") from None
    dev = _device(device)
    lm, tok = _load_model(model, dev, need_tokenizer=True)
    ids = tok.encode(prompt)
    if not ids:
        raise UserError("the prompt is empty: give at least one character")
    generator = torch.Generator(dev).manual_seed(seed)
    new, times, printed = [], [], ""
    for token in stream_generate(lm, torch.tensor([ids], device=dev), max_new_tokens, temperature, top_k, generator,
                                 compile_step):
        times.append(time.perf_counter())
        if token.item() == tok.eos_id:
            break
        new.append(token.item())
        text = tok.decode(new)
        # Hold back a trailing partial UTF-8 character (byte tokens decode to U+FFFD until complete).
        if not as_json and not text.endswith("\ufffd"):
            click.echo(text[len(printed):], nl=False)
            printed = text
            sys.stdout.flush()
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    text = tok.decode(new)
    if as_json:
        click.echo(json.dumps({"prompt_tokens": len(ids), "new_tokens": len(new), "text": text,
                               "tokens_per_s": rate}))
    else:
        click.echo(text[len(printed):])


@main.command("eval")
@click.argument("model", type=click.Path())
@click.option("--data", "data", type=click.Path(), required=True, help="Token store (foldscale prepare).")
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Stop after this many predicted tokens (default: the whole split).")
@click.option("--streams", type=click.IntRange(min=1), default=16, show_default=True,
              help="Documents read side by side (each stream reads its documents back to back, as training does).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write loss by position as a PNG.")
@click.option("--compare", "compare", type=click.Path(), multiple=True,
              help="Another model, run on exactly the same text (repeat for more).")
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="Read each document in windows of this many tokens, each from a fresh state, so no "
                   "token sees further back: how much worse the loss gets says how much context is used.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(model, data, split, max_tokens, streams, plot, compare, context, device, as_json):
    """Loss and perplexity of MODEL on whole documents of a token store, overall and by
    position in the document.

    Documents are read from their start, in index order, each model with its own segment length
    and carried state. Position convention: a token at position p of its document counts in
    segment-index bucket p // l, l being MODEL's segment length (also for --compare MODEL2),
    with training's buckets 0, 1, 2-3, 4-7, ...

    \b
    Example:
      foldscale eval models/folded --data store --max-tokens 1000000 --plot loss.png
      foldscale eval models/folded --data store --compare models/baseline --json
      foldscale eval models/folded --data store --context 1024     # no token sees > 1024 back
    """
    from pathlib import Path

    from foldscale.data import TokenStore
    from foldscale.evaluate import evaluate
    if plot:
        _check_plot_path(Path(plot))
    dev = _device(device)
    store = TokenStore.open(data)
    models = {}
    for path in [model, *compare]:
        lm, tok = _load_model(path, dev)
        problem = _store_mismatch(Path(path), lm.cfg.vocab_size, tok, store)
        if problem:
            raise UserError(problem)
        name = str(path)
        while name in models:
            name = f"{path} ({len(models) + 1})"
        models[name] = lm
    if not len(store.docs(split)):
        raise UserError(f"{data}: the {split} split has no documents")
    result = evaluate(models, store, split, max_tokens, streams, dev, context)
    if plot:
        from foldscale.metrics import plot_position_loss
        fig = plot_position_loss({r["model"]: r["by_position"] for r in result["models"]},
                                 title=f"loss by position ({result['position_unit']}-token segments)")
        fig.savefig(plot, dpi=120)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    rows = result["models"]
    click.echo(f"{result['tokens']:,} tokens of {result['documents']} {split} documents; position in "
               f"segments of {result['position_unit']} tokens")
    click.echo(f"{'segment':>10s}" + "".join(f"  {r['model'][-24:]:>24s}" for r in rows))
    labels = list(dict.fromkeys(k for r in rows for k in r["by_position"]))
    for label in labels:
        cells = [f"{r['by_position'][label]:.4f}" if label in r["by_position"] else "-" for r in rows]
        click.echo(f"{label:>10s}" + "".join(f"  {c:>24s}" for c in cells))
    click.echo(f"{'loss':>10s}" + "".join(f"  {r['loss']:>24.4f}" for r in rows))
    click.echo(f"{'ppl':>10s}" + "".join(f"  {r['perplexity']:>24.2f}" for r in rows))
    if plot:
        click.echo(f"wrote {plot}")


def _check_plot_path(plot):
    """Refuse, before any evaluation, a --plot that cannot be written."""
    from matplotlib.figure import Figure
    kinds = Figure().canvas.get_supported_filetypes()
    if plot.suffix.lstrip(".").lower() not in kinds:
        raise UserError(f"--plot {plot}: give a file ending in one of .{', .'.join(sorted(kinds))} (e.g. loss.png)")
    if not plot.parent.is_dir():
        raise UserError(f"--plot {plot}: no directory {plot.parent} (create it first)")


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
