"""The one exception of :mod:`envs.isolation`."""


class SandboxError(RuntimeError):
    """The sandbox itself cannot work (bubblewrap unusable, worker does not start, pool closed)."""
