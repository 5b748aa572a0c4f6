"""etpo.fit: runs that stop cleanly (real signals to real subprocesses), resuming after SIGKILL, the isolation in the
run's outputs, and config errors that say where."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO

TOY = str(REPO / "configs" / "toy.yaml")
HAS_BWRAP = shutil.which("bwrap") is not None


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("ETPO_SANDBOX", None)
    return env


def _start(run_dir: Path, *configs: Path, extra=()):
    cmd = [sys.executable, "-m", "etpo.fit", "--config", TOY, *[a for c in configs for a in ("--config", str(c))],
           "--run_dir", str(run_dir), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(predicate, proc, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the awaited moment:\n{err[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


def _processes_of(pid: int) -> list[str]:
    """Processes still alive that belong to run ``pid``: its session, or sandbox workers of its pool directories."""
    prefix = f"etpo-sandbox-{pid}-"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        if int(fields[3]) == pid or prefix in cmdline or prefix in cwd:  # fields[3]: session id
            found.append(f"{entry}: {cmdline[:200]}")
    return found


def _overlay(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("sig, phase", [(signal.SIGTERM, "update"), (signal.SIGINT, "rollout")])
def test_a_stop_signal_ends_the_run_within_seconds(tmp_path, sig, phase):
    """SIGTERM in a long update, Ctrl-C while generated code runs: out within 10 s, resumable, nothing left."""
    marker = tmp_path / "marker"
    if phase == "update":  # the second update takes two minutes of torch work unless interrupted
        model = f"""model:
  class_path: stop_helpers.SlowUpdateETPO
  init_args:
    marker: {marker}
    fast_updates: 1
    slow_seconds: 120
"""
        env_args = ""
    else:  # each environment's second step runs code that sleeps two minutes in the sandbox
        model = ""
        env_args = f"      honest_steps: 1\n      marker: {marker}\n"
    overlay = _overlay(tmp_path / "overlay.yaml", model + f"""data:
  env:
    class_path: stop_helpers.FixedCodeEnv
    init_args:
      dataset: breast_cancer
      n_splits: 1
      timeout: 150
      max_steps: 1
{env_args}  budget: 64
""")
    run = tmp_path / "run"
    proc = _start(run, overlay)
    _wait_for(marker.exists, proc)
    time.sleep(0.5)  # well inside the long update / the sandboxed sleep
    t0 = time.monotonic()
    os.kill(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the run did not stop within 30 s of the signal")
    elapsed = time.monotonic() - t0
    assert elapsed < 10.0, (elapsed, err[-2000:])
    assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
    name = signal.Signals(sig).name
    assert f"stopped by {name}" in err and "--ckpt_path last" in err and str(run) in err, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    # the last finished step's checkpoint loads
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    # ETPO takes a critic and a policy step per rollout batch
    assert ckpt["global_step"] >= 2 and ckpt["global_step"] == 2 * ckpt["agent"]["policy_version"]
    # no sandbox worker, no process of the run, no pool directory survives it
    assert _processes_of(proc.pid) == []
    assert not [d for d in os.listdir(tempfile.gettempdir()) if d.startswith(f"etpo-sandbox-{proc.pid}-")]
    # the isolation generated code ran under is in the run log, summary.json and TensorBoard
    summary = json.loads((run / "summary.json").read_text())
    expected = "isolated" if HAS_BWRAP else "rlimits"  # never silently the fallback where bubblewrap is installed
    assert summary["sandbox"]["isolation"] == expected and summary["finished"] is False, err[-4000:]
    assert f"sandbox: {expected}" in err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run)).Reload()
    assert any(tag.startswith("run/sandbox") for tag in acc.Tags()["tensors"]), acc.Tags()


def test_ctrl_c_while_environments_step_is_not_held_up_by_them():
    """TextVectorEnv waits for every environment before it raises an environment's error, but a KeyboardInterrupt
    (Ctrl-C, or a stopping run's interruption) in the waiting thread is raised at once."""
    import threading

    from envs import TextVectorEnv
    from envs.toy import TargetCharsEnv

    class Slow(TargetCharsEnv):
        def step(self, action):
            time.sleep(5)
            return super().step(action)

    vec = TextVectorEnv([Slow(), Slow()])
    vec.reset(seed=0)
    # Python's own Ctrl-C handler for the test's duration: a shell starts background jobs with SIGINT ignored
    # (`make test &`), and then no KeyboardInterrupt would come at all
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.5, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)).start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            vec.step(["ab", "ab"])
        assert time.monotonic() - t0 < 2.0
    finally:
        signal.signal(signal.SIGINT, previous)


