"""``python -m etpo.fit --config configs/<name>.yaml [--section.key value ...]``

LightningCLI in omegaconf parser mode and subclass mode: a config's ``model: {class_path: ...}`` picks the
contender (ETPO, PPO-KL, Reflection), ``data:`` the rollout DataModule with its environment, ``trainer:`` the
Lightning Trainer. Every run gets one directory (``--run_dir``, default ``runs/<config name>``) holding the resolved
``config.yaml``, TensorBoard events, ``checkpoints/`` (``last.ckpt`` and the best by best reward), the adapters in
peft format, ``history.jsonl``, ``best_code.py`` and ``summary.json``. ``--ckpt_path last`` resumes a run in its
directory with step counters, optimizer state, target weights, best-reward record and environment budget intact.
Kills, power losses and full disks leave every file a resume reads whole (etpo/run_files.py); a resume passes over a
damaged checkpoint to the newest intact one, and a failed write stops the run with one line and exit code 74.

Stopping: Ctrl-C or SIGTERM ends a run within seconds, also in the middle of a long update or while generated code
runs (Lightning alone would only notice SIGTERM at the next batch boundary): the signal raises an interruption in
the main thread, which Lightning's graceful-shutdown path handles; checkpoint writes are let finish; sandbox workers
and their directories are removed; the run exits with 128 + the signal number and says how to resume. The isolation
generated code runs under (:func:`envs.isolation.isolation_report`) goes to the console, ``summary.json`` and
TensorBoard. A config that does not parse stops with one line naming the file, line and column, or the unknown key
and the closest valid one.

A run starts with one line per fact -- ``etpo.fit: run directory: ...``, ``etpo.fit: model: ...`` (what was
loaded, its dtype and device, the adapters), ``etpo.fit: sandbox: ...`` -- and none of the libraries' own start
lines (etpo/console.py). Configs travel: a relative config path in a config (``backbone: model/smollm2.yaml``) that
is not next to it is taken from the project's ``configs/`` folder, so a copy edited anywhere runs; a path found
nowhere stops with one line saying where it was looked for and how to fix it (etpo/config_paths.py).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from etpo import run_lock
from etpo.hardware import apply_hardware_fallback
from etpo.probe import AnswerClassProbe
from etpo.run_files import (AtomicCheckpointIO, RunWriteError, append_lines, format_size, inspect_checkpoint,
                            intact_checkpoints, is_partial_write, read_jsonl, remove_partial_writes, write_atomic,
                            writing)
from modules.shared_base.fsdp import save_adapters_sharded

__all__ = ["ETPOCLI", "RunArtifacts", "RunInterrupted", "main", "contender_name", "sandbox_summary"]


def contender_name(module: Any) -> str:
    """A short, stable name for the contender a LightningModule implements."""
    name = getattr(module, "contender", None)
    if name:
        return str(name)
    return type(module).__name__.replace("Module", "").lower()


_SANDBOX_SINCE = 0  # isolation_mark() when this run's configuration was instantiated


def sandbox_summary() -> dict:
    """The isolation this run's generated code runs under (:func:`envs.isolation.isolation_report`: the pools its
    environments asked for, not ones other code in this process made before)."""
    from envs.isolation import isolation_report

    report = isolation_report(since=_SANDBOX_SINCE)
    if report is None:
        return {"isolation": "none", "detail": "the environment runs no generated code", "pools": []}
    return report


def _describe_sandbox(report: dict) -> str:
    if not report["pools"]:
        return f"sandbox: none ({report['detail']})"
    return "sandbox: " + "; ".join(
        f"{p['mode']} (requested {p['requested']!r} by {p['source']}): {p['detail']}" for p in report["pools"])


class RunInterrupted(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM or SIGINT; a KeyboardInterrupt, so Lightning's graceful shutdown runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """Turns SIGTERM and SIGINT into :class:`RunInterrupted` at once (not at the next batch boundary).

    Installed before ``trainer.fit``; Lightning then composes its own SIGTERM handler with this one. Inside
    :meth:`deferred` (checkpoint and artifact writes) the interruption waits until the block ends, so a step that
    has finished is saved whole. A watchdog ends the process if the shutdown itself hangs.
    """

    def __init__(self, grace_s: float = 10.0):
        self.grace_s = grace_s
        self.signum: int | None = None
        self._stopped = threading.Event()
        self._depth = 0
        self._pending = False
        self._installed = False

    def install(self) -> None:
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        self.signum, self._depth, self._pending = None, 0, False
        self._stopped = threading.Event()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._installed = True

    def uninstall(self) -> None:
        """Give the process its previous handlers back (``main`` may run inside another program, e.g. pytest)."""
        if not self._installed or threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            return  # already stopping: a second Ctrl-C must not interrupt the shutdown
        self.signum = signum
        print(f"\netpo.fit: {signal.Signals(signum).name} received: stopping (the last finished step is kept)",
              file=sys.stderr, flush=True)
        threading.Thread(target=self._watchdog, name="etpo-stop-watchdog", daemon=True).start()
        if self._depth:
            self._pending = True
            return
        raise RunInterrupted(signum)

    def stopped(self) -> None:
        """The stop has been handled (everything saved, the user told): the watchdog stands down."""
        self._stopped.set()

    def _watchdog(self) -> None:
        if self._stopped.wait(self.grace_s):
            return
        print(f"etpo.fit: the run did not stop within {self.grace_s:g} s of the signal; exiting now",
              file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            from envs.isolation import close_all_pools

            close_all_pools(final=True)
        os._exit(128 + int(self.signum or signal.SIGTERM))

    @contextlib.contextmanager
    def deferred(self):
        """Run the block to its end even if a stop signal arrives meanwhile; the interruption follows it."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._pending:
                self._pending = False
                raise RunInterrupted(self.signum)


