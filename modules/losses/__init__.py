"""The pure losses of the algorithm modules: pure torch, no Lightning, nothing of ours outside this package.

* :mod:`modules.losses.etpo`: ETPO's exact per-token soft values, soft Bellman / TD(lambda) targets, critic and
  policy losses (docs/method.md, sections 2-8: Eq. 6, Eq. 7, Appendix A/B);
* :mod:`modules.losses.ppo`: PPO-KL's KL-penalised rewards, GAE, clipped surrogate and value loss (section 11);
* :mod:`modules.losses.grpo`: GRPO's group-relative advantages, token weights, exact reference KL and loss
  (section 12); it reuses ``soft_value`` from the ETPO losses and ``clipped_surrogate`` from PPO.

Each module's docstring cites the equations of docs/method.md it implements; the tests check each function against
a plain loop or a brute-force reference. ``tests/test_layers.py`` keeps this floor pure: the losses import torch
and each other, never Lightning, ``datamodules``, ``envs``, the rest of ``modules`` or ``etpo``.
"""
