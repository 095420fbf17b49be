"""The `mixer` command line. Each subcommand lives in `mlpmixer/commands/<module>.py` and exposes
`register(parser)`, which adds its description and arguments and sets `func` to the function that runs it.

Only the command being run is imported (`mixer --help` lists them from the table below): most of them
need torch, whose import takes seconds."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings
from typing import Any, Iterable, Sequence

# command -> (module under mlpmixer.commands, one-line summary), in the order `mixer --help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train a Mixer (default: a small one on the embedded MNIST digits)"),
    "finetune": ("finetune", "fine-tune any checkpoint on new data (paper Appendix C recipe)"),
    "eval": ("eval", "top-1 / top-5 accuracy of a checkpoint or run on a dataset"),
    "predict": ("predict", "top-5 classes of images, by class name"),
    "recipes": ("recipes", "list the training recipes (presets for train and finetune)"),
    "info": ("info", "table of the Mixer variants, or what a checkpoint holds"),
    "convert": ("convert", "convert a checkpoint between the official .npz, timm and our .safetensors formats"),
    "resize": ("resize", "convert a checkpoint to a higher resolution (the paper's block-diagonal token MLPs)"),
    "fewshot": ("fewshot", "linear few-shot accuracy on frozen features (the paper's few-shot evaluation)"),
    "linear-probe": ("linear_probe", "linear classifier on frozen features, fitted on all the training data"),
    "show-weights": ("show_weights",
                     "draw the token-mixing units (paper Figure 5) or the stem kernels of a checkpoint"),
    "bench": ("bench", "measure inference and training throughput (img/s), utilisation and peak memory"),
    "export": ("export", "export a checkpoint to ONNX, TorchScript or a torch.export program (dynamic batch)"),
}


def build_parser(commands: Iterable[str] = COMMANDS) -> argparse.ArgumentParser:
    """The parser of `mixer`, with the arguments of `commands` (the others are listed, not imported)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="mixer",
        description="MLP-Mixer image classifiers: train, fine-tune, evaluate, convert and inspect.",
    )
    parser.add_argument("--version", action="version", version=f"mlpmixer {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks (also MLPMIXER_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = set(commands)
    for name, (module, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary)
        if name in wanted:
            importlib.import_module(f".commands.{module}", __package__).register(p)
    parser.commands = sub.choices  # type: ignore[attr-defined]  # name -> its parser, for its own usage line
    return parser


TRUE_WORDS = ("1", "true", "yes", "on")  # what the MLPMIXER_* switches (DEBUG, OFFLINE) take as on

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_python_format_warning = warnings.formatwarning


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    """Our warnings as one line, like our errors (Python's format adds the file, the line number and
    the source line of the warnings.warn call); other libraries' warnings as Python prints them. Ours are
    those warned from the package, or of a category it defines (the fast path's, put at its caller's line)."""
    if os.path.abspath(filename).startswith(_PACKAGE + os.sep) or category.__module__.startswith("mlpmixer."):
        # On a terminal, first clear the line a progress bar may be drawing (it redraws itself after).
        clear = "\r\033[K" if sys.stderr.isatty() else ""
        return f"{clear}mixer: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill` and cluster schedulers send), raised where Ctrl-C raises KeyboardInterrupt, so that a
    command it stops says so in one sentence as after Ctrl-C (Python's default for it is to end without a word)."""


_stopped_by: type[KeyboardInterrupt] | None = None  # Ctrl-C or SIGTERM came: its exception may have been swallowed


def _stop(signum: int, frame: object) -> None:
    """SIGINT's and SIGTERM's handler: raise KeyboardInterrupt or Terminated, and remember it (raise_if_stopped)."""
    global _stopped_by
    _stopped_by = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once, as without us
    raise _stopped_by


def _default_signals_in_child() -> None:
    """A forked process (a DataLoader worker, a training rank) leaves the stop to its parent, which says it and ends
    its children: SIGTERM kills it, and Ctrl-C, which reaches the whole process group, is ignored (raised there, it
    interrupted Python's exit of a worker that was ending anyway, which printed a traceback)."""
    if signal.getsignal(signal.SIGTERM) is _stop:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) is _stop:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_default_signals_in_child)


