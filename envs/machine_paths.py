"""Text without the paths of the machine it was written on, so that what is kept reads the same in every clone.

Error feedback (:func:`envs.datascience.env.summarize_error`: the reflection prompt and what a run records) and the
files kept under docs/results (tools/keep_runs.py, tools/headroom.py, tools/base_rate.py) pass through
:class:`MachinePaths`, which cuts, in this order:

* installation prefixes: ``/home/u/etpo/.venv/lib/python3.11/site-packages/sklearn/x.py`` ->
  ``site-packages/sklearn/x.py`` (``dist-packages`` too), ``/usr/lib/python3.11/json/x.py`` -> ``python3.11/json/x.py``;
* data directories (``data_dirs``): ``/data/shared/datasets/airlines/airlines.csv`` ->
  ``<data dir>/airlines/airlines.csv``, the directory itself -> ``<data dir>``;
* checkouts of the project (``checkouts``, by default this one): ``/home/u/etpo/runs/x`` -> ``runs/x`` (relative to
  the project root), the root itself -> ``.``.

A path is cut only where it starts (at the start of the text or after a character that cannot be part of a path: a
space, a quote, a bracket, ``=``, ``,`` ...): a relative path, or a word that merely contains the names, stays as it
is. The longest of the data directories and checkouts is cut first, so a data directory inside the project stays a
data directory.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Iterable

__all__ = ["PROJECT_ROOT", "DATA_DIR_LABEL", "MachinePaths", "portable_text"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR_LABEL = "<data dir>"

# ".../site-packages/sklearn/x.py" -> "site-packages/sklearn/x.py", ".../lib/python3.11/json/x.py" -> "python3.11/..."
_INSTALL_PREFIXES = tuple(
    re.compile(r"""(?<![^\s"'(<=])(?:[A-Za-z]:)?[/\\][^\s"'()<>]*?[/\\](%s)(?=[/\\])""" % names)
    for names in (r"site-packages|dist-packages", r"python3\.\d+")  # packages first: they live under python3.X
)
_NAME_CHAR = r"\w.~+@%\-"  # what a file name is made of
_PATH_CHAR = _NAME_CHAR + "/"
# a root ends at slashes that go on into the path (group 1: what lies below it), or where the path ends (the folder)
_ROOT_END = rf"(?:(/+)(?=[{_NAME_CHAR}])|(?=/?(?:$|[^{_PATH_CHAR}])|\.(?:$|[^{_PATH_CHAR}])))"


def _spellings(folder: str | os.PathLike) -> list[str]:
    """The folder as given (made absolute) and resolved: a symlinked checkout is named both ways in tracebacks."""
    found = []
    for spelled in (os.path.abspath(os.path.expanduser(folder)), str(Path(folder).expanduser().resolve())):
        spelled = spelled.rstrip("/")
        if spelled and spelled not in found:
            found.append(spelled)
    return found


class MachinePaths:
    """The paths of one machine to cut out of text: installation prefixes, ``data_dirs`` (each becomes
    ``<data dir>``) and ``checkouts`` of the project (each becomes the project root: paths below it relative).
    A filesystem root (``/``) is never a data directory or checkout."""

    def __init__(self, checkouts: Iterable[str | os.PathLike] = (PROJECT_ROOT,),
                 data_dirs: Iterable[str | os.PathLike] = ()):
        roots = [(spelled, DATA_DIR_LABEL + "/", DATA_DIR_LABEL) for d in data_dirs for spelled in _spellings(d)]
        roots += [(spelled, "", ".") for c in checkouts for spelled in _spellings(c)]
        roots.sort(key=lambda root: -len(root[0]))
        self.roots = tuple(dict.fromkeys(spelled for spelled, _, _ in roots))
        self._patterns = [(re.compile(rf"(?<![{_PATH_CHAR}]){re.escape(spelled)}{_ROOT_END}"), below, itself)
                          for spelled, below, itself in roots]

    def may_hold(self, text: str) -> bool:
        """False when ``text`` surely holds no path to cut (a cheap test before parsing a record)."""
        return any(name in text for name in ("site-packages", "dist-packages", "python3.", *self.roots))

    def portable_text(self, text: str) -> str:
        """``text`` with every path of this machine cut (module docstring)."""
        if not self.may_hold(text):
            return text
        for prefix in _INSTALL_PREFIXES:
            text = prefix.sub(r"\1", text)
        for pattern, below, itself in self._patterns:
            text = pattern.sub(lambda m, below=below, itself=itself: below if m.group(1) else itself, text)
        return text

    def portable_value(self, value):
        """A JSON value (dicts, lists, strings, numbers ...) with :meth:`portable_text` applied to every string in it,
        dictionary keys included."""
        if isinstance(value, str):
            return self.portable_text(value)
        if isinstance(value, list):
            return [self.portable_value(item) for item in value]
        if isinstance(value, dict):
            return {self.portable_text(key) if isinstance(key, str) else key: self.portable_value(item)
                    for key, item in value.items()}
        return value


@functools.lru_cache(maxsize=1)
def _this_checkout() -> MachinePaths:
    return MachinePaths()


def portable_text(text: str) -> str:
    """``text`` without installation prefixes and with paths in this checkout of the project made relative to it."""
    return _this_checkout().portable_text(text)
