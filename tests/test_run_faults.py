"""A run directory that survives kills and full disks (etpo/run_files.py, etpo.fit): a log line torn by a kill, a
damaged checkpoint, a disk that fills up mid-run and a refused run, each on a real toy run (about a second each)
that resumes to exactly the uninterrupted run, or stops with one line and leaves everything as it was."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from test_fit import TOY, _state

STEPS = 8  # the toy run: 4 rollout batches, a critic and a policy step each


def _fit(run_dir: Path, *extra: str):
    from etpo.fit import main

    return main(["--config", TOY, "--run_dir", str(run_dir), *extra])


def _resume(run_dir: Path):
    return _fit(run_dir, "--ckpt_path", "last")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _listing(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``run_dir`` with its size and modification time: what a refused run must leave alone."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted toy run: its summary, logs and final state, and a copy of its directory."""
    run = tmp_path_factory.mktemp("reference") / "run"
    _fit(run)
    return {"dir": run, "summary": json.loads((run / "summary.json").read_text()),
            "history": _jsonl(run / "history.jsonl"), "samples": _jsonl(run / "samples.jsonl"), "state": _state(run)}


def _assert_same_as(reference: dict, run: Path) -> None:
    """The resumed run ended where the uninterrupted one did: rewards, logs (no batch twice, none missing) and
    weights."""
    got = json.loads((run / "summary.json").read_text())
    want = reference["summary"]
    assert got["finished"] is True and got["env_steps"] == want["env_steps"]
    for key in ("batch_avg_reward", "best_reward", "best_within", "batch_max_reward"):
        assert got[key] == want[key], key
    history = _jsonl(run / "history.jsonl")
    assert [h["batch"] for h in history] == [1, 2, 3, 4]
    assert [h["avg_reward"] for h in history] == [h["avg_reward"] for h in reference["history"]]
    assert _jsonl(run / "samples.jsonl") == reference["samples"]
    state = _state(run)
    assert state["global_step"] == reference["state"]["global_step"] == STEPS
    for key, value in reference["state"]["state_dict"].items():
        torch.testing.assert_close(state["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)


def _killed_after_batch_2(run: Path) -> None:
    """Turn a finished toy run into the run as a kill after its second batch's checkpoint left it: that checkpoint
    (best-step=4.ckpt, written in the same step) as last.ckpt, and the logs of the first two batches."""
    best = run / "checkpoints" / "best-step=4.ckpt"
    assert torch.load(best, weights_only=False)["global_step"] == 4  # the toy run's best is older than its end
    shutil.copyfile(best, run / "checkpoints" / "last.ckpt")
    for name in ("history.jsonl", "samples.jsonl"):
        lines = (run / name).read_text().splitlines(keepends=True)
        (run / name).write_text("".join(ln for ln in lines if json.loads(ln)["batch"] <= 2))


# ----------------------------------------------------------------------------- a kill tears a log line


@pytest.mark.parametrize("torn", ["history.jsonl", "samples.jsonl"])
def test_a_log_line_torn_by_a_kill_is_dropped_and_written_again(tmp_path, capsys, reference, torn):
    """Killed while appending batch 3 to history.jsonl (or to samples.jsonl, history's line already written): the
    resume drops the torn line with one notice, runs batch 3 again and ends as the uninterrupted run."""
    run = tmp_path / "run"
    _fit(run)
    _killed_after_batch_2(run)
    batch3 = [json.dumps(h) for h in reference["history"] if h["batch"] == 3]
    samples3 = [json.dumps(s) for s in reference["samples"] if s["batch"] == 3]
    with open(run / "history.jsonl", "a") as fh:
        fh.write(batch3[0][:40] if torn == "history.jsonl" else batch3[0] + "\n")
    if torn == "samples.jsonl":
        with open(run / "samples.jsonl", "a") as fh:
            fh.write("".join(s + "\n" for s in samples3[:2]) + samples3[2][:25])
    capsys.readouterr()
    _resume(run)
    err = capsys.readouterr().err
    notices = [ln for ln in err.splitlines() if "dropped" in ln]
    line = 3 if torn == "history.jsonl" else sum(s["batch"] <= 2 for s in reference["samples"]) + 3
    assert notices == [f"etpo.fit: {run / torn}: dropped its last line (line {line}), cut short by a write that did "
                       "not finish; the resumed run writes its batch again"], err
    assert "Traceback" not in err
    _assert_same_as(reference, run)


# ----------------------------------------------------------------------------- a damaged checkpoint


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_last_checkpoint_resumes_from_the_newest_intact_one(tmp_path, capsys, reference, damage):
    """last.ckpt cut short or empty (a kill or a full disk under the old writer): named with what is wrong, then the
    run resumes from best-step=4.ckpt, older, with a notice; the logs beyond it are trimmed and written again, and
    the run ends as the uninterrupted one."""
    run = tmp_path / "run"
    _fit(run)
    last = run / "checkpoints" / "last.ckpt"
    os.truncate(last, last.stat().st_size // 2 if damage == "truncated" else 0)
    lines = (run / "history.jsonl").read_text()
    (run / "history.jsonl").write_text(lines[:-30])  # and the kill tore the last history line too
    capsys.readouterr()
    _resume(run)
    err = capsys.readouterr().err
    problem = "is empty (0 bytes)" if damage == "empty" else "is cut short ("
    assert f"etpo.fit: {last} {problem}" in err, err
    assert f"etpo.fit: resuming from {run / 'checkpoints' / 'best-step=4.ckpt'} (step 4), the newest intact" in err
    assert "Traceback" not in err
    _assert_same_as(reference, run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-step=4.ckpt", "last.ckpt"]


def test_no_intact_checkpoint_says_how_to_start_afresh_and_leaves_the_run_as_it_was(tmp_path, capsys, reference):
    """Every checkpoint damaged: one line naming each and how to start afresh; no traceback, nothing written (no
    TensorBoard events file, no config.yaml rewritten)."""
    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    for ckpt in (run / "checkpoints").iterdir():
        os.truncate(ckpt, 1000)
    before = _listing(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        _resume(run)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("etpo.fit:")]
    assert len(lines) == 1 and lines[0].startswith(f"etpo.fit: error: cannot resume {run}:"), err
    for name in ("last.ckpt", "best-step=4.ckpt"):
        assert f"{run / 'checkpoints' / name} is cut short (1.0 kB, no end of archive)" in lines[0]
    assert "no intact checkpoint is left" in lines[0] and "--run_dir NEW_DIR" in lines[0]
    assert _listing(run) == before


def test_a_run_refused_for_its_checkpoints_leaves_its_directory_as_it_was(capsys, reference):
    before = _listing(reference["dir"])
    with pytest.raises(SystemExit) as info:
        _fit(reference["dir"])
    assert info.value.code == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert _listing(reference["dir"]) == before


@pytest.mark.skipif(sys.platform == "win32", reason="run locks use fcntl.flock (POSIX)")
def test_a_run_directory_in_use_by_another_run_is_refused_untouched(tmp_path, capsys, reference):
    """A second process resuming a run directory while another runs it (a hand-started resume beside a sweep) would
    interleave history lines and overwrite checkpoints: refused in one line naming the holder, nothing written. The
    lock is taken here in this process, as another process's would be (a second open file description)."""
    from etpo import run_lock

    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    fd, holder = run_lock.try_lock(run)
    assert fd is not None and holder == ""
    before = _listing(run)
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as info:
            _resume(run)
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("etpo.fit:")]
    assert len(lines) == 1 and f"run directory {run} is in use by another run (pid {os.getpid()} since" in lines[0], err
    assert _listing(run) == before
    # once the other run has ended the same command resumes it (the lock was let go with its descriptor)
    assert _resume(run) is not None
    fd, holder = run_lock.try_lock(run)  # and this run let go of it when it ended
    assert fd is not None
    os.close(fd)


# ----------------------------------------------------------------------------- a full disk


class _FullDisk:
    """os.write as on a disk that fills up while ``name`` gets its ``nth`` write in the run directory: that write
    takes half its bytes, and every later write there fails with ENOSPC (as write(2) does) until ``freed``."""

    def __init__(self, run: Path, name: str, nth: int):
        self.run, self.name, self.nth = str(run), name, nth
        self.seen, self.full = 0, False
        self.real = os.write

    def __call__(self, fd: int, data) -> int:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return self.real(fd, data)
        if not path.startswith(self.run):
            return self.real(fd, data)
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.name in Path(path).name:
            self.seen += 1
            if self.seen == self.nth:
                self.full = True
                return self.real(fd, bytes(data)[: len(data) // 2])
        return self.real(fd, data)


@pytest.mark.parametrize("name, nth, kept", [("best-step=4.ckpt", 1, 2), ("samples.jsonl", 3, 4)],
                         ids=["checkpoint", "log"])
def test_a_full_disk_stops_the_run_with_one_line_and_it_resumes_once_space_is_freed(
        tmp_path, capsys, monkeypatch, reference, name, nth, kept):
    """The disk fills while best-step=4.ckpt is written (or batch 3's samples are appended): the run stops with one
    line naming the file, the space it needed and the checkpoint kept; no half-written checkpoint under its name, no
    torn log line, no traceback; once space is freed, --ckpt_path last ends as the uninterrupted run."""
    run = tmp_path / "run"
    disk = _FullDisk(run, name, nth)
    monkeypatch.setattr(os, "write", disk)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        _fit(run)
    err = capsys.readouterr().err
    assert disk.full and info.value.code == 74 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    target = run / "checkpoints" / name if name.endswith(".ckpt") else run / name
    action = "writing" if name.endswith(".ckpt") else "appending to"
    assert len(lines) == 1 and lines[0].startswith(
        f"etpo.fit: error: {action} {target} failed: No space left on device (it needed "), err
    assert f"keeping {run / 'checkpoints' / 'last.ckpt'} (step {kept}) and its logs. Free some space" in lines[0]
    assert f"--run_dir {run} --ckpt_path last" in err
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best-step=2.ckpt" if kept == 2 else "best-step=4.ckpt", "last.ckpt"]  # no partial file
    assert _state(run)["global_step"] == kept
    for log in ("history.jsonl", "samples.jsonl"):
        _jsonl(run / log)  # every line whole
    monkeypatch.setattr(os, "write", disk.real)  # space is freed
    _resume(run)
    _assert_same_as(reference, run)
