"""Headroom of a data-science task: how far the untrained model's answers sit below what scikit-learn can reach.

An RL run can only show learning *in the reward* where better answers than the untrained model's exist. For every
dataset this tool measures, on the environment's own 5 validation splits and through its own sandbox and scoring
(:meth:`envs.datascience.DataScienceEnv.evaluate`, exactly as a training run scores an answer):

* **reference pipelines** (:data:`REFERENCES`): ``build_model`` bodies a careful person would write -- the two
  classes of the few-shot examples as they are, scaled logistic regression, one-hot + scaled logistic regression,
  forests with more trees and larger leaves, histogram gradient boosting (default and slower), gradient boosting,
  scaled k-NN and SVC, naive Bayes;
* **the untrained model**: ``--n`` first attempts (default 64) of SmolLM2 with the quickstart's prompt and sampling,
  sampled and stepped by :func:`tools.base_rate.measure` (the call the rollout makes, the env's sandbox): its
  runnable rate, the AUC of its most common runnable answer (same code up to whitespace and comments), the mean
  AUC of its runnable answers and its best AUC within the ``n`` attempts.

The **gap** is the best reference's AUC minus the untrained best; a dataset has headroom when the gap is at least
``--min-gap`` (0.02) *and* the untrained model runs at least one attempt (RL needs successes to amplify).

Resumable: every dataset's result goes to ``<out-dir>/<dataset>.json`` as soon as it is measured and is reused on
the next run (``--force`` measures again); the samples of the untrained model go next to it
(``<dataset>_samples.jsonl``). The table is written from whatever is there::

    python tools/headroom.py --datasets all --table docs/results/headroom.md          # ~2-3 h on 2 cores
    python tools/headroom.py --datasets pharyngitis,cmc --references-only             # minutes
    python tools/headroom.py --table docs/results/headroom.md --table-only            # redraw the table

The reference AUCs are stochastic where the pipeline is (forests without ``random_state`` are given one here, so
they are not); the untrained numbers depend on ``--seed`` as :mod:`tools.base_rate` describes.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))
import etpo  # noqa: E402,F401  (before torch: idle OpenMP threads wait passively, see etpo/__init__.py)

import numpy as np  # noqa: E402

__all__ = ["REFERENCES", "Reference", "score_references", "untrained_summary", "normalise_code", "answer_label",
           "headroom_row", "table_markdown", "main"]

_spec = importlib.util.spec_from_file_location("_tool_base_rate", Path(__file__).with_name("base_rate.py"))
base_rate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base_rate)


def _body(*lines: str) -> str:
    """A ``build_model`` body as the model would write it: every line indented under the prompt's header."""
    return "\n" + "\n".join("    " + line for line in lines)


@dataclass(frozen=True)
class Reference:
    """A reference pipeline: a short name, what it is, and its ``build_model`` body."""

    name: str
    what: str
    body: str


_ONE_HOT = (
    "from sklearn.compose import ColumnTransformer",
    "from sklearn.linear_model import LogisticRegression",
    "from sklearn.pipeline import make_pipeline",
    "from sklearn.preprocessing import OneHotEncoder, StandardScaler",
    "few = [j for j in range(x_train.shape[1]) if len(np.unique(x_train[:, j])) <= 10]",
    "many = [j for j in range(x_train.shape[1]) if j not in few]",
    "prep = ColumnTransformer([('cat', OneHotEncoder(handle_unknown='ignore'), few), ('num', StandardScaler(), many)])",
    "clf = make_pipeline(prep, LogisticRegression(max_iter=2000))",
    "clf.fit(x_train, y_train)",
    "return clf",
)

