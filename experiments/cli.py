"""The one command-line helper of every entry point: config-file checks, one-line errors, exit status 2.

Every entry script (train.py, merge.py, pipeline.py, sweep.py, bv.py) runs its body through :func:`run_cli`:
bad input (a ``ValueError``, ``OSError``, a parse error, ...) becomes one line ``<prog>: error: <what>; <fix>``
on stderr and exit status 2, with the run's partial outputs removed by its ``cleanup``;
``BADMERGING_TRACEBACK=1`` re-raises instead (full traceback, for debugging). Ctrl-C (SIGINT) becomes one line
``<prog>: interrupted; <what was kept, how to resume>`` and exit status 130, after the same cleanup.

Also here, for every entry point: ``--tasks_file`` (tasks of your own, registered before the rest of the command
line is read: :func:`take_tasks_files`) and ``--device`` (:func:`resolve_device`). This module imports neither torch
nor Lightning at import time, so that ``--help`` of the entry points stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

__all__ = ["UserError", "USER_ERRORS", "Interrupted", "INTERRUPTED_STATUS", "one_line", "read_config_mapping",
           "check_config_files", "parse_error_line", "run_cli", "check_output_path", "OneLineArgumentParser",
           "config_values", "TASKS_FILE_FLAG", "TASKS_FILE_HELP", "add_tasks_file_argument", "take_tasks_files",
           "load_tasks_files", "DEVICE_HELP", "resolve_device"]

INTERRUPTED_STATUS = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


class UserError(ValueError):
    """An input that cannot be used; the message is one line naming the input and the fix."""


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError, argparse.ArgumentError,
                                                pickle.UnpicklingError)


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) inside :func:`run_cli`, raised where ``KeyboardInterrupt`` would be.

    Not a ``KeyboardInterrupt``: Lightning catches that one, logs, tears down and calls ``sys.exit(1)``; this one it
    passes on (after its ``on_exception`` hooks), so the run's own cleanup and message follow. ``detail`` (set by
    the code that knows, e.g. ``TrainingCLI``) says what was kept and how to resume.
    """

    def __init__(self, detail: str | None = None):
        super().__init__(detail or "interrupted")
        self.detail = detail


def check_output_path(path: str | os.PathLike, flag: str, *, is_dir: bool, error=None) -> None:
    """``merging.io.check_output_path`` (the one writability check), imported when first used: merging.io needs torch."""
    from merging.io import check_output_path as check

    if error is None:
        check(path, flag, is_dir=is_dir)
    else:
        check(path, flag, is_dir=is_dir, error=error)


def one_line(error: BaseException | str) -> str:
    """``error``'s text on one line (its type name when it has none)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def read_config_mapping(path: str | os.PathLike, *, flag: str = "--config", shipped: str = "configs/",
                        error: type[Exception] = UserError) -> dict:
    """A YAML file that must exist and hold a mapping (an empty file is an empty mapping)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise error(f"{flag} {path}: file not found; check the path ({shipped} holds the shipped ones)")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise error(f"{flag} {path}: malformed YAML{where} ({problem}); fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{flag} {path}: unreadable ({one_line(e)}); check the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{flag} {path}: holds a {type(data).__name__}, not a mapping of settings; "
                    f"see {shipped} for the format")
    return data


def config_values(argv: Sequence[str]) -> list[str]:
    """The values given to ``--config`` / ``-c`` in ``argv``."""
    values = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith("--config="):
            values.append(arg.split("=", 1)[1])
    return values


def check_config_files(argv: Sequence[str], *, shipped: str = "configs/", error: type[Exception] = UserError) -> None:
    """Every ``--config`` file of ``argv`` exists and is a YAML mapping (jsonargparse's message spans many lines).

    A value that is not a path (inline YAML such as ``{a: 1}``) is left to the parser.
    """
    for value in config_values(argv):
        inline = "\n" in value or ":" in value or not ("/" in value or value.endswith((".yaml", ".yml", ".json")))
        if inline and not Path(value).is_file():
            continue
        read_config_mapping(value, shipped=shipped, error=error)


_UNKNOWN_KEY = (r"does not accept option '([^']+)'", r"Option '([^']+)' is not accepted", r'No action for key "([^"]+)"',
                r'Key "([^"]+)" is not expected', r"Unrecognized arguments: (\S+)", r"unrecognized arguments: (\S+)")


