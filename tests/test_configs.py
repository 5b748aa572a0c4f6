"""The shipped configs: one complete base per setting, short contender / ablation overlays on top of them.

Every combination a user is told to run -- each base alone, each base with each overlay, every run of the shipped
benchmark sweeps -- parses with the real CLI; and the resolved configs of one setting differ only where the
contender or ablation must (the contenders meet on the same model, environment, budget, splits and sampling)."""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stdout
from functools import lru_cache
from unittest import mock

import pytest
import yaml

from conftest import REPO

CONFIGS = REPO / "configs"
SETTINGS = {"cpu": "quickstart.yaml", "7b": "etpo.yaml", "7b_fsdp": "etpo_7b_fsdp.yaml"}  # the setting bases
STANDALONE = sorted(p.name for p in CONFIGS.glob("*.yaml"))  # every top-level config runs on its own
OVERLAYS = sorted(p.name for p in (CONFIGS / "contenders").glob("*.yaml"))
PRESETS = sorted(p.name for p in (CONFIGS / "model").glob("*.yaml"))
BENCHMARKS = sorted(p.name for p in (CONFIGS / "benchmark").glob("*.yaml"))
# The init_args a contender with its own class_path inherits from the base (jsonargparse keeps those its class also
# takes): they describe the setting, not the algorithm. Any other inherited init arg (say a `beta` that means
# something else in the new algorithm) must be set in the overlay itself.
SETTING_INIT_ARGS = {"backbone", "gamma", "policy_lr", "critic_lr", "weight_decay", "policy_max_grad_norm",
                     "critic_max_grad_norm", "policy_lr_scheduler", "critic_lr_scheduler", "token_chunk_size"}


@lru_cache(maxsize=None)
def resolve(*configs: str, extra: tuple[str, ...] = ()) -> dict:
    """The config ``python -m etpo.fit --config A --config B ... --print_config`` resolves to."""
    from etpo.fit import main

    args = [a for c in configs for a in ("--config", str(CONFIGS / c))] + ["--run_dir", "runs/x", *extra]
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as info, mock.patch.object(sys, "argv", ["etpo.fit"]):
        main(args + ["--print_config"])
    assert info.value.code in (0, None), out.getvalue()[-2000:]
    return yaml.safe_load(out.getvalue())


