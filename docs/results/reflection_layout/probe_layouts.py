"""Exploration only (not committed): alternative task-first layouts, second attempts on replayed first attempts."""
import sys
from pathlib import Path
REPO = Path(__file__).resolve().parents[3]  # this file lies in docs/results/reflection_layout
sys.path.insert(0, str(REPO))
import etpo  # noqa
import envs.datascience.prompts as P

name = sys.argv[1]
orig = P.task_first_prompt

def feedback(previous_code, error, auc):
    if auc is not None:
        return (f"# Result: build_model above ran; its mean validation ROC AUC is {auc:.4f}.\n"
                "# Write a better build_model: try another classifier, other settings or preprocessing.\n")
    what = "failed" if previous_code is not None else "is not a usable build_model function"
    hint = P.error_hint(error or "")
    return (f"# Error: build_model above {what}:\n{P._as_comment(error or '', max_lines=8)}\n"
            + (f"# Hint: {hint}\n" if hint else "") + "# Fix the problem and write build_model again.\n")

def header_of_task(task):
    # the task block: from the last module docstring (the task's "Dataset: ...") to the end
    at = task.rfind('"""Dataset:')
    return task[at:]

def patched(task, previous_code, previous_answer, error=None, auc=None):
    body = P._previous_body(previous_code, previous_answer)
    fb = feedback(previous_code, error, auc)
    if name == "B":  # previous attempt as comments
        shown = "\n".join("    # " + l.strip() if l.strip() else "" for l in body.strip("\n").splitlines())
        return f"{task}\n    # (an earlier answer, shown as comments)\n{shown}\n    pass\n\n\n{fb}{P.open_stub(task)}"
    if name == "D":  # as C, but a failed attempt's code is not shown (only its error)
        if auc is None:
            return f"{task}\n    pass\n\n\n{fb.replace('build_model above', 'the previous build_model')}\n\n{header_of_task(task)}"
        return f"{task}{body}\n\n\n{fb}\n\n{header_of_task(task)}"
    if name in ("E", "E2"):  # the raw answer (cut where a new block began), one feedback line, a bare header
        lines = []
        for line in (previous_answer or "").splitlines():
            if line.startswith(("def ", "class ", "if __name__")) or line.strip().startswith('"""'):
                break
            lines.append(line)
        while lines and not lines[-1].strip():
            lines.pop()
        raw = "\n".join(lines[:13])
        if auc is not None:
            fb = f"# build_model above ran: validation ROC AUC {auc:.4f}. A better build_model:\n"
        else:
            hint = P.error_hint(error or "")
            last = (error or "").strip().splitlines()[-1][:160] if error else ""
            fb = f"# build_model above failed: {last}\n" + (f"# Hint: {hint}\n" if hint else "") + "# A fixed build_model:\n"
        header = "def build_model(x_train: np.ndarray, y_train: np.ndarray):"
        if name == "E2":
            header += '\n    """Fit a scikit-learn classifier on x_train, y_train and return it."""'
        return f"{task}{raw}\n\n\n{fb}{header}"
    if name == "C":  # the whole task block again after the feedback
        return f"{task}{body}\n\n\n{fb}\n\n{header_of_task(task)}"
    raise SystemExit(name)

P.task_first_prompt = patched
sys.argv = ["base_rate.py"] + sys.argv[2:]
import runpy
runpy.run_path(str(REPO / "tools" / "base_rate.py"), run_name="__main__")