_STOP = _StopSignals()


def _describe_model(module: Any) -> str | None:
    """What was loaded, in one line: the model, where it comes from, its dtype and device, and the adapters; None for
    a module without the project's shared base (``backbone`` and ``model``)."""
    cfg, lm = getattr(module, "backbone", None), getattr(module, "model", None)
    base = getattr(lm, "base_model", None)
    if cfg is None or base is None:
        return None
    if cfg.source == "tiny":
        name, origin = f"tiny random Llama with {cfg.tiny_num_layers} layers of width {cfg.tiny_hidden_size}", "tiny"
    elif cfg.source == "hf":
        name, origin = str(cfg.name_or_path), "hf"
    else:  # smollm2 | gguf: the file's name less its quantisation ("SmolLM2-135M-Instruct.Q4_1.gguf")
        from modules.shared_base.loading import smollm2_gguf_path

        file = smollm2_gguf_path() if cfg.source == "smollm2" else Path(cfg.gguf_file or str(cfg.name_or_path))
        name, _, quant = file.name.removesuffix(".gguf").partition(".")
        origin = " ".join(x for x in ("smollm2" if cfg.source == "smollm2" else "", "GGUF", quant) if x)
    param = next(base.parameters(), None)
    where = "" if param is None else f", {str(param.dtype).removeprefix('torch.')} on {param.device}"
    return f"{name} ({origin}{where}), policy and critic LoRA r={cfg.lora_r}"


class _StartLines(Callback):
    """One line per fact at the start of a run, each as soon as it is known (rank zero only): the run directory when
    ``fit`` begins, the model once Lightning's ``configure_model`` has loaded it. The sandbox line follows from
    :class:`RunArtifacts`, once the environments' pools exist."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = run_dir

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            print(f"etpo.fit: run directory: {self.run_dir}", file=sys.stderr, flush=True)

    def on_fit_start(self, trainer, pl_module) -> None:
        line = _describe_model(pl_module)
        if line is not None and trainer.is_global_zero:
            print(f"etpo.fit: model: {line}", file=sys.stderr, flush=True)


class _StopCleanly(Callback):
    """On an interruption (or any failure) of ``fit``: close every sandbox pool, so that no worker process or
    directory outlives the run and environment threads waiting on generated code return at once."""

    def on_exception(self, trainer, pl_module, exception) -> None:
        from envs.isolation import close_all_pools

        close_all_pools(final=isinstance(exception, KeyboardInterrupt))


class _SaveConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml``, written whole or not at all (etpo/run_files.py): etpo.benchmark reads it to
    decide whether a run it resumes is still the run it asks for."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})  # save_config below writes it instead

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False)
        write_atomic(Path(self.config["run_dir"]) / self.config_filename, config)


class _Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint; a stop signal waits until this step's checkpoint is written."""

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        with _STOP.deferred():
            super().on_train_batch_end(*args, **kwargs)


def _peak_rss_gb() -> float | None:
    """The trainer process's peak resident memory so far (GiB; the sandbox's workers are separate processes with
    their own limit), or None where the platform does not say."""
    try:
        import resource
    except ImportError:  # Windows has no resource module
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return round(kib / (2 ** 30 if sys.platform == "darwin" else 2 ** 20), 3)


