"""etpo.perplexity: the windowed, batched perplexity equals a plain token-by-token loop on a tiny random Llama with a
character tokenizer -- for the base (adapters disabled) and for the trained policy (base + saved LoRA adapter)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from etpo import perplexity as ppl
from modules.shared_base.loading import BackboneConfig, load_backbone
from modules.shared_base import SharedBaseLM

TEXT = "the quick brown fox jumps.\npack my box with 5 jugs!"


def tiny_config(**overrides) -> BackboneConfig:
    kwargs = dict(source="tiny", tiny_init_std=0.2, tiny_hidden_size=32, tiny_num_layers=2, device="cpu",
                  lora_r=4, lora_alpha=8.0, seed=3)
    kwargs.update(overrides)
    return BackboneConfig(**kwargs)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run dozens of times faster single-threaded on a busy machine (no thread contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as etpo.fit leaves it: adapters/{policy,critic,target} + backbone.json (SharedBaseLM)."""
    root = tmp_path_factory.mktemp("run")
    model = SharedBaseLM(tiny_config())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.policy_parameters():  # a visibly trained policy (LoRA B starts at zero)
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_adapters(root / "adapters")
    return root


@pytest.fixture(scope="module")
def reference_models(run_dir):
    """The base rebuilt independently (same seed, same weights) and the trained policy merged into a plain model."""
    from peft import PeftModel

    base, _ = load_backbone(tiny_config())
    merged = PeftModel.from_pretrained(load_backbone(tiny_config())[0], str(run_dir / "adapters" / "policy"))
    return base, merged.merge_and_unload()


@torch.no_grad()
def reference_nll(model, ids: list[int], window: int, stride: int, bos_id) -> tuple[float, int]:
    """A plain loop over tokens: token p is predicted from [BOS] + ids[begin:p], where begin is the start of the
    first window (begin = k * stride, covering window - 1 stream tokens) that reaches past p."""
    span = window - (1 if bos_id is not None else 0)
    total, count = 0.0, 0
    for p in range(0 if bos_id is not None else 1, len(ids)):
        k = 0
        while min(k * stride + span, len(ids)) <= p:
            k += 1
        context = ([bos_id] if bos_id is not None else []) + ids[k * stride:p]
        logits = model(torch.tensor([context])).logits[0, -1].double()
        total += float(-torch.log_softmax(logits, -1)[ids[p]])
        count += 1
    return total, count


def test_window_plan_scores_every_token_once():
    for n, window, stride, bos in [(10, 4, 2, True), (10, 4, 2, False), (10, 4, 3, True), (7, 20, 10, False),
                                   (33, 8, 7, True), (33, 8, 6, False)]:
        plan = ppl.window_plan(n, window, stride, bos)
        scored = [p for _, e, s in plan for p in range(s, e)]
        assert scored == list(range(0 if bos else 1, n))
        for b, e, s in plan:
            assert e - b <= window - bos and (s > b or bos)
    with pytest.raises(ValueError):
        ppl.window_plan(10, 4, 4, False)  # without BOS a window must keep one token of context


@pytest.mark.parametrize("window,stride,bos", [(100, None, "always"), (9, 4, "always"), (12, 11, "never")])
def test_matches_hand_computed_perplexity(run_dir, reference_models, window, stride, bos):
    model, tok, info = ppl.load_policy_model(run_dir)
    assert info["adapter"].endswith("adapters/policy") and info["backbone_from"].endswith("backbone.json")
    corpora = {"text": ([TEXT], "test")}
    results, settings = ppl.evaluate(model, tok, corpora, max_tokens=10_000, window=window, stride=stride,
                                     batch_size=3, bos=bos)
    (r,) = results
    ids = tok(TEXT, add_special_tokens=False).input_ids
    bos_id = tok.bos_token_id if bos == "always" else None
    stride = settings["stride"]

    base, merged = reference_models
    base_sum, n = reference_nll(base, ids, window, stride, bos_id)
    assert r.tokens == n == len(ids) - (0 if bos_id is not None else 1)
    assert r.base_ppl == pytest.approx(math.exp(base_sum / n), rel=1e-5)

    trained_sum, _ = reference_nll(merged, ids, window, stride, bos_id)
    assert r.trained_ppl == pytest.approx(math.exp(trained_sum / n), rel=1e-5)
    assert abs(r.relative_change) > 1e-3  # the adapter does change the model
    assert r.relative_change == pytest.approx(r.trained_ppl / r.base_ppl - 1)


def test_cli_writes_perplexity_json(run_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 2)
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("abc def. " * 8)
    (folder / "b.bin").write_bytes(b"\0\1\2")
    rc = ppl.main(["--run_dir", str(run_dir), "--corpus", "", "--corpus_file", f"mine={text}",
                   "--corpus_file", f"folder={folder}", "--window", "32", "--max_tokens", "60"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "corpus" in out and "mine" in out and "folder" in out and "%" in out
    data = json.loads((run_dir / "perplexity.json").read_text())
    assert set(data["corpora"]) == {"mine", "folder"}
    mine = data["corpora"]["mine"]
    assert mine["tokens"] == 60 - (0 if data["bos"] else 1) and mine["trained_ppl"] > 1
    assert data["backbone"]["source"] == "tiny" and data["window"] == 32


def test_config_yaml_fallback_and_clear_errors(run_dir, tmp_path, capsys):
    # a run dir whose adapters carry no backbone.json: the base comes from config.yaml
    import shutil

    other = tmp_path / "run2"
    shutil.copytree(run_dir / "adapters" / "policy", other / "adapters" / "policy")
    import yaml

    (other / "config.yaml").write_text(yaml.safe_dump({"model": {"class_path": "modules.etpo.ETPOModule",
                                                                 "init_args": {"backbone": tiny_config().to_dict()}}}))
    model, tok, info = ppl.load_policy_model(other)
    assert info["backbone_from"].endswith("config.yaml")
    assert ppl.main(["--run_dir", str(tmp_path / "nothing"), "--corpus", "code", "--max_tokens", "50"]) == 2
    assert "no backbone description" in capsys.readouterr().err
    assert ppl.main(["--run_dir", str(run_dir), "--hf", "wiki=wikitext:wikitext-2-raw-v1"]) == 2
    err = capsys.readouterr().err
    assert "wikitext" in err and "--corpus_file" in err


def test_offline_corpora_are_deterministic_and_distinct():
    seen = {}
    for name, build in ppl.BUILTIN_CORPORA.items():
        docs, source = build(6000)
        again, _ = build(6000)
        assert docs == again and sum(map(len, docs)) >= 5000, name
        seen[name] = "\n\n".join(docs)
    assert "def " in seen["code"] and "import" in seen["code"]
    assert seen["prose"].count(". ") > 20 and "    " not in seen["prose"]
    assert "Parameters" in seen["science"] and ">>>" not in seen["science"]
