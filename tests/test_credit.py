"""etpo.credit: token credit HTML (every token escaped, one colour per token), the summary text, and the callback."""

from __future__ import annotations

import html
import json
import re
from types import SimpleNamespace

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from modules.agent import TokenCredit
from etpo.credit import (TokenCreditCallback, credit_summary_text, diverging_colour, render_credit_html,
                         render_credit_page)

TOKENS = ["<b>", "def", " f", "():", "\n", "  return", ' "x&y"', "", "\t", "</script>"]
SCORES = {
    "soft Q of taken token": [0.5, -1.0, 0.0, 2.0, 0.1, -0.3, 1.5, 0.2, -2.0, 0.0],
    "target y": [0.1] * 10,
    "advantage": [1, 2, 3, 4, 5, 6, 7, 8, 9, float("nan")],
}
SPAN = re.compile(r'<span class="tok" style="background-color: (rgb\(\d+, \d+, \d+\))(?:; color: #fff)?" '
                  r'title="([^"]*)">(.*?)</span>(?=<span class="tok"|</div>)', re.S)


def spans_by_section(page: str) -> dict[str, list[tuple[str, str, str]]]:
    out = {}
    for sec in re.findall(r'<section class="score"><h3>(.*?)</h3>.*?<div class="tokens">(.*?)</div></section>', page,
                          re.S):
        out[html.unescape(sec[0])] = SPAN.findall(sec[1] + "</div>")
    return out


def test_every_token_escaped_and_coloured_once_per_section():
    page = render_credit_html(TOKENS, SCORES, title="credit <test>", reward=0.91)
    assert "<script>" not in page.replace("</script>", "") and "credit &lt;test&gt;" in page
    sections = spans_by_section(page)
    assert list(sections) == list(SCORES)
    for name, spans in sections.items():
        assert len(spans) == len(TOKENS), name  # one coloured span per token
        for (colour, tip, shown), tok in zip(spans, TOKENS):
            assert colour.startswith("rgb(")
            if tok.strip() and tok != "":
                assert html.escape(tok, quote=True).strip() in shown
            # hover lists every score of the token
            tip_text = html.unescape(tip)
            assert all(f"{n}:" in tip_text for n in SCORES)
    q = sections["soft Q of taken token"]
    white, top, bottom = "rgb(255, 255, 255)", diverging_colour(1, 1), diverging_colour(-1, 1)
    assert q[2][0] == white and q[3][0] == top and q[8][0] == bottom  # 0 -> white, +max -> blue, -max -> red
    assert q[0][0] != q[6][0]  # different values, different colours
    assert "&lt;b&gt;" in q[0][2] and "&lt;/script&gt;" in q[9][2] and "&quot;x&amp;y&quot;" in q[6][2]
    assert "↵" in q[4][2] and "∅" in q[7][2]
    # a constant row is all white; NaN is grey
    assert {c for c, _, _ in sections["target y"]} == {diverging_colour(0.1, 0.1)}
    assert sections["advantage"][9][0] == "rgb(200, 200, 200)"


def test_center_at_row_mean():
    page = render_credit_html(["a", "b", "c"], {"s": [1.0, 2.0, 3.0]}, "t", center="mean")
    colours = [c for c, _, _ in spans_by_section(page)["s"]]
    assert colours[1] == "rgb(255, 255, 255)" and colours[0] == diverging_colour(-1, 1)
    assert colours[2] == diverging_colour(1, 1)
    with pytest.raises(ValueError):
        render_credit_html(["a"], {"s": [1.0, 2.0]}, "t")


def test_summary_text_top_and_bottom_tokens():
    text = credit_summary_text(TOKENS, SCORES, top_k=2, reward=0.5)
    line = next(x for x in text.splitlines() if "soft Q" in x)
    assert line.index("`():`@3 (2)") < line.index('` \\"x&y\\"`@6 (1.5)') < line.index("bottom")
    assert line.split("bottom:")[1].strip().startswith("`\\t`@8 (-2)")
    assert "reward 0.5000" in text


