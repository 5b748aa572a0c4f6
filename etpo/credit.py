"""Token-level credit views: which tokens of an action the critic credits, as HTML and as a TensorBoard summary.

* :func:`render_credit_html` -- one self-contained HTML page for one action: one section per score type (e.g.
  "soft Q of taken token", "target y", "advantage"); every token is a span coloured by that score on a diverging
  scale (red < centre < blue; centre 0 or the row mean; the scale is symmetric, ± the largest deviation of the
  row), and hovering a token shows all its scores. :func:`render_credit_page` puts several actions on one page.
* :func:`credit_summary_text` -- plain markdown: the top-k and bottom-k credited tokens per score type.
* :class:`TokenCreditCallback` -- a Lightning callback that every ``every_n_steps`` training steps asks the
  LightningModule for per-token credit and writes ``<run_dir>/credit/step_<k>.html`` (plus ``step_<k>.json`` with
  the raw numbers) and logs the summary to TensorBoard (``credit/summary``).

The module contract: ``AgentModule.token_credit(batch, max_examples) -> TokenCredit | None``
(:class:`modules.agent.TokenCredit`: decoded action tokens, one list of scores per token and score kind, the
transitions' rewards) for the first ``max_examples`` transitions of the batch. It is called under
``torch.no_grad()`` after that batch's update (so with the updated weights). A module returning None is left alone.
"""

from __future__ import annotations

import html
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from lightning.pytorch import Callback

__all__ = ["diverging_colour", "render_credit_html", "render_credit_page", "credit_summary_text",
           "TokenCreditCallback"]