def _tuned(imports: tuple[str, ...], make: str, grid: str) -> tuple[str, ...]:
    """A body that picks the settings of ``make`` (a format string over one grid point ``p``) by 3-fold
    cross-validated ROC AUC on the training split alone, then fits the winner on all of it (GridSearchCV is banned
    in this env, so the loop is written out; the validation split is never seen)."""
    return (*imports, "from sklearn.model_selection import cross_val_score",
            "scoring = 'roc_auc' if len(np.unique(y_train)) == 2 else 'roc_auc_ovo'",
            f"grid = {grid}",
            f"scores = [cross_val_score({make}, x_train, y_train, cv=3, scoring=scoring).mean() for p in grid]",
            "p = grid[int(np.argmax(scores))]",
            f"clf = {make}", "clf.fit(x_train, y_train)", "return clf")


#: the reference pipelines, in table order
REFERENCES: tuple[Reference, ...] = (
    Reference("rf", "RandomForestClassifier() (the few-shot example's class, as copied)", _body(
        "from sklearn.ensemble import RandomForestClassifier", "clf = RandomForestClassifier(random_state=0)",
        "clf.fit(x_train, y_train)", "return clf")),
    Reference("lr", "LogisticRegression() (the other example's class, as copied)", _body(
        "from sklearn.linear_model import LogisticRegression", "clf = LogisticRegression()",
        "clf.fit(x_train, y_train)", "return clf")),
    Reference("lr_scaled", "StandardScaler + LogisticRegression(max_iter=2000)", _body(
        "from sklearn.linear_model import LogisticRegression", "from sklearn.pipeline import make_pipeline",
        "from sklearn.preprocessing import StandardScaler",
        "clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))",
        "clf.fit(x_train, y_train)", "return clf")),
    Reference("lr_onehot", "one-hot columns with <= 10 values, scale the rest, LogisticRegression", _body(*_ONE_HOT)),
    Reference("rf_500_leaf3", "RandomForestClassifier(n_estimators=500, min_samples_leaf=3)", _body(
        "from sklearn.ensemble import RandomForestClassifier",
        "clf = RandomForestClassifier(n_estimators=500, min_samples_leaf=3, random_state=0)",
        "clf.fit(x_train, y_train)", "return clf")),
    Reference("rf_500_leaf10", "RandomForestClassifier(n_estimators=500, min_samples_leaf=10, max_features=0.5)",
              _body("from sklearn.ensemble import RandomForestClassifier",
                    "clf = RandomForestClassifier(n_estimators=500, min_samples_leaf=10, max_features=0.5, "
                    "random_state=0)", "clf.fit(x_train, y_train)", "return clf")),
    Reference("et_500", "ExtraTreesClassifier(n_estimators=500, min_samples_leaf=3)", _body(
        "from sklearn.ensemble import ExtraTreesClassifier",
        "clf = ExtraTreesClassifier(n_estimators=500, min_samples_leaf=3, random_state=0)",
        "clf.fit(x_train, y_train)", "return clf")),
    Reference("hgb", "HistGradientBoostingClassifier()", _body(
        "from sklearn.ensemble import HistGradientBoostingClassifier",
        "clf = HistGradientBoostingClassifier(random_state=0)", "clf.fit(x_train, y_train)", "return clf")),
    Reference("hgb_slow", "HistGradientBoostingClassifier(learning_rate=0.03, max_iter=300, max_leaf_nodes=8, "
                          "l2_regularization=1.0)", _body(
        "from sklearn.ensemble import HistGradientBoostingClassifier",
        "clf = HistGradientBoostingClassifier(learning_rate=0.03, max_iter=300, max_leaf_nodes=8, "
        "l2_regularization=1.0, random_state=0)", "clf.fit(x_train, y_train)", "return clf")),
    Reference("gb", "GradientBoostingClassifier()", _body(
        "from sklearn.ensemble import GradientBoostingClassifier",
        "clf = GradientBoostingClassifier(random_state=0)", "clf.fit(x_train, y_train)", "return clf")),
    Reference("knn_scaled", "StandardScaler + KNeighborsClassifier(n_neighbors=25, weights='distance')", _body(
        "from sklearn.neighbors import KNeighborsClassifier", "from sklearn.pipeline import make_pipeline",
        "from sklearn.preprocessing import StandardScaler",
        "clf = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=25, weights='distance'))",
        "clf.fit(x_train, y_train)", "return clf")),
    Reference("svc_scaled", "StandardScaler + SVC(probability=True)", _body(
        "from sklearn.pipeline import make_pipeline", "from sklearn.preprocessing import StandardScaler",
        "from sklearn.svm import SVC", "clf = make_pipeline(StandardScaler(), SVC(probability=True, random_state=0))",
        "clf.fit(x_train, y_train)", "return clf")),
    Reference("nb", "GaussianNB()", _body(
        "from sklearn.naive_bayes import GaussianNB", "clf = GaussianNB()", "clf.fit(x_train, y_train)",
        "return clf")),
    # tuned on the training split by inner 3-fold CV (slower: scored with --reference-timeout)
    Reference("rf_cv", "RandomForestClassifier(300 trees), min_samples_leaf in {1, 3, 10} x max_features in "
                       "{sqrt, 0.5} by inner CV", _body(*_tuned(
        ("from sklearn.ensemble import RandomForestClassifier",),
        "RandomForestClassifier(n_estimators=300, min_samples_leaf=p[0], max_features=p[1], random_state=0)",
        "[(1, 'sqrt'), (3, 'sqrt'), (10, 'sqrt'), (1, 0.5), (3, 0.5), (10, 0.5)]"))),
    Reference("hgb_cv", "HistGradientBoostingClassifier, learning_rate in {0.03, 0.1} x max_leaf_nodes in {8, 31} "
                        "x max_iter in {100, 300} by inner CV", _body(*_tuned(
        ("from sklearn.ensemble import HistGradientBoostingClassifier",),
        "HistGradientBoostingClassifier(learning_rate=p[0], max_leaf_nodes=p[1], max_iter=p[2], random_state=0)",
        "[(a, b, c) for a in (0.03, 0.1) for b in (8, 31) for c in (100, 300)]"))),
    Reference("lr_onehot_cv", "lr_onehot with C in {0.01, 0.1, 1, 10} by inner CV", _body(*_tuned(
        _ONE_HOT[:7],
        "make_pipeline(prep, LogisticRegression(C=p, max_iter=2000))", "[0.01, 0.1, 1.0, 10.0]"))),
)


