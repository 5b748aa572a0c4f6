"""Is a run in a folder still the run a command asks for? Compare the settings of an ``etpo.fit`` command line with
the ``config.yaml`` that LightningCLI saved into the run directory when the run was made.

A benchmark is resumable: a finished run is skipped and an unfinished one resumed. That is only right while the
settings stay the same -- after ``configs/quickstart.yaml`` adopts a new option, or a contender's overlay changes a
learning rate, the runs already in the folder were made with the old settings, and counting them beside new ones
would mix two settings in one table without a word. :func:`run_differences` names what differs.

What is compared: every setting the command states -- each ``--config`` file (a later one overriding an earlier,
as jsonargparse does; a config path inside a file, such as ``backbone: model/smollm2.yaml``, is read as the file it
names), then each ``--key=value`` argument -- against the same key of the saved config. ``--run_dir`` and
``--ckpt_path`` say where a run lives and how it is continued, not what it is, and are left out; so are the settings
no file or argument states (their defaults live in the code, and a changed default is not seen here).

Keys the saved config does not hold:

* under a node with a ``class_path`` (the model, the environment) and the top-level ``data`` / ``trainer``: a
  parameter the class does not take is dropped by jsonargparse when an overlay switches the class (PPO-KL has no
  ``q_parameterisation``) and is not a difference; a parameter it takes but the run's config lacks was added to the
  code after the run was made, so the run had the parameter's default then -- a difference only when the command
  asks for another value than the default;
* anywhere else: a difference (the run's config predates the key).

Numbers compare by value (``1e-4`` equals ``0.0001``); lists element by element.
"""

from __future__ import annotations

import importlib
import inspect
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["dotlist", "command_settings", "settings_differences", "run_differences"]

# arguments that locate or continue a run, not settings of it
_NOT_SETTINGS = ("run_dir", "ckpt_path")
# the classes behind the top-level sections that have no class_path of their own (etpo.fit's LightningCLI)
_SECTION_CLASSES = {"data": "datamodules.rollout.RolloutDataModule", "trainer": "lightning.pytorch.Trainer"}
_MISSING = object()


def _load_yaml(path: str) -> Any:
    """A config file as plain data (omegaconf, as etpo.fit reads it; interpolations resolved where they can be)."""
    from omegaconf import OmegaConf

    conf = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(conf, resolve=True)
    except Exception:  # an interpolation only the whole parse can resolve: compare the rest as written
        return OmegaConf.to_container(conf, resolve=False)


def _expand_config_paths(data: Any, folder: str) -> Any:
    """``data`` with every string that names a config file (``backbone: model/smollm2.yaml``) replaced by that file's
    content, found as etpo.fit finds it (next to the including file, else in the project's configs/)."""
    from etpo.config_paths import _looks_like_config_path, resolve_config_path

    if isinstance(data, dict):
        return {k: _expand_config_paths(v, folder) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand_config_paths(v, folder) for v in data]
    if _looks_like_config_path(data):
        found = resolve_config_path(data, folder)
        if found is not None:
            return _expand_config_paths(_load_yaml(found), str(Path(found).parent))
    return data


def _merge(base: Any, layer: Any) -> Any:
    """``layer`` over ``base``: mappings key by key (a new class_path keeps the init_args given so far; jsonargparse
    keeps those the new class takes, and the comparison skips the others), anything else replaced."""
    if isinstance(base, dict) and isinstance(layer, dict):
        out = dict(base)
        for k, v in layer.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    return layer


def _set_dotted(tree: dict, key: str, value: Any) -> dict:
    node: Any = value
    for part in reversed(key.split(".")):
        node = {part: node}
    return _merge(tree, node)


def dotlist(tokens: Sequence[str]) -> list[str]:
    """``--key=value`` / ``--key value`` / ``key=value`` -> omegaconf dotlist entries ``key=value``."""
    out, i = [], 0
    tokens = list(tokens)
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            tok = tok[2:]
            if "=" not in tok:
                if i + 1 >= len(tokens):
                    raise ValueError(f"--{tok} needs a value")
                tok = f"{tok}={tokens[i + 1]}"
                i += 1
        if "=" not in tok:
            raise ValueError(f"cannot read the override {tokens[i]!r}: use key=value or --key=value")
        out.append(tok)
        i += 1
    return out


def command_settings(args: Sequence[str], cwd: str | Path = ".") -> dict:
    """The settings an ``etpo.fit`` argument list states (without the program itself): its ``--config`` files and
    ``--key=value`` / ``--key value`` arguments, in order, as one nested mapping."""
    import yaml

    from etpo.config_paths import resolve_config_path

    settings: dict = {}
    for entry in dotlist([a for a in args if a != "--print_config"]):  # the one option that takes no value
        key, _, value = entry.partition("=")
        if key in _NOT_SETTINGS:
            continue
        if key == "config":
            found = resolve_config_path(value, str(cwd))
            if found is None:
                raise FileNotFoundError(f"config file not found: {value}")
            settings = _merge(settings, _expand_config_paths(_load_yaml(found), str(Path(found).parent)))
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        settings = _set_dotted(settings, key, parsed)
    return settings


