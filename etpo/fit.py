"""``python -m etpo.fit --config configs/<name>.yaml [--section.key value ...]``

LightningCLI in omegaconf parser mode and subclass mode: a config's ``model: {class_path: ...}`` picks the
contender (ETPO, PPO-KL, Reflection), ``data:`` the rollout DataModule with its environment, ``trainer:`` the
Lightning Trainer. Every run gets one directory (``--run_dir``, default ``runs/<config name>``) holding the resolved
``config.yaml``, TensorBoard events, ``checkpoints/`` (``last.ckpt`` and the best by best reward), the adapters in
peft format, ``history.jsonl``, ``best_code.py`` and ``summary.json``. ``--ckpt_path last`` resumes a run in its
directory with step counters, optimizer state, target weights, best-reward record and environment budget intact.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningCLI

from modules.shared_base.fsdp import save_adapters_sharded
from etpo.hardware import apply_hardware_fallback

__all__ = ["ETPOCLI", "RunArtifacts", "main", "contender_name"]


def contender_name(module: Any) -> str:
    """A short, stable name for the contender a LightningModule implements."""
    name = getattr(module, "contender", None)
    if name:
        return str(name)
    return type(module).__name__.replace("Module", "").lower()


class RunArtifacts(Callback):
    """Writes what a researcher wants next to the TensorBoard events: one ``history.jsonl`` line per rollout batch,
    ``best_code.py`` whenever the best reward improves, the adapters, and ``summary.json`` (refreshed every batch,
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
            "finished": finished,
            "best_within": [list(x) for x in stats.best_within],
            "batch_avg_reward": list(stats.batch_avg_reward),
            "batch_runnable_fraction": list(stats.batch_runnable),
        }

    def _write_summary(self, trainer: Trainer, finished: bool) -> None:
        if not trainer.is_global_zero or self._stats(trainer) is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(self.summary(trainer, finished), indent=2))
        tmp.replace(self.run_dir / "summary.json")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = self._stats(trainer)
        if not trainer.is_global_zero or stats is None:
            return
        if stats.updates == self._batches_written:
            return  # several optimizer steps per rollout batch (PPO-KL): one line per batch
        self._batches_written = stats.updates
        line = {"batch": stats.updates, "env_steps": stats.env_steps, "avg_reward": stats.batch_avg_reward[-1],
                "best_reward": stats.best_reward, "runnable_fraction": stats.batch_runnable[-1],
                "global_step": trainer.global_step}
        with open(self.run_dir / "history.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")
        if stats.best_reward > self._best_written:
            self._best_written = stats.best_reward
            (self.run_dir / "best_code.py").write_text(
                f"# best reward {stats.best_reward:.6f} at environment step {stats.best_env_step}\n{stats.best_code}\n")
        self._write_summary(trainer, finished=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if getattr(pl_module, "model", None) is not None:  # on every rank: gathering sharded adapters is collective
            save_adapters_sharded(pl_module.model, self.run_dir / "adapters", trainer.strategy.model,
                                  is_global_zero=trainer.is_global_zero)
        self._write_summary(trainer, finished=True)
        if trainer.is_global_zero and self._stats(trainer) is not None:
            from etpo.report import plot_run_curve

            summary = self.summary(trainer, finished=True)
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
        if not resuming and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
            raise ValueError(f"run directory {run_dir} already holds checkpoints: pass --ckpt_path last to resume it, "
                             "or --run_dir NEW_DIR for a new run")
        if not resuming:
            for stale in ("history.jsonl", "summary.json", "best_code.py"):
                (Path(run_dir) / stale).unlink(missing_ok=True)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

        from etpo.console import RolloutProgressBar
        from etpo.credit import TokenCreditCallback

        run_dir = self.config["run_dir"]
        extra = [
            ModelCheckpoint(dirpath=os.path.join(run_dir, "checkpoints"), monitor="charts/best_reward", mode="max",
                            save_top_k=1, save_last=True, filename="best-{step}", every_n_train_steps=1),
            RunArtifacts(run_dir),
            # which tokens the contender credits: HTML under <run_dir>/credit/, a summary in TensorBoard
            TokenCreditCallback(every_n_steps=10, max_examples=4),
        ]
        configured = self.config_init["trainer"].get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if self.config["trainer"].get("enable_progress_bar") is not False and \
                not any(isinstance(c, ProgressBar) for c in configured):
            extra.append(RolloutProgressBar())
        # Handed to the Trainer at construction (LightningCLI's persistent callbacks), not appended afterwards: with a
        # ModelCheckpoint and a progress bar of ours, Lightning adds neither of its defaults (no second checkpoint
        # file, no litmodels tip).
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": extra}
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None) -> ETPOCLI | None:
    from jsonargparse import ArgumentError

    from datamodules.rollout import RolloutDataModule
    from etpo.console import quiet_console
    from etpo.malloc import maybe_release_freed_memory
    from modules.agent import AgentModule

    maybe_release_freed_memory()  # opt-in (ETPO_RELEASE_FREED_MEMORY=1): smaller resident size, slower steps
    quiet_console()  # no Lightning tips, no warnings about our deliberate choices (etpo/console.py)
    trainer_defaults = {"max_epochs": 1, "num_sanity_val_steps": 0, "limit_val_batches": 0, "log_every_n_steps": 1,
                        "enable_model_summary": False}
    try:
        # run=False: parse and instantiate here (config errors surface now), then fit below.
        cli = ETPOCLI(
            AgentModule, RolloutDataModule, subclass_mode_model=True, subclass_mode_data=False,
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False, "default_env": False},
            save_config_kwargs={"overwrite": True}, trainer_defaults=trainer_defaults, args=args,
            auto_configure_optimizers=False, run=False,
        )
    except (ArgumentError, ValueError, FileNotFoundError, KeyError, TypeError) as err:
        _one_line_error(err)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    except FileNotFoundError as err:  # e.g. a model file or a resumed checkpoint that is not there
        _one_line_error(err)
    return cli


def _one_line_error(err: BaseException) -> None:
    """A bad config (unknown key, wrong type, unknown dataset, missing model file) stops with one clear line."""
    message = " ".join(str(err).split())
    print(f"etpo.fit: error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
    main()