def parse_error_line(error: BaseException, help_hint: str) -> str:
    """A (jsonargparse or argparse) parse error as one line; an unknown option or config key is named."""
    text = one_line(error)
    for pattern in _UNKNOWN_KEY:
        key = re.search(pattern, text, re.I)
        if key:
            return f"unknown option or config key {key.group(1).lstrip('-')!r}; fix its spelling or remove it ({help_hint} lists them)"
    return f"{text}; see {help_hint}"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise (and so become one line in :func:`run_cli`) instead of printing usage."""

    def error(self, message):
        raise UserError(f"{message}; see {self.prog} --help")


# ---------------------------------------------------------------------------------------------
# --tasks_file: tasks of your own, registered before the rest of the command line is read
# ---------------------------------------------------------------------------------------------
TASKS_FILE_FLAG = "--tasks_file"
TASKS_FILE_HELP = ("a YAML file of tasks of your own (datamodules.task_files), registered before the other options are "
                   "read so that its task names are valid everywhere; repeatable")


def add_tasks_file_argument(parser) -> None:
    """``--tasks_file`` in a jsonargparse parser: shown in ``--help``, and settable in a ``--config`` file
    (``tasks_file: [a.yaml]``, loaded with :func:`load_tasks_files` after parsing); on the command line it is taken
    out by :func:`take_tasks_files` before parsing."""
    parser.add_argument(TASKS_FILE_FLAG, type=list[str], default=[], metavar="PATH", help=TASKS_FILE_HELP)


def load_tasks_files(paths: Sequence[str]) -> list[str]:
    """Register the tasks of every file in ``paths`` (in order); returns their names.

    A bad file raises ``datamodules.task_files.TaskFileError`` (a ``ValueError`` with a one-line message), which
    :func:`run_cli` prints as ``<prog>: error: ...``.
    """
    if not paths:
        return []
    from datamodules.task_files import load_tasks_file  # only when asked for: it reads the task registry

    return [name for path in paths for name in load_tasks_file(path)]


def take_tasks_files(argv: Sequence[str], *, error: type[Exception] = UserError) -> tuple[list[str], list[str]]:
    """``(argv without its --tasks_file options, the files)``, the files' tasks registered before anything else of
    ``argv`` is parsed or validated (``--tasks_file X`` and ``--tasks_file=X``, any number, anywhere before ``--``)."""
    rest: list[str] = []
    files: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg == TASKS_FILE_FLAG:
            if i + 1 >= len(args) or not args[i + 1] or args[i + 1].startswith("-"):
                raise error(f"{TASKS_FILE_FLAG} needs a path after it, e.g. {TASKS_FILE_FLAG} my_tasks.yaml")
            files.append(args[i + 1])
            i += 2
            continue
        if arg.startswith(TASKS_FILE_FLAG + "="):
            value = arg.split("=", 1)[1]
            if not value:
                raise error(f"{TASKS_FILE_FLAG}= is empty; give a path, e.g. {TASKS_FILE_FLAG}=my_tasks.yaml")
            files.append(value)
        else:
            rest.append(arg)
        i += 1
    load_tasks_files(files)
    return rest, files


# ---------------------------------------------------------------------------------------------
# --device
# ---------------------------------------------------------------------------------------------
DEVICE_HELP = "cpu | cuda | cuda:N | mps | auto (cuda when a GPU is available, else cpu)"
_DEVICES = "cpu, cuda, cuda:N (N < the GPU count), mps or auto"


def resolve_device(value: str, flag: str = "--device", *, error: type[Exception] = UserError) -> str:
    """``value`` checked against this machine before any work (``auto`` resolved): a torch device string of a device
    that exists here. Refused in one line: an unknown string, CUDA without a GPU, ``cuda:N`` beyond the GPU count."""
    import torch

    text = str(value).strip()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise error(f"{flag} {value!r} is not a device; use {_DEVICES}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise error(f"{flag} {text}: this machine has no usable CUDA GPU (torch.cuda.is_available() is False); "
                        f"use {flag} cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise error(f"{flag} {text}: no such GPU, this machine has {count} (cuda:0 .. cuda:{count - 1}); "
                        f"pick one of them, or {flag} cuda")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise error(f"{flag} {text}: MPS (Apple GPU) is not available on this machine; use {flag} cpu (or auto)")
    elif device.type != "cpu":
        raise error(f"{flag} {text}: device type {device.type!r} is not supported; use {_DEVICES}")
    return text


# ---------------------------------------------------------------------------------------------
# run_cli: one-line errors, Ctrl-C
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _sigint_handled_by(handler) -> Iterator[None]:
    """SIGINT goes to ``handler`` while inside (in the main thread: the only one that can set signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def _raise_interrupted(pid: int):
    """A SIGINT handler raising :class:`Interrupted` once in process ``pid`` (further Ctrl-C's ignored until the
    caller restores its handler); forked children that inherit it (DataLoader workers) keep Python's default."""

    def handler(signum, frame):
        if os.getpid() != pid:
            raise KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Interrupted()

    return handler


def _is_rank_zero() -> bool:
    """Not a secondary DDP rank (each rank runs the entry point and gets the terminal's Ctrl-C: one line, not N)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK"))


def run_cli(prog: str, body: Callable[[], int | None], *, user_errors: tuple = USER_ERRORS,
            format_error: Callable[[BaseException], str] | None = None,
            cleanup: Callable[[], None] | None = None,
            interrupted: str | Callable[[], str | None] | None = None) -> int:
    """Run ``body``; bad input -> one line ``<prog>: error: ...`` on stderr and 2 (after ``cleanup``).

    Ctrl-C -> ``cleanup``, one line ``<prog>: interrupted; <detail>`` and 130, where the detail (what was kept, how
    to resume) is ``interrupted`` (a text, or a function of the run's state), else the exception's own, else a
    generic one. ``BADMERGING_TRACEBACK=1`` re-raises both instead.
    """
    try:
        try:
            with _sigint_handled_by(_raise_interrupted(os.getpid())):
                status = body()
        except BaseException:
            if cleanup is not None:
                with _sigint_handled_by(signal.SIG_IGN):  # a second Ctrl-C must not leave half-removed outputs
                    cleanup()
            raise
    except (Interrupted, KeyboardInterrupt) as e:
        if os.environ.get("BADMERGING_TRACEBACK"):
            raise
        detail = interrupted() if callable(interrupted) else interrupted
        detail = detail or getattr(e, "detail", None) or "the run stopped before it finished; rerun the command"
        if _is_rank_zero():
            print(f"{prog}: interrupted; {detail}", file=sys.stderr)
        return INTERRUPTED_STATUS
    except user_errors as e:
        if os.environ.get("BADMERGING_TRACEBACK"):
            raise
        message = format_error(e) if format_error else (
            parse_error_line(e, f"{prog} --help") if isinstance(e, argparse.ArgumentError) else one_line(e))
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return 0 if status is None else int(status)