class RunArtifacts(Callback):
    """Writes what a researcher wants next to the TensorBoard events: one ``history.jsonl`` line per rollout batch,
    the batch's actions with their reward, status and error in ``samples.jsonl`` (one line per action, tagged with
    its batch), ``best_code.py`` whenever the best reward improves, the adapters, and ``summary.json`` (refreshed every batch,
    marked finished at the end)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self._best_written = -math.inf
        self._batches_written = 0

    @staticmethod
    def _stats(trainer: Trainer):
        return getattr(trainer.datamodule, "stats", None)

    def summary(self, trainer: Trainer, finished: bool) -> dict:
        stats = self._stats(trainer)
        module = trainer.lightning_module
        runnable = stats.batch_runnable
        return {
            "contender": contender_name(module),
            "model_class": f"{type(module).__module__}.{type(module).__name__}",
            "dataset": (getattr(trainer.datamodule, "env_kwargs", None) or {}).get("dataset"),
            "split_seed": (getattr(trainer.datamodule, "env_kwargs", None) or {}).get("split_seed"),
            "seed": getattr(trainer.datamodule, "seed", None),
            "env_steps": stats.env_steps,
            "budget": getattr(trainer.datamodule, "budget", None),
            "updates": stats.updates,
            "best_reward": stats.best_reward if stats.best_within else None,
            "best_env_step": stats.best_env_step,
            "best_code": stats.best_code,
            "runnable_fraction": float(sum(runnable) / len(runnable)) if runnable else None,
            "wall_time_s": stats.wall_time_s,
            "peak_rss_gb": _peak_rss_gb(),
            "finished": finished,
            "best_within": [list(x) for x in stats.best_within],
            "batch_avg_reward": list(stats.batch_avg_reward),
            "batch_runnable_fraction": list(stats.batch_runnable),
            "batch_runnable_reward": list(stats.batch_runnable_reward),
            "batch_max_reward": list(stats.batch_max_reward),
            "batch_timing": [dict(t) for t in stats.batch_timing],
            "sandbox": sandbox_summary(),
        }

    def _write_summary(self, trainer: Trainer, finished: bool) -> None:
        if not trainer.is_global_zero or self._stats(trainer) is None:
            return
        write_atomic(self.run_dir / "summary.json", json.dumps(self.summary(trainer, finished), indent=2))

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        self._trim_history()
        report = sandbox_summary()
        line = _describe_sandbox(report)
        print(f"etpo.fit: {line}", file=sys.stderr, flush=True)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("run/sandbox", line, trainer.global_step)

    def _trim_history(self) -> None:
        """After a crash between a batch's history line and its checkpoint, a resumed run redoes that batch: drop
        the lines of batches the checkpoint does not contain (all of a later one, when it resumes from an older
        checkpoint), and a line that a kill cut short, with one notice; the resumed run writes them again."""
        for name in ("history.jsonl", "samples.jsonl"):
            path = self.run_dir / name
            if not path.is_file():
                continue
            records, bad, torn = read_jsonl(path)
            keep = [text for text, record in records if record.get("batch", 0) <= self._batches_written]
            if torn:
                print(f"etpo.fit: {path}: dropped its last line (line {torn}), cut short by a write that did not "
                      "finish; the resumed run writes its batch again", file=sys.stderr, flush=True)
            if bad:
                print(f"etpo.fit: {path}: dropped line{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}, "
                      "not JSON records", file=sys.stderr, flush=True)
            if torn or bad or len(keep) != len(records):
                write_atomic(path, "".join(text + "\n" for text in keep))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with _STOP.deferred():
            self._batch_end(trainer)

    def _batch_end(self, trainer) -> None:
        stats = self._stats(trainer)
        if not trainer.is_global_zero or stats is None:
            return
        if stats.updates == self._batches_written:
            return  # several optimizer steps per rollout batch (PPO-KL): one line per batch
        self._batches_written = stats.updates
        timing = dict(stats.batch_timing[-1]) if stats.batch_timing else {}
        if timing.get("generation_s"):
            timing["generated_tokens_per_s"] = timing["generated_tokens"] / timing["generation_s"]
        for key, value in trainer.callback_metrics.items():  # the module's own (e.g. ETPO's scored positions)
            if key.startswith("timing/positions"):
                timing[key.split("/", 1)[1]] = int(value)
        line = {"batch": stats.updates, "env_steps": stats.env_steps, "avg_reward": stats.batch_avg_reward[-1],
                "best_reward": stats.best_reward, "runnable_fraction": stats.batch_runnable[-1],
                "runnable_reward": stats.batch_runnable_reward[-1], "batch_best_reward": stats.batch_max_reward[-1],
                "global_step": trainer.global_step, "timing": timing}
        if getattr(stats, "batch_classes", None) and stats.batch_classes[-1]:
            line["classes"] = stats.batch_classes[-1]  # {answer class: n, runnable, mean_reward}
        probe = next((c for c in trainer.callbacks if isinstance(c, AnswerClassProbe)), None)
        if probe is not None and probe.latest is not None and probe.latest["batch"] == stats.updates:
            line["choice"] = probe.latest  # where the classes part, as every view reads it (etpo/probe.py)
        append_lines(self.run_dir / "history.jsonl", [json.dumps(line)])
        append_lines(self.run_dir / "samples.jsonl",
                     [json.dumps({"batch": stats.updates, **sample}) for sample in stats.batch_samples])
        if stats.best_reward > self._best_written:
            self._best_written = stats.best_reward
            write_atomic(self.run_dir / "best_code.py", f"# best reward {stats.best_reward:.6f} at environment step "
                                                        f"{stats.best_env_step}\n{stats.best_code}\n")
        self._write_summary(trainer, finished=False)

    def on_train_end(self, trainer, pl_module) -> None:
        with _STOP.deferred():
            self._train_end(trainer, pl_module)

    def _train_end(self, trainer, pl_module) -> None:
        if getattr(pl_module, "model", None) is not None:  # on every rank: gathering sharded adapters is collective
            with writing(self.run_dir / "adapters"):
                save_adapters_sharded(pl_module.model, self.run_dir / "adapters", trainer.strategy.model,
                                      is_global_zero=trainer.is_global_zero)
        self._write_summary(trainer, finished=True)
        if trainer.is_global_zero and self._stats(trainer) is not None:
            from etpo.report import plot_run_curve

            summary = self.summary(trainer, finished=True)
            with writing(self.run_dir / "reward_curve.png"):
                curve = plot_run_curve(summary, self.run_dir / "reward_curve.png")
            print(self.summary_line(summary), flush=True)
            if curve is not None:
                print(f"etpo.fit: reward curve: {curve}", flush=True)

    def summary_line(self, summary: dict) -> str:
        """The one line a finished run prints: what ran, the best reward and where it was found, where to look."""
        best = summary["best_reward"]
        found = ("no reward yet" if best is None
                 else f"best reward {best:.4f} at environment step {summary['best_env_step']}")
        what = summary["contender"] + (f" on {summary['dataset']}" if summary.get("dataset") else "")
        return (f"etpo.fit: {what}: {found} ({summary['env_steps']} environment steps, {summary['updates']} updates, "
                f"{summary['wall_time_s']:.0f} s); results in {self.run_dir}/ (summary.json, best_code.py)")

    def state_dict(self) -> dict:
        return {"best_written": self._best_written, "batches_written": self._batches_written}

    def load_state_dict(self, state_dict: dict) -> None:
        self._best_written = state_dict.get("best_written", -math.inf)
        self._batches_written = state_dict.get("batches_written", 0)


class ETPOCLI(LightningCLI):
    """LightningCLI with one run directory per run and the project's default logger and checkpoints."""

    def add_arguments_to_parser(self, parser) -> None:
        global _PARSER
        _PARSER = parser
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="directory of this run (default: runs/<config file names joined by +>)")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="'last' (or a checkpoint path) to resume the run in --run_dir")

    def before_instantiate_classes(self) -> None:
        cfg = self.config
        # GPU-only trainer settings fall back to the CPU with one warning line each (ETPO_STRICT_DEVICE=1: fail)
        apply_hardware_fallback(cfg["trainer"])
        run_dir = cfg.get("run_dir")
        if not run_dir:
            # base + overlays (--config configs/quickstart.yaml --config configs/contenders/ppo_kl.yaml) name the run
            # after all of them, runs/quickstart+ppo_kl: one overlay on two settings gets two directories
            configs = cfg.get("config") or []
            stem = "+".join(Path(str(c)).stem for c in configs) if configs else "run"
            run_dir = os.path.join("runs", stem)
        cfg["run_dir"] = run_dir
        trainer_cfg = cfg["trainer"]
        if trainer_cfg.get("logger") in (None, True):
            trainer_cfg["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                     "init_args": {"save_dir": run_dir, "name": "", "version": ""}}
        trainer_cfg["default_root_dir"] = run_dir
        resuming = bool(cfg.get("ckpt_path"))
        ckpt_dir = Path(run_dir) / "checkpoints"
        # Refused here, before the Trainer and its logger exist: a refused run leaves the directory as it was
        if not resuming and ckpt_dir.is_dir() and any(not is_partial_write(p) for p in ckpt_dir.iterdir()):
            raise ValueError(f"run directory {run_dir} already holds checkpoints: pass --ckpt_path last to resume it, "
                             "or --run_dir NEW_DIR for a new run")
        if resuming:
            cfg["ckpt_path"] = _checkpoint_to_resume(str(cfg["ckpt_path"]), ckpt_dir)
        if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
            # one process per run directory (a second resume of it, a sweep's run: etpo/run_lock.py), taken after
            # the refusals above (they write nothing) and before anything in the directory changes
            run_lock.hold(run_dir)
        for folder in (Path(run_dir), ckpt_dir):  # what a killed write left is incomplete by construction
            remove_partial_writes(folder)
        if not resuming:
            for stale in ("history.jsonl", "samples.jsonl", "summary.json", "best_code.py"):
                (Path(run_dir) / stale).unlink(missing_ok=True)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        from lightning.pytorch.callbacks import ProgressBar
        from lightning.pytorch.plugins import CheckpointIO

        from etpo.console import RolloutProgressBar
        from etpo.credit import TokenCreditCallback

        run_dir = self.config["run_dir"]
        plugins = self.config_init["trainer"].get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        strategy = self.config_init["trainer"].get("strategy")
        if not any(isinstance(p, CheckpointIO) for p in plugins) and \
                getattr(strategy, "_checkpoint_io", None) is None:
            # checkpoints written whole or not at all (a temporary name, fsync, rename): etpo/run_files.py
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        extra = [
            _StartLines(run_dir),
            _Checkpoint(dirpath=os.path.join(run_dir, "checkpoints"), monitor="charts/best_reward", mode="max",
                            save_top_k=1, save_last=True, filename="best-{step}", every_n_train_steps=1),
            AnswerClassProbe(),  # before RunArtifacts: its readings go into the batch's history line
            RunArtifacts(run_dir),
            # which tokens the contender credits: HTML under <run_dir>/credit/, a summary in TensorBoard
            TokenCreditCallback(every_n_steps=10, max_examples=4),
            _StopCleanly(),
        ]
        configured = self.config_init["trainer"].get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if self.config["trainer"].get("enable_progress_bar") is not False and \
                not any(isinstance(c, ProgressBar) for c in configured):
            extra.append(RolloutProgressBar())
        # Handed to the Trainer at construction (LightningCLI's persistent callbacks), not appended afterwards: with a
        # ModelCheckpoint and a progress bar of ours, Lightning adds neither of its defaults (no second checkpoint
        # file, no litmodels tip). Lightning runs checkpoint callbacks last: a step's checkpoint then holds the
        # RunArtifacts state after that step's history line, which is what resuming after a crash relies on.
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": extra}
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None) -> ETPOCLI | None:
    from jsonargparse import ArgumentError

    from datamodules.rollout import RolloutDataModule
    from envs.isolation import SandboxError, isolation_mark
    from etpo.config_paths import register_config_mode, unresolved_config_path
    from etpo.console import quiet_console
    from etpo.malloc import maybe_release_freed_memory
    from modules.agent import AgentModule

    maybe_release_freed_memory()  # opt-in (ETPO_RELEASE_FREED_MEMORY=1): smaller resident size, slower steps
    try:
        quiet_console()  # no Lightning chatter, no warnings about our deliberate choices (etpo/console.py)
    except ValueError as err:  # an ETPO_VERBOSE it does not understand
        _one_line_error(err)
    argv = _locate_configs(list(sys.argv[1:] if args is None else args))
    problem = _config_file_problem(_config_paths(argv))
    if problem is not None:
        _one_line_error(problem)
    global _SANDBOX_SINCE
    _SANDBOX_SINCE = isolation_mark()
    trainer_defaults = {"max_epochs": 1, "num_sanity_val_steps": 0, "limit_val_batches": 0, "log_every_n_steps": 1,
                        "enable_model_summary": False}
    try:
        # run=False: parse and instantiate here (config errors surface now), then fit below. allow_abbrev=False: a
        # misspelt option (--data.num_env) is an error, not silently the option it abbreviates.
        cli = ETPOCLI(
            AgentModule, RolloutDataModule, subclass_mode_model=True, subclass_mode_data=False,
            # omegaconf, with relative config paths that fall back to the project's configs/ (etpo/config_paths.py)
            parser_kwargs={"parser_mode": register_config_mode(), "exit_on_error": False, "default_env": False,
                           "allow_abbrev": False},
            save_config_callback=_SaveConfig, save_config_kwargs={"overwrite": True},
            trainer_defaults=trainer_defaults, args=argv,
            auto_configure_optimizers=False, run=False,
        )
    except (ArgumentError, ValueError, FileNotFoundError, KeyError, TypeError, SandboxError) as err:
        # a config path found nowhere gets its own line, not jsonargparse's ~600-character union error
        _one_line_error(unresolved_config_path(_config_paths(argv), str(err)) or _explain_config_error(err, argv))
    _STOP.install()
    previous_excepthook, threading.excepthook = threading.excepthook, _quiet_writer_threads(threading.excepthook)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    except OSError as err:
        failed = _failed_write(err)
        if failed is None and isinstance(err, FileNotFoundError):  # e.g. a model file that is not there
            _one_line_error(err)
        _report_failed_write(cli, argv, failed or err)
        raise SystemExit(EXIT_WRITE_FAILED) from None
    except (SystemExit, KeyboardInterrupt):
        # Lightning turns the interruption into a graceful shutdown and sys.exit(1)
        if _STOP.signum is None:
            raise
        _report_stop(cli, argv, _STOP.signum)
        _STOP.stopped()
        raise SystemExit(128 + _STOP.signum) from None
    finally:
        _STOP.uninstall()
        threading.excepthook = previous_excepthook
        run_lock.release(cli.config["run_dir"])
    return cli


