"""The `osx` command line. Subcommands live in `osx/commands/` and are imported only when run, so
`osx --help` and `osx generate` never import torch."""

from __future__ import annotations

import importlib
import importlib.util
import signal
import sys

import click

from osx import __version__
from osx.errors import OsxError, missing_module_error, os_error

# name -> (module, attribute, one-line help). Keep the help here so `osx --help` imports nothing.
SUBCOMMANDS = {
    "export": ("osx.commands.export", "export", "Export a checkpoint to a bundle (ONNX, optional TensorRT engines)."),
    "generate": ("osx.commands.generate", "generate", "Generate a video from a prompt with a bundle (no torch)."),
    "bundle": ("osx.commands.bundle", "bundle", "Inspect, verify, pack and unpack bundles."),
    "build": ("osx.commands.build", "build", "Build (or rebuild) TensorRT engines for this machine's GPU from a bundle's ONNX."),
    "calibrate": ("osx.commands.calibrate", "calibrate", "Capture calibration activations for INT8/FP8 quantization."),
    "serve": ("osx.commands.serve", "serve", "Serve bundles over HTTP on Ray Serve (JSON API + web page)."),
    "doctor": ("osx.commands.doctor", "doctor", "Report GPU, driver, CUDA, TensorRT and onnxruntime providers."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(n for n, (mod, _, _) in SUBCOMMANDS.items() if importlib.util.find_spec(mod) is not None)

    def get_command(self, ctx, name):
        if name not in SUBCOMMANDS:
            return None
        mod, attr, _ = SUBCOMMANDS[name]
        if importlib.util.find_spec(mod) is None:
            return None
        return getattr(importlib.import_module(mod), attr)

    def format_commands(self, ctx, formatter):
        rows = [(n, SUBCOMMANDS[n][2]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="osx")
def cli():
    """osx: export Open-Sora to ONNX / TensorRT bundles and run them without PyTorch."""


def _honour_interrupts() -> None:
    """Ctrl-C and `kill` stop osx whatever signal state it inherited: a process started by one that ignores or
    blocks SIGINT (Ray starts its processes with SIGINT blocked; `nohup`, some job runners ignore it) would
    otherwise run on through them, or, blocked, hold them pending until it ends."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors (OsxError) print a clear message and exit with their code, no traceback."""
    if argv is None:  # the `osx` process itself (not a caller's process running main([...]))
        _honour_interrupts()
    try:
        try:
            cli.main(args=argv, prog_name="osx", standalone_mode=False)
        except ModuleNotFoundError as e:  # an optional extra is not installed
            raise missing_module_error(e) from None
        except OSError as e:  # full disk, read-only folder, ...: a message, not a traceback
            raise os_error(e) from None
    except OsxError as e:
        click.secho(f"error: {e.message}", fg="red", err=True)
        if e.hint:
            click.echo(f"  hint: {e.hint}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise


if __name__ == "__main__":
    main()
