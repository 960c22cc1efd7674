"""The one command-line helper of every entry point: config-file checks, one-line errors, exit status 2.

Every entry script (train.py, merge.py, pipeline.py, sweep.py, bv.py) runs its body through :func:`run_cli`:
bad input (a ``ValueError``, ``OSError``, a parse error, ...) becomes one line ``<prog>: error: <what>; <fix>``
on stderr and exit status 2, with the run's partial outputs removed by its ``cleanup``;
``BADMERGING_TRACEBACK=1`` re-raises instead (full traceback, for debugging).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from merging.io import check_output_path

__all__ = ["UserError", "USER_ERRORS", "one_line", "read_config_mapping", "check_config_files", "parse_error_line",
           "run_cli", "check_output_path", "OneLineArgumentParser", "config_values"]


class UserError(ValueError):
    """An input that cannot be used; the message is one line naming the input and the fix."""


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError, argparse.ArgumentError,
                                                pickle.UnpicklingError)


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


def run_cli(prog: str, body: Callable[[], int | None], *, user_errors: tuple = USER_ERRORS,
            format_error: Callable[[BaseException], str] | None = None,
            cleanup: Callable[[], None] | None = None) -> int:
    """Run ``body``; bad input -> one line ``<prog>: error: ...`` on stderr and 2 (after ``cleanup``)."""
    try:
        try:
            status = body()
        except BaseException:
            if cleanup is not None:
                cleanup()
            raise
    except user_errors as e:
        if os.environ.get("BADMERGING_TRACEBACK"):
            raise
        message = format_error(e) if format_error else (
            parse_error_line(e, f"{prog} --help") if isinstance(e, argparse.ArgumentError) else one_line(e))
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return 0 if status is None else int(status)