def _state(path: Path) -> dict:
    return torch.load(path / "checkpoints" / "last.ckpt", weights_only=False)


def test_sigkill_mid_run_then_resume_gives_the_same_rewards(tmp_path):
    """A run killed with SIGKILL (no chance to clean up) resumes with --ckpt_path last to exactly the uninterrupted
    run: same rewards, history, weights and optimizer state."""
    from etpo.fit import main

    slow = _overlay(tmp_path / "slow.yaml", "model:\n  class_path: stop_helpers.SlowUpdateETPO\n  init_args:\n"
                    "    slow_seconds: 0.6\n    fast_updates: 0\ndata:\n  budget: 48\n")
    sys.path.insert(0, str(REPO / "tests"))
    try:  # the uninterrupted reference, in this process (same code path, no sleeping)
        main(["--config", TOY, "--config", str(slow), "--run_dir", str(tmp_path / "ref"),
              "--model.init_args.slow_seconds=0"])
    finally:
        sys.path.remove(str(REPO / "tests"))
    run = tmp_path / "run"
    proc = _start(run, slow)
    history = run / "history.jsonl"
    _wait_for(lambda: history.is_file() and len(history.read_text().splitlines()) >= 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] is False and summary["env_steps"] < 48
    sys.path.insert(0, str(REPO / "tests"))
    try:  # resumed in this process (a subprocess start costs more than the run): the kill above was real
        main(["--config", TOY, "--config", str(slow), "--run_dir", str(run), "--ckpt_path", "last",
              "--model.init_args.slow_seconds=0"])
    finally:
        sys.path.remove(str(REPO / "tests"))
    ref, got = json.loads((tmp_path / "ref" / "summary.json").read_text()), json.loads((run / "summary.json").read_text())
    assert got["finished"] is True and got["env_steps"] == ref["env_steps"] == 48
    assert got["batch_avg_reward"] == ref["batch_avg_reward"] and got["best_reward"] == ref["best_reward"]
    assert got["best_within"] == ref["best_within"]
    assert got["sandbox"]["isolation"] == "none"  # the toy environment runs no code
    lines = [json.loads(x) for x in history.read_text().splitlines()]
    assert [x["batch"] for x in lines] == list(range(1, 7))  # no batch twice, none missing
    assert [x["avg_reward"] for x in lines] == ref["batch_avg_reward"]
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    ref_samples = [json.loads(x) for x in (tmp_path / "ref" / "samples.jsonl").read_text().splitlines()]
    assert samples == ref_samples  # the batch redone after the kill is written once
    a, b = _state(tmp_path / "ref"), _state(run)
    assert a["global_step"] == b["global_step"] == 12  # 6 batches, a critic and a policy step each
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=1e-6, msg=k)
    assert len(a["optimizer_states"]) == len(b["optimizer_states"]) == 2
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        assert opt_a["state"]
        for k in opt_a["state"]:
            for name in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt_a["state"][k][name], opt_b["state"][k][name], rtol=0, atol=1e-6)


def test_a_sandbox_that_cannot_start_stops_the_run_before_it_begins(tmp_path, capsys, monkeypatch):
    """auto with bubblewrap installed but unusable is an error naming bubblewrap's reason, not a silent fallback."""
    import envs.isolation.modes as modes_mod
    import envs.isolation.view as view_mod

    monkeypatch.delenv("ETPO_SANDBOX", raising=False)
    monkeypatch.setattr(modes_mod.shutil, "which", lambda name: "/usr/bin/bwrap")
    monkeypatch.setattr(view_mod, "_BWRAP_PROBE", {"ok": False, "exe": "/usr/bin/bwrap",
                                                      "reason": "bwrap failed: setting up uid map: Permission denied"})
    line = _error_line(capsys, ["--config", TOY, "--run_dir", str(tmp_path / "r"),
                                "--data.env.class_path=envs.datascience.DataScienceEnv",
                                "--data.env.init_args.dataset=breast_cancer"])
    assert "bubblewrap is installed but cannot start" in line and "uid map: Permission denied" in line
    assert "ETPO_SANDBOX=rlimits" in line


