"""The benchmark sweep: ``python -m etpo.benchmark --config configs/benchmark/<name>.yaml [overrides]``.

Runs every contender on every dataset with every seed for a budget of N environment steps, each run one
``python -m etpo.fit`` subprocess in its own run directory, then writes the report (``etpo.report``) into the output
folder. The benchmark config is a small YAML (read with omegaconf)::

    out: runs/benchmark/paper          # runs go to <out>/runs/<contender>/<dataset>/seed<k>; the report to <out>/
    budget: 500                        # environment steps per run (--data.budget)
    seeds: 5                           # an int n (= seeds 0..n-1) or a list; seed k = train/validation split k
    datasets: [breast_w, cmc]          # --data.env.init_args.dataset
    base: configs/quickstart.yaml      # the setting: every run's first --config (null: contenders are whole configs)
    contenders:                        # name: an overlay on the base, or {config: ..., overrides: [...] | {key: value}}
      reflection: configs/contenders/reflection.yaml
      ppo_kl: {config: configs/contenders/ppo_kl.yaml, overrides: ["--model.init_args.ppo_epochs=2"]}
      etpo: null                       # null: the base alone (it is ETPO)
    overrides: []                      # extra etpo.fit arguments for every run
    env_override: dotted               # how the dataset / split reach etpo.fit (see below)
    jobs: 1                            # runs at a time (several fit on one GPU; mind the memory)
    timeout_s: null                    # per-run wall-clock limit (the run is killed, reported failed, resumable)
    preflight: auto                    # parse one run per contender with --print_config first (auto: with etpo.fit)
    report: {within: null, ddof: 1, paper: false}   # also last_fraction (0.25), n_boot (10000), band (std | se):
                                                    # see etpo.report

Paths are relative to the working directory (run from the repository root). Every key can be overridden on the
command line as ``key=value`` or ``--key=value`` (omegaconf dotlist: ``--budget=64 --seeds=[0,1]
--datasets=[breast_w]``); ``--only etpo,ppo_kl`` restricts the contenders.

One run (contender c, dataset d, seed k) is::

    python -m etpo.fit [--config <base>] [--config <c.config>] --run_dir <out>/runs/<c>/<d>/seed<k>
        --data.env.init_args.dataset=<d> --data.env.init_args.split_seed=<k> --data.seed=<k> --data.budget=<N>
        --seed_everything=<k> <overrides> <c.overrides> [--ckpt_path last]

so all contenders share the 5 train/validation splits, and -- composed from one base -- everything else of the
setting. With ``env_override: file`` the dataset and split are passed instead as a last
``--config <run_dir>/benchmark_env.yaml`` holding the composed ``data.env`` of base and overlay with
``init_args.dataset`` / ``init_args.split_seed`` replaced (for a DataModule whose ``env`` argument is a plain dict,
which jsonargparse cannot override key by key).

Resumable: a run whose ``summary.json`` says ``finished`` is skipped; a run directory holding checkpoints is
resumed with ``--ckpt_path last``; anything else starts afresh. A finished or resumable run is first checked against
the settings the sweep now asks for (its saved ``config.yaml`` against the config files and overrides of its command,
``etpo/run_settings.py``): when a config or an override has changed since the run was made, the run is *stale* and
the sweep stops before anything runs, naming each stale run and what differs -- unless ``--stale rerun`` (move the
stale runs to ``<out>/stale/<contender>/<dataset>/seed<k>-<time>/`` with a ``stale.json`` saying why, where
``etpo.report`` does not count them, and run them afresh) or ``--stale keep`` (count them as they are, with a
warning). stdout/stderr of every run go to
``<run_dir>/fit.log`` (appended, one header line per attempt). A failed run (non-zero exit, timeout, no finished
summary, or a summary whose dataset / seed differ from the requested ones -- an override that did not take effect)
is reported and listed at the end; the sweep goes on. ``<out>/benchmark_status.json`` records every run's latest
status (merged across sweeps: two sweeps on one folder do not erase each other's entries).

Several sweeps may share one folder (say, one per contender on a machine with cores to spare): a run is claimed
with the lock etpo.fit holds on ``<run_dir>/.run.lock`` (``etpo/run_lock.py``: handed to the run's process, it lasts
as long as the run; the system drops it when they end, so a crash or a restart leaves nothing to clean up), and its
state is read again just before it starts. A run that another process is running (a sweep's, or a resume started by
hand) is skipped (``in use by another run``); one that another sweep has finished since this sweep planned is
skipped as finished; one that gained checkpoints is resumed.
Before the sweep a preflight parses the first pending run of every contender with ``--print_config`` (seconds,
nothing is trained) and stops with a clear message when an argument is rejected or the dataset / split seed / seed
do not reach the resolved config. ``--dry_run`` prints the commands; ``--report_only`` only writes the report.
``--fit_cmd "python stub.py"`` replaces ``python -m etpo.fit`` (tests use a stub; no preflight then).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from etpo import run_lock
from etpo.run_settings import dotlist

__all__ = ["Contender", "BenchmarkConfig", "RunSpec", "load_config", "run_state", "build_command", "plan",
           "run_benchmark", "main"]

DEFAULT_FIT_CMD = (sys.executable, "-m", "etpo.fit")
_ENV_MODES = ("dotted", "file")


@dataclass
class Contender:
    name: str
    config: Optional[str]            # a whole etpo.fit config, or an overlay on BenchmarkConfig.base (None: the base)
    overrides: list[str] = field(default_factory=list)


@dataclass
class BenchmarkConfig:
    contenders: list[Contender]
    datasets: list[str]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    budget: int = 500
    out: str = "runs/benchmark"
    overrides: list[str] = field(default_factory=list)
    env_override: str = "dotted"
    jobs: int = 1
    timeout_s: Optional[float] = None
    fit_cmd: Optional[list[str]] = None
    preflight: str = "auto"
    report: dict = field(default_factory=lambda: {"within": None, "ddof": 1, "paper": False, "last_fraction": 0.25,
                                                  "n_boot": 10000, "band": "std"})
    base: Optional[str] = None       # the setting's config, first --config of every run

    @property
    def runs_dir(self) -> Path:
        return Path(self.out) / "runs"

    def config_files(self, contender: Contender) -> list[str]:
        """The ``--config`` files of one contender's runs, in order: the base, then the contender's overlay."""
        return [c for c in (self.base, contender.config) if c]


# ----------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------

def _override_list(value: Any, where: str) -> list[str]:
    """Overrides as etpo.fit arguments: a list of strings, or a mapping ``{key: value}`` -> ``--key=value``."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            elif isinstance(v, (list, dict)) or v is None:
                v = json.dumps(v)
            key = k if str(k).startswith("--") else f"--{k}"
            out.append(f"{key}={v}")
        return out
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise ValueError(f"{where}: overrides must be a list of arguments or a mapping, got {value!r}")


