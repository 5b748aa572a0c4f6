"""Shared test helpers: where the offline datasets are, and a tiny in-process ETPO set-up."""

from __future__ import annotations

import os
from pathlib import Path

# Tiny models run fastest on one thread, and the 2-core machines are shared with sandbox workers and
# subprocess runs: OpenMP spin-waiting across oversubscribed cores made tiny steps ~7x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("ETPO_DATA_DIR", REPO.parent / "shared" / "datasets"))


def tiny_backbone(**overrides):
    """A 2-layer random Llama with a character tokenizer over a small alphabet (trains in tens of ms a step)."""
    from modules.shared_base import BackboneConfig

    kwargs = dict(source="tiny", tiny_alphabet="abcdefgh", tiny_hidden_size=32, tiny_num_layers=2, lora_r=4,
                  lora_alpha=8.0, seed=0, device="cpu")
    kwargs.update(overrides)
    return BackboneConfig(**kwargs)


def toy_env(target_chars="ab", max_steps=1, prompt="q:", success_reward=None):
    return {"class_path": "envs.toy.TargetCharsEnv",
            "init_args": {"target_chars": target_chars, "max_steps": max_steps, "prompt": prompt,
                          "success_reward": success_reward}}


@pytest.fixture
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"offline dataset copies not found at {SHARED_DATASETS} (set ETPO_DATA_DIR)")
    return SHARED_DATASETS


def etpo_with_views_apart(beta: float = 0.1):
    """A tiny ETPO module whose policy, critic and reference say different things (every LoRA weight nudged at
    random), in eval mode: for readings at a token checked against a plain forward of each view."""
    import torch

    from modules.etpo import ETPOModule

    torch.manual_seed(0)
    m = ETPOModule(backbone=tiny_backbone(), beta=beta, q_parameterisation="zero", token_chunk_size=3)
    m.configure_model()
    with torch.no_grad():
        for name, p in m.model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
    m.model.eval()
    return m


@pytest.fixture(scope="module")
def views_apart():
    """:func:`etpo_with_views_apart`, built once per test module."""
    return etpo_with_views_apart()