# ----------------------------------------------------------------------------- config errors


def _error_line(capsys, args):
    from etpo.fit import main

    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("etpo.fit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "broken config.yaml"
    bad.write_text("model:\n  init_args:\n    beta: [0.05\n    gamma: 0.9\n")
    line = _error_line(capsys, ["--config", TOY, "--config", str(bad), "--run_dir", str(tmp_path / "r")])
    assert f"{bad}, line 4, column 10" in line and "YAML syntax error" in line and "line 3, column 11" in line


@pytest.mark.parametrize("overlay, args, key, suggestion, where", [
    ("model:\n  init_args:\n    polyak_rho_: 0.5\n", [], "polyak_rho_", None, "line 3"),
    ("data:\n  num_env: 3\n", [], "num_env", "num_envs", "line 2"),
    ("trainer:\n  max_epoch: 2\n", [], "max_epoch", "max_epochs", "line 2"),
    ("model:\n  init_args:\n    backbone:\n      lora_rr: 3\n", [], "lora_rr", "lora_r", "line 4"),
    ("data:\n  env:\n    init_args:\n      target_char: ab\n", [], "target_char", "target_chars", "line 4"),
    ("seed_evrything: 1\n", [], "seed_evrything", "seed_everything", "line 1"),
    ("", ["--model.init_args.gamm=0.5"], "gamm", "gamma", "command line"),
    ("", ["--data.generation.temperatur=1"], "temperatur", "temperature", "command line"),
    ("", ["--data.budge=3"], "budge", "budget", "command line"),  # a prefix is not silently taken for the option
])
def test_an_unknown_key_names_the_closest_valid_one(tmp_path, capsys, overlay, args, key, suggestion, where):
    extra = []
    if overlay:
        path = tmp_path / "overlay.yaml"
        path.write_text(overlay)
        extra = ["--config", str(path)]
    line = _error_line(capsys, ["--config", TOY, *extra, "--run_dir", str(tmp_path / "r"), *args])
    assert f"unknown key '{key}'" in line and where in line, line
    if suggestion:
        assert f"did you mean '{suggestion}'?" in line, line
    if overlay:
        assert str(tmp_path / "overlay.yaml") in line


def test_the_quickstart_shrunk_onto_a_tiny_model_runs_its_own_settings(tmp_path):
    """configs/quickstart.yaml as it is -- its ETPO options (Q = critic - reference, two critic steps, the answer
    trees with their memory and the forward policy step at beta 0.01), the data-science environment and the
    sandbox -- with only the model and the sizes shrunk."""
    from etpo.fit import main

    run = tmp_path / "run"
    main(["--config", str(REPO / "configs" / "quickstart.yaml"), "--run_dir", str(run),
          "--model.init_args.backbone.source=tiny", "--model.init_args.backbone.tiny_alphabet=abcdefgh ()=:.\n",
          "--model.init_args.backbone.device=cpu", "--model.init_args.backbone.lora_r=4",
          "--data.num_envs=2", "--data.budget=4", "--data.generation.max_new_tokens=8",
          "--data.env.init_args.n_splits=1", "--trainer.enable_progress_bar=false"])
    config = (run / "config.yaml").read_text()
    for setting in ("q_parameterisation: zero", "critic_steps: 2", "target_backup: optimal_tree",
                    "policy_target: optimal_tree", "answer_memory: 8", "policy_divergence: forward", "beta: 0.01",
                    "chunk_positions: 512", "reflection: false", "dataset: tic_tac_toe", "stop_on_success: false",
                    "max_steps: 5"):
        assert setting in config, setting
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] is True and summary["env_steps"] == 4 and summary["updates"] == 2
    assert 0.1 < summary["peak_rss_gb"] < 24  # the trainer's own peak memory (torch alone takes a few hundred MB)
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["reward"] == -1.0 and s["status"] != "ok" for s in samples)  # random text
    assert {s["answer_class"] for s in samples} == {"(no code)"}  # the env names each answer's class
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert [h["classes"] for h in history] == [{"(no code)": {"n": 2, "runnable": 0, "mean_reward": -1.0}}] * 2
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2 * 3  # per batch: two critic steps and one policy step
    assert (run / "reward_curve.png").is_file()
