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
* Lightning's start and end lines: "Seed set to 0" (the seed is in the run's ``config.yaml``), "GPU available: ...,
  used: ..." and "TPU available: ..." (``etpo.fit``'s ``model:`` line says where the model runs), and "`Trainer.fit`
  stopped: `max_epochs=1` reached" (a rollout stream is one epoch: that is every run's normal end, and the summary
  line follows). Each is dropped by its exact text at the logger that writes it; "`Trainer.fit` stopped:
  `max_steps=N` reached" and "No training batches" still show, since they mean the budget was not spent.
* The sandbox's one-off :class:`~envs.isolation.SandboxFallbackWarning` (no bubblewrap, so ``auto`` runs with
  resource limits only): ``etpo.fit`` prints the isolation as its own ``sandbox:`` line, with the same advice.
  Code that builds an environment without ``etpo.fit`` still gets the warning, once.
* transformers' own bars while a model loads ("Loading weights", "Writing model shards") and the
  "Converting and de-quantizing GGUF tensors" bar of a first SmolLM2 load (later loads read the safetensors copy in
  ``gguf_cache_dir``); downloads from the hub keep theirs.

What a run prints instead, one line per fact: ``etpo.fit: run directory: ...``, ``etpo.fit: model: ...`` and
``etpo.fit: sandbox: ...`` at the start, the bar, and the summary line at the end.

``ETPO_VERBOSE=1`` installs none of this: every library line, bar and warning shows as the libraries print it
(e.g. to watch the de-quantisation of a first GGUF load); unset or 0 is the quiet console.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import warnings
from typing import Any

from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["quiet_console", "verbose", "VERBOSE_ENV", "RolloutProgressBar", "LIGHTNING_TIP_LOGGERS"]

VERBOSE_ENV = "ETPO_VERBOSE"

# the loggers Lightning's rank_zero_info writes through (lightning_utilities' rank-zero module is pointed at one of
# them, depending on which of lightning.fabric / lightning.pytorch was imported last)
LIGHTNING_TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_TIP_PREFIX = "💡 Tip:"
# the logger of lightning.fabric's seed_everything, and the exact records dropped from it and from the rank-zero ones
_SEED_LOGGER = "lightning.fabric.utilities.seed"
_SEED_RECORD = re.compile(r"(\[rank: \d+\] )?Seed set to -?\d+")
_RANK_ZERO_RECORDS = (
    re.compile(r"GPU available: (True|False)( \(\w+\))?, used: (True|False)"),
    re.compile(r"TPU available: (True|False), using: \d+ TPU cores"),
    re.compile(r"`Trainer\.fit` stopped: `max_epochs=\d+` reached\."),
)
# the module whose GGUF de-quantisation loop draws a tqdm bar of its own (no transformers switch reaches it)
_GGUF_MODULE = "transformers.modeling_gguf_pytorch_utils"

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


class _DropLightningChatter(logging.Filter):
    """Drops Lightning's advertising records ("💡 Tip: try installing litlogger ...") and its hardware and normal-end
    lines (``_RANK_ZERO_RECORDS``, whole messages only), and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith(_TIP_PREFIX) or any(p.fullmatch(message) for p in _RANK_ZERO_RECORDS))


class _DropSeedLine(logging.Filter):
    """Drops "Seed set to N" and nothing else from the logger of Lightning's ``seed_everything``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _SEED_RECORD.fullmatch(str(record.msg))


_TIP_FILTER = _DropLightningChatter()
_SEED_FILTER = _DropSeedLine()


def verbose() -> bool:
    """Whether ``ETPO_VERBOSE`` asks for every library line (1/true/yes/on; unset, empty or 0/false/no/off: no)."""
    value = os.environ.get(VERBOSE_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{VERBOSE_ENV}={os.environ[VERBOSE_ENV]!r} is not understood: set it to 1 to show every "
                     "library line (Lightning's, the model-loading bars), or to 0 / unset it for the quiet console")


def quiet_console() -> None:
    """Install the filters above (idempotent: calling it twice adds nothing); nothing when ``ETPO_VERBOSE=1``."""
    if verbose():
        return
    from envs.isolation import SandboxFallbackWarning

    for name, log_filter in [(n, _TIP_FILTER) for n in LIGHTNING_TIP_LOGGERS] + [(_SEED_LOGGER, _SEED_FILTER)]:
        logger = logging.getLogger(name)
        if log_filter not in logger.filters:
            logger.addFilter(log_filter)
    for message, category, module in _SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    warnings.filterwarnings("ignore", category=SandboxFallbackWarning)  # etpo.fit's sandbox line says it
    _quiet_model_loading_bars()
    _quiet_gguf_bar()


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


def _quiet_gguf_bar() -> None:
    """transformers draws the de-quantisation bar with a plain ``tqdm`` of that module's own: that name, and no other
    tqdm, gets a bar that is off (the loop runs the same)."""
    try:
        module = importlib.import_module(_GGUF_MODULE)
    except ImportError:  # pragma: no cover - transformers is a dependency; gguf support may move
        return
    bar = getattr(module, "tqdm", None)
    if bar is None or getattr(bar, "__wrapped__", None) is not None:
        return  # gone in this transformers version, or already quiet

    def quiet_bar(*args: Any, **kwargs: Any):
        kwargs.setdefault("disable", True)
        return bar(*args, **kwargs)

    quiet_bar.__wrapped__ = bar
    module.tqdm = quiet_bar


class RolloutProgressBar(RichProgressBar):
    """Lightning's rich progress bar with the run's numbers under short names: the losses the module puts on the bar
    (``losses/critic`` -> ``critic``), ``avg_reward`` and ``best_reward`` of the rollouts, ``env_steps`` against
    the budget (the bar's own count is training steps, whose total an iterable rollout stream does not know), and
    where the last batch's time went (``time: gen 21s env 3s update 30s``, from the ``timing/`` charts)."""

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        # where the last batch's time went, in one short item: "gen 21s env 3s update 30s"
        phases = [(label, items.pop(f"timing/{key}_s", None)) for label, key in
                  (("gen", "generation"), ("env", "environment"), ("update", "update"))]
        timing = " ".join(f"{label} {float(v):.0f}s" for label, v in phases if v is not None)
        short = [key.rsplit("/", 1)[-1] for key in items]
        shown = {(name if short.count(name) == 1 else key): value for key, name, value in zip(items, short,
                                                                                               items.values())}
        env_steps = trainer.callback_metrics.get("charts/env_steps")  # logged by AgentModule.log_rollout
        budget = getattr(trainer.datamodule, "budget", None)
        if env_steps is not None and budget:
            shown["env_steps"] = f"{int(env_steps)}/{budget}"
        if timing:
            shown["time"] = timing
        return shown
