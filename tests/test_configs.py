"""Every shipped experiment config parses (types, class paths, keys) with the real CLI, and contender configs
differ from ETPO's only in the model section -- the contenders meet on the same environment, budget and splits."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest
import yaml

from conftest import REPO

FIT_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def test_there_is_a_config_per_contender_and_setting():
    for name in ("quickstart", "toy", "etpo", "ppo_kl", "reflection", "etpo_disc", "etpo_1step", "etpo_7b_fsdp",
                 "ppo_kl_cpu", "reflection_cpu", "etpo_disc_cpu", "etpo_1step_cpu"):
        assert f"{name}.yaml" in FIT_CONFIGS, name


@pytest.mark.parametrize("name", FIT_CONFIGS)
def test_config_parses(name, tmp_path):
    from etpo.fit import main

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as info:
        main(["--config", str(REPO / "configs" / name), "--run_dir", str(tmp_path), "--print_config"])
    assert info.value.code in (0, None), out.getvalue()[-2000:]
    resolved = yaml.safe_load(out.getvalue())
    assert resolved["model"]["class_path"].startswith("modules.")
    assert resolved["data"]["env"]["class_path"].startswith("envs.")


def _load(name):
    return yaml.safe_load((REPO / "configs" / name).read_text())


@pytest.mark.parametrize("etpo, others", [
    ("etpo.yaml", ["ppo_kl.yaml", "reflection.yaml", "etpo_disc.yaml", "etpo_1step.yaml"]),
    ("quickstart.yaml", ["ppo_kl_cpu.yaml", "reflection_cpu.yaml", "etpo_disc_cpu.yaml", "etpo_1step_cpu.yaml"]),
])
def test_contenders_share_everything_but_the_model(etpo, others):
    base = _load(etpo)
    for name in others:
        other = _load(name)
        assert other["model"]["init_args"]["backbone"] == base["model"]["init_args"]["backbone"], name
        assert other["trainer"] == base["trainer"] and other.get("seed_everything") == base.get("seed_everything")
        data, base_data = dict(other["data"]), dict(base["data"])
        if name.startswith("etpo_1step"):  # the ablation itself: one attempt, no reflection
            env_args = dict(data["env"]["init_args"])
            assert env_args.pop("max_steps") == 1 and env_args.pop("reflection") is False
            base_args = dict(base_data["env"]["init_args"])
            base_args.pop("max_steps"), base_args.pop("reflection", None)
            assert env_args == base_args
            data.pop("env"), base_data.pop("env")
        assert data == base_data, name
    ppo = _load(others[0])
    assert ppo["model"]["class_path"] == "modules.ppo_kl.PPOKLModule"
    assert base["model"]["class_path"] == "modules.etpo.ETPOModule"
