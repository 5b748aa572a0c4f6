"""The rollout DataModule: streams fresh, on-policy transitions from text environments.

This is where environments and the model meet. ``num_envs`` environments step together; each iteration the
*current* policy generates one action for every environment in one batch (``policy.act``), the environments step
in parallel (:class:`envs.base.TextVectorEnv`, the data-science env evaluates code through its sandbox pool),
and finished episodes reset. A batch holds ``steps_per_update`` such iterations, i.e.
``num_envs * steps_per_update`` transitions, as token ids only -- nothing vocabulary-sized is stored between
rollout and update (the LightningModule computes every per-token value and KL itself, exactly).

On-policy by construction: the LightningModules take ``dataloader_iter`` in ``training_step`` and pull the batch
themselves, so Lightning does not prefetch a batch with stale weights; each batch is generated with the weights of
the step that trains on it (``batch["policy_version"]`` records which).
"""

from __future__ import annotations

import functools
import importlib
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Iterator, Protocol, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules.batch import GenerationConfig, RolloutBatch, RolloutMetrics, pad_rows
from envs.base import TextEnv, TextVectorEnv

__all__ = ["GenerationConfig", "RolloutBatch", "RolloutPolicy", "RolloutCollector", "RolloutDataModule", "RolloutStats",
           "build_env", "env_factory"]

#: builds one environment; LightningCLI fills it from ``{class_path: ..., init_args: {...}}`` (a partial)
EnvFactory = Callable[[], TextEnv]


class RolloutPolicy(Protocol):
    """What the collector needs from a LightningModule."""

    policy_version: int

    def act(self, prompts: list[str], generation: GenerationConfig) -> Any:  # returns modules.shared_base.Generation
        ...

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        ...