def _seeds(value: Any) -> list[int]:
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"seeds: need at least one seed, got {value}")
        return list(range(value))
    if isinstance(value, (list, tuple)) and value:
        return [int(v) for v in value]
    raise ValueError(f"seeds must be a positive int or a non-empty list, got {value!r}")


def load_config(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = (),
                data: Optional[dict] = None) -> BenchmarkConfig:
    """Read a benchmark YAML (or the mapping ``data``) and apply dotlist ``overrides`` (``key=value``)."""
    from omegaconf import OmegaConf

    base = OmegaConf.create(data or {})
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"benchmark config not found: {path}")
        base = OmegaConf.merge(base, OmegaConf.load(str(path)))
    if overrides:
        base = OmegaConf.merge(base, OmegaConf.from_dotlist(dotlist(overrides)))
    raw = OmegaConf.to_container(base, resolve=True)
    known = {f for f in BenchmarkConfig.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown benchmark config keys {unknown}; known: {sorted(known)}")
    base = None if raw.get("base") is None else str(raw["base"])
    contenders = []
    for name, spec in (raw.get("contenders") or {}).items():
        if isinstance(spec, str) or spec is None:
            contenders.append(Contender(str(name), spec))
        elif isinstance(spec, dict) and "config" in spec:
            extra = sorted(set(spec) - {"config", "overrides"})
            if extra:
                raise ValueError(f"contender {name}: unknown keys {extra} (use config, overrides)")
            contenders.append(Contender(str(name), None if spec["config"] is None else str(spec["config"]),
                                        _override_list(spec.get("overrides"), f"contender {name}")))
        else:
            raise ValueError(f"contender {name}: give a config path or {{config: ..., overrides: ...}}, got {spec!r}")
        if contenders[-1].config is None and base is None:
            raise ValueError(f"contender {name}: no config, and no base to run as it is; name a config or set base")
    if not contenders:
        raise ValueError("the benchmark config names no contenders")
    datasets = [str(d) for d in (raw.get("datasets") or [])]
    if not datasets:
        raise ValueError("the benchmark config names no datasets")
    report = {"within": None, "ddof": 1, "paper": False, "last_fraction": 0.25, "n_boot": 10000, "band": "std"}
    report.update(raw.get("report") or {})
    unknown = sorted(set(report) - {"within", "ddof", "paper", "last_fraction", "n_boot", "band"})
    if unknown:
        raise ValueError(f"the benchmark config's report section has unknown keys {unknown}; "
                         "use within, ddof, paper, last_fraction, n_boot, band")
    if report["band"] not in ("std", "se"):
        raise ValueError(f"the benchmark config's report.band is {report['band']!r}; use std (mean ± std over "
                         "seeds, the paper's) or se (mean ± standard error)")
    cfg = BenchmarkConfig(
        contenders=contenders,
        datasets=datasets,
        seeds=_seeds(raw.get("seeds", 5)),
        budget=int(raw.get("budget", 500)),
        out=str(raw.get("out") or "runs/benchmark"),
        overrides=_override_list(raw.get("overrides"), "overrides"),
        env_override=str(raw.get("env_override") or "dotted"),
        jobs=int(raw.get("jobs") or 1),
        timeout_s=None if raw.get("timeout_s") is None else float(raw["timeout_s"]),
        fit_cmd=shlex.split(raw["fit_cmd"]) if isinstance(raw.get("fit_cmd"), str) else raw.get("fit_cmd"),
        preflight=str(raw.get("preflight", "auto")).lower(),
        report=report,
        base=base,
    )
    if cfg.preflight not in ("auto", "true", "false"):
        raise ValueError(f"preflight must be auto, true or false, got {cfg.preflight!r}")
    if cfg.env_override not in _ENV_MODES:
        raise ValueError(f"env_override must be one of {_ENV_MODES}, got {cfg.env_override!r}")
    if cfg.budget < 1 or cfg.jobs < 1:
        raise ValueError("budget and jobs must be positive")
    names = [c.name for c in contenders]
    if len(set(names)) != len(names) or any("/" in n for n in names + datasets):
        raise ValueError("contender names must be unique, and names must not contain '/'")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# planning
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class RunSpec:
    contender: str
    dataset: str
    seed: int
    run_dir: Path
    command: list[str]
    state: str                      # finished | resume | new
    env_file: Optional[dict] = None  # env_override=file: the YAML to write into the run dir before starting
    stale: list[str] = field(default_factory=list)  # what differs from the settings asked now (finished / resume)

    @property
    def name(self) -> str:
        return f"{self.contender}/{self.dataset}/seed{self.seed}"


def read_summary(run_dir: Path) -> Optional[dict]:
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def run_state(run_dir: str | os.PathLike) -> str:
    """``finished`` (summary.json says so), ``resume`` (checkpoints exist) or ``new``."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    if summary is not None and summary.get("finished"):
        return "finished"
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir() and any(ckpt.iterdir()):
        return "resume"
    return "new"


def _env_spec_with(config_paths: Sequence[str], dataset: str, seed: int) -> dict:
    """The ``data.env`` that the configs compose to (later files override earlier ones; a new ``class_path`` starts
    the ``init_args`` afresh) with ``init_args.dataset`` / ``init_args.split_seed`` replaced."""
    from omegaconf import OmegaConf

    env: dict = {}
    for path in config_paths:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        layer = ((raw or {}).get("data") or {}).get("env")
        if not isinstance(layer, dict):
            continue
        if layer.get("class_path", env.get("class_path")) != env.get("class_path"):
            env = {}
        env = {**env, **layer, "init_args": {**(env.get("init_args") or {}), **(layer.get("init_args") or {})}}
    if "class_path" not in env:
        raise ValueError(f"{' + '.join(config_paths)}: no data.env with a class_path (needed for env_override: file)")
    env["init_args"] = {**env["init_args"], "dataset": dataset, "split_seed": seed}
    return {"data": {"env": env}}


def build_command(cfg: BenchmarkConfig, contender: Contender, dataset: str, seed: int, run_dir: str | os.PathLike,
                  resume: bool = False, fit_cmd: Optional[Sequence[str]] = None) -> list[str]:
    """The ``etpo.fit`` argument list of one run (see the module docstring for the exact form)."""
    fit_cmd = list(fit_cmd or cfg.fit_cmd or DEFAULT_FIT_CMD)
    run_dir = str(run_dir)
    cmd = fit_cmd + [arg for path in cfg.config_files(contender) for arg in ("--config", path)]
    if cfg.env_override == "file":
        cmd += ["--config", str(Path(run_dir) / "benchmark_env.yaml"), "--run_dir", run_dir]
    else:
        cmd += ["--run_dir", run_dir, f"--data.env.init_args.dataset={dataset}",
                f"--data.env.init_args.split_seed={seed}"]
    cmd += [f"--data.seed={seed}", f"--data.budget={cfg.budget}", f"--seed_everything={seed}"]
    cmd += list(cfg.overrides) + list(contender.overrides)
    if resume:
        cmd += ["--ckpt_path", "last"]
    return cmd


def plan(cfg: BenchmarkConfig, fit_cmd: Optional[Sequence[str]] = None, only: Optional[Sequence[str]] = None,
         with_env_files: bool = True, check_settings: bool = True) -> list[RunSpec]:
    """Every run of the sweep in execution order -- seed-major (all contenders and datasets of seed 0 first, so
    that whole repetitions complete early) -- with its state and command, and (``check_settings``) for a finished or
    resumable run what differs between its saved config and the settings its command asks for now."""
    contenders = [c for c in cfg.contenders if not only or c.name in only]
    if only and len(contenders) != len(set(only)):
        missing = sorted(set(only) - {c.name for c in cfg.contenders})
        raise ValueError(f"--only names unknown contenders {missing}")
    specs = []
    for seed in cfg.seeds:
        for dataset in cfg.datasets:
            for c in contenders:
                run_dir = cfg.runs_dir / c.name / dataset / f"seed{seed}"
                state = run_state(run_dir)
                cmd = build_command(cfg, c, dataset, seed, run_dir, resume=state == "resume", fit_cmd=fit_cmd)
                check = check_settings and state != "new"
                composed_env = None  # env_override=file: the data.env a run is (or was) given
                if cfg.env_override == "file" and (check or (with_env_files and state != "finished")):
                    composed_env = _env_spec_with(cfg.config_files(c), dataset, seed)
                stale = _settings_differences(cmd, len(fit_cmd or cfg.fit_cmd or DEFAULT_FIT_CMD), composed_env) \
                    if check else []
                env_file = composed_env if with_env_files and state != "finished" else None
                specs.append(RunSpec(c.name, dataset, seed, run_dir, cmd, state, env_file, stale))
    return specs


def _settings_differences(cmd: list[str], program_len: int, env_file: Optional[dict]) -> list[str]:
    """What differs between the run in the command's --run_dir and the command's settings (etpo/run_settings.py);
    with env_override: file the composed data.env stands in for the benchmark_env.yaml the run was given."""
    from etpo.run_settings import run_differences

    args = cmd[program_len:]
    run_dir = Path(args[args.index("--run_dir") + 1])
    replace = None
    if env_file is not None:  # the run's benchmark_env.yaml is rewritten before a run: compare with what it will say
        env_yaml = str(run_dir / "benchmark_env.yaml")
        at = next(i for i in range(len(args) - 1) if args[i] == "--config" and args[i + 1] == env_yaml)
        args, replace = args[:at] + args[at + 2:], {"data.env": env_file["data"]["env"]}
    try:
        return run_differences(run_dir, args, replace=replace) or []
    except (OSError, ValueError) as err:  # a config that cannot be read: say so rather than call the run current
        return [f"the settings could not be compared ({err})"]


_STALE_CHOICES = ("stop", "rerun", "keep")


def _set_stale_aside(cfg: BenchmarkConfig, spec: RunSpec, fit_cmd: Optional[Sequence[str]]) -> RunSpec:
    """Move a stale run to <out>/stale/<contender>/<dataset>/seed<k>-<time>/ with a stale.json saying why (nothing is
    deleted; etpo.report skips it) and return the spec of a fresh run in its place."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = Path(cfg.out) / "stale" / spec.contender / spec.dataset / f"seed{spec.seed}-{stamp}"
    k = 1
    while dest.exists():
        k += 1
        dest = dest.with_name(f"seed{spec.seed}-{stamp}-{k}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    spec.run_dir.rename(dest)
    (dest / "stale.json").write_text(json.dumps({
        "moved_from": str(spec.run_dir), "moved_at": time.strftime("%Y-%m-%d %H:%M:%S"), "state": spec.state,
        "differences": spec.stale, "rerun_with": spec.command}, indent=2))
    contender = next(c for c in cfg.contenders if c.name == spec.contender)
    cmd = build_command(cfg, contender, spec.dataset, spec.seed, spec.run_dir, resume=False, fit_cmd=fit_cmd)
    env_file = _env_spec_with(cfg.config_files(contender), spec.dataset, spec.seed) \
        if cfg.env_override == "file" else None
    return RunSpec(spec.contender, spec.dataset, spec.seed, spec.run_dir, cmd, "new", env_file)


def _stale_message(stale: Sequence[RunSpec], limit: int = 8) -> str:
    lines = [f"{len(stale)} run(s) in the folder were made with other settings than the sweep now asks for:"]
    for spec in stale[:limit]:
        more = f" (+{len(spec.stale) - 3} more)" if len(spec.stale) > 3 else ""
        lines.append(f"  {spec.name} ({spec.state}): " + "; ".join(spec.stale[:3]) + more)
    if len(stale) > limit:
        lines.append(f"  ... and {len(stale) - limit} more")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    name: str
    run_dir: str
    status: str                       # skipped | ok | failed
    state: str                        # what the run was before this sweep: finished | resume | new
    returncode: Optional[int] = None
    wall_s: float = 0.0
    best_reward: Optional[float] = None
    error: str = ""
    command: list[str] = field(default_factory=list)


def _last_history_line(run_dir: Path) -> Optional[dict]:
    path = run_dir / "history.jsonl"
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 4096))
            lines = fh.read().decode("utf-8", "replace").strip().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError, IndexError):
        return None