# ------------------------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------------------------

def score_references(env, references: Sequence[Reference] = REFERENCES,
                     progress: Optional[Callable[[str], None]] = None) -> dict[str, dict]:
    """Each reference's ``build_model`` scored by ``env.evaluate`` (the env's splits, sandbox and AUC): ``{name:
    {"auc", "aucs", "status", "error", "seconds"}}`` (``auc`` None where it failed)."""
    out = {}
    for ref in references:
        t0 = time.monotonic()
        info = env.evaluate(ref.body)
        out[ref.name] = {"auc": info["auc"], "aucs": [float(a) for a in info["aucs"]], "status": info["status"],
                         "error": info["error"], "seconds": round(time.monotonic() - t0, 2)}
        if progress is not None:
            auc = "failed: " + str(info["error"]).splitlines()[-1] if info["auc"] is None else f"{info['auc']:.4f}"
            progress(f"  {ref.name:14s} {auc}")
    return out


_COMMENT = re.compile(r"#[^\n]*")


def normalise_code(code: str) -> str:
    """An answer's code up to layout: comments, blank lines and indentation dropped, runs of spaces collapsed."""
    lines = [" ".join(_COMMENT.sub("", line).split()) for line in code.splitlines()]
    return "\n".join(line for line in lines if line)


_CLASS = re.compile(r"\b([A-Z]\w*(?:Classifier|Regression|Regressor|NB|SVC|Boost\w*|Forest\w*))\s*\(([^()]*)\)")


