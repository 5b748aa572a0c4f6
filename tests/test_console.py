"""A quiet console: a normal ``python -m etpo.fit`` run prints our progress bar and summary line, and none of the
library chatter etpo/console.py removes -- while the filters stay precise enough that any other warning shows."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings

import pytest

from conftest import REPO

# what a run printed before etpo/console.py (Lightning 2.6.6, torch 2.13, transformers 5)
CHATTER = ["💡 Tip", "litlogger", "litmodels", "Here be dragons", "`dataloader_iter`", "LeafSpec",
           "returned `None`", "Loading weights", "Writing model shards", "LightningCLI's args parameter"]


def _run_toy(tmp_path, *extra):
    cmd = [sys.executable, "-m", "etpo.fit", "--config", str(REPO / "configs" / "toy.yaml"),
           "--run_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar=true", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("overlay, contender", [(None, "etpo"), ("reflection", "reflection")])
def test_a_toy_run_prints_our_bar_and_summary_and_no_chatter(tmp_path, overlay, contender):
    extra = ["--config", str(REPO / "configs" / "contenders" / f"{overlay}.yaml")] if overlay else []
    out = _run_toy(tmp_path, *extra)
    for message in CHATTER:
        assert message not in out, f"{message!r} in the output:\n{out}"
    assert re.search(rf"^etpo\.fit: {contender}: best reward \d\.\d{{4}} at environment step \d+ \(32 environment "
                     r"steps, 4 updates", out, re.M), out
    # one bar: short names for the losses, the two rewards and the budget (rich may wrap the metrics over lines)
    bar = " ".join(out.split())
    losses = ("critic:", "policy:") if overlay is None else ()  # Reflection has none
    for item in ("avg_reward:", "best_reward:", "env_steps: 32/32") + losses:
        assert item in bar, (item, out)
    assert "losses/" not in bar and "charts/" not in bar and "v_num" not in bar
    # Lightning added no default ModelCheckpoint of its own (its epoch=0-step=N.ckpt, and its litmodels tip)
    checkpoints = sorted(p.name.split("=")[0] for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["best-step", "last.ckpt"]


def test_the_warning_filters_are_precise():
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    from etpo.console import quiet_console

    dragons = ("You are using the `dataloader_iter` step flavor. ... Here be dragons.", PossibleUserWarning,
               "lightning.pytorch.trainer.configuration_validator")
    pytree = ("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning,
              "lightning.pytorch.utilities._pytree")
    found = ("Found `dataloader_iter` argument in the `training_step`. Note ...", UserWarning,
             "lightning.pytorch.loops.utilities")
    checkpoint = ("Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization "
                  "state was saved.", UserWarning, "lightning.pytorch.callbacks.model_checkpoint")
    cli_args = ("LightningCLI's args parameter is intended to run from within Python like if it were from the command "
                "line. ...", UserWarning, "lightning.pytorch.cli")

    def shown(message, category, module):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_console()
            warnings.warn_explicit(message, category, f"/x/{module.replace('.', '/')}.py", 1, module=module)
        return len(caught) == 1

    for message, category, module in (dragons, pytree, found, checkpoint, cli_args):
        assert not shown(message, category, module), message
        assert shown(message, category, "my_package.module"), "the same text from elsewhere still shows"
        assert shown("something else entirely", category, module), "other warnings of that module still show"
    assert shown(pytree[0], DeprecationWarning, pytree[2]), "the category is part of the filter"


def test_only_lightnings_tips_are_dropped_from_its_log():
    from etpo.console import LIGHTNING_TIP_LOGGERS, quiet_console

    quiet_console()
    quiet_console()  # idempotent
    for name in LIGHTNING_TIP_LOGGERS:
        logger = logging.getLogger(name)
        assert len([f for f in logger.filters if type(f).__name__ == "_DropLightningTips"]) == 1

        def record(msg):
            return logging.LogRecord(name, logging.INFO, __file__, 1, msg, None, None)

        assert not logger.filter(record("💡 Tip: For seamless cloud logging, try installing litlogger"))
        assert logger.filter(record("GPU available: False, used: False"))


def test_model_loading_bars_are_off_and_hub_downloads_keep_theirs():
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as transformers_logging

    from etpo.console import quiet_console

    was_on = transformers_logging.is_progress_bar_enabled()
    hub_utils.enable_progress_bars()
    try:
        quiet_console()
        assert not transformers_logging.is_progress_bar_enabled()
        assert not hub_utils.are_progress_bars_disabled()
    finally:
        if was_on:
            transformers_logging.enable_progress_bar()
