"""What ``python -m etpo.fit`` prints: one progress bar with the losses, the rewards and the environment budget, and
none of the library chatter that says nothing about the run.

Each message is removed at its source where the source is ours, else filtered by its exact text, category and the
module that emits it -- never a blanket ``warnings.simplefilter("ignore")``, so any other warning still shows:

* Lightning's "💡 Tip: ... litlogger / litmodels" lines (INFO records of its rank-zero logger): the litmodels tip is
  gone at its source -- ``etpo.fit`` hands the Trainer its ModelCheckpoint, so Lightning adds no default one (which
  also wrote a redundant ``epoch=0-step=N.ckpt``); the litlogger tip has no switch and is filtered.
* "You are using the `dataloader_iter` step flavor ... Here be dragons" and "Found `dataloader_iter` argument in
  the `training_step`": every module takes ``dataloader_iter`` on purpose -- the rollout of a batch must run inside
  ``training_step``, after the previous update, or Lightning's prefetching would sample it with the old policy.
* "`isinstance(treespec, LeafSpec)` is deprecated": Lightning 2.6's pytree helper on torch 2.13, nothing of ours.
* "Using ModelCheckpoint with manual optimization and every_n_train_steps ...": the modules step their optimizers
  themselves, and a checkpoint must hold the state *after* the batch's steps -- which is what Lightning warns of.
* transformers' own bars while a model loads ("Loading weights", "Writing model shards"); downloads from the hub
  keep theirs. (The one-off "Converting and de-quantizing GGUF tensors" bar of a first SmolLM2 load has no switch
  and stays: later loads read the safetensors copy in ``gguf_cache_dir``.)
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["quiet_console", "RolloutProgressBar", "LIGHTNING_TIP_LOGGERS"]

# the loggers Lightning's rank_zero_info writes through (lightning_utilities' rank-zero module is pointed at one of
# them, depending on which of lightning.fabric / lightning.pytorch was imported last)
LIGHTNING_TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_TIP_PREFIX = "💡 Tip:"

# (message regex, category, emitting module regex) of each warning etpo.fit silences
_SILENCED_WARNINGS = (
    (r"You are using the `dataloader_iter` step flavor", PossibleUserWarning,
     r"lightning\.pytorch\.trainer\.configuration_validator"),
    (r"Found `dataloader_iter` argument in the `training_step`", UserWarning, r"lightning\.pytorch\.loops\.utilities"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
    (r"Using ModelCheckpoint with manual optimization and every_n_train_steps", UserWarning,
     r"lightning\.pytorch\.callbacks\.model_checkpoint"),
    # etpo.fit hands LightningCLI the command line it has checked (args=...), which Lightning warns about whenever
    # sys.argv holds arguments too -- i.e. in every `python -m etpo.fit --config ...` run
    (r"LightningCLI's args parameter is intended to run from within Python", UserWarning, r"lightning\.pytorch\.cli"),
)


class _DropLightningTips(logging.Filter):
    """Drops Lightning's advertising records ("💡 Tip: try installing litlogger ...") and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TIP_PREFIX)


_TIP_FILTER = _DropLightningTips()


def quiet_console() -> None:
    """Install the filters above (idempotent: calling it twice adds nothing)."""
    for name in LIGHTNING_TIP_LOGGERS:
        logger = logging.getLogger(name)
        if _TIP_FILTER not in logger.filters:
            logger.addFilter(_TIP_FILTER)
    for message, category, module in _SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    _quiet_model_loading_bars()


def _quiet_model_loading_bars() -> None:
    try:
        import huggingface_hub.utils as hub_utils
        from transformers.utils import logging as transformers_logging
    except ImportError:  # pragma: no cover - both are dependencies
        return
    hub_bars_were_on = not hub_utils.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # also switches the hub's off ...
    if hub_bars_were_on:
        hub_utils.enable_progress_bars()  # ... which a 13 GB first download should keep


class RolloutProgressBar(RichProgressBar):
    """Lightning's rich progress bar with the run's numbers under short names: the losses the module puts on the bar
    (``losses/critic`` -> ``critic``), ``avg_reward`` and ``best_reward`` of the rollouts, and ``env_steps`` against
    the budget (the bar's own count is training steps, whose total an iterable rollout stream does not know)."""

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        short = [key.rsplit("/", 1)[-1] for key in items]
        shown = {(name if short.count(name) == 1 else key): value for key, name, value in zip(items, short,
                                                                                               items.values())}
        env_steps = trainer.callback_metrics.get("charts/env_steps")  # logged by AgentModule.log_rollout
        budget = getattr(trainer.datamodule, "budget", None)
        if env_steps is not None and budget:
            shown["env_steps"] = f"{int(env_steps)}/{budget}"
        return shown
