"""The ``runtime`` command: thin click layers over the library (every subcommand is a function call).

One click group; the subcommands live by area: ``runtime.cli.model`` (embed, refine, build),
``runtime.cli.evaluation`` (synth, demo, parity, evaluate, bench), ``runtime.cli.serving``
(triton-repo, deepstream-config), ``runtime.cli.service`` (serve, threshold); shared options and file helpers in ``runtime.cli.options``.
"""
from __future__ import annotations

import signal
import sys
import threading

import click

from runtime.cli import evaluation, model, service, serving


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Run exported NFormer models: embed person crops, refine sets of embeddings."""
    # SIGTERM (a timeout, a container stopping) unwinds like Ctrl-C: work folders and temporary
    # files are removed by their own cleanup; ``serve`` installs its own handler (stop, then save)
    # (not where SIGTERM is ignored: a caller that set SIG_IGN, e.g. ``nohup``-style wrappers, keeps it)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        previous = signal.signal(signal.SIGTERM, _exit_on_signal)
        if previous is not None:          # restored when the command ends (CliRunner, embedding callers)
            click.get_current_context().call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


def _exit_on_signal(signum, frame):
    sys.exit(128 + signum)


for _module in (model, evaluation, serving, service):
    for _command in vars(_module).values():
        if isinstance(_command, click.Command):
            main.add_command(_command)