def build_env(spec: dict) -> TextEnv:
    """Instantiate an environment from ``{"class_path": "pkg.mod.Class", "init_args": {...}}``."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"env must be a mapping with 'class_path' (and optional 'init_args'), got {spec!r}")
    module_name, _, class_name = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"env class_path {spec['class_path']!r} cannot be imported: {err}") from err
    return cls(**dict(spec.get("init_args") or {}))


def env_factory(env: EnvFactory | dict) -> EnvFactory:
    """Accept either a factory (what LightningCLI builds from a config) or a ``class_path``/``init_args`` dict."""
    if isinstance(env, dict):
        return functools.partial(build_env, env)
    if callable(env):
        return env
    raise ValueError(f"env must be a class_path/init_args mapping or an environment factory, got {env!r}")


def env_arguments(env: EnvFactory | dict) -> dict:
    """The keyword arguments an environment is built with (for run summaries: dataset, split seed, ...)."""
    if isinstance(env, dict):
        return dict(env.get("init_args") or {})
    keywords = getattr(env, "keywords", None)
    if isinstance(keywords, dict) and "init_args" not in keywords:
        return dict(keywords)
    args = getattr(env, "args", ())
    if args and isinstance(args[0], dict):  # functools.partial(build_env, spec)
        return dict(args[0].get("init_args") or {})
    return {}


@dataclass
class _Transition:
    prompt_ids: list[int]
    action_ids: np.ndarray  # int32: 4 bytes per generated token
    reward: float
    terminated: bool
    truncated: bool
    next_prompt: str
    env_index: int
    episode_step: int
    status: str
    next_index: int = -1  # index in the batch of the transition acting on this one's next state (or -1)


@dataclass
class RolloutStats:
    """What the rollout has seen so far (public: the run artifacts, the charts and the benchmark read it)."""

    env_steps: int = 0
    updates: int = 0
    episodes: int = 0
    best_reward: float = -math.inf
    best_code: str = ""
    best_env_step: int = 0
    best_within: list = field(default_factory=list)  # [(env_steps, best_reward)] after every batch
    batch_avg_reward: list = field(default_factory=list)
    batch_runnable: list = field(default_factory=list)
    # quality apart from runnability: the mean reward of the batch's runnable answers (None when none ran; for the
    # data-science env their mean validation AUC) and the batch's best reward
    batch_runnable_reward: list = field(default_factory=list)
    batch_max_reward: list = field(default_factory=list)
    # where each batch's time went: {"generation_s", "environment_s", "generated_tokens", "update_s"} (the module
    # adds update_s through record_update_time once it has learned from the batch)
    batch_timing: list = field(default_factory=list)
    wall_time_s: float = 0.0
    # the last batch's actions as the environments judged them ({env_index, episode_step, reward, status, error,
    # text}): written to the run's samples.jsonl, so a batch's failures can be read afterwards
    batch_samples: list = field(default_factory=list)
    # the answer classes of every batch, where the environment reports one (``info["answer_class"]``; the data-science
    # env: the estimator the code builds): {class: {"n", "runnable", "mean_reward"}} -- what a run learns to prefer
    batch_classes: list = field(default_factory=list)

    def record_update_time(self, seconds: float) -> None:
        """The update's share of the last batch's time (called by the module after ``learn``)."""
        if self.batch_timing:
            self.batch_timing[-1]["update_s"] = float(seconds)


class RolloutCollector:
    """Steps ``num_envs`` environments with the current policy and returns batches of transitions."""

    def __init__(self, env: EnvFactory | dict, num_envs: int, steps_per_update: int, budget: int, seed: int,
                 generation: GenerationConfig, max_workers: int | None = None):
        if num_envs < 1 or steps_per_update < 1 or budget < 1:
            raise ValueError("num_envs, steps_per_update and budget must be positive")
        make_env = env_factory(env)
        self.num_envs = num_envs
        self.steps_per_update = steps_per_update
        self.budget = budget
        self.seed = seed
        self.generation = generation
        self.vec = TextVectorEnv([make_env() for _ in range(num_envs)], max_workers=max_workers)
        self.stats = RolloutStats()
        self._obs: list[str] | None = None
        self._first_obs: list[str | None] = [None] * num_envs  # each live episode's first observation
        self._encoded_prompts: dict[str, list[int]] = {}  # first observations as token ids (they recur every batch)
        self._episode_seeds = np.random.SeedSequence(seed)
        self._started = time.perf_counter()

    @property
    def exhausted(self) -> bool:
        return self.stats.env_steps >= self.budget

    def _reset(self, indices: Sequence[int]) -> list[str]:
        obs = []
        for i in indices:
            # one fresh, reproducible seed per episode
            episode_seed = int(self._episode_seeds.spawn(1)[0].generate_state(1)[0])
            o, _ = self.vec.reset(seed=episode_seed, indices=[i])
            obs.append(o[0])
        return obs

    def collect(self, policy: RolloutPolicy) -> RolloutBatch:
        """One rollout batch: ``steps_per_update`` parallel steps of every environment."""
        if self._obs is None:
            self._obs = self._reset(range(self.num_envs))
            self._first_obs = list(self._obs)
        # an action taken later in an episode is also an exact transition from the episode's first observation where
        # the environment says so and the learner asks for them (docs/method.md, section 4b)
        relabel = bool(getattr(policy, "relabels_actions", False)) and all(
            getattr(env, "actions_relabel_to_first_state", False) for env in self.vec.envs)
        relabelled: list[_Transition] = []
        transitions: list[_Transition] = []
        last_of_env: dict[int, int] = {}
        version = policy.policy_version
        self.stats.batch_samples = []
        timing = {"generation_s": 0.0, "environment_s": 0.0, "generated_tokens": 0}
        for _ in range(self.steps_per_update):
            if self.exhausted:
                break
            prompts = list(self._obs)
            started = time.perf_counter()
            gen = policy.act(prompts, self.generation)
            generated = time.perf_counter()
            obs, rewards, terminated, truncated, infos = self.vec.step(gen.texts)
            timing["generation_s"] += generated - started
            timing["environment_s"] += time.perf_counter() - generated
            timing["generated_tokens"] += int(gen.action_mask.sum())
            prompt_ids = _unpad_rows(gen.prompt_ids, gen.prompt_mask)
            action_ids = _unpad_rows(gen.action_ids, gen.action_mask)
            for i in range(self.num_envs):
                if i in last_of_env:  # this env's previous transition in the batch continues into this one
                    transitions[last_of_env[i]].next_index = len(transitions)
                transitions.append(_Transition(
                    prompt_ids=prompt_ids[i], action_ids=np.asarray(action_ids[i], dtype=np.int32),
                    reward=float(rewards[i]), terminated=bool(terminated[i]), truncated=bool(truncated[i]),
                    next_prompt=obs[i], env_index=i, episode_step=int(infos[i].get("steps", 0)),
                    status=str(infos[i].get("status", "ok")),
                ))
                last_of_env[i] = len(transitions) - 1
                first = self._first_obs[i]
                if relabel and transitions[-1].episode_step > 1 and first is not None:
                    moved = replace(transitions[-1], prompt_ids=self._encoded(policy, first),
                                    truncated=False, episode_step=1, next_index=-1)
                    relabelled.append(moved)  # the step limit truncates no first step of an episode that had a second
                self._track_best(float(rewards[i]), infos[i], gen.texts[i])
                error = infos[i].get("error")
                self.stats.batch_samples.append({
                    "env_index": i, "episode_step": int(infos[i].get("steps", 0)), "reward": float(rewards[i]),
                    "status": str(infos[i].get("status", "ok")), "error": None if error is None else str(error),
                    "text": gen.texts[i],
                    **({"answer_class": str(infos[i]["answer_class"])} if "answer_class" in infos[i] else {}),
                    **({"view": gen.views[i]} if getattr(gen, "views", None) else {})})
            self.stats.env_steps += self.num_envs
            done = [i for i in range(self.num_envs) if terminated[i] or truncated[i]]
            for i in done:
                last_of_env.pop(i)  # a new episode starts: no bootstrapping link across episodes
            self.stats.episodes += len(done)
            new_obs = self._reset(done) if done else []
            for i, o in zip(done, new_obs):
                obs[i] = o
                self._first_obs[i] = o
            self._obs = list(obs)
        batch = self._make_batch(transitions, policy, version, timing)
        if relabel:
            batch.relabelled = self._tensors(relabelled, policy, version, batch.metrics) if relabelled else None
        return batch

    def _encoded(self, policy: RolloutPolicy, prompt: str) -> list[int]:
        """``policy.encode_prompts([prompt])[0]``, remembered: an episode's first observation recurs in every batch."""
        if prompt not in self._encoded_prompts:
            if len(self._encoded_prompts) >= 64:  # environments whose episodes start differently: keep it bounded
                self._encoded_prompts.clear()
            self._encoded_prompts[prompt] = list(policy.encode_prompts([prompt])[0])
        return self._encoded_prompts[prompt]

    def _track_best(self, reward: float, info: dict, text: str) -> None:
        if reward > self.stats.best_reward:
            self.stats.best_reward = reward
            self.stats.best_code = str(info.get("code") or text)
            self.stats.best_env_step = self.stats.env_steps + 1

    def _make_batch(self, transitions: list[_Transition], policy: RolloutPolicy, version: int,
                    timing: dict) -> RolloutBatch:
        rewards = [t.reward for t in transitions]
        runnable = [t.status == "ok" for t in transitions]
        ran = [r for r, ok in zip(rewards, runnable) if ok]
        runnable_reward = float(np.mean(ran)) if ran else None
        self.stats.updates += 1
        self.stats.wall_time_s = time.perf_counter() - self._started
        self.stats.batch_avg_reward.append(float(np.mean(rewards)))
        self.stats.batch_runnable.append(float(np.mean(runnable)))
        self.stats.batch_runnable_reward.append(runnable_reward)
        self.stats.batch_max_reward.append(float(max(rewards)))
        self.stats.batch_timing.append(dict(timing))
        classes = answer_class_counts(self.stats.batch_samples)
        self.stats.batch_classes.append(classes)
        self.stats.best_within.append((self.stats.env_steps, self.stats.best_reward))
        metrics = RolloutMetrics(
            avg_reward=float(np.mean(rewards)),
            best_reward=float(self.stats.best_reward),
            runnable_fraction=float(np.mean(runnable)),
            env_steps=float(self.stats.env_steps),
            sps=self.stats.env_steps / max(self.stats.wall_time_s, 1e-9),
            episodes=float(self.stats.episodes),
            runnable_reward=runnable_reward,
            batch_best_reward=float(max(rewards)),
            generation_s=float(timing["generation_s"]),
            environment_s=float(timing["environment_s"]),
            generated_tokens=int(timing["generated_tokens"]),
            answer_classes=classes or None,
        )
        return self._tensors(transitions, policy, version, metrics)

    def _tensors(self, transitions: list[_Transition], policy: RolloutPolicy, version: int,
                 metrics: RolloutMetrics) -> RolloutBatch:
        """The transitions as a :class:`RolloutBatch` (prompts left-padded, actions right-padded)."""
        rewards = [t.reward for t in transitions]
        # Next-state prompts are needed only where the episode goes on (neither terminated nor truncated: the step
        # limit ends an episode, as in the paper) and the next state is not already the prompt of a later
        # transition in this batch (then V(s_{t+1}) is read from that transition's first row).
        need_next = [k for k, t in enumerate(transitions)
                     if not (t.terminated or t.truncated) and t.next_index < 0]
        next_ids = policy.encode_prompts([transitions[k].next_prompt for k in need_next]) if need_next else []
        pad = 0
        prompt_ids, prompt_mask = _left_pad([t.prompt_ids for t in transitions], pad)
        action_ids, action_mask = _right_pad([t.action_ids.tolist() for t in transitions], pad)
        next_prompt_ids, next_prompt_mask = _left_pad(next_ids, pad) if next_ids else (None, None)
        return RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, action_ids=action_ids, action_mask=action_mask,
            rewards=torch.tensor(rewards, dtype=torch.float32),
            terminated=torch.tensor([t.terminated for t in transitions], dtype=torch.bool),
            truncated=torch.tensor([t.truncated for t in transitions], dtype=torch.bool),
            next_index=torch.tensor([t.next_index for t in transitions], dtype=torch.long),
            next_needed=torch.tensor(need_next, dtype=torch.long),
            env_index=torch.tensor([t.env_index for t in transitions], dtype=torch.long),
            episode_step=torch.tensor([t.episode_step for t in transitions], dtype=torch.long),
            runnable=torch.tensor([t.status == "ok" for t in transitions], dtype=torch.bool),
            policy_version=version,
            sampling=self.generation,
            metrics=metrics,
            next_prompt_ids=next_prompt_ids, next_prompt_mask=next_prompt_mask,
        )

    # ---- checkpointing: budget, best record and the live episodes survive a resume -------------------------------
    def state_dict(self) -> dict:
        state = {"stats": asdict(self.stats), "obs": self._obs, "seed_seq": self._episode_seeds.n_children_spawned,
                 "first_obs": list(self._first_obs)}
        state["envs"] = [env.state_dict() if hasattr(env, "state_dict") else None for env in self.vec.envs]
        return state

    def load_state_dict(self, state: dict) -> None:
        known = {f.name for f in fields(RolloutStats)}  # a checkpoint of an older version lacks the newer series
        self.stats = RolloutStats(**{k: v for k, v in state["stats"].items() if k in known})
        self.stats.best_within = [tuple(x) for x in self.stats.best_within]
        self._obs = state["obs"]
        # a checkpoint made before the first observations were kept: the live episodes are not relabelled
        self._first_obs = list(state.get("first_obs") or [None] * self.num_envs)
        self._episode_seeds = np.random.SeedSequence(self.seed)
        if state.get("seed_seq"):
            self._episode_seeds.spawn(state["seed_seq"])
        for env, env_state in zip(self.vec.envs, state.get("envs") or []):
            if env_state is not None and hasattr(env, "load_state_dict"):
                env.load_state_dict(env_state)
        self._started = time.perf_counter() - self.stats.wall_time_s

    def close(self) -> None:
        self.vec.close()


