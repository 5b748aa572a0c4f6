"""Do a contender's runs share their settings? ``settings.md`` of the report.

A table pools a contender's runs over datasets and seeds; that is only one contender while every run was made with
the same settings. A folder can hold runs made before and after a config changed (copied results, a benchmark kept
with ``--stale keep``), and nothing in the summaries shows it. So every run's ``config.yaml`` (as etpo.fit saved
it) is compared with the contender's first run's -- both ways, with :func:`etpo.run_settings.settings_differences`
(numbers by value; a key a run's config lacks counts only when the other asks it away from the class default).
What a benchmark varies on purpose is left out: the dataset, the train/validation split, the seeds and where the run
lives.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

from etpo.report.runs import RunRecord

__all__ = ["VARYING", "settings_mismatches", "settings_markdown"]

# what a benchmark varies between the runs of one contender (etpo.benchmark's command), and where a run lives
VARYING = ("data.env.init_args.dataset", "data.env.init_args.split_seed", "data.seed", "seed_everything", "run_dir",
           "ckpt_path", "trainer.logger.init_args.save_dir", "trainer.default_root_dir")


def _config(run: RunRecord) -> Optional[dict]:
    import yaml

    try:
        config = yaml.safe_load((run.path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    config = copy.deepcopy(config)
    for key in VARYING:
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return config


def _name(run: RunRecord) -> str:
    return f"{run.dataset}/seed{run.seed}"


def settings_mismatches(runs: Sequence[RunRecord], contenders: Optional[Sequence[str]] = None
                        ) -> dict[str, tuple[int, list[str]]]:
    """``{contender: (runs with a config.yaml, [one line per setting in which a run differs from the first])}``."""
    from etpo.run_settings import settings_differences

    out: dict[str, tuple[int, list[str]]] = {}
    names = list(contenders) if contenders else sorted({r.contender for r in runs})
    for contender in names:
        mine = sorted((r for r in runs if r.contender == contender), key=lambda r: (r.dataset, r.seed, str(r.path)))
        configs = [(r, c) for r in mine if (c := _config(r)) is not None]
        lines: list[str] = []
        if configs:
            first, first_config = configs[0]
            for run, config in configs[1:]:
                sides = (f"{_name(first)} has", f"{_name(run)} has")
                found = settings_differences(first_config, config, names=sides)
                keys = {line.split(":", 1)[0] for line in found}
                # the other way round: keys this run states that the first run's config lacks
                found += [line for line in settings_differences(config, first_config, names=sides[::-1])
                          if line.split(":", 1)[0] not in keys]
                lines += found
        out[contender] = (len(configs), lines)
    return out


def settings_markdown(mismatches: dict[str, tuple[int, list[str]]], limit: int = 12) -> str:
    lines = ["## Settings of the runs", "",
             "Each contender's runs against its first run (their `config.yaml`, as etpo.fit saved it), apart from "
             "what a benchmark varies on purpose (dataset, train/validation split, seeds, where the run lives). "
             "Runs of one contender with different settings are pooled in the tables all the same: rerun them "
             "(`etpo.benchmark --stale rerun`) or report them apart.", "",
             "| contender | runs compared | settings |", "|---|---|---|"]
    for contender, (n, found) in mismatches.items():
        if n == 0:
            verdict = "— (no config.yaml)"
        elif not found:
            verdict = "the same"
        else:
            shown = "; ".join(found[:limit]) + (f"; ... ({len(found) - limit} more)" if len(found) > limit else "")
            verdict = f"**differ**: {shown}"
        lines.append(f"| {contender} | {n} | {verdict.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
