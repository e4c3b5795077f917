"""The entry point: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import signal
import sys

import typer
from typer._click import exceptions as click_exceptions  # typer >= 0.20 vendors click

from fastserve_cli.cli.common import STATE, app
from fastserve_cli.core.errors import UserError


def _terminate(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so stages clean their temp output and are marked failed."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors become one line on stderr and exit code 2."""
    debug = STATE["debug"] or "--debug" in (argv if argv is not None else sys.argv[1:])
    signal.signal(signal.SIGTERM, _terminate)
    if debug:  # --debug also turns on debug logs (e.g. each request's MLFQ level history)
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("fastserve").setLevel(logging.DEBUG)
        logging.getLogger("fastserve_cli").setLevel(logging.DEBUG)
    try:
        code = app(args=argv, prog_name="fastserve", standalone_mode=False)
        if isinstance(code, int) and code:  # non-standalone click returns 130 on Ctrl-C instead of raising
            sys.stderr.write("interrupted\n")
            sys.exit(code)
    except UserError as err:
        if debug:
            raise
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)
    except click_exceptions.UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError" and err.ctx is not None:
            sys.stdout.write(err.ctx.get_help() + "\n")
            sys.exit(0)
        command = err.ctx.command_path if err.ctx else "fastserve"
        sys.stderr.write(f"error: {err.format_message()} (see `{command} --help`)\n")
        sys.exit(2)
    except typer.Exit as err:  # typer >= 0.20's vendored click has no exceptions.Exit
        sys.exit(err.exit_code)
    except typer.Abort:
        sys.stderr.write("aborted\n")
        sys.exit(130)
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write("interrupted\n")
        sys.exit(130)
