"""The command line: argument parsing and output only; every command calls one library function.

Never imports torch or transformer_lens at module level: query commands must start fast.
User mistakes (CatalogError) become one line on stderr and exit status 1.
"""

from __future__ import annotations

import sys

import click

from catalog.errors import CatalogError


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


_FILE_SYSTEM_ERRORS = {28, 30, 13, 1, 5, 122}  # ENOSPC, EROFS, EACCES, EPERM, EIO, EDQUOT


class _CatalogGroup(click.Group):
    """One error convention for every command: a user mistake, whether the catalog's own
    (CatalogError) or click's (a bad option value, a missing option, an unknown command), prints
    one line `error: ...` on stderr and exits with status 1, never a traceback or a usage block."""

    def invoke(self, ctx):
        try:
            return self._invoke_saying_errors(ctx)
        except KeyboardInterrupt:  # Ctrl-C in a command without its own handling (a long `sql`),
            # also one that lands while an error below is being handled (a signal stopped a query)
            click.echo("interrupted: nothing was changed", err=True)
            sys.exit(130)

    def _invoke_saying_errors(self, ctx):
        try:
            return super().invoke(ctx)
        except CatalogError as err:
            click.echo(f"error: {_one_line(err)}", err=True)
            sys.exit(1)
        except OSError as err:
            if err.errno not in _FILE_SYSTEM_ERRORS:
                raise
            # A disk that filled up or went read-only mid-command: batches already committed stay.
            click.echo(f"error: {_one_line(err.strerror)}{' (' + str(err.filename) + ')' if err.filename else ''}; "
                       "whatever was committed is kept (an ingest resumes when run again)", err=True)
            sys.exit(1)
        except Exception as err:
            # A signal stopped a read (see entry): DuckDB says so with its InterruptException, or,
            # when it noticed the signal itself while fetching rows, a RuntimeError of its own.
            if type(err).__name__ == "InterruptException" or (type(err) is RuntimeError
                                                              and str(err) == "Query interrupted"):
                raise KeyboardInterrupt from None
            if not type(err).__module__.startswith(("duckdb", "_duckdb")):
                raise
            # DuckDB failing on the file itself (a damaged block, a full disk, an I/O error) once it
            # was opened: one line; committed transactions are intact, the failed one rolled back.
            click.echo(f"error: the catalog could not be read or written: {_first_line(err)}; "
                       "whatever was committed is kept", err=True)
            sys.exit(1)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        import errno

        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:  # no command at all: the help, as --help
            click.echo(err.format_message())
            sys.exit(0)
        except click.ClickException as err:
            where = f" (see `{err.ctx.command_path} --help`)" if getattr(err, "ctx", None) is not None else ""
            click.echo(f"error: {_one_line(err.format_message())}{where}", err=True)
            sys.exit(1)
        except click.exceptions.Abort:  # Ctrl-C outside a command's own handling
            click.echo("interrupted", err=True)
            sys.exit(130)
        except OSError as err:
            if err.errno != errno.EPIPE:  # the reader of a pipe went away (| head): stop quietly
                raise
            import os

            sys.stdout = open(os.devnull, "w")
            sys.exit(1)
        # Without standalone mode click returns an Exit's code (--help, --version: 0) or the
        # command's return value (None).
        sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


@click.group(cls=_CatalogGroup)
@click.version_option(package_name="circuit-catalog")
def main():
    """circuit-catalog: which attention heads of a transformer talk to which, stored in DuckDB."""


def _add_commands(module_name: str) -> None:
    """Add the commands of a CLI module (each module lists its commands in COMMANDS)."""
    import importlib

    for command in importlib.import_module(module_name).COMMANDS:
        main.add_command(command)


for _module in ("catalog.cli.ingest", "catalog.cli.query", "catalog.cli.serve", "catalog.cli.intervene",
                "catalog.cli.overview", "catalog.cli.features"):
    _add_commands(_module)


def _interrupt_reads_on_signals() -> None:
    """Python runs a signal's handler only once the main thread runs Python again, so a long DuckDB
    query would hold Ctrl-C or SIGTERM back until it ends. The C-level handler also writes the
    signal's number to a wakeup file descriptor: a thread waiting on it stops the statements of
    the open read-only connections at once (catalog.store.interrupt_readers), then the handler's
    KeyboardInterrupt ends the command with its one line."""
    import os
    import signal
    import threading

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    except ValueError:  # not the main thread (a test's runner): signals are not ours to watch
        os.close(read_end)
        os.close(write_end)
        return

    def watch() -> None:
        while True:
            received = os.read(read_end, 64)
            if not received:
                return
            store = sys.modules.get("catalog.store")  # not imported yet: no connection to stop
            if store is not None and {signal.SIGINT, signal.SIGTERM} & set(received):
                store.interrupt_readers()

    threading.Thread(target=watch, name="signal-watch", daemon=True).start()


def entry() -> None:
    """Console-script entry point: run the CLI, then leave without a noisy interpreter shutdown.

    After a model has been loaded, DuckDB 2's nanobind bindings print a wall of benign
    "nanobind: leaked instances" lines while Python tears down modules. Everything is
    committed and closed by then, so the commands that ran a model exit directly.
    """
    import os
    import signal

    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        # SIGTERM (a service manager, `kill`) stops every command as Ctrl-C does: what is committed
        # is kept and one line says so, exit status 130 (`serve` puts its own handling over this).
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    _interrupt_reads_on_signals()
    try:
        main.main(prog_name="circuit-catalog")
        code = 0
    except SystemExit as stop:
        code = stop.code
    if isinstance(code, str):
        click.echo(code, err=True)
        code = 1
    code = code or 0
    if "torch" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