@lru_cache(maxsize=None)
def _class_parameters(class_path: str) -> Optional[dict]:
    """{parameter: default} of a class's constructor, following ``**kwargs`` up the base classes as jsonargparse does;
    None when the class cannot be imported (then nothing can be said about keys its run lacks)."""
    cls = _import(class_path)
    if cls is None:
        return None
    params: dict = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            signature = inspect.signature(init)
        except (TypeError, ValueError):
            break
        more = False
        for p in list(signature.parameters.values())[1:]:
            if p.kind is p.VAR_KEYWORD:
                more = True
            elif p.kind is not p.VAR_POSITIONAL and p.name not in params:
                params[p.name] = None if p.default is p.empty else p.default
        if not more:
            break
    return params


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):  # True == 1 in Python; a config's true is not its 1
        return a is b if isinstance(a, bool) and isinstance(b, bool) else str(a).lower() == str(b).lower()
    numbers = []
    for v in (a, b):
        try:
            numbers.append(float(v) if isinstance(v, (int, float, str)) and v is not None else None)
        except ValueError:
            numbers.append(None)
    if None not in numbers:
        x, y = numbers
        return x == y or math.isclose(x, y, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return not settings_differences(a, b)
    return a == b


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@lru_cache(maxsize=None)
def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:
        return None


def _same_class(asked: Any, saved: Any) -> bool:
    """jsonargparse saves the class by the path it is exported under (``envs.DataScienceEnv`` for
    ``envs.datascience.DataScienceEnv``): the same class object is the same class."""
    asked, saved = str(asked), str(saved)
    if asked == saved:
        return True
    a, b = _import(asked), _import(saved)
    return a is not None and a is b


def settings_differences(asked: dict, saved: dict, where: str = "", owner: Optional[str] = None,
                         names: tuple[str, str] = ("the command asks", "the run has")) -> list[str]:
    """One line per setting of ``asked`` that ``saved`` (a run's resolved config) does not match (module docstring).
    ``owner``: the class whose parameters ``asked``'s keys are (None: not known); ``names``: how the lines introduce
    the value of each side (``asked``'s, ``saved``'s)."""
    out: list[str] = []
    want_side, have_side = names
    if "class_path" in asked and "class_path" in saved and not _same_class(asked["class_path"], saved["class_path"]):
        return [f"{where}class_path: {have_side} {saved['class_path']}, {want_side} {asked['class_path']}"]
    for key, want in asked.items():
        name = f"{where}{key}"
        if key == "class_path":
            continue
        child_owner = None
        if key == "init_args" and "class_path" in saved:
            child_owner = str(saved["class_path"])
        elif not where and key in _SECTION_CLASSES:
            child_owner = _SECTION_CLASSES[key]
        have = saved.get(key, _MISSING) if isinstance(saved, dict) else _MISSING
        if have is _MISSING:
            params = _class_parameters(owner) if owner else None
            if owner and params is None:
                continue  # the class cannot be imported here: nothing to say about what its run lacks
            if params is not None and key not in params:
                continue  # a parameter this class does not take (an overlay switched the class; jsonargparse drops it)
            if params is not None and _same(want, params[key]):
                continue  # added after the run was made, asked at its default: the run had the same
            default = f"; it had the default {_short(params[key])}" if params is not None else ""
            out.append(f"{name}: {have_side} no such key (made before the setting existed{default}), "
                       f"{want_side} {_short(want)}")
        elif isinstance(want, dict) and isinstance(have, dict):
            out += settings_differences(want, have, f"{name}.", child_owner, names)
        elif not _same(want, have):
            out.append(f"{name}: {have_side} {_short(have)}, {want_side} {_short(want)}")
    return out


def run_differences(run_dir: str | Path, args: Sequence[str], cwd: str | Path = ".",
                    replace: Optional[dict] = None) -> Optional[list[str]]:
    """What differs between the run in ``run_dir`` (its saved ``config.yaml``) and the ``etpo.fit`` arguments
    ``args``: [] when nothing does; None when the run has no readable config.yaml (nothing can be compared).
    ``replace``: {dotted key: value} set in place of what the arguments compose to there (etpo.benchmark's
    ``env_override: file`` gives the whole ``data.env``)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(saved, dict):
        return None
    asked = command_settings(args, cwd)
    for key, value in (replace or {}).items():
        *parents, last = key.split(".")
        node = asked
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return settings_differences(asked, saved)