def _resume_command(argv: list[str], run_dir: str) -> str:
    """The exact command that resumes this run: its arguments with ``--run_dir`` and ``--ckpt_path last``."""
    import shlex

    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--ckpt_path", "--run_dir"):
            skip = True
            continue
        if a.startswith(("--ckpt_path=", "--run_dir=")):
            continue
        keep.append(a)
    return " ".join(shlex.quote(a) for a in ["python", "-m", "etpo.fit", *keep, "--run_dir", run_dir,
                                             "--ckpt_path", "last"])


def _checkpoint_to_resume(ckpt_path: str, ckpt_dir: Path) -> str:
    """The checkpoint a resume loads. ``last`` is the newest intact checkpoint of the run: a damaged one is named,
    with what is wrong with it, and passed over with a notice. A path given is checked as it is. ValueError (one
    line, before anything is written) where no intact checkpoint is left; "best", "hpc", a missing file, a sharded
    checkpoint and a run that has saved none yet are Lightning's to handle."""
    if ckpt_path != "last":
        if not Path(ckpt_path).is_file():
            return ckpt_path
        state = inspect_checkpoint(ckpt_path)
        if state.problem is None:
            return ckpt_path
        intact, _ = intact_checkpoints(ckpt_dir)
        other = (f"the newest intact checkpoint of the run is {intact[0].path}: pass --ckpt_path {intact[0].path}"
                 if intact else f"no checkpoint in {ckpt_dir} is intact")
        raise ValueError(f"cannot resume from {ckpt_path}: it {state.problem}; {other}")
    if (ckpt_dir / "last.ckpt").is_dir():
        return ckpt_path
    intact, damaged = intact_checkpoints(ckpt_dir)
    if not damaged:
        return str(intact[0].path) if intact else ckpt_path
    if not intact:
        problems = "; ".join(f"{d.path} {d.problem}" for d in damaged)
        raise ValueError(f"cannot resume {ckpt_dir.parent}: {problems}; no intact checkpoint is left. Start the run "
                         f"afresh with --run_dir NEW_DIR, or move {ckpt_dir} aside and run without --ckpt_path")
    for state in damaged:
        print(f"etpo.fit: {state.path} {state.problem}; passed over", file=sys.stderr, flush=True)
    chosen = intact[0]
    step = "" if chosen.step is None else f" (step {chosen.step})"
    print(f"etpo.fit: resuming from {chosen.path}{step}, the newest intact checkpoint; the batches after it run "
          "again", file=sys.stderr, flush=True)
    return str(chosen.path)


