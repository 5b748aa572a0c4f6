"""The isolated sandbox starts wherever the project, its virtual environment and the interpreter live.

Issue 13: a clone under /tmp had every worker fail ("bwrap: execvp <clone>/.venv/bin/python: No such file or
directory") because the worker's writable /tmp was mounted over the directory holding the venv. Here: the mount
plan as a pure function, then a real virtual environment in a temporary directory under /tmp whose path has
spaces and goes through a symlinked directory, with a symlinked python.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from envs.isolation import TaskFiles, mount_plan
from envs.isolation.view import _under

REPO = Path(__file__).resolve().parents[1]


def _binds(args):
    """(source, destination) of every --ro-bind / --bind, and the other operations by destination."""
    out, ops, i = [], {}, 0
    while i < len(args):
        a = args[i]
        if a in ("--ro-bind", "--bind", "--symlink"):
            out.append((a, args[i + 1], args[i + 2]))
            i += 3
        elif a in ("--dir", "--tmpfs", "--remount-ro", "--perms", "--chdir", "--dev", "--proc"):
            ops.setdefault(a, []).append(args[i + 1])
            i += 2
        else:
            i += 1
    return out, ops


def _fake_files(tmp_path, stdlib=None):
    site = tmp_path / "dir with spaces" / "venv" / "lib" / "site-packages"
    (site / "pkg" / "tests").mkdir(parents=True)
    (site / "pkg" / "__init__.py").write_text("")
    (site / "pkg" / "tests" / "data.csv").write_text("1,2\n")
    exe = Path(os.path.realpath(sys.executable))
    return TaskFiles(executable=str(exe), stdlib=stdlib or os.path.dirname(os.__file__), roots=(str(site / "pkg"),),
                     sys_path=(str(site),), libraries=(), failed=()), site


def test_scratch_never_shadows_a_needed_path(tmp_path):
    files, site = _fake_files(tmp_path)
    assert str(site).startswith("/tmp/")  # the situation of the bug: what the worker needs lies under /tmp
    scratch_host, empty = tmp_path / "scratch", tmp_path / "empty"
    scratch_host.mkdir(), empty.mkdir()
    plan = mount_plan(files, str(scratch_host), str(empty), None, hide=[str(site / "pkg" / "tests")])
    binds, ops = _binds(plan.args)
    needed = [dest for kind, src, dest in binds if kind == "--ro-bind" and src != str(empty) and src != "/dev/null"]
    assert str(site / "pkg") in needed
    assert plan.scratch != "/tmp" and not any(_under(n, plan.scratch) or _under(plan.scratch, n) for n in needed)
    assert ("--bind", str(scratch_host), plan.scratch) in binds
    # the path with spaces stays one argument, its parents are created traversable (0755) on the read-only root
    assert any(d == str(site) for d in ops["--dir"])
    # hidden: the test data, with an empty directory in its place
    assert ("--ro-bind", str(empty), str(site / "pkg" / "tests")) in binds
    assert ops["--remount-ro"][-1] == "/"  # the root tmpfs is made read-only last


def test_scratch_is_tmp_when_nothing_lives_there(tmp_path):
    files, _ = _fake_files(tmp_path)
    files = TaskFiles(files.executable, files.stdlib, (), (), (), ())
    if any(_under(p, "/tmp") for p in (files.executable, os.path.realpath(files.stdlib))):
        pytest.skip("this interpreter itself lives under /tmp")
    plan = mount_plan(files, str(tmp_path), str(tmp_path), None)
    assert plan.scratch == "/tmp"


def test_a_hidden_directory_holding_a_needed_package_becomes_a_read_only_tmpfs(tmp_path):
    files, site = _fake_files(tmp_path)
    scratch, empty = tmp_path / "s", tmp_path / "e"
    scratch.mkdir(), empty.mkdir()
    # a shown tree (venv/lib) holding a hidden directory (site-packages) that holds a needed package (pkg), as
    # with the system package directories under /usr and the standard library
    files2 = TaskFiles(files.executable, files.stdlib, (str(site.parent), str(site / "pkg")), (str(site),), (), ())
    plan = mount_plan(files2, str(scratch), str(empty), None, hide=[str(site)])
    binds, ops = _binds(plan.args)
    assert str(site) in ops["--tmpfs"] and str(site) in ops["--remount-ro"]
    order = [dest for _, _, dest in binds]
    assert order.index(str(site / "pkg")) > order.index(str(site.parent))


def test_a_symlinked_standard_library_is_shown_under_both_names(tmp_path):
    real = tmp_path / "real-lib"
    real.mkdir()
    link = tmp_path / "link-lib"
    link.symlink_to(real)
    files, _ = _fake_files(tmp_path, stdlib=str(link))
    plan = mount_plan(files, str(tmp_path), str(tmp_path), None)
    binds, _ = _binds(plan.args)
    assert ("--ro-bind", str(real), str(real)) in binds and ("--ro-bind", str(real), str(link)) in binds


def test_packages_in_the_base_interpreters_site_packages_are_shown(tmp_path):
    """A package found in <stdlib>/site-packages (a venv with --system-site-packages, a plain pyenv) is a root of its
    own: the standard library is shown whole but its site-packages is hidden, so it must be shown explicitly."""
    from envs.isolation import classify_probe

    stdlib = tmp_path / "py" / "lib" / "python3.x"
    (stdlib / "site-packages" / "basepkg").mkdir(parents=True)
    (stdlib / "lib-dynload").mkdir()
    for f in (stdlib / "os.py", stdlib / "lib-dynload" / "_x.so", stdlib / "site-packages" / "basepkg" / "__init__.py"):
        f.write_text("")
    info = {"stdlib": str(stdlib), "path": [str(stdlib), str(stdlib / "lib-dynload"), str(stdlib / "site-packages")],
            "files": [str(stdlib / "os.py"), str(stdlib / "lib-dynload" / "_x.so"),
                      str(stdlib / "site-packages" / "basepkg" / "__init__.py")], "maps": [], "failed": []}
    files = classify_probe(info, sys.executable)
    assert files.roots == (str(stdlib / "site-packages" / "basepkg"),)
    assert files.sys_path == (str(stdlib / "site-packages"),)
    scratch, empty = tmp_path / "s", tmp_path / "e"
    scratch.mkdir(), empty.mkdir()
    plan = mount_plan(files, str(scratch), str(empty), None)
    binds, ops = _binds(plan.args)
    assert str(stdlib / "site-packages") in ops["--tmpfs"]  # hidden, but holding what is needed
    assert ("--ro-bind", str(stdlib / "site-packages" / "basepkg"), str(stdlib / "site-packages" / "basepkg")) in binds


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link a package tree (a real copy where the filesystems differ)."""
    if src.is_file():
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        return

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link, symlinks=True)


