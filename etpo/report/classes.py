"""What a run learns to write: answer classes per batch, and the views' readings where the classes part.

    python -m etpo.report.classes docs/results/learning_v3 --dataset balance_scale --out docs/results/soft_optimal

For every run ``<folder>/runs/<contender>/<dataset>/seed<k>``: the classes of its answers per batch (the estimator
the code builds; from ``history.jsonl``'s ``classes`` where the run recorded them, else parsed from its
``samples.jsonl(.gz)`` with :func:`envs.datascience.extract.answer_class`) and, where the answer-class probe ran
(:mod:`etpo.probe`), the readings at the token where the most frequent class and the best class part. Writes

* ``class_shares_<dataset>.png``: per contender, each class's share of the runnable answers and the failures' share,
  per batch, pooled over seeds -- a contender whose samples name more than one view (ETPO's ``reference_rows``)
  drawn once per view, its policy's rows apart from the reference's;
* ``choice_<dataset>.png``: per run with probe readings, pi_theta, pi_bar and pi* of the two sides' tokens at that
  parting, per batch;
* ``classes_<dataset>.md``: the shares as a table, and each run's classes in its last quarter.

``--arguments``: the same by configuration -- the class with its constructor's arguments as written
(:func:`envs.datascience.extract.answer_configuration`: ``RandomForestClassifier(max_samples=1000)`` apart from
``RandomForestClassifier()``), parsed from the samples, into ``class_shares_<dataset>_arguments.png`` and
``classes_<dataset>_arguments.md`` (no choice figure: the probe reads classes). For a dataset whose better answer
is an argument of the common class.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

__all__ = ["run_samples", "run_classes", "run_views", "pooled_shares", "choice_series", "write_class_report", "main"]

FAILED = "(failed)"


#: panels a row in the choice figure (one panel per run)
CHOICE_PANELS_PER_ROW = 5
#: panels a row in the class-share figure (one per contender, or per view of one)
CLASS_PANELS_PER_ROW = 5


def run_samples(run: Path) -> list[dict]:
    """A run directory's samples, from ``samples.jsonl`` or its kept, gzipped copy (empty when neither is there)."""
    for name, opener in (("samples.jsonl", open), ("samples.jsonl.gz", gzip.open)):
        path = run / name
        if path.is_file():
            with opener(path, "rt") as fh:
                return [json.loads(line) for line in fh if line.strip()]
    return []


def _history(run: Path) -> list[dict]:
    path = run / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _policy_first(views) -> list[str]:
    return sorted(set(views), key=lambda v: (v != "policy", v))


def run_views(run: Path) -> list[str]:
    """The views that sampled a run's answers (``"view"`` of its samples; a sample without one is the policy's),
    the policy first."""
    return _policy_first(str(s.get("view", "policy")) for s in run_samples(run))


def run_classes(run: Path, view: Optional[str] = None, arguments: bool = False) -> list[Counter]:
    """Per batch, a Counter of the run's answers by category: the class of an answer that ran, :data:`FAILED` for
    one that did not. ``view``: only the answers that view sampled (from the samples; one without a ``"view"`` is
    the policy's). ``arguments``: the class with its constructor's arguments (from the samples)."""
    history = [] if arguments else _history(run)
    if view is None and history and all("classes" in h for h in history):
        out = []
        for h in history:
            c = Counter()
            for name, entry in h["classes"].items():
                if entry["runnable"]:
                    c[name] += entry["runnable"]
                if entry["n"] - entry["runnable"]:
                    c[FAILED] += entry["n"] - entry["runnable"]
            out.append(c)
        return out
    from envs.datascience.extract import answer_class, answer_configuration, extract_function

    category = answer_configuration if arguments else answer_class
    per_batch: dict[int, Counter] = defaultdict(Counter)
    for s in run_samples(run):
        if view is not None and str(s.get("view", "policy")) != view:
            continue
        name = category(extract_function(s.get("text", "")).code) if s.get("status") == "ok" else FAILED
        per_batch[int(s["batch"])][name] += 1
    return [per_batch[b] for b in sorted(per_batch)]


def pooled_shares(runs: list[Path], view: Optional[str] = None,
                  arguments: bool = False) -> tuple[list[str], list[dict[str, float]]]:
    """Per batch, each category's share of all answers (of ``view``'s, when given), pooled over ``runs``; the
    categories ordered by their total count (failures last)."""
    series = [run_classes(r, view, arguments) for r in runs]
    total: Counter = Counter()
    for s in series:
        for c in s:
            total.update(c)
    names = [n for n, _ in total.most_common() if n != FAILED] + ([FAILED] if FAILED in total else [])
    batches = max((len(s) for s in series), default=0)
    shares = []
    for b in range(batches):
        c = Counter()
        for s in series:
            if b < len(s):
                c.update(s[b])
        n = sum(c.values())
        shares.append({name: c[name] / n for name in names} if n else {})
    return names, shares