EXIT_WRITE_FAILED = 74  # sysexits.h EX_IOERR: a write failed (a full disk, a quota), the run is resumable


def _quiet_writer_threads(previous: Any) -> Any:
    """``threading.excepthook`` for a run, on top of ``previous``: TensorBoard writes its events in a thread of its
    own, which prints the traceback of a failed write (a full disk) as it dies and hands the error to the main
    thread's next write, where :func:`main` reports it in one line; that thread's traceback is left out, any other
    thread's goes to ``previous``."""

    def excepthook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    return excepthook


def _failed_write(err: BaseException) -> RunWriteError | None:
    """The write of ours that failed, where ``err`` is it or followed from it (Lightning's clean-up after a failure
    writes too, and on a full disk fails in turn)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, RunWriteError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _report_failed_write(cli: ETPOCLI, argv: list[str], err: OSError) -> None:
    """One line for a run stopped by an ``OSError`` (a full disk, a quota, a read-only file system): what failed and
    where, the space it needed, what was kept; then the command that resumes it once that is fixed."""
    import errno
    import shutil

    run_dir = Path(str(cli.config["run_dir"]))
    if isinstance(err, RunWriteError):
        what = str(err)
    else:  # a library's write (TensorBoard, peft, matplotlib): the file, where the error names it
        what = f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else f" (a write under {run_dir})")
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            with contextlib.suppress(OSError):
                what += f", {format_size(shutil.disk_usage(run_dir).free)} free there"
    fix = "Free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "Fix that"
    intact, _ = intact_checkpoints(run_dir / "checkpoints")
    if not intact:
        print(f"etpo.fit: error: {what}; the run stopped before its first checkpoint, there is nothing to resume. "
              f"{fix}, then start it again", file=sys.stderr, flush=True)
        return
    step = "" if intact[0].step is None else f" (step {intact[0].step})"
    print(f"etpo.fit: error: {what}; the run stopped, keeping {intact[0].path}{step} and its logs. {fix}, then "
          f"resume with --ckpt_path last:\n  {_resume_command(argv, str(run_dir))}", file=sys.stderr, flush=True)


def _report_stop(cli: ETPOCLI, argv: list[str], signum: int) -> None:
    """Say what was kept and the exact command that resumes the run."""
    run_dir = str(cli.config["run_dir"])
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    name = signal.Signals(signum).name
    if not last.is_file():
        print(f"etpo.fit: stopped by {name} before the first training step finished; there is nothing to resume "
              "(start the run again)", file=sys.stderr, flush=True)
        return
    print(f"etpo.fit: stopped by {name} after {cli.trainer.global_step} finished training steps; the last of them "
          f"is saved in {last}. Resume with --ckpt_path last:\n  {_resume_command(argv, run_dir)}", file=sys.stderr,
          flush=True)


def _one_line_error(err: BaseException | str) -> None:
    """A bad config (unknown key, wrong type, unknown dataset, missing model file) stops with one clear line."""
    message = " ".join(str(err).split())
    print(f"etpo.fit: error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


# ---------------------------------------------------------------------------------------------------
# config errors that say where


def _config_paths(argv: list[str]) -> list[str]:
    out = []
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith("--config="):
            out.append(a.split("=", 1)[1])
    return out


def _locate_configs(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config`` file that is not where the working directory says replaced by the project's
    own (``--config configs/contenders/ppo_kl.yaml`` from any folder, etpo/config_paths.py); one line if nowhere."""
    from etpo.config_paths import config_hub, resolve_config_path

    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            at, prefix, value = i + 1, "", out[i + 1]
        elif arg.startswith("--config="):
            at, prefix, value = i, "--config=", arg.split("=", 1)[1]
        else:
            continue
        if not value.lower().endswith((".yaml", ".yml")) or os.path.exists(value):
            continue  # there (or no file name at all): jsonargparse reads it as it is
        found = resolve_config_path(value, os.getcwd())
        if found is None:
            _one_line_error(f"config file {value} not found: not in the working directory ({os.getcwd()}) nor in the "
                            f"project's configs ({config_hub()}/); give its path relative to the working directory "
                            "or absolute")
        out[at] = prefix + found
    return out