SCRIPT = r"""
import json, os, sys
import numpy as np
from envs.datascience.evaluation import ModelSandbox
from sklearn.linear_model import LogisticRegression
import sklearn

p = ModelSandbox(n_workers=1, timeout=60, isolation="isolated")
ready = p.check()
rng = np.random.default_rng(0)
x = rng.normal(size=(80, 3)); y = (x[:, 0] > 0).astype(int)
code = '''def build_model(x_train, y_train):
    import os, sklearn
    from sklearn.linear_model import LogisticRegression
    open(os.path.join(os.environ["TMPDIR"], "scratch-works"), "w").write("x")
    print("SKLEARN", sklearn.__file__)
    try:
        from sklearn.datasets import load_breast_cancer
        load_breast_cancer()
        print("BUNDLED-VISIBLE")
    except Exception as e:
        print("bundled hidden", type(e).__name__)
    return LogisticRegression().fit(x_train, y_train)
'''
res = p.evaluate(code, x[:40], y[:40], x[40:], n_classes=2)
ref = LogisticRegression().fit(x[:40], y[:40]).predict_proba(x[40:])
print(json.dumps({"status": res.status, "error": res.error, "stdout": res.stdout, "isolation": res.isolation,
                  "pid_namespace": ready["pid_namespace"], "scratch": p._workers[0].plan.scratch,
                  "diff": float(np.abs(res.proba - ref).max()) if res.ok else None, "sklearn_here": sklearn.__file__,
                  "executable": sys.executable}))
p.close()
"""


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (`make test` installs it)")
def test_isolated_sandbox_starts_from_a_venv_under_tmp_with_spaces_and_symlinks(tmp_path):
    from envs.datascience.evaluation import MODEL_TASK
    from envs.isolation import task_files

    real = tmp_path / "a dir with spaces" / "real checkout"
    real.mkdir(parents=True)
    link = tmp_path / "a dir with spaces" / "linked checkout"
    link.symlink_to(real, target_is_directory=True)
    project = link  # the project is reached through the symlink, as a user's clone might be
    shutil.copytree(REPO / "envs", project / "envs", ignore=shutil.ignore_patterns("__pycache__"))
    base_python = os.path.realpath(sys.executable)
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(project / ".venv")], check=True, timeout=120)
    venv_python = project / ".venv" / "bin" / "python"
    assert venv_python.is_symlink()
    site = Path(subprocess.run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    site.mkdir(parents=True, exist_ok=True)
    roots = list(task_files(tuple(dict.fromkeys((*MODEL_TASK.preload, *MODEL_TASK.modules))), MODEL_TASK.runner).roots)
    # outside the sandbox joblib also imports its process backend (loky needs cloudpickle)
    import cloudpickle

    roots.append(os.path.dirname(cloudpickle.__file__))
    for root in roots:
        _link_tree(Path(root), site / Path(root).name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["ETPO_SANDBOX"] = "isolated"
    proc = subprocess.run([str(venv_python), "-c", SCRIPT], cwd=str(project), capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == "ok", out
    assert out["isolation"] == "isolated" and out["pid_namespace"] is True
    assert out["diff"] < 1e-9
    # the sandbox used the packages of that venv (through the resolved path), not ours
    assert f"SKLEARN {os.path.realpath(out['sklearn_here'])}" in out["stdout"]
    assert str(real) in out["stdout"] and "bundled hidden" in out["stdout"] and "BUNDLED-VISIBLE" not in out["stdout"]
    assert out["scratch"] != "/tmp"  # /tmp holds the venv here: the scratch directory went elsewhere