def flat(tree, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are values."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def differing(a: dict, b: dict) -> set[str]:
    fa, fb = flat(a), flat(b)
    return {k for k in fa.keys() | fb.keys() if fa.get(k, "<absent>") != fb.get(k, "<absent>")}


def _raw(path) -> dict:
    return yaml.safe_load((CONFIGS / path).read_text()) or {}


def test_the_layout_has_a_base_per_setting_and_an_overlay_per_contender():
    assert set(SETTINGS.values()) | {"toy.yaml"} == set(STANDALONE), STANDALONE
    assert {"ppo_kl.yaml", "reflection.yaml", "etpo_disc.yaml", "etpo_1step.yaml"} <= set(OVERLAYS), OVERLAYS
    assert {"smollm2.yaml", "codellama7b.yaml"} <= set(PRESETS)
    for name in OVERLAYS:  # overlays are short: only what differs
        lines = [ln for ln in (CONFIGS / "contenders" / name).read_text().splitlines()
                 if ln.strip() and not ln.lstrip().startswith("#")]
        assert len(lines) <= 15, (name, len(lines))


@pytest.mark.parametrize("name", STANDALONE)
def test_every_standalone_config_parses(name):
    resolved = resolve(name)
    assert resolved["model"]["class_path"].startswith("modules.")
    assert resolved["data"]["env"]["class_path"].startswith("envs.")


@pytest.mark.parametrize("base", sorted(SETTINGS.values()))
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_parses_on_every_base(base, overlay):
    resolved = resolve(base, f"contenders/{overlay}")
    assert resolved["model"]["class_path"].startswith("modules.")


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_every_benchmark_run_parses(bench):
    """What a sweep runs: base + overlay + the sweep's own overrides, for each contender."""
    from etpo import benchmark

    cfg = benchmark.load_config(CONFIGS / "benchmark" / bench)
    assert cfg.base in {f"configs/{b}" for b in SETTINGS.values()}, "a sweep composes one setting base"
    for contender in cfg.contenders:
        cmd = benchmark.build_command(cfg, contender, cfg.datasets[-1], cfg.seeds[-1], "runs/x", fit_cmd=["FIT"])
        configs, rest, args = [], [], iter(cmd[1:])
        for arg in args:
            if arg == "--config":
                configs.append(next(args).removeprefix("configs/"))
            elif arg == "--run_dir":
                next(args)
            else:
                rest.append(arg)
        assert configs[0] == cfg.base.removeprefix("configs/")
        rest = tuple(rest)
        resolved = resolve(*configs, extra=rest)
        init = resolved["data"]["env"]["init_args"]
        assert init["dataset"] == cfg.datasets[-1] and init["split_seed"] == cfg.seeds[-1]
        assert resolved["data"]["budget"] == cfg.budget


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_contenders_of_a_setting_differ_only_where_they_must(setting):
    base_file = SETTINGS[setting]
    base = resolve(base_file)
    assert base["model"]["class_path"] == "modules.etpo.ETPOModule"  # every base is ETPO in its setting
    for overlay in OVERLAYS:
        variant = resolve(base_file, f"contenders/{overlay}")
        diff = differing(base, variant)
        raw = _raw(f"contenders/{overlay}")
        if overlay == "etpo_disc.yaml":
            assert diff == {"model.init_args.discount_within_action"}, diff
            assert variant["model"]["init_args"]["discount_within_action"] is True
        elif overlay == "etpo_1step.yaml":
            # reflection off is the CPU base's own setting already (its prompts are shared); the 7B bases reflect
            assert "data.env.init_args.max_steps" in diff, diff
            assert diff <= {"data.env.init_args.max_steps", "data.env.init_args.reflection"}, diff
            init = variant["data"]["env"]["init_args"]
            assert init["max_steps"] == 1 and init["reflection"] is False
        else:  # another algorithm: only the model section, never the setting's part of it
            assert {k.split(".")[0] for k in diff} == {"model"}, (overlay, diff)
            assert set(raw) == {"model"}, overlay
            assert not any(k.startswith("model.init_args.backbone") for k in diff), (overlay, diff)
            new_args = variant["model"]["init_args"]
            for key in SETTING_INIT_ARGS & new_args.keys():
                assert new_args[key] == base["model"]["init_args"][key], (overlay, key)
        if overlay == "ppo_kl.yaml":
            assert variant["model"]["class_path"] == "modules.ppo_kl.PPOKLModule"
        if overlay == "reflection.yaml":
            assert variant["model"]["class_path"] == "modules.reflection.ReflectionModule"
            assert set(variant["model"]["init_args"]) == {"backbone"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_overlay_sets_what_it_changes_and_nothing_else(overlay):
    """A variant file holds only what differs: none of its values repeats the base's. A contender with its own
    class_path sets every init arg of its own -- it inherits from the base only the setting's (SETTING_INIT_ARGS)."""
    raw = _raw(f"contenders/{overlay}")
    for setting in sorted(SETTINGS):
        _check_no_repeats(overlay, raw, SETTINGS[setting], repeats_allowed=_repeated_elsewhere(overlay, raw, setting))


def _repeated_elsewhere(overlay, raw, setting):
    """Keys of the overlay that repeat this setting's base but change another setting's: an overlay shared by the
    settings sets what any of them needs (etpo_1step turns reflection off; the CPU base has it off already)."""
    allowed = set()
    for other in SETTINGS:
        if other == setting:
            continue
        other_flat = flat(resolve(SETTINGS[other]))
        allowed |= {k for k, v in flat(raw).items() if k in other_flat and other_flat[k] != v}
    return allowed


def _check_no_repeats(overlay, raw, base_file, repeats_allowed=frozenset()):
    base = resolve(base_file)
    variant = resolve(base_file, f"contenders/{overlay}")
    own_class = "class_path" in raw.get("model", {}) and raw["model"]["class_path"] != base["model"]["class_path"]
    base_flat = flat({k: v for k, v in base.items() if not (own_class and k == "model")})
    if own_class:
        base_flat.update({f"model.init_args.{k}": v for k, v in flat(base["model"]["init_args"]).items()
                          if k.split(".")[0] in SETTING_INIT_ARGS})
    for key, value in flat(raw).items():
        if key in base_flat and key not in repeats_allowed:
            assert base_flat[key] != value, f"{overlay}: {key} = {value!r} repeats the base {base_file}"
    if own_class:
        set_here = set(raw["model"].get("init_args") or {})
        inherited = (set(variant["model"]["init_args"]) & set(base["model"]["init_args"])) - set_here
        assert inherited <= SETTING_INIT_ARGS, (
            f"{overlay} inherits {sorted(inherited - SETTING_INIT_ARGS)} from the base's "
            f"{base['model']['class_path']}: set them in the overlay (they belong to the algorithm, not the setting)")


def test_the_fsdp_base_is_the_7b_base_sharded():
    diff = differing(resolve(SETTINGS["7b"]), resolve(SETTINGS["7b_fsdp"]))
    assert {k for k in diff if not k.startswith("trainer.")} == {"data.num_envs"}, diff


def test_every_setting_shares_its_model_preset():
    """The bases name the backbone presets (configs/model/), so each backbone is written down once."""
    preset_of = {"cpu": "smollm2.yaml", "7b": "codellama7b.yaml", "7b_fsdp": "codellama7b.yaml"}
    for setting, base_file in SETTINGS.items():
        assert _raw(base_file)["model"]["init_args"]["backbone"] == f"model/{preset_of[setting]}"
        preset = _raw(f"model/{preset_of[setting]}")
        backbone = resolve(base_file)["model"]["init_args"]["backbone"]
        assert {k: backbone[k] for k in preset} == preset, setting


@pytest.mark.parametrize("path", STANDALONE + [f"contenders/{n}" for n in OVERLAYS] + [f"model/{n}" for n in PRESETS])
def test_every_field_is_annotated(path):
    """litgpt style: each field line says why, except class paths (their block names them)."""
    for number, line in enumerate((CONFIGS / path).read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- "):
            continue
        key, _, value = stripped.partition(":")
        if value.strip() and not value.strip().startswith("#") and key != "class_path":
            assert "#" in value, f"{path}:{number} has no comment: {line}"


# ----------------------------------------------------------------------------- configs that travel


def _print_config(*args: str) -> dict:
    """``python -m etpo.fit ARGS --print_config`` in this process and working directory, parsed."""
    from etpo.fit import main

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as info, mock.patch.object(sys, "argv", ["etpo.fit"]):
        main([*args, "--run_dir", "runs/x", "--print_config"])
    assert info.value.code in (0, None), out.getvalue()[-2000:]
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("base", sorted(SETTINGS.values()))
def test_a_copied_base_runs_from_anywhere(base, tmp_path, monkeypatch):
    """A copy of a setting base in another folder, read from a working directory outside the project, resolves to
    what the original does: the model preset it names (model/...yaml) comes from the project's configs/."""
    copy = tmp_path / "elsewhere" / f"my_{base}"
    copy.parent.mkdir()
    copy.write_text((CONFIGS / base).read_text())
    monkeypatch.chdir(tmp_path)
    assert _print_config("--config", str(copy)) == resolve(base)


def test_copied_overlays_and_the_projects_overlays_resolve_from_anywhere(tmp_path, monkeypatch):
    """An overlay copied out of configs/contenders/ that names a preset the way an overlay there would
    (../model/...), and a project overlay named from the project root (configs/contenders/...), from another folder."""
    mine = tmp_path / "mine"
    (mine / "contenders").mkdir(parents=True)
    (mine / "q.yaml").write_text((CONFIGS / "quickstart.yaml").read_text())
    overlay = mine / "contenders" / "small_backbone.yaml"
    overlay.write_text("model:\n  init_args:\n    backbone: ../model/smollm2.yaml\n")
    monkeypatch.chdir(tmp_path)
    assert _print_config("--config", str(mine / "q.yaml"), "--config", str(overlay)) == resolve("quickstart.yaml")
    assert _print_config("--config", str(mine / "q.yaml"), "--config", "configs/contenders/ppo_kl.yaml") == \
        resolve("quickstart.yaml", "contenders/ppo_kl.yaml")


def test_print_config_writes_a_self_contained_config(tmp_path, monkeypatch):
    """What the one-line error recommends: --print_config inlines the presets, so its output runs from anywhere."""
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit), mock.patch.object(sys, "argv", ["etpo.fit"]):
        from etpo.fit import main

        main(["--config", str(CONFIGS / "quickstart.yaml"), "--print_config"])
    text = out.getvalue()
    assert ".yaml" not in text.split("\n", 1)[1]  # (the first line is Lightning's version comment)
    (tmp_path / "far" / "away").mkdir(parents=True)
    contained = tmp_path / "far" / "away" / "self_contained.yaml"
    contained.write_text(text)
    assert _print_config("--config", str(contained)) == resolve("quickstart.yaml")


def test_a_config_path_found_nowhere_is_one_line_with_the_fix(tmp_path, monkeypatch, capsys):
    from etpo.fit import main

    text = (CONFIGS / "quickstart.yaml").read_text()
    assert "backbone: model/smollm2.yaml" in text
    copy = tmp_path / "elsewhere" / "q.yaml"
    copy.parent.mkdir()
    copy.write_text(text.replace("backbone: model/smollm2.yaml", "backbone: model/nowhere.yaml"))
    line_no = next(n for n, ln in enumerate(copy.read_text().splitlines(), 1) if "model/nowhere.yaml" in ln)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info, mock.patch.object(sys, "argv", ["etpo.fit"]):
        main(["--config", str(copy), "--run_dir", "runs/x"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    line = err[0]
    assert len(line.replace(str(copy.parent), "").replace(str(CONFIGS), "")) < 320, line  # short, but for the paths
    assert line.startswith(f"etpo.fit: error: {copy}, line {line_no}: config path 'model/nowhere.yaml' "), line
    assert str(copy.parent / "model" / "nowhere.yaml") in line and f"{CONFIGS}/" in line  # where it looked
    assert "relative to the config file or absolute" in line and "--print_config > self_contained.yaml" in line


def test_a_config_file_found_nowhere_is_one_line(tmp_path, monkeypatch, capsys):
    from etpo.fit import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info, mock.patch.object(sys, "argv", ["etpo.fit"]):
        main(["--config", "configs/contenders/nowhere.yaml", "--print_config"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "configs/contenders/nowhere.yaml" in err[0] and str(tmp_path) in err[0], err


def test_base_plus_overlay_names_its_run_after_both(tmp_path, monkeypatch):
    """Without --run_dir a run is runs/<config stems joined by +>: one overlay on two bases gets two directories."""
    from datamodules.rollout import RolloutDataModule
    from etpo.fit import ETPOCLI
    from modules.agent import AgentModule

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["etpo.fit"])
    cli = ETPOCLI(AgentModule, RolloutDataModule, subclass_mode_model=True, subclass_mode_data=False,
                  parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False, "default_env": False},
                  auto_configure_optimizers=False, run=False,
                  args=["--config", str(CONFIGS / "toy.yaml"), "--config", str(CONFIGS / "contenders/ppo_kl.yaml")])
    assert cli.config["run_dir"] == "runs/toy+ppo_kl"
    assert type(cli.model).__name__ == "PPOKLModule" and cli.model.backbone.source == "tiny"
