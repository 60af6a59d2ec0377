"""The Typer app, its root options (``--debug``, ``--quiet``, ``--version``) and the one
place library errors become a stderr line and an exit code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from nccli.cli.options import DebugOpt, QuietOpt, VersionOpt
from nccli.errors import NCError

app = typer.Typer(
    name="nccli",
    help="Measure Neural Collapse in trained networks: extract → measure → compare.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)


class _State:
    debug: bool = False
    quiet: bool = False


STATE = _State()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors into one stderr line and an exit code."""
    try:
        yield
    except NCError as exc:
        if STATE.debug:
            raise
        msg = " ".join(str(exc).split())
        typer.echo(f"nccli: error: {msg}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        if STATE.debug:
            raise
        why = " ".join(str(exc).split())  # e.g. what was kept for --resume
        typer.echo(f"nccli: interrupted; {why}" if why else "nccli: interrupted", err=True)
        raise typer.Exit(130) from None
    except MemoryError:
        if STATE.debug:
            raise
        typer.echo("nccli: error: out of memory; use smaller --chunk-rows", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        if STATE.debug:
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        typer.echo(f"nccli: error: {where}{exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None


@app.callback()
def _root(debug: DebugOpt = False, quiet: QuietOpt = False, version: VersionOpt = False) -> None:
    """nccli — Neural Collapse metrics from checkpoints, caches and feature files."""
    STATE.debug = debug
    STATE.quiet = quiet


def split_list(items: list[str] | None) -> list[str]:
    """Repeatable, comma-separated option values as one list (``-l a,b -l c``)."""
    return [p.strip() for item in (items or []) for p in item.split(",") if p.strip()]
