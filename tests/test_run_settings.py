"""etpo/run_settings.py: a run's saved config (LightningCLI's own --print_config output, as etpo.fit saves it) against
the settings of an etpo.fit command -- the same command is current, a changed setting is named, an option added
after the run was made counts only when asked away from its default, a parameter an overlay's class does not take is
not a difference."""

from __future__ import annotations

import copy
import io
import sys
from contextlib import redirect_stdout
from functools import lru_cache
from pathlib import Path
from unittest import mock

import pytest
import yaml

from etpo.run_settings import command_settings, run_differences, settings_differences

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
PPO_KL = str(ROOT / "configs" / "contenders" / "ppo_kl.yaml")
RUN_ARGS = ("--run_dir", "runs/x", "--data.env.init_args.dataset=balance_scale",
            "--data.env.init_args.split_seed=1", "--data.seed=1", "--data.budget=16", "--seed_everything=1")


@lru_cache(maxsize=None)
def saved_config(*args: str) -> dict:
    """What etpo.fit saves as the run's config.yaml for these arguments (its --print_config, in this process)."""
    from etpo.fit import main

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as info, mock.patch.object(sys, "argv", ["etpo.fit"]):
        main([*args, "--print_config"])
    assert info.value.code in (0, None), out.getvalue()[-2000:]
    return yaml.safe_load(out.getvalue())


def quickstart_args(*extra: str) -> list[str]:
    return ["--config", QUICKSTART, *RUN_ARGS, *extra]


def test_the_command_a_run_was_made_with_is_current():
    saved = saved_config(*quickstart_args())
    assert settings_differences(command_settings(quickstart_args()), saved) == []
    # numbers compare by value: 5e-4 is the quickstart's 5.0e-4; the run_dir says where, not what
    assert settings_differences(command_settings(quickstart_args("--model.init_args.critic_lr=5e-4",
                                                                 "--run_dir", "elsewhere")), saved) == []


def test_changed_settings_are_named_with_both_values():
    saved = saved_config(*quickstart_args())
    beta = saved["model"]["init_args"]["beta"]  # the quickstart's
    assert beta != 0.1
    found = settings_differences(command_settings(quickstart_args("--model.init_args.beta=0.1")), saved)
    assert found == [f"model.init_args.beta: the run has {beta}, the command asks 0.1"]
    found = settings_differences(command_settings(quickstart_args("--data.env.init_args.dataset=jungle_chess")),
                                 saved)
    assert len(found) == 1 and found[0].startswith("data.env.init_args.dataset:") and "jungle_chess" in found[0]
    # a value inside a file a config names (backbone: model/smollm2.yaml): the file is read, not its name compared
    other = copy.deepcopy(saved)
    other["model"]["init_args"]["backbone"]["lora_r"] = 16
    found = settings_differences(command_settings(quickstart_args()), other)
    assert len(found) == 1 and found[0].startswith("model.init_args.backbone.lora_r:")


def test_an_overlay_that_switches_the_class():
    ppo_args = ["--config", QUICKSTART, "--config", PPO_KL, *RUN_ARGS, "--model.init_args.ppo_epochs=2"]
    saved_ppo = saved_config(*ppo_args)
    # the base's ETPO-only parameters (q_parameterisation, td_lambda, ...) are dropped for PPO-KL: not differences
    assert settings_differences(command_settings(ppo_args), saved_ppo) == []
    found = settings_differences(command_settings(ppo_args[:-1] + ["--model.init_args.ppo_epochs=5"]), saved_ppo)
    assert len(found) == 1 and "ppo_epochs" in found[0]
    found = settings_differences(command_settings(quickstart_args()), saved_ppo)
    assert found == [f"model.class_path: the run has {saved_ppo['model']['class_path']}, the command asks "
                     "modules.etpo.ETPOModule"]


def test_a_run_older_than_an_option():
    older = copy.deepcopy(saved_config(*quickstart_args()))
    del older["model"]["init_args"]["reward_baseline"]  # as in a run made before the option existed
    # asked at its default (null, the paper's; the quickstart itself asks 'running'): current
    paper = quickstart_args("--model.init_args.reward_baseline=null")
    assert settings_differences(command_settings(paper), older) == []
    found = settings_differences(command_settings(quickstart_args()), older)
    assert len(found) == 1 and found[0].startswith("model.init_args.reward_baseline: the run has no such key") \
        and "'running'" in found[0] and "None" in found[0]
    del older["data"]["env"]["init_args"]["max_steps"]  # a parameter the env takes, asked at its default (5): current
    assert settings_differences(command_settings(paper), older) == []
    del older["data"]["env"]["init_args"]["stop_on_success"]  # asked false, its default is true
    found = settings_differences(command_settings(paper), older)
    assert [f.split(":")[0] for f in found] == ["data.env.init_args.stop_on_success"]


def test_run_differences_reads_the_run_directory(tmp_path):
    assert run_differences(tmp_path, quickstart_args()) is None  # no config.yaml: nothing to compare
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved_config(*quickstart_args())))
    assert run_differences(tmp_path, quickstart_args()) == []
    assert len(run_differences(tmp_path, quickstart_args("--data.num_envs=4"))) == 1
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        run_differences(tmp_path, ["--config", "nowhere.yaml"])