def _check_result(spec: RunSpec, returncode: Optional[int], timed_out: bool) -> tuple[str, str, Optional[float]]:
    """(status, error, best_reward) of a run that just ended."""
    summary = read_summary(spec.run_dir)
    best = summary.get("best_reward") if summary else None
    if timed_out:
        return "failed", "timed out (resumable)", best
    if returncode != 0:
        return "failed", f"exit code {returncode}", best
    if summary is None or not summary.get("finished"):
        return "failed", "exited 0 but summary.json does not say finished", best
    for key, want in (("dataset", spec.dataset), ("seed", spec.seed)):
        got = summary.get(key)
        if got is not None and str(got) != str(want):
            return "failed", (f"summary.json reports {key}={got!r}, the benchmark asked for {want!r}: the override "
                              "did not take effect (try env_override: file)"), best
    return "ok", "", best


class _Display:
    """A rich progress display (overall bar plus one line per running run); plain lines when not a terminal."""

    def __init__(self, total: int, enabled: bool = True):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)

        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                 console=self.console, disable=not self.live)
        self.overall = self.progress.add_task("benchmark runs", total=total, info="")
        self.tasks: dict[str, Any] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def print(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def start(self, spec: RunSpec, budget: int) -> None:
        verb = "resuming" if spec.state == "resume" else "starting"
        self.tasks[spec.name] = self.progress.add_task(f"  {spec.name}", total=budget, info=verb)
        if not self.live:
            self.print(f"{verb} {spec.name}")

    def update(self, spec: RunSpec, line: Optional[dict]) -> None:
        if line is None or spec.name not in self.tasks:
            return
        best = line.get("best_reward")
        info = f"best {best:.4f}" if isinstance(best, (int, float)) else ""
        self.progress.update(self.tasks[spec.name], completed=line.get("env_steps", 0), info=info)

    def finish(self, result: RunResult) -> None:
        task = self.tasks.pop(result.name, None)
        if task is not None:
            self.progress.remove_task(task)
        self.progress.advance(self.overall)
        best = "—" if result.best_reward is None else f"{result.best_reward:.4f}"
        if result.status == "ok":
            self.progress.update(self.overall, info=f"last: {result.name} best {best}")
            self.print(f"[green]done[/green] {result.name}: best {best} in {result.wall_s:.0f} s")
        elif result.status == "failed":
            self.print(f"[red]FAILED[/red] {result.name}: {result.error} (log: {result.run_dir}/fit.log)")
        elif result.error:  # skipped because another process is running it
            self.print(f"[yellow]skipped[/yellow] {result.name}: {result.error}")
        else:
            self.progress.update(self.overall, info=f"last: {result.name} best {best} (already finished)")


def _kill(proc: subprocess.Popen) -> None:
    """End the run's whole process group (it was started in a new session: its sandbox workers go with it)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_any(procs: Sequence[subprocess.Popen], seconds: float) -> None:
    """Sleep until one of ``procs`` ends or ``seconds`` pass (so short runs do not wait a whole poll period)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return
        time.sleep(min(0.02, seconds))


def _write_status(cfg: BenchmarkConfig, results: list[RunResult]) -> None:
    """Merge this sweep's results into ``<out>/benchmark_status.json`` (an entry per run, the latest wins), under a
    lock so that two sweeps on one folder neither erase nor interleave each other's entries."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "benchmark_status.json"
    with run_lock.exclusive(out / ".benchmark_status.lock"):
        try:
            previous = json.loads(path.read_text()).get("runs", [])
        except (OSError, ValueError, AttributeError):
            previous = []
        ours = {r.name for r in results}
        runs = [e for e in previous if isinstance(e, dict) and e.get("name") not in ours]
        runs += [{**asdict(r), "updated": time.strftime("%Y-%m-%d %H:%M:%S")} for r in results]
        tmp = out / f"benchmark_status.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"budget": cfg.budget, "runs": runs}, indent=2))
        tmp.replace(path)


def _as_state_now(spec: RunSpec) -> RunSpec:
    """The spec with the run's state read again (another sweep may have run it since the plan was made)."""
    now = run_state(spec.run_dir)
    if now == spec.state:
        return spec
    command = spec.command[:-2] if spec.command[-2:] == ["--ckpt_path", "last"] else list(spec.command)
    if now == "resume":
        command += ["--ckpt_path", "last"]
    return dataclasses.replace(spec, command=command, state=now)


def _skipped_as_finished(spec: RunSpec) -> RunResult:
    summary = read_summary(spec.run_dir) or {}
    return RunResult(spec.name, str(spec.run_dir), "skipped", spec.state, best_reward=summary.get("best_reward"),
                     command=spec.command)


def execute(specs: Sequence[RunSpec], cfg: BenchmarkConfig, show_progress: bool = True,
            poll_s: float = 0.5) -> list[RunResult]:
    """Run the specs (``cfg.jobs`` at a time); finished ones are skipped. Returns one result per spec."""
    results: list[RunResult] = []
    pending = []
    with _Display(len(specs), enabled=show_progress) as display:
        for spec in specs:
            if spec.state == "finished":
                r = _skipped_as_finished(spec)
                results.append(r)
                display.finish(r)
            else:
                pending.append(spec)
        running: list[tuple[RunSpec, subprocess.Popen, Any, Optional[int], float]] = []  # ..., log, lock, start
        try:
            while pending or running:
                while pending and len(running) < cfg.jobs:
                    spec = pending.pop(0)
                    lock, holder = run_lock.try_lock(spec.run_dir)
                    if lock is None:
                        r = RunResult(spec.name, str(spec.run_dir), "skipped", spec.state,
                                      error=f"in use by another run ({holder})", command=spec.command)
                        results.append(r)
                        display.finish(r)
                        continue
                    spec = _as_state_now(spec)
                    if spec.state == "finished":  # another sweep finished it after this one made its plan
                        run_lock.let_go(lock)
                        r = _skipped_as_finished(spec)
                        results.append(r)
                        display.finish(r)
                        continue
                    _write_env_file(spec)
                    log = open(spec.run_dir / "fit.log", "a")
                    log.write(f"\n=== etpo.benchmark {time.strftime('%Y-%m-%d %H:%M:%S')} ({spec.state}): "
                              f"{shlex.join(spec.command)}\n")
                    log.flush()
                    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                    if lock >= 0:  # etpo.fit finds its run's lock held already (etpo/run_lock.py)
                        env[run_lock.INHERITED_FD_ENV] = str(lock)
                    try:
                        # the run's process holds the lock too: it outlives this sweep if the sweep is killed
                        proc = subprocess.Popen(spec.command, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                                pass_fds=(lock,) if lock >= 0 else ())
                    except OSError as err:
                        log.close()
                        run_lock.let_go(lock)
                        r = RunResult(spec.name, str(spec.run_dir), "failed", spec.state, error=f"cannot start: {err}",
                                      command=spec.command)
                        results.append(r)
                        display.finish(r)
                        _write_status(cfg, results)
                        continue
                    running.append((spec, proc, log, lock, time.monotonic()))
                    display.start(spec, cfg.budget)
                _wait_any([proc for _, proc, _, _, _ in running], poll_s)
                still = []
                for spec, proc, log, lock, t0 in running:
                    rc = proc.poll()
                    timed_out = rc is None and cfg.timeout_s is not None and time.monotonic() - t0 > cfg.timeout_s
                    if timed_out:
                        _kill(proc)
                        rc = proc.returncode
                    if rc is None:
                        display.update(spec, _last_history_line(spec.run_dir))
                        still.append((spec, proc, log, lock, t0))
                        continue
                    log.close()
                    run_lock.let_go(lock)
                    status, error, best = _check_result(spec, rc, timed_out)
                    r = RunResult(spec.name, str(spec.run_dir), status, spec.state, rc, time.monotonic() - t0,
                                  best, error, spec.command)
                    results.append(r)
                    display.finish(r)
                    _write_status(cfg, results)
                running = still
        except KeyboardInterrupt:
            display.print("[yellow]interrupted: stopping the running runs (they stay resumable)[/yellow]")
            for spec, proc, log, lock, _ in running:
                _kill(proc)
                log.close()
                run_lock.let_go(lock)
            raise
    _write_status(cfg, results)
    return results


def _write_env_file(spec: RunSpec) -> None:
    if spec.env_file is not None:
        from omegaconf import OmegaConf

        spec.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(spec.env_file), spec.run_dir / "benchmark_env.yaml")


