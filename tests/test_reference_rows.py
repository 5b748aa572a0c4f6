"""Rows sampled from the reference (ETPO's ``reference_rows``, docs/method.md section 7c): ``generate`` with one view
per prompt samples each row exactly as a batch of that view alone would, and a shrunk ETPO run explores its last
environments with the reference, records which view wrote each sample and charts its policy's own rows apart."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import tiny_backbone, toy_env
from datamodules.rollout import GenerationConfig, RolloutDataModule
from modules.etpo import ETPOModule

PROMPTS = ["q:", "qa:", "q:b", "qab:"]
VIEWS = ["policy", "reference", "policy", "reference"]


def _module(**kw) -> ETPOModule:
    torch.manual_seed(0)
    module = ETPOModule(backbone=tiny_backbone(), **kw)
    module.configure_model()
    with torch.no_grad():  # a policy adapter that differs from the reference
        for name, p in module.model.named_parameters():
            if "lora_" in name:
                p.add_(0.5 * torch.randn_like(p))
    return module


def _rows(gen) -> list[tuple[list[int], list[int]]]:
    """Each row's unpadded (prompt, action) token ids."""
    return [(p[pm.bool()].tolist(), a[am.bool()].tolist())
            for p, pm, a, am in zip(gen.prompt_ids, gen.prompt_mask, gen.action_ids, gen.action_mask)]


@pytest.mark.parametrize("do_sample", [False, True])
def test_each_row_is_sampled_as_its_view_alone_would(do_sample):
    m = _module().model
    kw = dict(max_new_tokens=6, temperature=1.0, top_k=0, do_sample=do_sample)
    torch.manual_seed(7)
    mixed = m.generate(PROMPTS, view=VIEWS, **kw)
    torch.manual_seed(7)  # the views' batches are drawn in the order the views first appear: policy, reference
    alone = {v: m.generate([p for p, w in zip(PROMPTS, VIEWS) if w == v], view=v, **kw)
             for v in ("policy", "reference")}
    expected = {v: iter(zip(_rows(g), g.texts, g.finished.tolist())) for v, g in alone.items()}
    for row, text, finished, v in zip(_rows(mixed), mixed.texts, mixed.finished.tolist(), VIEWS):
        assert (row, text, finished) == next(expected[v])
    assert mixed.views == VIEWS
    assert (mixed.action_ids[mixed.action_mask == 0] == m.pad_token_id).all()
    # the views differ, so the check above could fail: greedy, the reference writes something else on some row
    greedy = dict(kw, do_sample=False)
    policy_rows = _rows(m.generate(PROMPTS, view="policy", **greedy))
    reference_rows = _rows(m.generate(PROMPTS, view="reference", **greedy))
    assert policy_rows != reference_rows
    # one view named for every row is the plain call
    torch.manual_seed(7)
    same = m.generate(PROMPTS, view=["policy"] * 4, **kw)
    torch.manual_seed(7)
    assert _rows(same) == _rows(m.generate(PROMPTS, view="policy", **kw)) and same.views is None
    with pytest.raises(ValueError, match="3 views for 4 prompts"):
        m.generate(PROMPTS, view=VIEWS[:3], **kw)


def test_reference_rows_are_refused_where_the_targets_follow_the_sampler():
    ETPOModule(backbone=tiny_backbone(), reference_rows=2, td_lambda=0.0)  # Eq. 6: off-policy
    ETPOModule(backbone=tiny_backbone(), reference_rows=2, td_lambda=1.0, target_backup="optimal_tree",
               policy_target="optimal_tree", unwritten_value="zero")
    with pytest.raises(ValueError, match="reference_rows: 2 samples rows from the reference.*td_lambda 0.5"):
        ETPOModule(backbone=tiny_backbone(), reference_rows=2, td_lambda=0.5)
    with pytest.raises(ValueError, match="replay_capacity 8"):
        ETPOModule(backbone=tiny_backbone(), reference_rows=1, td_lambda=0.0, replay_capacity=8, replay_rows=2)
    with pytest.raises(ValueError, match="reference_rows must be >= 0"):
        ETPOModule(backbone=tiny_backbone(), reference_rows=-1)
    module = ETPOModule(backbone=tiny_backbone(), reference_rows=2, td_lambda=0.0)
    assert module.sampling_views(5) == ["policy"] * 3 + ["reference"] * 2
    assert ETPOModule(backbone=tiny_backbone()).sampling_views(5) == "policy"
    with pytest.raises(ValueError, match="leaves none of the 2 rows"):
        module.sampling_views(2)


def test_a_run_explores_its_last_environments_with_the_reference():
    L.seed_everything(0)
    seen = []

    class Spy(ETPOModule):
        def learn(self, batch):
            charts = dict(super().learn(batch))
            seen.append((batch, charts))
            return charts

    module = Spy(backbone=tiny_backbone(), reference_rows=2, td_lambda=0.0, beta=0.05, q_parameterisation="zero")
    dm = RolloutDataModule(env=toy_env(), num_envs=6, steps_per_update=1, budget=6 * 3, seed=0,
                           generation=GenerationConfig(max_new_tokens=4, temperature=1.0, top_k=0))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    samples = []
    original = dm.setup

    def keep_samples(stage=None):  # read each batch's samples as the collector records them
        original(stage)
        collect = dm.collector.collect

        def spy(policy):
            batch = collect(policy)
            samples.append(list(dm.collector.stats.batch_samples))
            return batch
        dm.collector.collect = spy

    dm.setup = keep_samples
    trainer.fit(module, datamodule=dm)
    assert len(seen) == 3 and len(samples) == 3
    for (batch, charts), recorded in zip(seen, samples):
        views = [s["view"] for s in sorted(recorded, key=lambda s: s["env_index"])]
        assert views == ["policy"] * 4 + ["reference"] * 2
        own = batch.env_index < 4
        assert charts["charts/policy_rows_avg_reward"] == pytest.approx(float(batch.rewards[own].mean()))
        ran = batch.runnable[own]
        assert charts["charts/policy_rows_runnable_fraction"] == pytest.approx(float(ran.float().mean()))
