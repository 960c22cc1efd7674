"""Tasks of your own, from a YAML task file: no Python, the same tasks in every entry point and worker.

A task file holds a ``tasks`` list; each entry is one :class:`~datamodules.tasks.TaskSpec`::

    tasks:
      - name: fruit                      # letters, digits, _ and -; not a built-in task's name
        classnames: [apple, banana]      # label order; or `from_folders` (data_dir in imagefolder layout)
        templates: ["a photo of a {}."]  # each with one {}; or a name: `imagenet`, or a registered task's
        data_dir: fruit_images           # local data, relative to this file ($VARS and ~ expanded) ...
        # hub_id: someone/fruit          # ... or a `datasets` hub id (exactly one of the two)
        # hub_config: null               # the hub (or hub-format folder) config
        train_split: train               # split names (defaults: train, test)
        test_split: test
        # image_column: image            # column names (defaults: image, label)
        # label_column: label

``classnames: from_folders`` reads the class folders of ``<data_dir>/<train_split>`` (sorted, as
torchvision's ``ImageFolder`` and ``datasets``' imagefolder give the labels; ``000_tench`` -> ``tench``)
when the file is loaded, so the names exist before any zero-shot head is built from them.

:func:`load_tasks_file` validates every field (one-line :class:`TaskFileError` naming the file, the task,
the key and the fix), registers the tasks and adds the file to ``BADMERGING_TASKS_FILES``; importing
``datamodules.tasks`` loads the files listed there, so spawned workers and SLURM jobs, which inherit the
environment, see the same tasks. Loading a file again replaces its own tasks (unchanged: a no-op); a name
taken by a built-in task or by another file's task is refused.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

from datamodules import tasks as registry
from datamodules.folders import FolderLayoutError, folder_classnames
from datamodules.tasks import NAMED_TEMPLATES, TASKS, TASKS_FILES_ENV, TaskSpec, register_task

__all__ = ["TaskFileError", "load_tasks_file", "load_environment", "loaded_task_files", "task_file_of",
           "file_task_identity", "FROM_FOLDERS", "TASK_KEYS"]

FROM_FOLDERS = "from_folders"
DEFAULT_TEMPLATES = ("a photo of a {}.",)
TASK_KEYS = ("name", "classnames", "templates", "data_dir", "hub_id", "hub_config", "train_split", "test_split",
             "image_column", "label_column")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_UNSET_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")
SHIPPED = "configs/tasks/"

_FILES: dict[str, tuple[str, ...]] = {}  # absolute file path -> names of the tasks it registered
_OWNER: dict[str, str] = {}  # task name -> absolute path of the file that registered it


class TaskFileError(ValueError):
    """A task file that cannot be used; the message is one line naming the file, the key and the fix."""


def _key(name: str) -> str:  # the registry's look-up key: case and '-' / '_' do not tell tasks apart
    return name.strip().lower().replace("-", "_")


def _read(file: Path, shown: str) -> Any:
    import yaml

    if not file.is_file():
        where = "is a directory, not a file" if file.is_dir() else "file not found"
        raise TaskFileError(f"task file {shown}: {where}; check the path ({SHIPPED} holds the shipped ones)")
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise TaskFileError(f"task file {shown}: malformed YAML{at} ({getattr(e, 'problem', None) or type(e).__name__}); "
                            "fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TaskFileError(f"task file {shown}: unreadable ({' '.join(str(e).split()) or type(e).__name__}); "
                            "check the file") from None


class _Entry:
    """One ``tasks[i]`` mapping with the file it came from, for messages ``<file>: task 'x': <key>: ...``."""

    def __init__(self, file: Path, shown: str, index: int, data: dict):
        self.file, self.shown, self.index, self.data = file, shown, index, data
        name = data.get("name")
        self.where = f"task {name!r}" if isinstance(name, str) and name else f"tasks[{index}]"

    def error(self, key: str | None, problem: str) -> TaskFileError:
        at = f"{self.where}: {key}: " if key else f"{self.where}: "
        return TaskFileError(f"task file {self.shown}: {at}{problem}")

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.data.get(key, default)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            got = "missing" if value is None else f"{value!r} is not a non-empty string"
            raise self.error(key, f"{got}; give it as text, e.g. {key}: {_EXAMPLE[key]}")
        return value.strip()


_EXAMPLE = {"name": "my_task", "hub_id": "someone/my_dataset", "hub_config": "default", "data_dir": "/data/my_task",
            "train_split": "train", "test_split": "test", "image_column": "image", "label_column": "label"}


def _name(entry: _Entry) -> str:
    name = entry.text("name", required=True)
    if not _NAME.match(name):
        raise entry.error("name", f"{name!r} is not a task name; use letters, digits, '_' and '-', starting with a "
                                  "letter")
    return name


def _data_dir(entry: _Entry) -> str | None:
    value = entry.text("data_dir")
    if value is None:
        return None
    expanded = os.path.expanduser(os.path.expandvars(value))
    unset = _UNSET_VARIABLE.search(expanded)
    if unset:
        variable = unset.group(1) or unset.group(2)
        raise entry.error("data_dir", f"{value}: environment variable {variable} is not set; export it "
                                      f"({variable}=/path/to/data) or write the path")
    path = Path(expanded)
    if not path.is_absolute():  # relative to the task file, as a config's paths are
        path = entry.file.parent / path
    path = path.resolve()
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise entry.error("data_dir", f"{path} {what}; pass the task's local data folder")
    return str(path)


def _one_classname(entry: _Entry, i: int, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        raise entry.error(f"classnames[{i}]", f"{value!r} is not text (YAML reads yes/no/on/off/true/false/null as "
                                              "other types); quote it")
    if isinstance(value, int):  # digits written bare: [0, 1, 2]
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise entry.error(f"classnames[{i}]", f"{value!r} is not a class name; give each class name as text")
    return value.strip()


def _classnames(entry: _Entry, data_dir: str | None, splits: tuple[str, str]) -> tuple[tuple[str, ...], bool]:
    """(class names, read from folders)."""
    value = entry.data.get("classnames")
    if value == FROM_FOLDERS:
        if data_dir is None:
            raise entry.error("classnames", f"{FROM_FOLDERS} reads the class folders of data_dir, which this task "
                                            "does not have; add data_dir (<data_dir>/<split>/<class>/<image>) or list "
                                            "the class names")
        try:
            names = folder_classnames(data_dir, splits)
        except (FolderLayoutError, OSError) as e:
            raise entry.error("classnames", f"{FROM_FOLDERS}: {' '.join(str(e).split())}") from None
    elif isinstance(value, list) and value:
        names = tuple(_one_classname(entry, i, v) for i, v in enumerate(value))
    else:
        got = "missing" if value is None else f"{value!r} is neither a list nor {FROM_FOLDERS}"
        raise entry.error("classnames", f"{got}; list them in label order ([cat, dog]) or write {FROM_FOLDERS}")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n.lower() in seen:
            raise entry.error("classnames", f"{names[seen[n.lower()]]!r} and {n!r} (positions {seen[n.lower()]} and {i}) "
                                            "name the same class; class names must be unique (case-insensitive)")
        seen[n.lower()] = i
    return names, value == FROM_FOLDERS


def _templates(entry: _Entry) -> tuple[str, ...]:
    value = entry.data.get("templates", list(DEFAULT_TEMPLATES))
    if isinstance(value, str) and "{" not in value:  # a named list, or a registered task's templates
        if value in NAMED_TEMPLATES:
            return NAMED_TEMPLATES[value]
        key = _key(value)
        match = next((s for n, s in TASKS.items() if _key(n) == key), None)
        if match is None:
            known = ", ".join([*NAMED_TEMPLATES, *sorted(TASKS)])
            raise entry.error("templates", f"{value!r} names no template list or task (known: {known}); list the "
                                           "templates or name one of these")
        return match.templates
    templates = [value] if isinstance(value, str) else value
    if not isinstance(templates, list) or not templates:
        raise entry.error("templates", f"{value!r} is not a list of templates; give e.g. ['a photo of a {{}}.']")
    for i, t in enumerate(templates):
        if not isinstance(t, str) or t.count("{}") != 1 or "{" in t.replace("{}", "") or "}" in t.replace("{}", ""):
            raise entry.error(f"templates[{i}]", f"{t!r} must hold '{{}}' (the class name) exactly once and no other "
                                                 "braces; e.g. 'a photo of a {}.'")
    return tuple(templates)


def _parse(entry: _Entry) -> TaskSpec:
    unknown = [k for k in entry.data if k not in TASK_KEYS]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, TASK_KEYS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "remove it"
        raise entry.error(None, f"unknown key {key!r}; {hint} (keys: {', '.join(TASK_KEYS)})")
    name = _name(entry)
    data_dir, hub_id = _data_dir(entry), entry.text("hub_id")
    if (data_dir is None) == (hub_id is None):
        both = "gives both data_dir and hub_id" if data_dir else "gives neither data_dir nor hub_id"
        raise entry.error(None, f"{both}; give exactly one source: data_dir (a local folder) or hub_id (a datasets "
                                "hub id)")
    if hub_id is not None and re.search(r"\s", hub_id):
        raise entry.error("hub_id", f"{hub_id!r} has white space; give the hub id as owner/name")
    splits = (entry.text("train_split", "train"), entry.text("test_split", "test"))
    classnames, from_folders = _classnames(entry, data_dir, splits)
    templates = _templates(entry)
    try:
        return TaskSpec(name=name, hub_id=hub_id, hub_config=entry.text("hub_config"), train_split=splits[0],
                        test_split=splits[1], classnames=classnames, templates=templates,
                        image_column=entry.text("image_column", "image"), label_column=entry.text("label_column", "label"),
                        data_dir=data_dir, classnames_from_folders=from_folders)
    except ValueError as e:  # TaskSpec's own checks
        raise entry.error(None, " ".join(str(e).split())) from None


def _check_names(specs: list[TaskSpec], path: str, shown: str) -> None:
    """Names unique in this file and not taken by a built-in task or another file's task."""
    mine: dict[str, str] = {}
    for spec in specs:
        key = _key(spec.name)
        if key in mine:
            raise TaskFileError(f"task file {shown}: task {spec.name!r}: name: defined twice in this file "
                                f"({mine[key]!r} and {spec.name!r}); give each task its own name")
        mine[key] = spec.name
        for taken in TASKS:
            if _key(taken) != key or _OWNER.get(taken) == path:
                continue
            other = _OWNER.get(taken)
            by = f"the task of task file {other}" if other else "a built-in task"
            raise TaskFileError(f"task file {shown}: task {spec.name!r}: name: {taken!r} is already {by}; rename "
                                "this task")


