"""``cxr-search``: the command-line interface (Typer). The only module that imports core, train and index.

This module is the app, the wiring and the error-to-exit-code mapping; the command groups live next to
the packages they drive: ``cxr_search.commands`` (model, embed, data, presets), ``train.commands``,
``index.commands`` (index), ``index.search_commands`` (search), ``index.bench.commands`` and ``index.demo`` (the demo's run and its
rendering; its training step is injected here because ``index`` must not import ``train``).

User errors (:class:`cxr_search.errors.CxrSearchError`) are printed as one readable line on stderr and
mapped to the error class's exit code, without a traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import typer

from cxr_search import __version__
from cxr_search.commands import data_app, embed_app, model_app, presets
from cxr_search.errors import OS_ERROR_EXIT, CxrSearchError
from cxr_search.fileio import emit_json
from cxr_search.terminal import err_console, styled
from index.bench.commands import bench_app
from index.commands import index_app
from index.demo.defaults import DEFAULT_EPOCHS, DEFAULT_STUDIES
from index.demo.render import print_demo_tables
from index.node.commands import import_dicomweb, node
from index.search_commands import search_app
from index.serve.commands import serve_app
from train.commands import train_app

app = typer.Typer(
    name="cxr-search",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(model_app, name="model")
app.add_typer(embed_app, name="embed")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(index_app, name="index")
app.add_typer(search_app, name="search")
app.add_typer(bench_app, name="bench")
app.command("presets")(presets)
app.add_typer(serve_app, name="serve")
app.command("node")(node)
index_app.command("import-dicomweb", hidden=True)(import_dicomweb)  # old name of index add --dicomweb

#: Exit code of a command-line usage error found by click (unknown option, missing argument, bad type).
USAGE_EXIT = 2
#: Exit code of an unexpected failure (a bug: ``-vv`` logs its traceback).
UNEXPECTED_EXIT = 1
#: Exit code of Ctrl-C.
INTERRUPT_EXIT = 130
logger = logging.getLogger("cxr_search.cli")


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"cxr-search {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging on stderr (-v info, -vv debug)."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Search engine for chest X-ray archives (CXR-CLIP dual encoders, FAISS, DICOM).

    Example: cxr-search search text "right pleural effusion" -i /indices/chest
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# -------------------------------------------------------------------------------------- demo
def _demo_train(request: Any) -> Dict[str, Any]:
    """The demo's training step (index/ must not import train/, so the CLI injects it): resumes a killed run."""
    from cxr_search.config import nest_overrides
    from train.config import get_recipe
    from train.trainer import train

    cfg = get_recipe(request.recipe, **nest_overrides(request.overrides))
    return train(cfg, [request.manifest], request.run_dir, resume=True, progress=request.progress).to_dict()


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Demo folder; a rerun reuses what it holds."),
    studies: int = typer.Option(DEFAULT_STUDIES, "--studies", min=20, help="Studies in the synthetic archive."),
    seed: int = typer.Option(0, "--seed", help="Seed of the archive and the patient hold-out."),
    epochs: int = typer.Option(DEFAULT_EPOCHS, "--epochs", min=1, help="Training epochs of tiny-synth."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Extra training override key=value (as `train --set`)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout instead of tables."),
) -> None:
    """Synthetic PACS archive -> train tiny-synth -> index -> example queries + HTML gallery -> Recall@K.

    Example: cxr-search demo --out demo-out --studies 200
    """
    from cxr_search.config import parse_set_pairs
    from index.demo.run import DemoOptions, run_demo

    # Flat dotted keys: the demo merges them over its own training overrides and fingerprints them.
    opts = DemoOptions(studies=studies, seed=seed, epochs=epochs, train_overrides=parse_set_pairs(set_),
                       progress=progress)
    result = run_demo(out, train_fn=_demo_train, options=opts,
                      say=lambda msg: err_console.print(styled("demo ", "bold"), msg, sep=""))
    if json_out:
        emit_json(result.to_dict())
    else:
        print_demo_tables(result)


# -------------------------------------------------------------------------------------- main
def _error(message: str) -> None:
    """``error: message`` on stderr, as one line; the message is data (a path, a report) and printed literally."""
    err_console.print(styled("error: ", "bold red"), message, sep="", soft_wrap=True)


def main(argv: Optional[List[str]] = None) -> int:
    """Console-script entry point: run the app, turning every error into one line and an exit code.

    The codes are the README's table (``cxr_search.errors.EXIT_CODES``): each :class:`CxrSearchError`
    subclass carries its own, a file-system error is 9, a usage error 2, Ctrl-C 130, anything else 1.
    """
    try:
        # Without standalone mode click returns the code of typer.Exit (e.g. `index verify` finding problems).
        rc = app(args=argv, prog_name="cxr-search", standalone_mode=False)
    except CxrSearchError as exc:
        logger.debug("error", exc_info=True)  # traceback with -vv
        _error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print(styled("interrupted", "yellow"))
        return INTERRUPT_EXIT
    except OSError as exc:  # the file system refused: an output folder that cannot exist, a full disk, permissions
        logger.debug("file system error", exc_info=True)  # traceback with -vv
        where = f"{exc.filename}: " if exc.filename else ""
        _error(f"{where}{exc.strerror or exc}; check the path, its permissions and the free disk space")
        return OS_ERROR_EXIT
    except Exception as exc:  # usage errors: a missing option, an unknown one, a bad value
        usage_errors, aborts = _click_exception_types()
        if isinstance(exc, usage_errors):
            exc.show()  # "Usage: ...", "Try ... --help" and the error, as click prints it
            return exc.exit_code
        if isinstance(exc, aborts):
            return UNEXPECTED_EXIT
        logger.debug("unexpected error", exc_info=True)
        _error(f"unexpected {type(exc).__name__}: {exc} (rerun with -vv for the traceback, and please report it)")
        return UNEXPECTED_EXIT
    if rc == INTERRUPT_EXIT:  # typer turns Ctrl-C into this code itself
        err_console.print(styled("interrupted", "yellow"))
    return rc if isinstance(rc, int) else 0


def _click_exception_types() -> Tuple[Tuple[type, ...], Tuple[type, ...]]:
    """``(ClickException classes, Abort classes)`` of the click that typer runs on.

    typer >= 0.24 carries its own copy of click (``typer._click``) whose exceptions are not the installed
    click's; older typer uses click itself. Both are collected, so a usage error never ends in a traceback.
    """
    usage: List[type] = []
    aborts: List[type] = []
    for name in ("typer._click.exceptions", "click.exceptions", "typer.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        usage += [module.ClickException] if hasattr(module, "ClickException") else []
        aborts += [module.Abort] if hasattr(module, "Abort") else []
    return tuple(usage), tuple(aborts)


if __name__ == "__main__":
    sys.exit(main())