def preflight(specs: Sequence[RunSpec], timeout_s: float = 600) -> list[str]:
    """Parse (``--print_config``, nothing is trained) the first pending run of every contender and check that the
    dataset, split seed, seed and budget reach the resolved config. Returns the problems found (empty = fine)."""
    import yaml

    problems, seen = [], set()
    for spec in specs:
        if spec.state == "finished" or spec.contender in seen:
            continue
        seen.add(spec.contender)
        _write_env_file(spec)
        cmd = [a for a in spec.command if a not in ("--ckpt_path", "last")] + ["--print_config"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as err:
            problems.append(f"{spec.contender}: could not check the config ({err})")
            continue
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
            problems.append(f"{spec.contender}: etpo.fit rejects the arguments of {spec.name}: {tail}")
            continue
        try:
            resolved = yaml.safe_load(proc.stdout) or {}
        except yaml.YAMLError as err:
            problems.append(f"{spec.contender}: unreadable --print_config output ({err})")
            continue
        data = resolved.get("data") or {}
        init = (data.get("env") or {}).get("init_args") or {}
        for what, got, want in (("data.env.init_args.dataset", init.get("dataset"), spec.dataset),
                                ("data.env.init_args.split_seed", init.get("split_seed"), spec.seed),
                                ("data.seed", data.get("seed"), spec.seed)):
            if str(got) != str(want):
                problems.append(f"{spec.contender}: {what} resolves to {got!r}, not {want!r}: the override does not "
                                "take effect (try env_override: file)")
    return problems


def run_benchmark(cfg: BenchmarkConfig, fit_cmd: Optional[Sequence[str]] = None, dry_run: bool = False,
                  report: bool = True, only: Optional[Sequence[str]] = None, show_progress: bool = True,
                  poll_s: float = 0.5, stale: str = "stop") -> list[RunResult]:
    """Plan, run (unless ``dry_run``: print the commands) and report. Returns the run results (empty when dry).
    ``stale``: what to do with finished or resumable runs made with other settings (module docstring)."""
    if stale not in _STALE_CHOICES:
        raise ValueError(f"stale must be one of {_STALE_CHOICES}, got {stale!r}")
    missing = sorted({path for c in cfg.contenders if not only or c.name in only
                      for path in cfg.config_files(c) if not Path(path).is_file()})
    specs = plan(cfg, fit_cmd, only, with_env_files=not dry_run, check_settings=not missing)
    if dry_run:
        for s in specs:
            note = {"finished": "# finished, skipped: ", "resume": "# resume: ", "new": ""}[s.state]
            if s.stale:
                note = f"# STALE ({s.state}; {'; '.join(s.stale)}) -- --stale {stale}: "
            print(note + shlex.join(s.command))
        if missing:
            print(f"# warning: configs not found: {missing}", file=sys.stderr)
        return []
    if missing:
        raise FileNotFoundError(f"benchmark configs not found (base or contender): {missing}")
    stale_specs = [s for s in specs if s.stale]
    if stale_specs and stale == "stop":
        raise ValueError(_stale_message(stale_specs) + "\nNothing was run. Run them afresh with --stale rerun (the old "
                         f"runs move to {Path(cfg.out) / 'stale'}/, nothing is deleted), or count them as they are "
                         "with --stale keep.")
    if stale_specs and stale == "keep":
        print("etpo.benchmark: warning: " + _stale_message(stale_specs) + "\n  counted as they are (--stale keep)",
              file=sys.stderr)
    if stale_specs and stale == "rerun":
        print("etpo.benchmark: " + _stale_message(stale_specs) + f"\n  moved to {Path(cfg.out) / 'stale'}/ and "
              "run afresh (--stale rerun)", file=sys.stderr)
        specs = [_set_stale_aside(cfg, s, fit_cmd) if s.stale else s for s in specs]
    check = cfg.preflight == "true" or (cfg.preflight == "auto" and not fit_cmd and not cfg.fit_cmd)
    if check:
        problems = preflight(specs)
        if problems:
            raise ValueError("preflight check failed (set preflight: false to skip it):\n  " + "\n  ".join(problems))
    results = execute(specs, cfg, show_progress, poll_s)
    failed = [r for r in results if r.status == "failed"]
    counts = {k: sum(r.status == k for r in results) for k in ("ok", "skipped", "failed")}
    print(f"benchmark: {counts['ok']} ran, {counts['skipped']} already finished, {counts['failed']} failed",
          file=sys.stderr)
    for r in failed:
        print(f"  FAILED {r.name}: {r.error}  (log: {r.run_dir}/fit.log)", file=sys.stderr)
    if report:
        write_benchmark_report(cfg, only)
    return results


def write_benchmark_report(cfg: BenchmarkConfig, only: Optional[Sequence[str]] = None) -> dict:
    from etpo.report import write_report

    rep = cfg.report or {}
    contenders = [c.name for c in cfg.contenders if not only or c.name in only]
    written = write_report(cfg.runs_dir if cfg.runs_dir.exists() else cfg.out, cfg.out,
                           within=rep.get("within"), ddof=int(rep.get("ddof", 1)), contenders=contenders,
                           datasets=cfg.datasets, paper=bool(rep.get("paper", False)),
                           last_fraction=float(rep.get("last_fraction", 0.25)), n_boot=int(rep.get("n_boot", 10000)),
                           band=str(rep.get("band", "std")))
    print(Path(written["table.md"]).read_text())
    print(f"report written to {cfg.out}/ ({', '.join(written)})", file=sys.stderr)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m etpo.benchmark", description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments: benchmark config overrides, key=value or --key=value.")
    parser.add_argument("--config", required=True, help="benchmark YAML (e.g. configs/benchmark/paper.yaml)")
    parser.add_argument("--dry_run", action="store_true", help="print the etpo.fit commands and exit")
    parser.add_argument("--report_only", action="store_true", help="only write the report from existing runs")
    parser.add_argument("--fit_cmd", default=None, help='replaces "python -m etpo.fit" (shell-split)')
    parser.add_argument("--only", default=None, help="comma-separated contenders to run")
    parser.add_argument("--no_progress", action="store_true", help="plain log lines instead of progress bars")
    parser.add_argument("--stale", choices=_STALE_CHOICES, default="stop",
                        help="finished or resumable runs made with other settings than asked now: stop before "
                             "running (default), rerun them afresh (the old ones are moved aside), or keep them")
    args, rest = parser.parse_known_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    try:
        cfg = load_config(args.config, rest)
        if args.report_only:
            write_benchmark_report(cfg, only)
            return 0
        fit_cmd = shlex.split(args.fit_cmd) if args.fit_cmd else None
        results = run_benchmark(cfg, fit_cmd, args.dry_run, only=only, show_progress=not args.no_progress,
                                stale=args.stale)
    except (ValueError, FileNotFoundError) as err:
        print(f"etpo.benchmark: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