def _yaml_strings(data: Any):
    if isinstance(data, dict):
        for v in data.values():
            yield from _yaml_strings(v)
    elif isinstance(data, list):
        for v in data:
            yield from _yaml_strings(v)
    elif isinstance(data, str):
        yield data


def _config_file_problem(paths: list[str]) -> str | None:
    """A YAML syntax error in a config file (or a config file it names) as "file, line L, column C: problem"."""
    import yaml

    from etpo.config_paths import resolve_config_path

    todo, seen = list(paths), set()
    while todo:
        path = todo.pop(0)
        if path in seen or not os.path.isfile(path):
            continue
        seen.add(path)
        try:
            data = yaml.safe_load(Path(path).read_text())
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            text = f"{path}, line {mark.line + 1}, column {mark.column + 1}: YAML syntax error: {exc.problem}"
            if exc.context and exc.context_mark is not None:
                text += (f" ({exc.context} that starts at line {exc.context_mark.line + 1}, "
                         f"column {exc.context_mark.column + 1})")
            return text
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            return f"{path}: not a readable YAML file: {exc}"
        for value in _yaml_strings(data):
            if value.endswith((".yaml", ".yml")):
                todo += [value, resolve_config_path(value, os.path.dirname(path) or ".") or
                         os.path.join(os.path.dirname(path), value)]
    return None


