"""``cxr-search train ...``: the Typer sub-app of the training commands (mounted by ``cli.py``).

``cxr-search train RECIPE --data M.csv --out DIR`` runs a recipe (``train run RECIPE`` is the same);
``train probe`` runs the linear probe; ``train recipes`` lists the recipes. Under ``torchrun`` every
process runs the same command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import click
import typer
from rich.table import Table
from typer.core import TyperGroup

from cxr_search.cli_options import DEVICE_HELP, JSON_HELP, MODEL_HELP, TOKENIZER_HELP, check_device
from cxr_search.fileio import emit_json
from cxr_search.terminal import err_console as console
from cxr_search.terminal import out_console, styled


class _RecipeFirstGroup(TyperGroup):
    """``train RECIPE ...`` means ``train run RECIPE ...``: a first word that is not a subcommand is a recipe."""

    def resolve_command(self, ctx: click.Context, args: List[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


train_app = typer.Typer(
    cls=_RecipeFirstGroup,
    no_args_is_help=True,
    help="Train CXR-CLIP models (`train RECIPE --data M.csv --out DIR`), run the linear probe, list recipes.",
)


@train_app.command("run")
def train_run(
    recipe: str = typer.Argument(..., help="Recipe name (see `cxr-search train recipes`)."),
    data: List[Path] = typer.Option(..., "--data", "-d", help="Manifest CSV (repeatable: one per dataset)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (checkpoints, metrics, final model)."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Recipe override key=value, e.g. optim.lr=1e-4 "
                                                          "(repeatable; JSON values)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout."),
) -> None:
    """Train a recipe on prepared manifests; a killed run continues with --resume.

    Example: cxr-search train tiny-synth --data synth.csv --out runs/tiny --set optim.epochs=2
    """
    from cxr_search.config import parse_set_options
    from train.config import get_recipe
    from train.trainer import train

    cfg = get_recipe(recipe, **parse_set_options(set_))
    result = train(cfg, data, out, resume=resume, progress=not json_out)
    if not result.is_main:
        return  # under torchrun only rank 0 reports
    summary = result.to_dict()
    if json_out:
        emit_json(summary)
        return
    if result.stopped == "time":
        console.print(f"stopped after max_minutes at step {result.steps}/{result.total_steps}; "
                      f"continue with the same command and --resume")
    else:
        console.print(f"trained {cfg.name}: {result.steps} steps ({result.epochs:.1f} epochs) in "
                      f"{result.seconds:.0f}s; model {result.model_dir}")
    if result.last_val:
        v = result.last_val
        console.print(f"validation: loss {v['val_loss']:.4f}, R@10 image->text {v['i2t_R@10']:.3f}, "
                      f"text->image {v['t2i_R@10']:.3f} ({int(v['val_studies'])} studies)")


@train_app.command("recipes")
def train_recipes(json_out: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List the training recipes.

    Example: cxr-search train recipes --json
    """
    from train.config import get_recipe, list_recipes

    rows = []
    for name in list_recipes():
        cfg = get_recipe(name)
        rows.append({"name": name, "model": cfg.model, "init": cfg.init.kind, "datasets": list(cfg.data.datasets),
                     "epochs": cfg.optim.epochs, "batch_size": cfg.optim.batch_size, "description": cfg.description})
    if json_out:
        emit_json({"recipes": rows})
        return
    table = Table(title="training recipes")
    for col in ("name", "model", "init", "datasets", "epochs", "batch"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["model"], r["init"], ", ".join(r["datasets"]) or "any", str(r["epochs"]),
                      str(r["batch_size"]))
    out_console.print(table)
    console.print("details: `cxr-search train recipes --json`; override any field with --set key=value")


@train_app.command("probe")
def train_probe(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    data: List[Path] = typer.Option(..., "--data", "-d", help="Manifest CSV with labels (repeatable)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    fraction: float = typer.Option(1.0, "--fraction", min=0.0, max=1.0, help="Share of training labels: 0.1 or 1.0."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Default: 300 for 10 %, 30 for 100 %."),
    train_split: str = typer.Option("train", "--train-split", help="Manifest split the probe is trained on."),
    test_split: str = typer.Option("test", "--test-split", help="Manifest split the AUROC is measured on."),
    seed: int = typer.Option(0, "--seed", help="Seed of the label subset, the initialisation and the batch order."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the result JSON here too."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Linear probe (CXR-CLIP protocol): frozen image tower, one linear layer, BCE; per-class AUROC.

    Example: cxr-search train probe -m models/r50_mcc --data chexpert.csv --fraction 0.1
    """
    from cxr_search.checkpoints import load_model
    from cxr_search.inference import Embedder
    from train.probe import probe_from_manifest

    check_device(device)
    m = load_model(model, tokenizer=tokenizer, require_tokenizer=False)
    embedder = Embedder(m, device=device, batch_size=64)
    result = probe_from_manifest(embedder, [str(p) for p in data], train_split=train_split, test_split=test_split,
                                 fraction=fraction, epochs=epochs, seed=seed, progress=not json_out)
    summary = result.to_dict()
    if out is not None:
        from cxr_search.fileio import write_json_atomic

        write_json_atomic(out, summary)
    if json_out:
        emit_json(summary)
        return
    table = Table(title=f"linear probe: {int(fraction * 100)} % of labels, {result.epochs} epochs")
    table.add_column("class", overflow="fold")
    table.add_column("AUROC", justify="right")
    for name, auc in result.auroc.items():
        table.add_row(name, f"{auc:.4f}")
    table.add_row(styled("mean", "bold"), styled(f"{result.mean_auroc:.4f}", "bold"))
    out_console.print(table)
    if result.skipped:
        console.print(f"skipped (one label value in the test split): {', '.join(result.skipped)}")