def answer_label(code: str) -> str:
    """A short name of an answer: the estimator classes it calls with their arguments, e.g.
    ``RandomForestClassifier()`` or ``make_pipeline(StandardScaler(), LogisticRegression(C=0.5))`` -> the classes."""
    found = [f"{m.group(1)}({' '.join(m.group(2).split())})" for m in _CLASS.finditer(code or "")]
    return " + ".join(dict.fromkeys(found)) or "(other)"


def untrained_summary(records: Sequence[dict]) -> dict:
    """What the untrained model's first attempts reach: runnable rate, the most common runnable answer and its mean
    AUC, the mean AUC of runnable answers, the best AUC within the attempts (with its code)."""
    rows = [r for r in records if r.get("attempt", 1) == 1]
    ran = [r for r in rows if r["status"] == "ok"]
    out = {"n": len(rows), "runnable": len(ran), "rate": len(ran) / len(rows) if rows else None,
           "mean_auc_runnable": None, "best_auc": None, "best_code": None, "most_common": None, "answers": []}
    if not ran:
        return out
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for r in ran:
        groups[normalise_code(r["code"] or r["text"])].append(r)
    ranked = sorted(groups.values(), key=lambda g: (-len(g), -max(x["reward"] for x in g)))
    answers = [{"label": answer_label(g[0]["code"] or g[0]["text"]), "count": len(g),
                "mean_auc": float(np.mean([x["reward"] for x in g])), "max_auc": float(max(x["reward"] for x in g)),
                "code": g[0]["code"]} for g in ranked]
    best = max(ran, key=lambda r: r["reward"])
    out.update(mean_auc_runnable=float(np.mean([r["reward"] for r in ran])), best_auc=float(best["reward"]),
               best_code=best["code"], most_common=answers[0], answers=answers[:8])
    return out


def headroom_row(result: dict, min_gap: float = 0.02) -> dict:
    """One table row from a dataset's result: best reference, gap to the untrained best, headroom verdict."""
    refs = {k: v["auc"] for k, v in (result.get("references") or {}).items() if v.get("auc") is not None}
    best_ref = max(refs, key=refs.get) if refs else None
    untrained = result.get("untrained")
    best_untrained = untrained.get("best_auc") if untrained else None
    gap = None if best_ref is None or best_untrained is None else refs[best_ref] - best_untrained
    runs = bool(untrained and untrained.get("runnable"))
    if result.get("unavailable"):
        verdict = "no data"
    elif untrained is None:
        verdict = "not measured"
    elif not runs:
        verdict = "no runnable attempt"
    else:
        verdict = "yes" if gap is not None and gap >= min_gap else "no"
    return {"dataset": result["dataset"], "best_reference": best_ref,
            "best_reference_auc": refs.get(best_ref) if best_ref else None, "untrained_best": best_untrained,
            "gap": gap, "headroom": verdict, "references": refs}


