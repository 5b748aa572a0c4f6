"""Exploration only (not committed): second attempts after a success under alternative feedback phrasings."""
import sys, json
from pathlib import Path
REPO = Path(__file__).resolve().parents[3]  # this file lies in docs/results/reflection_layout
sys.path.insert(0, str(REPO))
import etpo  # noqa
import envs.datascience.prompts as P

VARIANTS = {
 "v1": ("# build_model above ran: mean validation ROC AUC {auc:.4f}.\n"
        "# Write build_model again with another classifier or other settings, to get a higher ROC AUC.\n"),
 "v2": "# build_model above ran: mean validation ROC AUC {auc:.4f}. Improve it: change the classifier or its settings.\n",
 "v3": "# Validation ROC AUC of build_model above: {auc:.4f}. Write a better one.\n",
}
name = sys.argv[1]
orig = P.task_first_prompt
def patched(task, previous_code, previous_answer, error=None, auc=None):
    if auc is None:
        return orig(task, previous_code, previous_answer, error, auc)
    body = P._previous_body(previous_code, previous_answer)
    return f"{task}{body}\n\n\n{VARIANTS[name].format(auc=auc)}{P.open_stub(task)}"
P.task_first_prompt = patched
sys.argv = ["base_rate.py"] + sys.argv[2:]
import runpy
runpy.run_path(str(REPO / "tools" / "base_rate.py"), run_name="__main__")