def load_tasks_file(path: str | os.PathLike) -> list[str]:
    """Validate and register the tasks of the YAML task file ``path``; returns their names, in file order.

    Raises :class:`TaskFileError` (one line: the file, the task, the key, the fix) before registering
    anything. Adds the file's absolute path to ``BADMERGING_TASKS_FILES``.
    """
    shown = str(path)
    file = Path(os.path.expanduser(str(path)))
    data = _read(file, shown)
    absolute = str(file.resolve())
    if not isinstance(data, dict) or "tasks" not in data:
        got = "is empty" if data is None else (f"holds a {type(data).__name__}" if not isinstance(data, dict)
                                               else "has no 'tasks' key")
        raise TaskFileError(f"task file {shown}: {got}; write a mapping with a 'tasks' list (see {SHIPPED}example.yaml)")
    extra = [k for k in data if k != "tasks"]
    if extra:
        raise TaskFileError(f"task file {shown}: unknown top-level key {str(extra[0])!r}; the file holds only 'tasks' "
                            "(move it into a task or remove it)")
    entries = data["tasks"]
    if not isinstance(entries, list) or not entries:
        raise TaskFileError(f"task file {shown}: tasks: {entries!r} is not a non-empty list; list one mapping per "
                            f"task (see {SHIPPED}example.yaml)")
    specs = []
    for i, item in enumerate(entries):
        if not isinstance(item, dict):
            raise TaskFileError(f"task file {shown}: tasks[{i}]: {item!r} is not a mapping; write each task as "
                                "name: ..., classnames: ..., templates: ...")
        specs.append(_parse(_Entry(file, shown, i, item)))
    _check_names(specs, absolute, shown)

    for old in _FILES.pop(absolute, ()):  # this file's earlier tasks: replaced, dropped if no longer defined
        TASKS.pop(old, None)
        _OWNER.pop(old, None)
    for spec in specs:
        register_task(spec, overwrite=True)
        _OWNER[spec.name] = absolute
    _FILES[absolute] = tuple(s.name for s in specs)
    listed = [p for p in os.environ.get(TASKS_FILES_ENV, "").split(os.pathsep) if p]
    if absolute not in listed:
        os.environ[TASKS_FILES_ENV] = os.pathsep.join([*listed, absolute])
    error = registry._ENVIRONMENT_ERROR
    if error is not None and getattr(error, "path", None) == absolute:  # the file that failed at import loads now
        registry._ENVIRONMENT_ERROR = None
    return [s.name for s in specs]