def choice_series(run: Path) -> Optional[dict]:
    """The probe's readings at the token where the run's most frequent class of the last batch and its best class
    part, per batch: ``{"position", "context", "classes": (frequent, best), "tokens", "batches", "pi", "pi_ref",
    "pi_optimal", "q"}`` with one list per side; None without probe readings or without such a parting."""
    history = [h for h in _history(run) if h.get("choice")]
    if not history:
        return None
    last = history[-1]["choice"]
    frequent, best = last["frequent"], last["best"]
    if frequent == best:  # the run settled on its best class: show where the runner-up parts from it
        ranked = sorted(last["classes"], key=lambda c: (-last["classes"][c]["runnable"], -last["classes"][c]["reward"]))
        others = [c for c in ranked if c != best]
        if not others:
            return None
        frequent = others[0]
    out = {"classes": (frequent, best), "batches": [], "tokens": None, "position": None, "context": None}
    for key in ("pi", "pi_ref", "pi_optimal", "q"):
        out[key] = ([], [])
    for h in history:
        choice = next((c for c in h["choice"]["choices"]
                       if frequent in c["options"] and best in c["options"]
                       and c["options"][frequent]["token"] != c["options"][best]["token"]), None)
        if choice is None:
            continue
        out["batches"].append(h["batch"])
        out["position"], out["context"] = choice["position"], choice["context"]
        out["tokens"] = (choice["options"][frequent]["token"], choice["options"][best]["token"])
        for key in ("pi", "pi_ref", "pi_optimal", "q"):
            for side, name in enumerate((frequent, best)):
                out[key][side].append(choice["options"][name].get(key, float("nan")))
    return out if out["batches"] else None


def _runs(folder: Path, dataset: str, contenders: Optional[list[str]]) -> dict[str, list[Path]]:
    root = folder / "runs"
    found: dict[str, list[Path]] = {}
    for run in sorted(root.glob(f"*/{dataset}/seed*")):
        contender = run.parent.parent.name
        if contenders is None or contender in contenders:
            found.setdefault(contender, []).append(run)
    if contenders is not None:
        found = {c: found[c] for c in contenders if c in found}
    return found


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


OTHER_COLOR, FAILED_COLOR = "0.75", "0.35"


def class_colors(shown_per_panel: list[list[str]]) -> dict[str, str]:
    """One colour per answer class across every panel, in the order the classes are first shown: a class ranked
    first in one contender's panel and second in another's keeps its colour (colours by rank swapped them)."""
    colors: dict[str, str] = {}
    for shown in shown_per_panel:
        for name in shown:
            colors.setdefault(name, f"C{len(colors) % 10}")
    return colors