def _f(x: Optional[float], digits: int = 3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def table_markdown(results: Sequence[dict], min_gap: float = 0.02) -> str:
    """The headroom table (one row per dataset) and the reference AUCs (one column per pipeline)."""
    lines = ["| dataset | rows x features, classes | untrained runnable | most common runnable answer (count): AUC | "
             "untrained mean AUC of runnable | untrained best | best reference: AUC | gap | headroom |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        row = headroom_row(res, min_gap)
        shape = res.get("shape") or {}
        size = f"{shape.get('rows', '')} x {shape.get('features', '')}, {shape.get('classes', '')}" if shape else ""
        u = res.get("untrained")
        if res.get("unavailable"):
            lines.append(f"| {res['dataset']} | `{res['unavailable']}` | | | | | | | no data |")  # <data dir> shown
            continue
        runnable = f"{u['runnable']}/{u['n']}" if u else "not measured"
        common = (f"`{u['most_common']['label']}` ({u['most_common']['count']}): {_f(u['most_common']['mean_auc'])}"
                  if u and u.get("most_common") else "")
        best_ref = f"{row['best_reference']}: {_f(row['best_reference_auc'])}" if row["best_reference"] else ""
        lines.append(f"| {res['dataset']} | {size} | {runnable} | {common} | {_f(u and u.get('mean_auc_runnable'))} | "
                     f"{_f(row['untrained_best'])} | {best_ref} | {_f(row['gap'])} | {row['headroom']} |")
    names = [r.name for r in REFERENCES]
    lines += ["", "Reference pipelines, mean ROC AUC over the env's 5 splits (blank: failed or not run):", "",
              "| dataset | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for res in results:
        if res.get("unavailable"):
            continue
        refs = res.get("references") or {}
        best = max((v["auc"] for v in refs.values() if v.get("auc") is not None), default=None)
        cells = []
        for name in names:
            auc = (refs.get(name) or {}).get("auc")
            cells.append("" if auc is None else (f"**{auc:.3f}**" if auc == best else f"{auc:.3f}"))
        lines.append(f"| {res['dataset']} | " + " | ".join(cells) + " |")
    lines += ["", "Pipelines: " + "; ".join(f"`{r.name}` {r.what}" for r in REFERENCES) + "."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="all", help="comma-separated load_dataset names, or 'all' (default)")
    p.add_argument("--data-dir", default=None, help="where benchmark tables live (default: ETPO_DATA_DIR / ../shared)")
    p.add_argument("--n", type=int, default=64, help="untrained first attempts per dataset (default: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-style", default="few_shot")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per evaluation (default: 20, the quickstart's)")
    p.add_argument("--reference-timeout", type=float, default=300.0,
                   help="seconds per evaluation of a reference pipeline (default: 300; the tuned ones cross-validate)")
    p.add_argument("--references-only", action="store_true", help="skip the untrained model")
    p.add_argument("--out-dir", default=str(REPO / "runs" / "headroom"), help="per-dataset results (resumable)")
    p.add_argument("--table", default=None, help="write the markdown table here")
    p.add_argument("--table-only", action="store_true", help="measure nothing; write the table from --out-dir")
    p.add_argument("--min-gap", type=float, default=0.02, help="gap that counts as headroom (default: 0.02)")
    p.add_argument("--force", action="store_true", help="measure again datasets already in --out-dir")
    p.add_argument("--samples", action="append", default=[], metavar="NAME=FILE",
                   help="summarise the untrained model from an earlier tools/base_rate.py samples file (JSONL, .gz "
                        "too) of dataset NAME instead of sampling anew; its task prompt must be today's (checked)")
    p.add_argument("--source", default="smollm2", help="BackboneConfig.source (default: smollm2; tests: tiny)")
    p.add_argument("--gguf-cache-dir", default=str(REPO / "runs" / ".model_cache"))
    return p


def _read_samples(path: str, prompt: str, n: int) -> list[dict]:
    """The first ``n`` first attempts of an earlier samples file, after checking they were drawn from ``prompt``."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    firsts = [r for r in records if r.get("attempt", 1) == 1][:n]
    digest = base_rate.prompt_digest(prompt)
    if not firsts or any(r.get("prompt_sha256") != digest for r in firsts):
        raise SystemExit(f"--samples {path}: its first attempts were not sampled from today's task prompt "
                         f"(sha256 {digest}); sample anew instead")
    return firsts


def _datasets(spec: str) -> list[str]:
    from envs.datascience.datasets import dataset_names

    names = list(dataset_names()) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    return names


def main(argv: Sequence[str] | None = None, backbone=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _datasets(args.datasets)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    results = []
    agent = None
    if not args.table_only:
        from datamodules.batch import GenerationConfig
        from envs.datascience import DataScienceEnv
        from envs.datascience.datasets import DatasetNotFoundError, data_directories
        from envs.machine_paths import MachinePaths

        machine = MachinePaths(checkouts=(REPO,), data_dirs=data_directories(args.data_dir))  # kept text names none
        reuse = dict(item.split("=", 1) for item in args.samples)
        generation = GenerationConfig(max_new_tokens=128, temperature=0.5, top_k=50, top_p=1.0,
                                      stop_strings=list(base_rate.QUICKSTART_STOP_STRINGS))
        for name in names:
            path = out_dir / f"{name}.json"
            old = json.loads(path.read_text()) if path.is_file() and not args.force else None
            need_untrained = not args.references_only and (old is None or old.get("untrained") is None) \
                and not (old or {}).get("unavailable")
            missing_refs = old is not None and not old.get("unavailable") and \
                any(r.name not in (old.get("references") or {}) for r in REFERENCES)
            if old is not None and not need_untrained and not missing_refs:
                results.append(old)
                continue
            env_kwargs = dict(dataset=name, data_dir=args.data_dir, prompt_style=args.prompt_style, max_steps=1,
                              reflection=False, timeout=args.timeout, download=False)
            try:
                env = DataScienceEnv(**env_kwargs)
            except (DatasetNotFoundError, FileNotFoundError, ValueError) as err:
                why = " ".join(machine.portable_text(str(err)).split())[:160].rstrip()
                res = {"dataset": name, "unavailable": why}
                path.write_text(json.dumps(res, indent=1))
                say(f"{name}: not available ({res['unavailable']})")
                results.append(res)
                continue
            ds = env.dataset
            res = old or {"dataset": name, "shape": {"rows": ds.n_rows, "features": ds.n_features,
                                                     "classes": ds.n_classes}}
            todo = [r for r in REFERENCES if r.name not in (res.get("references") or {})]
            if todo:  # new reference pipelines are added to a stored result
                say(f"{name}: {ds.n_rows} rows x {ds.n_features} features, {ds.n_classes} classes: references")
                ref_env = DataScienceEnv(**{**env_kwargs, "timeout": args.reference_timeout})
                res["references"] = {**(res.get("references") or {}), **score_references(ref_env, todo, progress=say)}
                ref_env.close()
                path.write_text(json.dumps(res, indent=1))
            if need_untrained and name in reuse:
                records = _read_samples(reuse[name], env.prompt, args.n)
                res["untrained"] = untrained_summary(records)
                res["untrained"].update(seed=None, prompt_style=args.prompt_style,
                                        samples=machine.portable_text(reuse[name]))
                path.write_text(json.dumps(res, indent=1))
            elif need_untrained:
                if agent is None:
                    from modules.reflection import ReflectionModule
                    from modules.shared_base import BackboneConfig

                    backbone = backbone or BackboneConfig(source=args.source, device="cpu",
                                                          gguf_cache_dir=args.gguf_cache_dir)
                    agent = ReflectionModule(backbone)  # untrained: its policy view is the base model
                    agent.configure_model()
                t0 = time.monotonic()
                samples = out_dir / f"{name}_samples.jsonl"
                with open(samples, "w") as fh:
                    records = base_rate.measure(
                        agent.act, lambda: DataScienceEnv(**env_kwargs), generation, args.n, 8, args.seed,
                        on_record=lambda rec: fh.write(json.dumps(rec) + "\n"),
                        progress=lambda msg: say(f"  {name}: {msg}"))
                res["untrained"] = untrained_summary(records)
                res["untrained"].update(seed=args.seed, prompt_style=args.prompt_style, seconds=round(time.monotonic() - t0))
                path.write_text(json.dumps(res, indent=1))
            row = headroom_row(res, args.min_gap)
            say(f"{name}: best reference {row['best_reference']} {_f(row['best_reference_auc'])}, untrained best "
                f"{_f(row['untrained_best'])}, gap {_f(row['gap'])}: headroom {row['headroom']}")
            results.append(res)
            env.close()
    else:
        for name in names:
            path = out_dir / f"{name}.json"
            if path.is_file():
                results.append(json.loads(path.read_text()))
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(table_markdown(results, args.min_gap))
        say(f"table: {args.table}")
    return results


if __name__ == "__main__":
    main()
