"""The ``nccli`` command line: thin Typer commands over the library.

Each command parses its options, calls one library function and hands the result to
:mod:`nccli.report`.  Data goes to stdout; progress, notes and errors to stderr.  A user
error (:class:`~nccli.errors.NCError`) becomes one stderr line and exit code 1 (bad data)
or 2 (bad usage); ``--debug`` shows the traceback instead.

- :mod:`~nccli.cli.core` — the app, ``--debug`` / ``--quiet`` / ``--version``, errors;
- :mod:`~nccli.cli.options` — every argument and option, as ``Annotated`` types;
- :mod:`~nccli.cli.analyse` — ``measure``, ``compare``;
- :mod:`~nccli.cli.extract` — ``extract``, ``info``;
- :mod:`~nccli.cli.utils` — ``metrics``.
"""

from __future__ import annotations

import sys

import typer

# the command modules register their commands on the app, in --help order
from nccli.cli import analyse, extract, utils  # noqa: F401
from nccli.cli.core import (
    STATE,
    app,
    click_exceptions,
    library_warnings,
    unexpected_line,
    user_errors,
)

__all__ = ["STATE", "app", "main", "user_errors"]


def main() -> None:
    """Console-script entry point.

    A command-line mistake click catches (missing or unknown option, bad value) is one
    stderr line and exit 2, like the errors of the commands themselves; library warnings
    become ``note:`` lines (:func:`~nccli.cli.core.library_warnings`); whatever escapes
    everything else is one ``unexpected`` line and exit 1 (``--debug``: the traceback).
    """
    ClickException, Abort, Exit = click_exceptions()
    try:
        with library_warnings():
            code = app(standalone_mode=False)
    except ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `nccli`: the help, exit 2
            exc.show()
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        hint = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
        msg = " ".join(exc.format_message().split()).rstrip(".")
        typer.echo(f"nccli: error: {msg}{hint}", err=True)
        sys.exit(exc.exit_code)
    except Abort:
        typer.echo("nccli: interrupted", err=True)
        sys.exit(130)
    except Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - outside any command (a callback, parsing)
        if STATE.debug:
            raise
        typer.echo(f"nccli: error: {unexpected_line(exc, None)}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