def answer_class_counts(samples: Sequence[dict]) -> dict:
    """``{class: {"n", "runnable", "mean_reward"}}`` over the samples that carry an ``answer_class`` (most frequent
    first); empty when the environment reports none."""
    groups: dict[str, list[dict]] = {}
    for sample in samples:
        if "answer_class" in sample:
            groups.setdefault(sample["answer_class"], []).append(sample)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return {name: {"n": len(group), "runnable": sum(s["status"] == "ok" for s in group),
                   "mean_reward": float(np.mean([s["reward"] for s in group]))} for name, group in ordered}


def _unpad_rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    ids, mask = ids.cpu(), mask.cpu().bool()
    return [row[m].tolist() for row, m in zip(ids, mask)]


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_rows(rows, "left", pad)


def _right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_rows(rows, "right", pad)


class _RolloutStream(IterableDataset):
    """Yields one freshly collected batch per iteration until the environment budget is spent."""

    def __init__(self, datamodule: "RolloutDataModule"):
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[RolloutBatch]:
        dm = self.datamodule
        while not dm.collector.exhausted:
            yield dm.collector.collect(dm.policy)


class RolloutDataModule(L.LightningDataModule):
    """Streams on-policy rollout batches from ``num_envs`` copies of an environment.

    Args:
        env: the environment, as ``{class_path: ..., init_args: {...}}`` of a :class:`envs.base.TextEnv` in a
            config (e.g. ``envs.datascience.DataScienceEnv`` with a dataset name); built ``num_envs`` times.
        num_envs: environments stepped together; one generation batch per step (the paper: 8).
        steps_per_update: parallel environment steps collected per training batch (the paper: 2).
        budget: total environment steps (over all environments, per rank) before training stops (the paper: 500).
        seed: seeds the episode resets (rank r uses ``seed + 1000 * r``).
        generation: sampling settings used by every contender.
        max_workers: threads stepping the environments (default: one per environment).
    """

    def __init__(self, env: EnvFactory, num_envs: int = 8, steps_per_update: int = 2, budget: int = 500, seed: int = 0,
                 generation: GenerationConfig | None = None, max_workers: int | None = None):
        super().__init__()
        self.env = env_factory(env)
        self.env_kwargs = env_arguments(env)
        self.num_envs = num_envs
        self.steps_per_update = steps_per_update
        self.budget = budget
        self.seed = seed
        self.generation = generation or GenerationConfig()
        self.max_workers = max_workers
        self.collector: RolloutCollector | None = None
        self._pending_state: dict | None = None
        # Fail at construction, with the environment's own message, on a bad env spec (unknown dataset, ...).
        self.env().close()

    def setup(self, stage: str) -> None:
        if self.collector is not None:
            return
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        self.collector = RolloutCollector(
            self.env, self.num_envs, self.steps_per_update, budget=math.ceil(self.budget / world),
            seed=self.seed + 1000 * rank, generation=self.generation, max_workers=self.max_workers,
        )
        if self._pending_state is not None:
            self.collector.load_state_dict(self._pending_state)
            self._pending_state = None

    @property
    def policy(self) -> RolloutPolicy:
        return self.trainer.lightning_module

    @property
    def exhausted(self) -> bool:
        """Whether the environment budget is spent."""
        return self.collector is not None and self.collector.exhausted

    @property
    def stats(self) -> RolloutStats | None:
        """What the rollout has seen so far (None before ``setup`` and after ``teardown``)."""
        return self.collector.stats if self.collector is not None else None

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: the stream already yields whole batches; num_workers=0: generation needs the live model.
        return DataLoader(_RolloutStream(self), batch_size=None, num_workers=0)

    def state_dict(self) -> dict:
        return {"collector": self.collector.state_dict()} if self.collector is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "collector" not in state_dict:
            return
        if self.collector is None:
            self._pending_state = state_dict["collector"]
        else:
            self.collector.load_state_dict(state_dict["collector"])

    def teardown(self, stage: str) -> None:
        if self.collector is not None:
            self.collector.close()
            self.collector = None
