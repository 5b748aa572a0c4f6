"""A quiet console: a normal ``python -m etpo.fit`` run prints our progress bar and summary line, and none of the
library chatter etpo/console.py removes -- while the filters stay precise enough that any other warning shows."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

import pytest

from conftest import REPO

# what a run printed before etpo/console.py (Lightning 2.6.6, torch 2.13, transformers 5)
CHATTER = ["💡 Tip", "litlogger", "litmodels", "Here be dragons", "`dataloader_iter`", "LeafSpec",
           "returned `None`", "Loading weights", "Writing model shards", "LightningCLI's args parameter",
           "Seed set to", "GPU available", "TPU available", "`Trainer.fit` stopped", "de-quantizing",
           "RuntimeWarning", "envs.isolation:"]


# etpo.fit's start lines: one per fact
START_PREFIXES = ("etpo.fit: run directory:", "etpo.fit: model:", "etpo.fit: sandbox:")


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
    start = [ln for ln in out.splitlines() if ln.startswith(START_PREFIXES)]  # each once, in this order
    assert start == [f"etpo.fit: run directory: {tmp_path / 'run'}",
                     "etpo.fit: model: tiny random Llama with 2 layers of width 32 (tiny, float32 on cpu), policy and "
                     "critic LoRA r=4",
                     "etpo.fit: sandbox: none (the environment runs no generated code)"], out
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


# configs/quickstart.yaml as it is -- the data-science environment, its sandbox -- on a tiny model (tests/test_fit.py)
SHRUNK_QUICKSTART = ["--model.init_args.backbone.source=tiny",
                     "--model.init_args.backbone.tiny_alphabet=abcdefgh ()=:.\n",
                     "--model.init_args.backbone.device=cpu", "--model.init_args.backbone.lora_r=4",
                     "--data.num_envs=2", "--data.budget=2", "--data.generation.max_new_tokens=8",
                     "--data.env.init_args.n_splits=1", "--trainer.enable_progress_bar=false"]


@pytest.mark.slow
@pytest.mark.parametrize("sandbox", ["default", "ETPO_SANDBOX=rlimits", "no bubblewrap"])
def test_a_run_starts_with_one_line_per_fact(tmp_path, sandbox):
    """Run directory, model and sandbox: each once, as etpo.fit's own line, and none of the libraries' start and end
    lines -- also where the sandbox falls back to resource limits, which used to be announced three times."""
    env = dict(os.environ)
    env.pop("ETPO_SANDBOX", None)
    env.pop("ETPO_VERBOSE", None)
    if sandbox == "ETPO_SANDBOX=rlimits":
        env["ETPO_SANDBOX"] = "rlimits"
    elif sandbox == "no bubblewrap":
        (tmp_path / "bin").mkdir()
        env["PATH"] = str(tmp_path / "bin")  # the interpreter is started by its full path; bwrap is not found
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "etpo.fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
           "--run_dir", str(run), *SHRUNK_QUICKSTART]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    lines = out.splitlines()
    model = ("etpo.fit: model: tiny random Llama with 2 layers of width 32 (tiny, float32 on cpu), policy and critic "
             "LoRA r=4")
    sandbox_line = {
        "default": r"etpo\.fit: sandbox: (isolated|rlimits) \(requested 'auto' by default\): .+",
        "ETPO_SANDBOX=rlimits": r"etpo\.fit: sandbox: rlimits \(requested 'rlimits' by ETPO_SANDBOX\): resource limits "
                                r"and a seccomp filter only: .+ \(requested\)",
        "no bubblewrap": r"etpo\.fit: sandbox: rlimits \(requested 'auto' by default\): bubblewrap \(bwrap\) is not "
                         r"installed; .+; install bubblewrap \(apt-get install bubblewrap\) for isolation, or set "
                         r"ETPO_SANDBOX=rlimits to choose this fallback explicitly",
    }[sandbox]
    start = [ln for ln in lines if ln.startswith("etpo.fit: ")][:3]
    assert start[:2] == [f"etpo.fit: run directory: {run}", model], out
    assert re.fullmatch(sandbox_line, start[2]), out
    if not _cuda_available():  # (on a CUDA machine Lightning warns that its GPU is not used: another warning, kept)
        assert lines[:3] == start, out
    for prefix in START_PREFIXES:
        assert sum(ln.startswith(prefix) for ln in lines) == 1, (prefix, out)
    assert sum("bubblewrap" in ln for ln in lines) <= 1, out  # the fallback's advice: in the sandbox line only
    for message in CHATTER:
        assert message not in out, f"{message!r} in the output:\n{out}"
    assert re.search(r"^etpo\.fit: etpo on tic_tac_toe: .*\(2 environment steps, 1 updates", out, re.M), out


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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


def test_only_lightnings_tips_and_start_and_end_lines_are_dropped_from_its_log():
    from etpo.console import LIGHTNING_TIP_LOGGERS, quiet_console

    quiet_console()
    quiet_console()  # idempotent

    def record(name, msg):
        return logging.LogRecord(name, logging.INFO, __file__, 1, msg, None, None)

    for name in LIGHTNING_TIP_LOGGERS:
        logger = logging.getLogger(name)
        assert len([f for f in logger.filters if type(f).__name__ == "_DropLightningChatter"]) == 1
        for dropped in ("💡 Tip: For seamless cloud logging, try installing litlogger",
                        "GPU available: False, used: False", "GPU available: True (cuda), used: True",
                        "TPU available: False, using: 0 TPU cores", "`Trainer.fit` stopped: `max_epochs=1` reached."):
            assert not logger.filter(record(name, dropped)), dropped
        for kept in ("`Trainer.fit` stopped: `max_steps=5` reached.",  # the budget was not spent: say so
                     "`Trainer.fit` stopped: No training batches.", "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]",
                     "GPU available: False, used: False -- and something else"):
            assert logger.filter(record(name, kept)), kept
    seed = logging.getLogger("lightning.fabric.utilities.seed")
    assert len([f for f in seed.filters if type(f).__name__ == "_DropSeedLine"]) == 1
    assert not seed.filter(record(seed.name, "Seed set to 0"))
    assert not seed.filter(record(seed.name, "[rank: 1] Seed set to 42"))
    assert seed.filter(record(seed.name, "No seed found, seed set to 0"))


def test_the_sandbox_fallback_is_left_to_the_sandbox_line():
    """etpo.fit prints the isolation as its sandbox line: the library's one-off warning is not said again; any other
    RuntimeWarning, even of the same text, still shows."""
    from envs.isolation import SandboxFallbackWarning
    from etpo.console import quiet_console

    text = "envs.isolation: bubblewrap (bwrap) is not installed, so generated code runs with resource limits ..."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_console()
        warnings.warn(text, SandboxFallbackWarning)
        warnings.warn(text, RuntimeWarning)
    assert [type(w.message) for w in caught] == [RuntimeWarning]


def test_the_gguf_bar_is_off_unless_etpo_verbose(monkeypatch):
    """The de-quantisation bar of a first GGUF load (a plain tqdm of transformers' GGUF module, no switch of its own)
    is off in the quiet console; ETPO_VERBOSE=1 leaves it, and everything else, as the libraries have it."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from etpo.console import quiet_console

    original = getattr(gguf_utils.tqdm, "__wrapped__", gguf_utils.tqdm)
    monkeypatch.setattr(gguf_utils, "tqdm", original)
    monkeypatch.setenv("ETPO_VERBOSE", "1")
    quiet_console()
    assert gguf_utils.tqdm is original
    monkeypatch.setenv("ETPO_VERBOSE", "0")
    quiet_console()
    quiet_console()  # idempotent: one wrapper
    assert gguf_utils.tqdm.__wrapped__ is original
    bar = gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")
    assert bar.disable and list(bar) == [0, 1, 2]  # the loop runs the same, without a bar


def test_an_etpo_verbose_it_does_not_understand_is_one_line(monkeypatch, capsys):
    from etpo.fit import main

    monkeypatch.setenv("ETPO_VERBOSE", "loud")
    with pytest.raises(SystemExit) as info:
        main(["--config", str(REPO / "configs" / "toy.yaml"), "--print_config"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ETPO_VERBOSE='loud'" in err[0] and "set it to 1" in err[0], err


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