class RecordingTB(TensorBoardLogger):
    def __init__(self, save_dir):
        super().__init__(save_dir=save_dir, name="", version="")
        self.texts = []

    @property
    def experiment(self):
        rec = self.texts
        return SimpleNamespace(add_text=lambda tag, text, global_step=None: rec.append((tag, text, global_step)))


class CreditModule:
    def __init__(self):
        self.calls = []

    def token_credit(self, batch, max_examples=None):
        self.calls.append(max_examples)
        n = len(batch["rewards"])
        k = n if max_examples is None else min(n, max_examples)
        return TokenCredit(tokens=[["x", "<y>", "\n"] for _ in range(k)],
                           scores={"soft Q of taken token": [[0.1 * i, -0.2, 0.3] for i in range(k)],
                                   "advantage": [[1.0, 0.0, -1.0] for _ in range(k)]},
                           rewards=[float(i) / n for i in range(k)])


def fake_trainer(tmp_path, step, logger=None):
    return SimpleNamespace(global_step=step, is_global_zero=True, log_dir=str(tmp_path), default_root_dir=None,
                           loggers=[logger] if logger else [])


def test_callback_writes_html_and_tensorboard_text_every_n_steps(tmp_path):
    cb = TokenCreditCallback(every_n_steps=3, max_examples=2)
    module = CreditModule()
    tb = RecordingTB(tmp_path)
    batch = {"rewards": [0.1, 0.2, 0.3, 0.4, 0.5]}
    for step in range(1, 11):
        cb.on_train_batch_end(fake_trainer(tmp_path, step, tb), module, None, batch, step - 1)
    steps = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "credit").glob("step_*.html"))
    assert steps == [1, 4, 7, 10] and module.calls == [2, 2, 2, 2]
    page = (tmp_path / "credit" / "step_4.html").read_text()
    assert page.count('class="tok"') == 2 * 2 * 3  # 2 transitions x 2 score types x 3 tokens
    assert "&lt;y&gt;" in page and "transition 1" in page and "transition 2" not in page
    data = json.loads((tmp_path / "credit" / "step_4.json").read_text())
    assert len(data["examples"]) == 2 and data["examples"][1]["reward"] == pytest.approx(0.2)
    assert [(t, s) for t, _, s in tb.texts] == [("credit/summary", k) for k in (1, 4, 7, 10)]
    assert "soft Q of taken token" in tb.texts[0][1]


def test_callback_is_a_no_op_without_token_credit(tmp_path):
    cb = TokenCreditCallback(every_n_steps=1)
    cb.on_train_batch_end(fake_trainer(tmp_path, 1), object(), None, {"rewards": [1.0]}, 0)
    cb.on_train_batch_end(fake_trainer(tmp_path, 2), CreditModule(), None, None, 0)  # no batch: nothing
    assert not (tmp_path / "credit").exists()

    class Broken:
        def token_credit(self, batch, max_examples=None):
            raise RuntimeError("boom")

    with pytest.warns(RuntimeWarning, match="boom"):
        cb.on_train_batch_end(fake_trainer(tmp_path, 3), Broken(), None, {"rewards": [1.0]}, 0)
    strict = TokenCreditCallback(every_n_steps=1, raise_errors=True)
    with pytest.raises(RuntimeError):
        strict.on_train_batch_end(fake_trainer(tmp_path, 3), Broken(), None, {"rewards": [1.0]}, 0)


def test_render_credit_page_multiple_examples():
    page = render_credit_page([{"tokens": ["a"], "scores": {"s": [1.0]}, "reward": 0.3},
                               {"tokens": ["b", "c"], "scores": {"s": [0.0, -1.0]}, "reward": -1.0}], "p")
    assert page.count('class="tok"') == 3 and "reward -1.0000" in page