def write_class_report(folder: Path, dataset: str, out: Path, contenders: Optional[list[str]] = None,
                       top: int = 4, arguments: bool = False) -> list[Path]:
    """The class-share figure, the choice figure (where probe readings exist) and the table; returns the paths.
    ``arguments``: by configuration (the module docstring), the files named ``..._arguments``."""
    runs = _runs(folder, dataset, contenders)
    if not runs:
        raise SystemExit(f"etpo.report.classes: no runs of {dataset} under {folder / 'runs'}")
    out.mkdir(parents=True, exist_ok=True)
    panels = []  # (title, paths, view): one per contender, or per view where its rows came from more than one
    for contender, paths in runs.items():
        views = _policy_first(v for p in paths for v in run_views(p))
        if len(views) > 1:
            panels += [(f"{contender}, {v} rows", paths, v) for v in views]
        else:
            panels.append((contender, paths, None))
    plt = _plt()
    from matplotlib.patches import Patch

    written = []
    drawn = []  # (contender, seeds, shown classes, shares) per panel, read before drawing: the colours span the panels
    for contender, paths, view in panels:
        names, shares = pooled_shares(paths, view, arguments)
        drawn.append((contender, len(paths), [n for n in names if n != FAILED][:top], shares))
    colors = class_colors([shown for _, _, shown, _ in drawn])
    # a grid of at most CLASS_PANELS_PER_ROW panels a row: a benchmark folder holds ten contenders and more
    cols = min(CLASS_PANELS_PER_ROW, len(panels))
    grid_rows = -(-len(panels) // cols)
    width = 4.2 * cols
    fig, axes = plt.subplots(grid_rows, cols, figsize=(width, 3.4 * grid_rows + 0.4), sharey=True, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    kinds, kind = ("configurations (class and constructor arguments)", "configuration") if arguments else \
        ("classes", "class")
    suffix = "_arguments" if arguments else ""
    lines = [f"# Answer {kinds} on {dataset}", "",
             f"Share of all answers per batch, pooled over the seeds (a {kind} counts its answers that ran; "
             f"`{FAILED}`: the answers that did not run).", ""]
    for ax, (contender, seeds, shown, shares) in zip(axes.flat, drawn):
        batches = list(range(1, len(shares) + 1))
        stack = [[s.get(n, 0.0) for s in shares] for n in shown]
        rest = [sum(v for k, v in s.items() if k not in shown and k != FAILED) for s in shares]
        failed = [s.get(FAILED, 0.0) for s in shares]
        ax.stackplot(batches, *stack, rest, failed, colors=[colors[n] for n in shown] + [OTHER_COLOR, FAILED_COLOR])
        ax.set_title(f"{contender} ({seeds} seeds)")
        ax.set_xlabel("batch")
        if len(batches) > 1:  # one batch: a single x, matplotlib widens the axis itself
            ax.set_xlim(1, max(batches))
        lines += [f"## {contender} ({seeds} seeds)", "",
                  "| batch | " + " | ".join(shown + ["other runnable", "failed"]) + " |",
                  "|---" * (len(shown) + 3) + "|"]
        for b, s in enumerate(shares, start=1):
            row = [s.get(n, 0.0) for n in shown] + [rest[b - 1], failed[b - 1]]
            lines.append(f"| {b} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
        lines.append("")
    for row in axes:
        row[0].set_ylabel("share of the batch's answers")
    # one legend for every panel, as many columns as the figure's width holds (class names run to ~25 characters)
    handles = [Patch(color=c, label=n) for n, c in colors.items()] + [
        Patch(color=OTHER_COLOR, label="other runnable"), Patch(color=FAILED_COLOR, label="failed")]
    longest = max(len(h.get_label()) for h in handles)  # a configuration's name runs to ~60 characters
    ncol = max(1, min(len(handles), int(width / max(2.1, 0.065 * longest + 0.5))))
    legend_rows = -(-len(handles) // ncol)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    legend_in = 0.1 + 0.22 * legend_rows  # inches: the legend's rows below the grid
    fig.tight_layout(rect=(0, min(0.45, legend_in / fig.get_figheight()), 1, 1))
    path = out / f"class_shares_{dataset}{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    readings = [] if arguments else [(c, p, choice_series(p)) for c, paths in runs.items() for p in paths]
    readings = [r for r in readings if r[2] is not None]
    if readings:
        # a grid of at most CHOICE_PANELS_PER_ROW panels a row: a benchmark folder holds tens of runs
        cols = min(CHOICE_PANELS_PER_ROW, len(readings))
        rows = -(-len(readings) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
        for ax in axes.flat[len(readings):]:
            ax.set_visible(False)
        lines += ["## Where the classes part (answer-class probe)", "",
                  "| run | classes (frequent / best) | tokens | batch | pi | pi_ref | pi* | Q |", "|---" * 8 + "|"]
        for ax, (contender, path, series) in zip(axes.flat, readings):
            for side, style in ((0, "-"), (1, "--")):
                name, tok = series["classes"][side], series["tokens"][side]
                ax.plot(series["batches"], series["pi"][side], style, color="C0", label=f"pi   {tok!r} ({name})")
                ax.plot(series["batches"], series["pi_optimal"][side], style, color="C3",
                        label=f"pi*  {tok!r} ({name})")
                ax.plot(series["batches"], series["pi_ref"][side], style, color="0.6", label=f"pi_ref {tok!r}")
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("batch")
            ax.set_title(f"{contender} {path.name}: token {series['position']}", fontsize=9)
            ax.legend(fontsize=6, loc="best")
            for k, b in enumerate(series["batches"]):
                lines.append(
                    f"| {contender} {path.name} | {series['classes'][0]} / {series['classes'][1]} | "
                    f"{series['tokens'][0]!r} / {series['tokens'][1]!r} | {b} | "
                    + " | ".join(f"{series[key][0][k]:.3f} / {series[key][1][k]:.3f}"
                                 for key in ("pi", "pi_ref", "pi_optimal", "q")) + " |")
        fig.tight_layout()
        path = out / f"choice_{dataset}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        lines.append("")
    md = out / f"classes_{dataset}{suffix}.md"
    md.write_text("\n".join(lines) + "\n")
    written.append(md)
    return written


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m etpo.report.classes", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a benchmark folder (its runs/<contender>/<dataset>/seed<k>)")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the folder)")
    parser.add_argument("--contenders", default=None, help="comma-separated, in this order (default: all)")
    parser.add_argument("--top", type=int, default=4, help="classes drawn by name (the rest as 'other runnable')")
    parser.add_argument("--arguments", action="store_true",
                        help="by configuration: the class with its constructor's arguments (files named *_arguments)")
    args = parser.parse_args(argv)
    contenders = args.contenders.split(",") if args.contenders else None
    for path in write_class_report(args.folder, args.dataset, args.out or args.folder, contenders, args.top,
                                   args.arguments):
        print(path)


if __name__ == "__main__":
    main()