_PARSER: Any = None  # the parser of the last ETPOCLI, kept to name the valid keys after a parse error


def _parser_children(prefix: str) -> set[str]:
    dests = [getattr(a, "dest", "") for a in getattr(_PARSER, "_actions", [])]
    if not prefix:
        return {d.split(".")[0] for d in dests if d and d != "help"}
    return {d[len(prefix) + 1:].split(".")[0] for d in dests if d.startswith(prefix + ".")}


def _class_keys(class_path: str) -> set[str]:
    """The init arguments a config may give the class ``class_path`` (as jsonargparse resolves them)."""
    import importlib

    from jsonargparse import ArgumentParser

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "x", fail_untyped=False)
    except Exception:  # noqa: BLE001 - only a suggestion is lost
        return set()
    return {a.dest[2:].split(".")[0] for a in parser._actions if getattr(a, "dest", "").startswith("x.")}


def _unknown_key(message: str) -> tuple[str, str, set[str]] | None:
    """(where, key, valid keys) from jsonargparse's message about an unaccepted option, if it is one."""
    m = re.search(r"Group '([\w.]+)' does not accept option '([^']+)'", message)
    if m:
        return m.group(1), m.group(2), _parser_children(m.group(1))
    m = re.search(r"unrecognized arguments: --([\w.]+)", message)
    if m:
        parent, _, key = m.group(1).rpartition(".")
        return parent or "the top level", key, _parser_children(parent)
    m = re.search(r"Option '([^']+)' is not accepted", message)
    if m:
        before, after = message[: m.start()], message[m.end():]
        classes = re.findall(r"class_path[ =]'([\w.]+)'", before) or re.findall(r"class_path[ =]'([\w.]+)'", after)
        keys = re.findall(r'Parser key "([^"]+)"', before)
        if classes:
            where = f"{' > '.join(keys) or 'the config'} ({classes[-1]})"
            return where, m.group(1), _class_keys(classes[-1])
        return "the top level", m.group(1), _parser_children("")
    return None


