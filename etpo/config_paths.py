"""Config paths that travel: a copy of a shipped config, edited in another folder, still finds the presets it names.

jsonargparse reads a relative path inside a config file (``backbone: model/smollm2.yaml``) relative to that file's
folder, so a copy of ``configs/quickstart.yaml`` anywhere else failed with a long union error about
``model/smollm2.yaml``. ``python -m etpo.fit`` therefore reads its configs in :data:`CONFIG_MODE`: omegaconf, as
before, plus a fallback -- a relative config path (a string ending in ``.yaml`` / ``.yml``) that does not exist
next to the config naming it is looked up in the project's own config hub, the ``configs/`` folder beside the
installed ``etpo`` package (:func:`config_hub`): relative to the hub (``model/smollm2.yaml``, also spelt
``configs/model/smollm2.yaml``) or to one of its folders (``../model/smollm2.yaml`` from a copied
``contenders/`` overlay). A file next to the config always wins. The same fallback serves ``--config`` paths that
are not where the working directory says (``--config configs/contenders/ppo_kl.yaml`` from any folder).

A path found nowhere stops the run with one line (:func:`unresolved_config_path`) that names the config, the
line, the path, where it was looked for and the fix. ``--print_config`` writes a config with every preset inlined,
which runs from anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_MODE", "config_hub", "register_config_mode", "resolve_config_path", "unresolved_config_path"]

CONFIG_MODE = "etpo_omegaconf"  # the jsonargparse parser_mode etpo.fit passes to LightningCLI
_SUFFIXES = (".yaml", ".yml")


def config_hub() -> Path:
    """The project's ``configs/`` folder, found from this package (never from the working directory)."""
    return Path(__file__).resolve().parents[1] / "configs"


def _looks_like_config_path(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower().endswith(_SUFFIXES) and "\n" not in value


def _hub_candidates(value: str) -> list[Path]:
    """Where ``value`` could be in the hub: relative to it, then to each of its folders (kept inside the hub)."""
    hub = config_hub()
    rel = Path(value)
    if rel.parts[:1] == ("configs",):  # spelt from the project root, as the README's commands do
        rel = Path(*rel.parts[1:])
    bases = [hub] + (sorted(p for p in hub.iterdir() if p.is_dir()) if hub.is_dir() else [])
    out: list[Path] = []
    for base in bases:
        candidate = Path(os.path.normpath(base / rel))
        if candidate.is_relative_to(hub) and candidate not in out:
            out.append(candidate)
    return out


def resolve_config_path(value: str, folder: str | os.PathLike) -> str | None:
    """The file the config path ``value`` names when read from ``folder``: there, else in the hub; None if
    nowhere. An absolute path is taken as it is."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path) if path.is_file() else None
    if (Path(folder) / path).is_file():
        return str(Path(folder) / path)
    return next((str(c) for c in _hub_candidates(value) if c.is_file()), None)


def _with_hub_fallback(data: Any, folder: str) -> Any:
    """``data`` with each relative config path that is not in ``folder`` replaced by its file in the hub."""
    if isinstance(data, dict):
        return {k: _with_hub_fallback(v, folder) for k, v in data.items()}
    if isinstance(data, list):
        return [_with_hub_fallback(v, folder) for v in data]
    if _looks_like_config_path(data) and not Path(data).expanduser().is_absolute() \
            and not (Path(folder) / data).is_file():
        return resolve_config_path(data, folder) or data
    return data


def register_config_mode() -> str:
    """Make :data:`CONFIG_MODE` a jsonargparse parser mode (idempotent) and return its name.

    jsonargparse reads every config file -- the ``--config`` ones and each one a config names -- with the working
    directory changed to that file's folder, which is where it resolves the relative paths inside: the loader
    below looks from there too, and only replaces a path jsonargparse would not find."""
    from jsonargparse import get_loader, set_loader
    # jsonargparse 4.x makes its omegaconf loader lazily, in this private module (tests/test_configs.py notices a move)
    from jsonargparse._loaders_dumpers import get_loader_exceptions, loaders, set_omegaconf_loader

    if CONFIG_MODE not in loaders:
        set_omegaconf_loader("omegaconf")  # jsonargparse builds its omegaconf loader on first use
        omegaconf_load = get_loader("omegaconf")

        def load(text: str) -> Any:
            value = omegaconf_load(text)
            if not isinstance(value, (dict, list)):  # a single value (say from the command line), not a config
                return value
            return _with_hub_fallback(value, os.getcwd())

        set_loader(CONFIG_MODE, load, get_loader_exceptions("omegaconf"))
    return CONFIG_MODE


def _config_path_nodes(path: str):
    """(value, line) of every string in the YAML file ``path`` that looks like a config path."""
    import yaml

    try:
        root = yaml.compose(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    todo = [root] if root is not None else []
    while todo:
        node = todo.pop(0)
        if isinstance(node, yaml.MappingNode):
            todo.extend(v for _, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)
        elif isinstance(node, yaml.ScalarNode) and node.tag.endswith(":str") and _looks_like_config_path(node.value):
            yield node.value, node.start_mark.line + 1


def unresolved_config_path(configs: list[str], error: str | None = None) -> str | None:
    """The one line for a config path in ``configs`` (or in a config they name) that is nowhere -- if there is one,
    and, given jsonargparse's ``error``, only if that error is about it (a string that is no config path is left
    to jsonargparse's own message)."""
    todo, seen = [str(c) for c in configs], set()
    while todo:
        config = todo.pop(0)
        if config in seen or not os.path.isfile(config):
            continue
        seen.add(config)
        folder = os.path.dirname(os.path.abspath(config))
        for value, line in _config_path_nodes(config):
            found = resolve_config_path(value, folder)
            if found is not None:
                todo.append(found)
                continue
            if error is not None and value not in error:
                continue
            if Path(value).expanduser().is_absolute():
                missing = "does not exist"
            else:
                missing = (f"is neither next to it ({os.path.join(folder, value)}) nor in the project's configs "
                           f"({config_hub()}/)")
            return (f"{config}, line {line}: config path '{value}' {missing}; give it relative to the config file or "
                    "absolute, or make a self-contained one: python -m etpo.fit --config ... --print_config > "
                    "self_contained.yaml")
    return None