def raise_if_stopped() -> None:
    """Raise again the interrupt of a Ctrl-C or SIGTERM that came. Its exception is raised wherever the process is,
    and some places swallow it (a DataLoader iterator's __del__, logging's hook at fork: the run went on
    training), so the long loops (training steps, evaluation batches) ask."""
    if _stopped_by is not None:
        raise _stopped_by


def _quiet_interrupts(unraisable: Any) -> None:
    """sys.unraisablehook: an interrupt raised where Python can only print it (a finaliser) is said once, by main."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def interrupt_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM that `error` was raised in unwinding from (a multiprocessing lock that the interrupt
    left half-released raises AssertionError on its way out), else None."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        cause = cause.__context__
    return None


def _say_stopped(stop: KeyboardInterrupt) -> int:
    """One line for a command stopped by Ctrl-C or SIGTERM, with what a training run left to resume from; the
    shell's exit status for that signal."""
    if hasattr(signal, "SIGCHLD"):  # DataLoader workers dying with us are part of the stop, not errors after it
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # (main puts it back as it returns)
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):  # else drawn again after the line
        bar.close()
    hint = getattr(stop, "resume_hint", None)  # a training run's (train.train)
    terminated = isinstance(stop, Terminated)
    print(f"mixer: {'terminated' if terminated else 'interrupted'}." + (f" {hint}" if hint else ""), file=sys.stderr)
    return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    from_python = argv is not None  # not the `mixer` script, whose process ends with this call
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["help"]:  # `mixer help [COMMAND]`, as git and pip have it
        argv = [*argv[1:2], "--help"]
    warnings.formatwarning = _format_warning  # DataLoader workers, forked later, inherit it
    # The command is the first word that is not an option: `mixer`'s own options take no values.
    command = next((word for word in argv if not word.startswith("-")), None)
    parser = build_parser([command] if command in COMMANDS else [])
    args, extra = parser.parse_known_args(argv)
    # argparse leaves the positionals after an option unparsed (`mixer predict CKPT --top 3 A.png`):
    # a command that takes a list of inputs gets them too.
    if "--debug" in extra:  # mixer's own option, after the command: taken as if before it
        extra.remove("--debug")
        args.debug = True
    if extra and isinstance(getattr(args, "inputs", None), list) and not any(e.startswith("-") for e in extra):
        args.inputs += extra
    elif extra:  # with the command's usage line, which lists its options
        parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("MLPMIXER_DEBUG", "").strip().lower() in TRUE_WORDS
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    global _stopped_by
    _stopped_by = None
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    if from_python and in_main_thread and hasattr(signal, "SIGCHLD"):  # which a stop sets aside (_say_stopped)
        previous[signal.SIGCHLD] = signal.getsignal(signal.SIGCHLD)
    previous_unraisable, sys.unraisablehook = sys.unraisablehook, _quiet_interrupts
    try:
        return args.func(args) or 0
    except KeyboardInterrupt as stop:
        return _say_stopped(stop)
    except BrokenPipeError:
        # The reader went away (`mixer info | head -3`): stop quietly, as other command-line tools do.
        # Python flushes stdout again at exit, so point it at devnull first (Python's signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the shell's status for a tool stopped by a closed pipe
    except (ValueError, OSError) as e:
        # User errors (bad paths, files, sizes) are one sentence; other exceptions are bugs and
        # keep their traceback.
        if debug:
            raise
        if (stop := interrupt_behind(e)) is not None:
            return _say_stopped(stop)
        if not getattr(e, "reported_elsewhere", False):  # a rank of several whose error another one prints
            print(f"mixer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug or (stop := interrupt_behind(e)) is None:
            raise
        return _say_stopped(stop)
    finally:
        sys.unraisablehook = previous_unraisable
        # main() called from Python (tests, notebooks) leaves the handlers as they were, torch's SIGCHLD one too (set
        # once per process: without it a later DataLoader's dead worker went unsaid).
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


if __name__ == "__main__":
    sys.exit(main())