def load_environment() -> list[str]:
    """Load every task file listed in ``BADMERGING_TASKS_FILES``; returns the task names."""
    names = []
    for path in [p for p in os.environ.get(TASKS_FILES_ENV, "").split(os.pathsep) if p]:
        try:
            names += load_tasks_file(path)
        except TaskFileError as e:
            error = TaskFileError(f"{e} (listed in {TASKS_FILES_ENV}; fix the file or remove it from the variable)")
            error.path = str(Path(path).expanduser().resolve())
            raise error from None
    return names


def loaded_task_files() -> list[str]:
    """The absolute paths of the task files loaded in this process, in load order."""
    return list(_FILES)


def task_file_of(name: str) -> str | None:
    """The task file that defined task ``name`` (None for a built-in task)."""
    return _OWNER.get(name)


def file_task_identity(name: str) -> dict | None:
    """What a task file says about task ``name`` (None for a built-in task): for cache keys of runs on it,
    so that editing the file (class names, templates, source, splits) does not reuse runs of the old task."""
    if name not in _OWNER:
        return None
    spec = TASKS[name]
    return {"classnames": list(spec.classnames), "templates": list(spec.templates), "hub_id": spec.hub_id,
            "hub_config": spec.hub_config, "data_dir": spec.data_dir, "train_split": spec.train_split,
            "test_split": spec.test_split, "image_column": spec.image_column, "label_column": spec.label_column}
