"""etpo.benchmark: exact etpo.fit argument lists, skipping finished runs, resuming unfinished ones, failures that do
not stop the sweep -- with a stub fit command that writes summary.json and records every invocation."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from etpo import benchmark, run_lock

STUB = textwrap.dedent(r'''
    """A stand-in for `python -m etpo.fit`: records its argv, then writes a finished summary.json."""
    import json, os, sys
    from pathlib import Path

    argv = sys.argv[1:]
    opts, flags = {}, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if "=" in a:
            k, v = a.split("=", 1)
            opts[k] = v
        elif a in ("--run_dir", "--ckpt_path", "--config"):
            opts.setdefault(a, [])
            opts[a] = opts[a] + [argv[i + 1]] if isinstance(opts[a], list) else [argv[i + 1]]
            i += 1
        i += 1
    run_dir = Path(opts["--run_dir"][0])
    if "--print_config" in argv:  # what etpo.fit's parser would resolve (STUB_MANGLE: the dict-typed env bug)
        env = {"class_path": "envs.x.Env", "init_args": {}}
        for k, v in opts.items():
            if k.startswith("--data.env.init_args."):
                key = k.rsplit(".", 1)[1]
                (env if os.environ.get("STUB_MANGLE") else env["init_args"])[key] = v
        print(json.dumps({"data": {"env": env, "seed": int(opts["--data.seed"]), "budget": 1}}))
        sys.exit(0)
    if os.environ.get("STUB_LOCKS"):  # is <run_dir>/.run.lock held (by the sweep) while the run goes?
        import fcntl
        fd = os.open(run_dir / ".run.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        handed = os.environ.get("ETPO_RUN_LOCK_FD")  # the sweep's descriptor of that very file, passed on
        same = handed is not None and os.path.samestat(os.fstat(int(handed)), os.fstat(fd))
        with open(os.environ["STUB_LOCKS"], "a") as fh:
            fh.write(json.dumps({"run_dir": str(run_dir), "held": held, "handed": same}) + "\n")
        os.close(fd)
    with open(os.environ["STUB_CALLS"], "a") as fh:
        fh.write(json.dumps(argv) + "\n")
    print("stub fit running in", run_dir)
    dataset = opts.get("--data.env.init_args.dataset")
    if dataset is None:  # env_override: file -> read the last config
        import yaml
        env = yaml.safe_load(open(opts["--config"][-1]))["data"]["env"]
        dataset = env["init_args"]["dataset"]
    if (Path(os.environ["STUB_FAIL_DIR"]) / dataset).exists():
        print("stub: failing on purpose", file=sys.stderr)
        sys.exit(3)
    seed = int(opts["--data.seed"])
    budget = int(opts["--data.budget"])
    reported = os.environ.get("STUB_REPORT_DATASET", dataset)
    best = 0.5 + 0.01 * seed + 0.1 * len(dataset) / 10
    curve = [[k, best - 0.01 * (budget - k) / 8] for k in range(8, budget + 1, 8)]
    summary = {"contender": "stub", "dataset": reported, "seed": seed, "env_steps": budget, "budget": budget,
               "best_reward": curve[-1][1], "finished": True, "best_within": curve,
               "batch_avg_reward": [-0.5 + 0.05 * j for j in range(len(curve))]}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if os.environ.get("STUB_WRITE_CONFIG"):  # as LightningCLI saves it: the config files, then the arguments
        import yaml

        def merge(a, b):
            if isinstance(a, dict) and isinstance(b, dict):
                return {**a, **{k: merge(a[k], v) if k in a else v for k, v in b.items()}}
            return b

        config = {}
        for path in opts.get("--config", []):
            config = merge(config, yaml.safe_load(open(path)) or {})
        for k, v in opts.items():
            if k.startswith("--") and k not in ("--run_dir", "--ckpt_path", "--config"):
                node = yaml.safe_load(v)
                for part in reversed(k[2:].split(".")):
                    node = {part: node}
                config = merge(config, node)
        (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "run_dir": str(run_dir)}))
''')


@pytest.fixture
def stub(tmp_path, monkeypatch):
    script = tmp_path / "stub_fit.py"
    script.write_text(STUB)
    calls = tmp_path / "calls.jsonl"
    fail_dir = tmp_path / "fail"
    fail_dir.mkdir()
    monkeypatch.setenv("STUB_CALLS", str(calls))
    monkeypatch.setenv("STUB_FAIL_DIR", str(fail_dir))

    def read_calls():
        return [json.loads(x) for x in calls.read_text().splitlines()] if calls.exists() else []

    return {"cmd": [sys.executable, str(script)], "calls": read_calls, "fail_dir": fail_dir}


def make_config(tmp_path, **over) -> benchmark.BenchmarkConfig:
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text(
            "data:\n  env:\n    class_path: envs.datascience.DataScienceEnv\n"
            "    init_args: {dataset: breast_w, max_steps: 5, split_seed: 0}\n")
    data = {
        "out": str(tmp_path / "bench"),
        "budget": 32,
        "seeds": 2,
        "datasets": ["breast_w", "cmc"],
        "contenders": {"reflection": str(tmp_path / "a.yaml"),
                       "etpo": {"config": str(tmp_path / "b.yaml"), "overrides": {"model.init_args.beta": 0.05}}},
        "overrides": ["--trainer.accelerator=cpu"],
    }
    data.update(over)
    return benchmark.load_config(data=data)


def test_exact_override_list(tmp_path):
    cfg = make_config(tmp_path)
    etpo = cfg.contenders[1]
    cmd = benchmark.build_command(cfg, etpo, "cmc", 3, "out/runs/etpo/cmc/seed3", fit_cmd=["FIT"])
    assert cmd == ["FIT", "--config", etpo.config, "--run_dir", "out/runs/etpo/cmc/seed3",
                   "--data.env.init_args.dataset=cmc", "--data.env.init_args.split_seed=3", "--data.seed=3",
                   "--data.budget=32", "--seed_everything=3", "--trainer.accelerator=cpu",
                   "--model.init_args.beta=0.05"]
    resumed = benchmark.build_command(cfg, etpo, "cmc", 3, "x", resume=True, fit_cmd=["FIT"])
    assert resumed[-2:] == ["--ckpt_path", "last"]
    default = benchmark.build_command(cfg, etpo, "cmc", 3, "x")
    assert default[:3] == [sys.executable, "-m", "etpo.fit"]


def test_sweep_skips_finished_resumes_unfinished_and_survives_failures(tmp_path, stub, capsys):
    cfg = make_config(tmp_path)
    runs = cfg.runs_dir
    # a finished run: skipped
    done = runs / "reflection" / "breast_w" / "seed0"
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"finished": True, "dataset": "breast_w", "seed": 0,
                                                   "best_reward": 0.9, "best_within": [[32, 0.9]], "env_steps": 32,
                                                   "batch_avg_reward": [0.1]}))
    # an unfinished run with a checkpoint: resumed with --ckpt_path last
    half = runs / "etpo" / "cmc" / "seed1"
    (half / "checkpoints").mkdir(parents=True)
    (half / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (half / "summary.json").write_text(json.dumps({"finished": False, "env_steps": 16}))
    # an unfinished run without checkpoints: started afresh
    crashed = runs / "etpo" / "breast_w" / "seed0"
    crashed.mkdir(parents=True)
    (crashed / "summary.json").write_text(json.dumps({"finished": False}))
    fail_marker = stub["fail_dir"] / "cmc"  # while it exists, every cmc run fails

    specs = benchmark.plan(cfg, stub["cmd"])
    assert len(specs) == 8
    assert [s.name for s in specs[:4]] == ["reflection/breast_w/seed0", "etpo/breast_w/seed0",
                                           "reflection/cmc/seed0", "etpo/cmc/seed0"]  # seed-major
    states = {s.name: s.state for s in specs}
    assert states["reflection/breast_w/seed0"] == "finished"
    assert states["etpo/cmc/seed1"] == "resume" and states["etpo/breast_w/seed0"] == "new"

    fail_marker.touch()  # the first sweep: cmc fails
    results = benchmark.run_benchmark(cfg, stub["cmd"], show_progress=False, poll_s=0.02)
    calls = stub["calls"]()
    assert len(calls) == 7  # 8 runs, 1 already finished
    by_dir = {c[c.index("--run_dir") + 1]: c for c in calls}
    assert by_dir[str(half)][-2:] == ["--ckpt_path", "last"]
    assert "--ckpt_path" not in by_dir[str(crashed)]
    status = {r.name: r.status for r in results}
    assert status["reflection/breast_w/seed0"] == "skipped"
    assert status["etpo/breast_w/seed1"] == "ok"
    failed = sorted(n for n, s in status.items() if s == "failed")
    assert failed == ["etpo/cmc/seed0", "etpo/cmc/seed1", "reflection/cmc/seed0", "reflection/cmc/seed1"]
    err = capsys.readouterr().err
    assert "4 failed" in err and "FAILED etpo/cmc/seed0: exit code 3" in err
    assert "stub: failing on purpose" in (runs / "etpo" / "cmc" / "seed0" / "fit.log").read_text()
    assert "stub fit running in" in (runs / "etpo" / "breast_w" / "seed1" / "fit.log").read_text()
    status_file = json.loads((Path(cfg.out) / "benchmark_status.json").read_text())
    assert len(status_file["runs"]) == 8
    # the report was written from what finished
    assert (Path(cfg.out) / "table.md").is_file() and (Path(cfg.out) / "best_within.png").is_file()
    assert "## etpo against each contender" in (Path(cfg.out) / "comparison.md").read_text()  # summaries without
    # the per-batch quality / timing series

    # second sweep: only the four failed runs run again (one of them resumes from its checkpoint)
    fail_marker.unlink()
    assert benchmark.main(["--config", str(_dump(cfg, tmp_path)), "--fit_cmd", " ".join(stub["cmd"]),
                           "--no_progress"]) == 0
    calls2 = stub["calls"]()[7:]
    assert len(calls2) == 4
    assert sum(c[-2:] == ["--ckpt_path", "last"] for c in calls2) == 1
    # third sweep: nothing to do
    assert benchmark.main(["--config", str(_dump(cfg, tmp_path)), "--fit_cmd", " ".join(stub["cmd"]),
                           "--no_progress"]) == 0
    assert len(stub["calls"]()) == 11
    table = (Path(cfg.out) / "table.md").read_text()
    assert "| reflection | etpo |" in table.splitlines()[0].replace("dataset | ", "")


def _dump(cfg: benchmark.BenchmarkConfig, tmp_path: Path) -> Path:
    import yaml

    data = {"out": cfg.out, "budget": cfg.budget, "seeds": cfg.seeds, "datasets": cfg.datasets,
            "contenders": {c.name: {"config": c.config, "overrides": c.overrides} for c in cfg.contenders},
            "overrides": cfg.overrides, "base": cfg.base}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.skipif(sys.platform == "win32", reason="run locks use fcntl.flock (POSIX)")
def test_two_sweeps_on_one_folder_neither_race_nor_erase_each_other(tmp_path, stub, monkeypatch):
    """What two concurrent sweeps on one folder used to do: the second started a run the first had finished since
    the second planned (etpo.fit then refused the run directory: "already holds checkpoints"), and each sweep's
    benchmark_status.json erased the other's entries."""
    locks = tmp_path / "locks.jsonl"
    monkeypatch.setenv("STUB_LOCKS", str(locks))
    cfg = make_config(tmp_path, seeds=[0, 1], datasets=["cmc"])
    specs = benchmark.plan(cfg, stub["cmd"])
    assert [s.state for s in specs] == ["new"] * 4
    runs = cfg.runs_dir
    # after the plan was made: another sweep finished reflection/cmc/seed0, left etpo/cmc/seed0 resumable, and is
    # running reflection/cmc/seed1 now (it holds that run's lock)
    finished = runs / "reflection" / "cmc" / "seed0"
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text(json.dumps({"finished": True, "best_reward": 0.7}))
    (runs / "etpo" / "cmc" / "seed0" / "checkpoints").mkdir(parents=True)
    (runs / "etpo" / "cmc" / "seed0" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    busy = runs / "reflection" / "cmc" / "seed1"
    lock, holder = run_lock.try_lock(busy)
    assert lock is not None and holder == ""
    try:
        results = benchmark.execute(specs, cfg, show_progress=False, poll_s=0.02)
    finally:
        os.close(lock)
    by_name = {r.name: r for r in results}
    assert by_name["reflection/cmc/seed0"].status == "skipped" and by_name["reflection/cmc/seed0"].best_reward == 0.7
    assert by_name["reflection/cmc/seed1"].status == "skipped"
    assert "in use by another run (pid " in by_name["reflection/cmc/seed1"].error
    assert by_name["etpo/cmc/seed0"].status == "ok" and by_name["etpo/cmc/seed1"].status == "ok"
    calls = {c[c.index("--run_dir") + 1]: c for c in stub["calls"]()}
    assert sorted(calls) == [str(runs / "etpo" / "cmc" / "seed0"), str(runs / "etpo" / "cmc" / "seed1")]
    assert calls[str(runs / "etpo" / "cmc" / "seed0")][-2:] == ["--ckpt_path", "last"]  # resumed, not refused
    assert "--ckpt_path" not in calls[str(runs / "etpo" / "cmc" / "seed1")]
    # each run's lock was held while it ran, and is free now that the sweep is over
    seen = [json.loads(x) for x in locks.read_text().splitlines()]
    assert len(seen) == 2 and all(x["held"] and x["handed"] for x in seen)
    again, _ = run_lock.try_lock(runs / "etpo" / "cmc" / "seed1")
    assert again is not None
    os.close(again)

    # a second sweep (another contender) merges its entries into the status file instead of replacing them
    (busy / "summary.json").write_text(json.dumps({"finished": True, "best_reward": 0.6}))
    status = Path(cfg.out) / "benchmark_status.json"
    before = {e["name"]: e for e in json.loads(status.read_text())["runs"]}
    assert set(before) == {"reflection/cmc/seed0", "reflection/cmc/seed1", "etpo/cmc/seed0", "etpo/cmc/seed1"}
    assert before["reflection/cmc/seed1"]["status"] == "skipped"
    benchmark.run_benchmark(cfg, stub["cmd"], only=["reflection"], show_progress=False, poll_s=0.02, report=False)
    after = {e["name"]: e for e in json.loads(status.read_text())["runs"]}
    assert set(after) == set(before)
    assert after["etpo/cmc/seed0"] == before["etpo/cmc/seed0"]  # the other sweep's entry is kept as it was
    assert after["reflection/cmc/seed1"]["state"] == "finished"  # this sweep's entry is the latest


def test_wrong_dataset_in_summary_is_a_failure(tmp_path, stub, monkeypatch):
    monkeypatch.setenv("STUB_REPORT_DATASET", "breast_cancer")
    cfg = make_config(tmp_path, seeds=[0], datasets=["cmc"], contenders={"etpo": str(tmp_path / "a.yaml")})
    (r,) = benchmark.run_benchmark(cfg, stub["cmd"], show_progress=False, poll_s=0.02, report=False)
    assert r.status == "failed" and "did not take effect" in r.error


def test_env_override_file_mode(tmp_path, stub):
    cfg = make_config(tmp_path, env_override="file", seeds=[4], datasets=["pc1"],
                      contenders={"etpo": str(tmp_path / "a.yaml")})
    (r,) = benchmark.run_benchmark(cfg, stub["cmd"], show_progress=False, poll_s=0.02, report=False)
    assert r.status == "ok", r.error
    run_dir = cfg.runs_dir / "etpo" / "pc1" / "seed4"
    import yaml

    env = yaml.safe_load((run_dir / "benchmark_env.yaml").read_text())["data"]["env"]
    assert env == {"class_path": "envs.datascience.DataScienceEnv",
                   "init_args": {"dataset": "pc1", "max_steps": 5, "split_seed": 4}}
    (call,) = stub["calls"]()
    assert call[:4] == ["--config", str(tmp_path / "a.yaml"), "--config", str(run_dir / "benchmark_env.yaml")]
    assert not any(a.startswith("--data.env") for a in call)


def test_dry_run_and_cli_overrides(tmp_path, stub, capsys):
    path = _dump(make_config(tmp_path), tmp_path)
    assert benchmark.main(["--config", str(path), "--dry_run", "--budget=8", "seeds=[7]", "--only", "etpo",
                           "--datasets", "[pc1]"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "--data.budget=8" in out[0] and "--data.seed=7" in out[0]
    assert "--data.env.init_args.dataset=pc1" in out[0] and "-m etpo.fit" in out[0]
    assert stub["calls"]() == []
    assert benchmark.main(["--config", str(path), "--bogus=1", "--dry_run"]) == 2
    assert "unknown benchmark config keys" in capsys.readouterr().err


def test_preflight_catches_overrides_that_do_not_take_effect(tmp_path, stub, monkeypatch):
    cfg = make_config(tmp_path, preflight="true", seeds=[1], datasets=["cmc", "pc1"])
    results = benchmark.run_benchmark(cfg, stub["cmd"], show_progress=False, poll_s=0.02, report=False)
    assert [r.status for r in results] == ["ok"] * 4
    monkeypatch.setenv("STUB_MANGLE", "1")
    cfg = make_config(tmp_path, preflight="true", seeds=[2], datasets=["cmc"])
    with pytest.raises(ValueError, match="data.env.init_args.dataset resolves to None, not 'cmc'"):
        benchmark.run_benchmark(cfg, stub["cmd"], show_progress=False, poll_s=0.02, report=False)
    assert len(stub["calls"]()) == 4  # nothing ran after the failed preflight


def _base_and_overlays(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "model:\n  class_path: modules.etpo.ETPOModule\n"
        "data:\n  env:\n    class_path: envs.datascience.DataScienceEnv\n"
        "    init_args: {dataset: breast_w, max_steps: 5, reflection: true, split_seed: 0}\n")
    (tmp_path / "one_step.yaml").write_text("data:\n  env:\n    init_args: {max_steps: 1, reflection: false}\n")
    (tmp_path / "toy_env.yaml").write_text("data:\n  env:\n    class_path: envs.toy.TargetCharsEnv\n"
                                           "    init_args: {target_chars: ab}\n")
    (tmp_path / "ppo.yaml").write_text("model:\n  class_path: modules.ppo_kl.PPOKLModule\n")


def test_contenders_compose_the_base_and_their_overlay(tmp_path):
    _base_and_overlays(tmp_path)
    cfg = make_config(tmp_path, base=str(tmp_path / "base.yaml"),
                      contenders={"etpo": None, "ppo_kl": {"config": str(tmp_path / "ppo.yaml"),
                                                           "overrides": ["--model.init_args.ppo_epochs=2"]}})
    etpo, ppo = cfg.contenders
    assert etpo.config is None and cfg.config_files(etpo) == [str(tmp_path / "base.yaml")]
    cmd = benchmark.build_command(cfg, ppo, "cmc", 3, "out/runs/ppo_kl/cmc/seed3", fit_cmd=["FIT"])
    assert cmd == ["FIT", "--config", str(tmp_path / "base.yaml"), "--config", str(tmp_path / "ppo.yaml"),
                   "--run_dir", "out/runs/ppo_kl/cmc/seed3", "--data.env.init_args.dataset=cmc",
                   "--data.env.init_args.split_seed=3", "--data.seed=3", "--data.budget=32", "--seed_everything=3",
                   "--trainer.accelerator=cpu", "--model.init_args.ppo_epochs=2"]
    assert benchmark.build_command(cfg, etpo, "cmc", 3, "d", fit_cmd=["FIT"])[:4] == \
        ["FIT", "--config", str(tmp_path / "base.yaml"), "--run_dir"]
    # run naming and order do not depend on how a contender's config is composed
    assert [s.name for s in benchmark.plan(cfg, ["FIT"])][:2] == ["etpo/breast_w/seed0", "ppo_kl/breast_w/seed0"]
    assert benchmark.plan(cfg, ["FIT"])[1].run_dir == cfg.runs_dir / "ppo_kl" / "breast_w" / "seed0"
    with pytest.raises(ValueError, match="no config, and no base"):
        make_config(tmp_path, contenders={"etpo": None})


def test_env_override_file_composes_base_and_overlay(tmp_path, stub, monkeypatch):
    monkeypatch.setenv("STUB_WRITE_CONFIG", "1")
    _base_and_overlays(tmp_path)
    cfg = make_config(tmp_path, base=str(tmp_path / "base.yaml"), env_override="file", seeds=[4], datasets=["pc1"],
                      contenders={"one_step": str(tmp_path / "one_step.yaml"), "toy": str(tmp_path / "toy_env.yaml")})
    results = benchmark.run_benchmark(cfg, stub["cmd"], show_progress=False, poll_s=0.02, report=False)
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    import yaml

    def env_of(name):
        return yaml.safe_load((cfg.runs_dir / name / "pc1" / "seed4" / "benchmark_env.yaml").read_text())["data"]["env"]

    assert env_of("one_step") == {"class_path": "envs.datascience.DataScienceEnv",  # base + overlay, merged
                                  "init_args": {"dataset": "pc1", "max_steps": 1, "reflection": False,
                                                "split_seed": 4}}
    assert env_of("toy") == {"class_path": "envs.toy.TargetCharsEnv",  # a new class_path starts afresh
                             "init_args": {"target_chars": "ab", "dataset": "pc1", "split_seed": 4}}
    one_step_call = next(c for c in stub["calls"]() if str(tmp_path / "one_step.yaml") in c)
    configs = [one_step_call[i + 1] for i, a in enumerate(one_step_call) if a == "--config"]
    assert configs == [str(tmp_path / "base.yaml"), str(tmp_path / "one_step.yaml"),
                       str(cfg.runs_dir / "one_step" / "pc1" / "seed4" / "benchmark_env.yaml")]
    # the settings check compares the env the file will hold with the run's: current now, stale after an edit
    assert [(s.state, s.stale) for s in benchmark.plan(cfg, stub["cmd"])] == [("finished", [])] * 2
    (tmp_path / "toy_env.yaml").write_text("data:\n  env:\n    class_path: envs.toy.TargetCharsEnv\n"
                                           "    init_args: {target_chars: abc}\n")
    assert [s.stale for s in benchmark.plan(cfg, stub["cmd"])] == \
        [[], ["data.env.init_args.target_chars: the run has 'ab', the command asks 'abc'"]]


def test_a_missing_base_is_reported_before_anything_runs(tmp_path, stub):
    cfg = make_config(tmp_path, base=str(tmp_path / "nowhere.yaml"))
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        benchmark.run_benchmark(cfg, stub["cmd"], show_progress=False, poll_s=0.02, report=False)
    assert stub["calls"]() == []


def test_report_options_reach_write_report(tmp_path, monkeypatch):
    """The config's report section (n_boot and last_fraction included) is passed to etpo.report.write_report;
    an unknown key is refused."""
    import etpo.report

    seen = {}

    def fake_write_report(folder, out, **kw):
        seen.update(kw)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "table.md").write_text("table\n")
        return {"table.md": Path(out) / "table.md"}

    monkeypatch.setattr(etpo.report, "write_report", fake_write_report)
    cfg = make_config(tmp_path, report={"n_boot": 500, "last_fraction": 0.5, "band": "se"})
    benchmark.write_benchmark_report(cfg)
    assert seen["n_boot"] == 500 and seen["last_fraction"] == 0.5 and seen["within"] is None and seen["band"] == "se"
    assert make_config(tmp_path).report["n_boot"] == 10000 and make_config(tmp_path).report["band"] == "std"
    with pytest.raises(ValueError, match="n_boot"):
        make_config(tmp_path, report={"n_bootstrap": 5})
    with pytest.raises(ValueError, match="report.band is 'sem'"):
        make_config(tmp_path, report={"band": "sem"})



def test_runs_made_with_other_settings_are_stale(tmp_path, stub, monkeypatch, capsys):
    """A finished run whose saved config no longer matches what the sweep asks for stops the sweep before anything
    runs (naming the run and the setting); --stale keep counts it, --stale rerun moves it aside (stale.json, not
    counted by etpo.report) and runs it afresh."""
    from etpo.report.runs import load_runs

    monkeypatch.setenv("STUB_WRITE_CONFIG", "1")
    cfg = make_config(tmp_path, datasets=["breast_w"])
    run = dict(show_progress=False, poll_s=0.02, report=False)
    assert [r.status for r in benchmark.run_benchmark(cfg, stub["cmd"], **run)] == ["ok"] * 4
    assert all(s.stale == [] and s.state == "finished" for s in benchmark.plan(cfg, stub["cmd"]))

    # the etpo contender's overlay now asks for 3 attempts per episode
    (tmp_path / "b.yaml").write_text("data:\n  env:\n    class_path: envs.datascience.DataScienceEnv\n"
                                     "    init_args: {dataset: breast_w, max_steps: 3, split_seed: 0}\n")
    specs = benchmark.plan(cfg, stub["cmd"])
    assert {s.name: s.stale for s in specs} == {
        f"{c}/breast_w/seed{k}": ([] if c == "reflection" else
                                  ["data.env.init_args.max_steps: the run has 5, the command asks 3"])
        for c in ("reflection", "etpo") for k in (0, 1)}
    with pytest.raises(ValueError, match=r"(?s)2 run\(s\).*etpo/breast_w/seed0.*max_steps.*--stale rerun"):
        benchmark.run_benchmark(cfg, stub["cmd"], **run)
    assert len(stub["calls"]()) == 4  # nothing ran
    bench_yaml = tmp_path / "bench.yaml"
    import yaml
    bench_yaml.write_text(yaml.safe_dump({"out": cfg.out, "budget": 32, "seeds": 2, "datasets": ["breast_w"],
                                          "contenders": {"etpo": str(tmp_path / "b.yaml")}}))
    fit = " ".join(stub["cmd"])
    assert benchmark.main(["--config", str(bench_yaml), "--fit_cmd", fit, "--no_progress"]) == 2
    assert "--stale rerun" in capsys.readouterr().err

    kept = benchmark.run_benchmark(cfg, stub["cmd"], stale="keep", **run)
    assert [r.status for r in kept] == ["skipped"] * 4 and len(stub["calls"]()) == 4

    rerun = benchmark.run_benchmark(cfg, stub["cmd"], stale="rerun", **run)
    assert {r.name: r.status for r in rerun} == {"reflection/breast_w/seed0": "skipped", "etpo/breast_w/seed0": "ok",
                                                 "reflection/breast_w/seed1": "skipped", "etpo/breast_w/seed1": "ok"}
    assert len(stub["calls"]()) == 6 and not any("--ckpt_path" in c for c in stub["calls"]()[4:])
    set_aside = sorted((Path(cfg.out) / "stale" / "etpo" / "breast_w").iterdir())
    assert [p.name.split("-")[0] for p in set_aside] == ["seed0", "seed1"]
    note = json.loads((set_aside[0] / "stale.json").read_text())
    assert note["differences"] == ["data.env.init_args.max_steps: the run has 5, the command asks 3"]
    assert note["moved_from"] == str(cfg.runs_dir / "etpo" / "breast_w" / "seed0")
    assert (set_aside[0] / "summary.json").exists()  # nothing of the old run is lost
    assert all(s.stale == [] for s in benchmark.plan(cfg, stub["cmd"]))  # the fresh runs are current
    assert len(load_runs(cfg.out)) == 4  # the report counts the fresh runs, not the ones set aside
    assert "not counting 2 run(s) set aside as stale" in capsys.readouterr().err