def _key_location(key: str, paths: list[str]) -> str | None:
    """"file, line N" of the last config file that sets ``key`` (a mapping key anywhere in it)."""
    import yaml

    found = None
    for path in paths:
        try:
            root = yaml.compose(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue
        todo = [root]
        while todo:
            node = todo.pop()
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.value == key:
                        found = f"{path}, line {k.start_mark.line + 1}"
                    todo.append(v)
            elif isinstance(node, yaml.SequenceNode):
                todo.extend(node.value)
    return found


def _explain_config_error(err: BaseException, argv: list[str]) -> str:
    message = " ".join(str(err).split())
    unknown = _unknown_key(message)
    if unknown is None:
        return message
    where, key, valid = unknown
    location = _key_location(key, _config_paths(argv))
    if location is None and any(a.lstrip("-").split("=")[0].endswith(key) for a in argv if a.startswith("--")):
        location = "command line"
    text = f"unknown key '{key}' in {where}" + (f" [{location}]" if location else "")
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
    if close:
        text += f"; did you mean '{close[0]}'?"
    elif valid:
        text += f"; valid keys: {', '.join(sorted(valid))}"
    return text


def _exit_after_stop(code: int) -> None:
    """After a stop signal everything is saved and every worker is gone: run the exit handlers, flush, and end the
    process without the interpreter's module-by-module teardown (seconds with torch loaded, on a busy machine)."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as exc:
        if _STOP.signum is not None and isinstance(exc.code, int):
            _exit_after_stop(exc.code)
        raise
