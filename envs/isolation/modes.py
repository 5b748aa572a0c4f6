"""Which isolation a pool gets: ``sandbox`` = ``"auto"`` | ``"isolated"`` | ``"rlimits"`` (see :mod:`envs.isolation`)."""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass

from . import view
from .errors import SandboxError

__all__ = ["SANDBOX_MODES", "SANDBOX_ENV_VAR", "Isolation", "SandboxFallbackWarning", "resolve_isolation"]

SANDBOX_MODES = ("auto", "isolated", "rlimits")
SANDBOX_ENV_VAR = "ETPO_SANDBOX"
_MODE_ALIASES = {"bwrap": "isolated", "bubblewrap": "isolated"}  # earlier spelling of "isolated"

# ---------------------------------------------------------------------------------------------------
# which isolation


class SandboxFallbackWarning(RuntimeWarning):
    """``auto`` fell back to ``rlimits`` because bubblewrap is missing: warned once per process, so that code that
    builds an environment sees it. A program that reports the isolation itself (``python -m etpo.fit`` prints it as
    its ``sandbox:`` line, advice included) filters this category instead of saying it twice."""


@dataclass(frozen=True)
class Isolation:
    """The isolation a pool uses: ``mode`` (``"isolated"``/``"rlimits"``), what was ``requested``
    (``"auto"``/``"isolated"``/``"rlimits"``), where that came from (``source``: ``"config"``,
    ``"ETPO_SANDBOX"`` or ``"default"``) and a one-line ``detail``."""

    mode: str
    requested: str
    source: str
    detail: str

    def describe(self) -> str:
        return f"{self.mode} (requested {self.requested!r} by {self.source}): {self.detail}"

    def as_dict(self) -> dict:
        return asdict(self)


def _normalize_mode(value: str, source: str) -> str:
    mode = _MODE_ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if mode not in SANDBOX_MODES:
        raise ValueError(f"sandbox mode {value!r} (from {source}) is not one of {', '.join(SANDBOX_MODES)}")
    return mode


_ISOLATED_DETAIL = ("own PID/network/IPC namespaces, read-only minimal filesystem (no data directory, "
                    "no bundled datasets), code runs as an unprivileged user")
_RLIMITS_DETAIL = ("resource limits and a seccomp filter only: the code sees the real filesystem (including the "
                   "data and its labels) and the network")
_FALLBACK_ADVICE = (f"install bubblewrap (apt-get install bubblewrap) for isolation, or set {SANDBOX_ENV_VAR}=rlimits "
                    "to choose this fallback explicitly")


def resolve_isolation(requested: str | None = None, *, source: str = "config") -> Isolation:
    """Decide the isolation for a pool; raise :class:`SandboxError` when it cannot be had.

    ``requested`` (a config value) wins; None means the ``ETPO_SANDBOX`` environment variable, else ``"auto"``.
    ``"auto"`` is ``"isolated"`` when bubblewrap is installed (an error with the reason if it cannot start
    here) and ``"rlimits"`` only when it is not installed, announced once per process.
    """
    if requested is None:
        env = os.environ.get(SANDBOX_ENV_VAR, "").strip()
        requested, source = (env, SANDBOX_ENV_VAR) if env else ("auto", "default")
    mode = _normalize_mode(requested, source)
    if mode == "rlimits":
        return Isolation("rlimits", mode, source, _RLIMITS_DETAIL + " (requested)")
    exe = shutil.which("bwrap")
    if exe is None or not sys.platform.startswith("linux"):
        missing = "bubblewrap (bwrap) is not installed" if sys.platform.startswith("linux") else "bubblewrap needs Linux"
        if mode == "isolated":
            raise SandboxError(f"sandbox 'isolated' requested (by {source}) but {missing}; "
                               "install it (apt-get install bubblewrap)")
        _announce_once(f"envs.isolation: {missing}, so generated code runs with {_RLIMITS_DETAIL}. "
                       f"{_FALLBACK_ADVICE[0].upper()}{_FALLBACK_ADVICE[1:]}.")
        # the advice is part of the detail: a report of the isolation (etpo.fit's sandbox line) says how to fix it
        return Isolation("rlimits", mode, source, f"{missing}; {_RLIMITS_DETAIL}; {_FALLBACK_ADVICE}")
    ok, reason = view.bwrap_available()
    if not ok:
        raise SandboxError(
            f"bubblewrap is installed but cannot start a sandbox here ({reason}). Fix that (e.g. allow "
            f"unprivileged user namespaces, or run as root), or choose the unisolated fallback explicitly with "
            f"{SANDBOX_ENV_VAR}=rlimits (or sandbox: rlimits in the environment's config)")
    return Isolation("isolated", mode, source, f"{view.bwrap_version()}: {_ISOLATED_DETAIL}")


_ANNOUNCED: set[str] = set()


def _announce_once(msg: str) -> None:
    """One warning, once per process (not also a log record: with no logging configured, Python prints a record
    of level WARNING too, and the user read the same text twice)."""
    if msg not in _ANNOUNCED:
        _ANNOUNCED.add(msg)
        warnings.warn(msg, SandboxFallbackWarning, stacklevel=3)