_NEG = (178, 24, 43)     # below the centre: red
_POS = (33, 102, 172)    # above the centre: blue
_NAN = (200, 200, 200)   # not a finite number: grey

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.6em; } h3 { font-size: 0.95em; margin: 1em 0 0.3em; }
.legend { font-size: 0.8em; color: #555; margin-bottom: 0.3em; }
.legend .sw { display: inline-block; width: 1.2em; height: 0.9em; vertical-align: middle; border: 1px solid #ccc; }
.tokens { font-family: ui-monospace, monospace; font-size: 0.9em; white-space: pre-wrap; line-height: 1.7;
          border: 1px solid #ddd; padding: 0.5em; border-radius: 4px; }
.tok { padding: 1px 0; border-radius: 2px; }
.tok:hover { outline: 1px solid #333; }
.ws { opacity: 0.6; }
"""


def _finite(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def diverging_colour(value: Optional[float], scale: float) -> str:
    """``rgb(...)`` of ``value`` (already centred) on a red-white-blue scale saturating at ``± scale``."""
    v = _finite(value)
    if v is None:
        return "rgb({}, {}, {})".format(*_NAN)
    t = 0.0 if scale <= 0 else max(-1.0, min(1.0, v / scale))
    end = _POS if t >= 0 else _NEG
    rgb = [round(255 + abs(t) * (e - 255)) for e in end]
    return f"rgb({rgb[0]}, {rgb[1]}, {rgb[2]})"


def _show(token: str) -> str:
    """The token as HTML text: escaped, with newlines and tabs made visible (the line break is kept)."""
    if token == "":
        return '<span class="ws">∅</span>'
    out = html.escape(token, quote=True)
    out = out.replace("\t", '<span class="ws">→</span>\t')
    out = out.replace("\r\n", "\n").replace("\n", '<span class="ws">↵</span>\n')
    return out


def _check(tokens: Sequence[str], scores: Mapping[str, Sequence[float]]) -> None:
    for name, values in scores.items():
        if len(values) != len(tokens):
            raise ValueError(f"score {name!r} has {len(values)} values for {len(tokens)} tokens")


def _sections(tokens: Sequence[str], scores: Mapping[str, Sequence[float]], center: str) -> str:
    """One ``<section>`` per score type; every token one coloured span whose tooltip lists all scores."""
    if center not in ("zero", "mean"):
        raise ValueError(f"center must be 'zero' or 'mean', got {center!r}")
    _check(tokens, scores)
    tips = []
    for j, tok in enumerate(tokens):
        lines = [f"#{j} {json.dumps(tok, ensure_ascii=False)}"]
        for name, values in scores.items():
            v = _finite(values[j])
            lines.append(f"{name}: {v:.5g}" if v is not None else f"{name}: {values[j]}")
        tips.append(html.escape("\n".join(lines), quote=True).replace("\n", "&#10;"))
    parts = []
    for name, values in scores.items():
        finite = [v for v in (_finite(x) for x in values) if v is not None]
        c = (sum(finite) / len(finite) if finite else 0.0) if center == "mean" else 0.0
        scale = max((abs(v - c) for v in finite), default=0.0)
        spans = []
        for tok, tip, x in zip(tokens, tips, values):
            v = _finite(x)
            colour = diverging_colour(None if v is None else v - c, scale)
            strong = v is not None and scale > 0 and abs(v - c) > 0.6 * scale  # white text on dark colours
            style = f"background-color: {colour}" + ("; color: #fff" if strong else "")
            spans.append(f'<span class="tok" style="{style}" title="{tip}">{_show(tok)}</span>')
        low, high = c - scale, c + scale
        legend = (f'<span class="sw" style="background-color: {diverging_colour(-1, 1)}"></span> {low:.4g} '
                  f'<span class="sw" style="background-color: {diverging_colour(0, 1)}"></span> {c:.4g} '
                  f'(centre: {"row mean" if center == "mean" else "0"}) '
                  f'<span class="sw" style="background-color: {diverging_colour(1, 1)}"></span> {high:.4g}')
        parts.append(f'<section class="score"><h3>{html.escape(name)}</h3><div class="legend">{legend}</div>'
                     f'<div class="tokens">{"".join(spans)}</div></section>')
    return "\n".join(parts)


def _document(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def render_credit_html(tokens: list[str], scores: dict[str, list[float]], title: str, center: str = "zero",
                       reward: Optional[float] = None) -> str:
    """A self-contained HTML page colouring each token of one action by each score type (one section each)."""
    head = f"<p>reward: {reward:.4f}</p>" if _finite(reward) is not None else ""
    return _document(title, head + _sections(tokens, scores, center))


def render_credit_page(examples: Sequence[Mapping[str, Any]], title: str, center: str = "zero") -> str:
    """Several actions on one page; each example is ``{"tokens", "scores", "reward"}``."""
    body = []
    for i, ex in enumerate(examples):
        r = _finite(ex.get("reward"))
        head = f"transition {i}" + (f" — reward {r:.4f}" if r is not None else "")
        body.append(f"<h2>{html.escape(head)}</h2>\n{_sections(ex['tokens'], ex['scores'], center)}")
    return _document(title, "\n".join(body) if body else "<p>no transitions</p>")


def _md_token(tok: str) -> str:
    shown = json.dumps(tok, ensure_ascii=False)[1:-1].replace("`", "ˋ").replace("|", "¦")
    return f"`{shown}`" if shown.strip() else f"`{shown or '∅'}`"


def credit_summary_text(tokens: Sequence[str], scores: Mapping[str, Sequence[float]], top_k: int = 5,
                        reward: Optional[float] = None) -> str:
    """Markdown: for every score type the ``top_k`` highest and lowest scored tokens (with their positions)."""
    _check(tokens, scores)
    lines = []
    if _finite(reward) is not None:
        lines.append(f"reward {float(reward):.4f}, {len(tokens)} tokens")
    for name, values in scores.items():
        ranked = sorted(((v, j) for j, v in enumerate(_finite(x) for x in values) if v is not None),
                        key=lambda p: (-p[0], p[1]))
        top = ", ".join(f"{_md_token(tokens[j])}@{j} ({v:.4g})" for v, j in ranked[:top_k])
        bottom = ", ".join(f"{_md_token(tokens[j])}@{j} ({v:.4g})" for v, j in ranked[::-1][:top_k])
        lines.append(f"- **{name}** — top: {top or '—'}; bottom: {bottom or '—'}")
    return "\n".join(lines)


def _examples(credit: Any, limit: int) -> list[dict]:
    """JSON-friendly examples from a ``TokenCredit`` (or any object with ``tokens``, ``scores``, ``rewards``)."""
    tokens = list(getattr(credit, "tokens", None) or [])[:limit]
    scores = getattr(credit, "scores", None) or {}
    rewards = list(getattr(credit, "rewards", None) or [])
    out = []
    for i, toks in enumerate(tokens):
        out.append({"tokens": [str(t) for t in toks],
                    "scores": {name: [float(x) for x in _tolist(vals[i])] for name, vals in scores.items()},
                    "reward": float(rewards[i]) if i < len(rewards) else None})
    return out


def _tolist(x: Any) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


class TokenCreditCallback(Callback):
    """Every ``every_n_steps`` training steps (and at the first one), asks ``pl_module.token_credit(batch)`` for
    per-token credit of the first ``max_examples`` transitions of the batch and writes
    ``<run_dir>/credit/step_<global_step>.html`` / ``.json`` (run_dir = ``trainer.log_dir`` or
    ``trainer.default_root_dir``) and a markdown summary (top ``top_k`` tokens per score) to TensorBoard under
    ``credit/summary``. Does nothing for modules without ``token_credit``. An exception inside ``token_credit``
    is reported as a warning (the run goes on) unless ``raise_errors``.
    """

    def __init__(self, every_n_steps: int = 50, max_examples: int = 4, top_k: int = 5, center: str = "zero",
                 raise_errors: bool = False):
        if every_n_steps < 1 or max_examples < 1:
            raise ValueError("every_n_steps and max_examples must be positive")
        if center not in ("zero", "mean"):
            raise ValueError(f"center must be 'zero' or 'mean', got {center!r}")
        self.every_n_steps = every_n_steps
        self.max_examples = max_examples
        self.top_k = top_k
        self.center = center
        self.raise_errors = raise_errors
        self._last_step: Optional[int] = None
        self.written: list[Path] = []

    @staticmethod
    def run_dir(trainer) -> Path:
        return Path(getattr(trainer, "log_dir", None) or trainer.default_root_dir or os.getcwd())

    def _due(self, step: int) -> bool:
        return self._last_step is None or step - self._last_step >= self.every_n_steps

    def _call(self, fn, batch):
        import torch

        with torch.no_grad():
            return fn(batch, max_examples=self.max_examples)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        fn = getattr(pl_module, "token_credit", None)
        if not callable(fn) or batch is None or not getattr(trainer, "is_global_zero", True):
            return
        step = int(trainer.global_step)
        if not self._due(step):
            return
        self._last_step = step
        try:
            credit = self._call(fn, batch)
            examples = _examples(credit, self.max_examples) if credit is not None else []
            if not examples:
                return
            title = f"token credit — step {step}"
            folder = self.run_dir(trainer) / "credit"
            folder.mkdir(parents=True, exist_ok=True)
            page = folder / f"step_{step}.html"
            page.write_text(render_credit_page(examples, title, self.center), encoding="utf-8")
            (folder / f"step_{step}.json").write_text(json.dumps({"step": step, "examples": examples}))
            self.written.append(page)
            summary = "\n\n".join(f"**transition {i}** — " + credit_summary_text(ex["tokens"], ex["scores"],
                                                                                 self.top_k, ex["reward"])
                                  for i, ex in enumerate(examples))
            self._log_text(trainer, summary, step)
        except Exception as err:  # noqa: BLE001 - a diagnostics view must not end a long run
            if self.raise_errors:
                raise
            warnings.warn(f"TokenCreditCallback: token credit at step {step} failed: {type(err).__name__}: {err}",
                          RuntimeWarning, stacklevel=1)

    @staticmethod
    def _log_text(trainer, text: str, step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in getattr(trainer, "loggers", None) or []:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("credit/summary", text, global_step=step)

    def state_dict(self) -> dict:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self._last_step = state_dict.get("last_step")
