"""Issue 7 (scale): GPU configs parse, CPU fallback of GPU-only settings, FSDP handling of the peft adapters
(checked with torch FSDP on CPU / gloo), the memory model, and the GPU smoke benchmark in its CPU mode.

Nothing here needs a GPU; the tests that do are marked ``gpu`` and skipped without CUDA."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import socket
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch

from conftest import tiny_backbone

REPO = Path(__file__).resolve().parents[1]
GPU_CONFIGS = ["configs/etpo.yaml", "configs/etpo_7b_fsdp.yaml"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def memory_model():
    return _load_tool("memory_model")


@pytest.fixture(scope="module")
def gpu_smoke():
    return _load_tool("gpu_smoke")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------------

def _print_config(*args: str) -> str:
    from etpo.fit import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop, \
            mock.patch.object(sys, "argv", ["etpo.fit"]):
        main(list(args) + ["--print_config"])
    assert stop.value.code in (0, None), out.getvalue()
    return out.getvalue()


@pytest.mark.parametrize("config", GPU_CONFIGS)
def test_gpu_config_parses_without_instantiating(config):
    """The project's LightningCLI parser accepts the config (``--print_config`` parses, prints, instantiates nothing
    -- a 7B model is never loaded)."""
    import yaml

    text = _print_config("--config", str(REPO / config))
    resolved = yaml.safe_load(text)
    model = resolved["model"]["init_args"]
    assert resolved["model"]["class_path"] == "modules.etpo.ETPOModule"
    assert model["backbone"]["source"] == "hf" and "CodeLlama-7b" in model["backbone"]["name_or_path"]
    assert model["backbone"]["gradient_checkpointing"] is True
    assert model["backbone"]["attn_implementation"] == "auto"
    assert (model["beta"], model["gamma"], model["polyak"]) == (0.01, 0.99, 0.995)
    assert model["policy_max_grad_norm"] == model["critic_max_grad_norm"] == 10.0
    data = resolved["data"]
    assert data["env"]["class_path"].endswith("DataScienceEnv")
    assert data["env"]["init_args"]["prompt_style"] == "paper"
    assert {k: data["generation"][k] for k in ("max_new_tokens", "temperature", "top_k", "top_p")} == \
        {"max_new_tokens": 256, "temperature": 0.5, "top_k": 50, "top_p": 1.0}
    assert data["steps_per_update"] == 2 and data["budget"] == 500
    trainer = resolved["trainer"]
    assert trainer["precision"] == "32-true" and trainer["accelerator"] == "gpu"
    world = trainer["devices"] * trainer["num_nodes"]
    assert data["num_envs"] * world == 8  # the paper's 8 environments over all ranks
    if "fsdp" in config:
        strategy = trainer["strategy"]
        assert strategy["class_path"] == "modules.strategy.ETPOFSDPStrategy"
        args = strategy["init_args"]
        assert args["layer_classes"] == ["LlamaDecoderLayer"] and args["use_orig_params"] is True
        assert args["adapters"] == "replicate" and args["sharding_strategy"] == "FULL_SHARD"


def test_dataset_is_chosen_by_a_dotted_override():
    import yaml

    text = _print_config("--config", str(REPO / GPU_CONFIGS[0]), "--data.env.init_args.dataset=cmc")
    env = yaml.safe_load(text)["data"]["env"]
    assert env["init_args"]["dataset"] == "cmc" and env["init_args"]["prompt_style"] == "paper"


def test_every_gpu_config_field_is_annotated():
    """litgpt style: every key line of the GPU configs carries a comment (its own, or the block's first line)."""
    for config in GPU_CONFIGS:
        for number, line in enumerate((REPO / config).read_text().splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.startswith("- "):
                continue
            key, _, value = stripped.partition(":")
            if value.strip() and not value.strip().startswith("#"):
                assert "#" in value or key in ("class_path",), f"{config}:{number} has no comment: {line}"


def test_strategy_requires_32_true_and_keeps_model_dtypes():
    from lightning.pytorch.plugins.precision import FSDPPrecision

    from modules.strategy import ETPOFSDPStrategy

    strategy = ETPOFSDPStrategy(layer_classes=["LlamaDecoderLayer"])
    with pytest.raises(ValueError, match="32-true"):
        strategy.precision_plugin = FSDPPrecision("bf16-true")
    strategy.precision_plugin = FSDPPrecision("32-true")
    plugin = strategy.precision_plugin
    module = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert plugin.convert_module(module).weight.dtype == torch.bfloat16  # Lightning's own 32-true would upcast
    assert plugin.mixed_precision_config is None  # FSDP computes in the stored dtype (bf16 base)
    with pytest.raises(ValueError, match="use_orig_params"):
        ETPOFSDPStrategy(use_orig_params=False)
    mixed = ETPOFSDPStrategy(adapters="shard", param_dtype="bfloat16", reduce_dtype="float32")
    assert mixed.precision_plugin.mixed_precision_config.param_dtype == torch.bfloat16


def test_bf16_true_would_freeze_the_polyak_target():
    """Why the configs use precision 32-true: Lightning's bf16-true casts the (float32) LoRA adapters to bf16, and a
    0.5 % Polyak step is below bf16 resolution, so the target never moves."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    from modules.shared_base import SharedBaseLM

    shared = SharedBaseLM(tiny_backbone(dtype="bfloat16"))
    assert {p.dtype for p in shared.critic_parameters()} == {torch.float32}  # peft keeps adapters in float32
    HalfPrecision("bf16-true").convert_module(shared)
    assert {p.dtype for p in shared.critic_parameters()} == {torch.bfloat16}
    for dtype, moves in ((torch.bfloat16, False), (torch.float32, True)):
        target, critic = torch.ones(4, dtype=dtype), torch.full((4,), 1.1, dtype=dtype)
        for _ in range(100):
            target.mul_(0.995).add_(critic, alpha=0.005)
        assert bool((target > 1.0).all()) is moves


# ----------------------------------------------------------------------------------------------------------------
# hardware fallback
# ----------------------------------------------------------------------------------------------------------------

def _gpu_trainer_section():
    return {"accelerator": "gpu", "devices": 4, "num_nodes": 2, "precision": "bf16-true",
            "strategy": {"class_path": "modules.strategy.ETPOFSDPStrategy", "init_args": {"adapters": "replicate"}}}


def test_hardware_fallback_rewrites_gpu_settings_with_one_line_each(capsys, monkeypatch):
    from etpo.hardware import STRICT_ENV, apply_hardware_fallback

    monkeypatch.delenv(STRICT_ENV, raising=False)
    cfg = _gpu_trainer_section()
    messages = apply_hardware_fallback(cfg, cuda_available=False)
    assert cfg == {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": "32-true", "strategy": "auto"}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(messages) == 5
    assert all(line.startswith("etpo.hardware: warning: no CUDA device: trainer.") for line in err)
    assert any("'gpu' -> 'cpu'" in line for line in err)
    assert any("ETPOFSDPStrategy" in line and "'auto'" in line for line in err)
    # already CPU-compatible settings, and machines with CUDA, are left alone
    for keep in ({"accelerator": "auto", "devices": "auto", "strategy": "auto", "precision": "32-true"},
                 {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true"}):
        before = dict(keep)
        assert apply_hardware_fallback(keep, cuda_available=False) == [] and keep == before
    cfg = _gpu_trainer_section()
    assert apply_hardware_fallback(cfg, cuda_available=True) == [] and cfg == _gpu_trainer_section()
    for devices, many in ((2, True), (-1, True), ([0, 1], True), ("0,1", True), ("2", True), (1, False), ("0,", False)):
        cfg = {"devices": devices}
        apply_hardware_fallback(cfg, cuda_available=False, warn=lambda _: None)
        assert (cfg["devices"] == 1 and devices != 1) is many or devices in (1, "0,")


def test_hardware_fallback_strict_mode_fails(monkeypatch):
    from etpo.hardware import STRICT_ENV, HardwareMismatchError, apply_hardware_fallback

    with pytest.raises(HardwareMismatchError, match="trainer.accelerator='gpu'"):
        apply_hardware_fallback(_gpu_trainer_section(), cuda_available=False, strict=True)
    monkeypatch.setenv(STRICT_ENV, "1")
    cfg = _gpu_trainer_section()
    with pytest.raises(HardwareMismatchError, match=STRICT_ENV):
        apply_hardware_fallback(cfg, cuda_available=False)
    assert cfg == _gpu_trainer_section()  # nothing rewritten
    assert issubclass(HardwareMismatchError, ValueError)  # etpo.fit turns ValueErrors into one clear line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_fsdp_config_instantiates_on_cpu_through_the_fallback(tmp_path, capsys, monkeypatch):
    """Wired as in ETPOCLI.before_instantiate_classes: the FSDP config builds a CPU Trainer here (the 7B model is not
    loaded: that happens in configure_model at fit time)."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from datamodules.rollout import RolloutDataModule
    from etpo.fit import ETPOCLI
    from etpo.hardware import STRICT_ENV, apply_hardware_fallback
    from modules.agent import AgentModule

    monkeypatch.delenv(STRICT_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["etpo.fit"])

    class CLI(ETPOCLI):
        def before_instantiate_classes(self) -> None:
            apply_hardware_fallback(self.config["trainer"])
            super().before_instantiate_classes()

    toy = tmp_path / "toy_env.yaml"
    toy.write_text("data:\n  env:\n    class_path: envs.toy.TargetCharsEnv\n    init_args: {target_chars: ab}\n")
    cli = CLI(AgentModule, RolloutDataModule, subclass_mode_model=True, subclass_mode_data=False,
              parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False, "default_env": False},
              save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, run=False,
              args=["--config", str(REPO / "configs/etpo_7b_fsdp.yaml"), "--config", str(toy),
                    "--run_dir", str(tmp_path / "run")])
    assert isinstance(cli.trainer.strategy, SingleDeviceStrategy)
    assert cli.trainer.strategy.root_device.type == "cpu"
    assert cli.trainer.precision == "32-true"
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("etpo.hardware")]
    assert len(err) == 3  # accelerator, devices, strategy (precision is already 32-true)
    assert cli.model.model is None  # nothing loaded


def test_attention_fallback_of_the_model_layer():
    """modules/shared_base/loading.py: auto -> sdpa without flash-attn / CUDA; an explicit flash_attention_2 says why it cannot."""
    from modules.shared_base.loading import flash_attn_available, resolve_attn_implementation

    assert resolve_attn_implementation("auto", torch.device("cpu"), torch.float32) == "sdpa"
    assert resolve_attn_implementation("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"
    if not flash_attn_available():
        assert resolve_attn_implementation("auto", torch.device("cuda"), torch.bfloat16) == "sdpa"
        with pytest.raises(ValueError, match="flash-attn"):
            resolve_attn_implementation("flash_attention_2", torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA|flash-attn"):
        resolve_attn_implementation("flash_attention_2", torch.device("cpu"), torch.bfloat16)
    # prefix sharing needs a custom mask: auto never picks flash-attention then, even where it is installed
    from unittest import mock

    with mock.patch("modules.shared_base.loading.flash_attn_available", return_value=True):
        assert resolve_attn_implementation("auto", torch.device("cuda"), torch.bfloat16) == "flash_attention_2"
        assert resolve_attn_implementation("auto", torch.device("cuda"), torch.bfloat16,
                                           needs_custom_mask=True) == "sdpa"


# ----------------------------------------------------------------------------------------------------------------
# memory model
# ----------------------------------------------------------------------------------------------------------------

def test_memory_model_counts(memory_model):
    mm = memory_model
    shape = mm.Shape()
    assert shape.params == 6_738_546_688  # CodeLlama-7B (vocab 32016, untied head)
    assert shape.lora_params(16) == 39_976_960 and shape.lora_params(8) == 19_988_480
    lora = shape.lora_params(16)
    one = mm.etpo_breakdown(shape, mm.Workload(), 1)
    assert one["base weights"] == 2 * shape.params  # bf16
    assert one["adapters (policy, critic, target)"] == 3 * 4 * lora  # fp32
    assert one["optimizer states"] == 2 * 2 * 4 * lora  # two AdamW (critic, policy), two fp32 moments each
    assert one["gradients"] == 4 * lora  # one adapter's at a time: each step frees its gradients
    assert mm.etpo_breakdown(shape, mm.Workload(), 2)["gradients"] == 2 * 4 * lora  # + the all-reduce buffer
    ref = mm.reference_breakdown(shape, mm.Workload())
    assert ref["base weights"] == 4 * 2 * shape.params  # four fp16 copies
    assert ref["optimizer states"] == ref["gradients"] == 2 * 2 * shape.params
    assert ref["host RAM: rollout buffer"] == 3 * 3 * 8 * 256 * 32016 * 4
    assert ref["phase 2: critic step"] is None and one["phase: one update (both graphs)"] is None


@pytest.mark.parametrize("sequences", [8, 16])
def test_memory_model_orderings(memory_model, sequences):
    mm = memory_model
    wl = mm.Workload(sequences=sequences)
    peak = lambda w=wl, n=1, **kw: mm.etpo_breakdown(mm.Shape(), w, n, **kw)["peak"]  # noqa: E731
    one = peak()
    no_ckpt = peak(replace(wl, checkpointing=False))
    plain = mm.etpo_breakdown(mm.Shape(), replace(wl, prefix_sharing=False), 1)
    ref = mm.reference_breakdown(mm.Shape(), wl)["peak"]
    assert one < 80e9 and one < no_ckpt < ref and one < plain["peak"] < ref
    assert mm.view_layout(wl).tokens < plain["tokens per view forward"]  # the task prompt once, not per row
    fsdp = [peak(n=n) for n in (1, 2, 4, 8)]
    assert fsdp == sorted(fsdp, reverse=True) and len(set(fsdp)) == 4
    assert peak(n=2, adapters="shard") > fsdp[1]
    table = mm.render(mm.Shape(), wl)
    assert "reference impl." in table and "FSDP 8" in table and "no prefix sharing" in table and "**" in table


def test_memory_model_phases_hold_what_the_update_holds(memory_model):
    """The critic step holds no vocabulary-sized tensor (taken-token head rows only); the targets' chunks count in
    phase 1 only, the policy step's in phase 3 only; checkpointing only changes the phases with a graph."""
    mm = memory_model
    base = mm.etpo_breakdown(mm.Shape(), mm.Workload(), 1)
    more_targets = mm.etpo_breakdown(mm.Shape(), mm.Workload(vocab_tensors_targets=20.0), 1)
    more_policy = mm.etpo_breakdown(mm.Shape(), mm.Workload(vocab_tensors_policy=20.0), 1)
    for phase in ("phase 2: critic step", "phase: rollout"):
        assert more_targets[phase] == more_policy[phase] == base[phase]
    assert more_targets["phase 1: targets (no grad)"] > base["phase 1: targets (no grad)"]
    assert more_targets["phase 3: policy step"] == base["phase 3: policy step"]
    assert more_policy["phase 3: policy step"] > base["phase 3: policy step"]
    assert more_policy["phase 1: targets (no grad)"] == base["phase 1: targets (no grad)"]
    no_ckpt = mm.etpo_breakdown(mm.Shape(), mm.Workload(checkpointing=False), 1)
    assert no_ckpt["phase 1: targets (no grad)"] == base["phase 1: targets (no grad)"]
    assert no_ckpt["phase 2: critic step"] > base["phase 2: critic step"]


@pytest.mark.parametrize("hidden,inter,heads,batch,seq,r", [(64, 176, 4, 2, 24, 8), (96, 256, 4, 3, 40, 4)])
def test_memory_model_layer_constants_match_autograd(memory_model, hidden, inter, heads, batch, seq, r):
    """The per-layer activation formulas are exact: count the tensors autograd saves on CPU."""
    mm = memory_model
    shape = mm.Shape(hidden=hidden, intermediate=inter, heads=heads, kv_heads=heads, layers=1)
    s = batch * seq
    assert mm.measure_layer_saved_bytes(hidden, inter, heads, batch, seq, r, "lora") == mm.lora_layer_bytes(shape, s, r)
    assert mm.measure_layer_saved_bytes(hidden, inter, heads, batch, seq, r, "lora_bf16") == \
        mm.lora_bf16_layer_bytes(shape, s, r)
    assert mm.measure_layer_saved_bytes(hidden, inter, heads, batch, seq, r, "full", "eager") == \
        mm.full_eager_layer_bytes(shape, s, seq)


def test_memory_model_vocab_tensor_count(memory_model):
    """The live float32 [B, chunk, V] tensors of each phase of ETPOModule.learn, measured on CPU, are the constants
    the model assumes -- and the critic step has none at all."""
    measured = memory_model.measure_vocab_tensors()
    wl = memory_model.Workload()
    assert measured["critic step"] == 0.0
    assert abs(measured["targets"] - wl.vocab_tensors_targets) <= 0.5, measured
    assert abs(measured["policy step"] - wl.vocab_tensors_policy) <= 0.5, measured


@pytest.mark.parametrize("sequences,tokens,action,reflections,nexts,own", [
    (6, 20, 8, 2, 2, 5),  # first attempts, reflections and next prompts
    (3, 16, 4, 3, 1, 3),  # every row a reflection
    (3, 10, 6, 0, 0, 3),  # one task prompt, nothing else
])
def test_memory_model_view_tokens_match_the_planner(memory_model, sequences, tokens, action, reflections, nexts, own):
    """Tokens per view forward as the memory model counts them = what SharedBaseLM.plan lays out, with prefix
    sharing (one prefix tree) and without (left-padded rows)."""
    mm = memory_model
    wl = mm.Workload(sequences=sequences, tokens=tokens, action_tokens=action, reflection_rows=reflections,
                     next_prompts=nexts, reflection_tokens=own)
    got = mm.measure_view_tokens(wl)
    assert got["packs"] == 1  # the formula's premise (the planner keeps one prefix tree at these sizes)
    assert got["shared"] == mm.view_layout(wl).tokens
    assert got["plain"] == mm.view_layout(replace(wl, prefix_sharing=False)).tokens


# ----------------------------------------------------------------------------------------------------------------
# GPU smoke benchmark
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_gpu_smoke_exits_clearly_without_cuda(gpu_smoke, capsys):
    assert gpu_smoke.main([]) == gpu_smoke.EXIT_NO_CUDA == 3
    assert "no CUDA device" in capsys.readouterr().err


def _smoke(gpu_smoke, tmp_path, name, *args):
    import json

    path = tmp_path / f"{name}.json"
    assert gpu_smoke.main(["--tiny", "--updates", "2", "--generations", "1", "--json", str(path), *args]) == 0
    return json.loads(path.read_text())


def _losses(report):
    return [(round(x["critic"], 5), round(x["policy"], 5)) for x in report["losses"]]


def test_gpu_smoke_tiny_runs_the_same_path_on_cpu(gpu_smoke, capsys, tmp_path):
    """--tiny runs module.learn on a rollout-shaped RolloutBatch (shared task prompt, reflections, next-state
    prompts) with prefix sharing and the once-prefilled generation prefix; --tiny --fsdp runs the same update under
    torch FSDP (every forward phase through the root) and gets the same losses; so does the plain computation."""
    plain = _smoke(gpu_smoke, tmp_path, "plain")
    out = capsys.readouterr().out
    assert "training tokens/s" in out and "generation tokens/s" in out and "tokens per view forward" in out
    shape = gpu_smoke.TINY
    assert plain["mode"] == "plain" and plain["prefix_sharing"] is True
    assert plain["sequences"] == shape.envs * shape.steps and plain["next_state_prompts"] >= 1
    assert plain["tokens_per_view_forward"] < plain["tokens_per_view_forward_plain"]
    from modules.shared_base.generation import MIN_SHARED_PREFIX

    once = plain["rollout_tokens"]["prefilled_once"]
    assert len(once) == shape.steps and min(once) >= MIN_SHARED_PREFIX  # every step's shared prefix prefilled once
    for phase in ("update", "update: targets", "update: critic step", "update: policy step"):
        assert len(plain["seconds"][phase]) == 2
    assert all(x["grad_norm_critic"] > 0 and x["grad_norm_policy"] > 0 for x in plain["losses"])
    phases = plain["flops_per_phase_etpo_estimate"]
    assert plain["flops_per_update_etpo_estimate"] == pytest.approx(sum(phases.values()))
    assert plain["memory_model_prediction_gb"]["update"] > 0

    fsdp = _smoke(gpu_smoke, tmp_path, "fsdp", "--fsdp")
    assert fsdp["mode"] == "fsdp-cpu-gloo"
    assert fsdp["params_without_adapters"] == plain["params_without_adapters"]
    assert _losses(fsdp) == _losses(plain)

    unshared = _smoke(gpu_smoke, tmp_path, "unshared", "--no-prefix-sharing")
    assert unshared["prefix_sharing"] is False and set(unshared["rollout_tokens"]["prefilled_once"]) == {0}
    assert unshared["tokens_per_view_forward"] == plain["tokens_per_view_forward_plain"]
    assert _losses(unshared) == _losses(plain)  # prefix sharing is exact through the whole update
    # the hardware-FLOP estimate follows the tokens the plan computes, the 6NT count the batch's tokens
    assert unshared["flops_per_update_etpo_estimate"] > plain["flops_per_update_etpo_estimate"]
    assert unshared["flops_per_update_6NT"] == plain["flops_per_update_6NT"]


@pytest.mark.slow
def test_gpu_smoke_fsdp_on_two_cpu_ranks(gpu_smoke, tmp_path):
    """--tiny --fsdp --ranks 2: two processes of the tool, the base really sharded (one process falls back to
    NO_SHARD), every rank learning from the same batch -- so the rank-averaged update is the plain one: the same
    losses and gradient norms, update after update."""
    sharded = _smoke(gpu_smoke, tmp_path, "ranks", "--fsdp", "--ranks", "2")
    assert sharded["mode"] == "fsdp-cpu-gloo-2-ranks" and sharded["ranks"] == 2 and sharded["prefix_sharing"]
    plain = _smoke(gpu_smoke, tmp_path, "plain")
    assert _losses(sharded) == _losses(plain)
    for ours, theirs in zip(sharded["losses"], plain["losses"]):
        for key in ("grad_norm_critic", "grad_norm_policy"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4)


def test_gpu_smoke_lightning_path_on_cpu(gpu_smoke, tmp_path):
    """--tiny --lightning: a Trainer pulls RolloutBatch objects (generated in the step, stamped with the module's
    policy_version) from the tool's DataModule and runs training_step -> learn: the plain run's losses. Lightning's
    FSDP strategy refuses a CPU model, which the tool says instead of failing inside Lightning."""
    trained = _smoke(gpu_smoke, tmp_path, "lightning", "--lightning")
    assert trained["mode"] == "lightning-cpu" and len(trained["losses"]) == 2
    assert len(trained["seconds"]["rollout"]) == 2  # one rollout pulled by each training step
    plain = _smoke(gpu_smoke, tmp_path, "plain")
    assert _losses(trained) == _losses(plain)
    with pytest.raises(SystemExit) as refused:
        gpu_smoke.main(["--tiny", "--lightning", "--fsdp"])
    assert refused.value.code == 2


def test_gpu_smoke_meter_nests_cuda_peaks(gpu_smoke, monkeypatch):
    """The CUDA bookkeeping of nested phases, with the allocator statistics faked: an inner phase resets the peak,
    the outer phase still reports the highest value seen while it was open."""
    import types

    state = {"now": 0.0, "peak": 0.0}

    def allocate(value):
        state["now"] = value
        state["peak"] = max(state["peak"], value)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: state.update(peak=state["now"]))
    meter = gpu_smoke.Meter(types.SimpleNamespace(type="cuda"))
    with meter.phase("update"):
        allocate(5e9)
        allocate(2e9)
        with meter.phase("update: targets"):
            allocate(3e9)
        allocate(1e9)
        with meter.phase("update: critic step"):
            allocate(4e9)
            allocate(1e9)
    assert meter.peaks == {"update: targets": 3.0, "update: critic step": 4.0, "update": 5.0}
    with meter.phase("update"):
        with meter.phase("update: policy step"):
            allocate(7e9)
    assert meter.peaks["update"] == 7.0 and meter.peaks["update: policy step"] == 7.0


def _gpu_memory_check(report):
    """Measured peaks against tools/memory_model.py's prediction for the same workload (the prediction leaves out
    allocator fragmentation and the CUDA context; docs/memory-model.md says how close it should be)."""
    measured, predicted = report["peak_memory_gb"], report["memory_model_prediction_gb"]
    for phase in ("update", "rollout"):
        assert 0.75 <= measured[phase] / predicted[phase] <= 1.25, (phase, measured[phase], predicted[phase])


@pytest.mark.gpu
@needs_cuda
def test_gpu_smoke_7b_on_cuda(gpu_smoke, tmp_path):
    import json

    path = tmp_path / "7b.json"
    assert gpu_smoke.main(["--updates", "2", "--generations", "1", "--attn", "sdpa", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["prefix_sharing"] is True
    assert report["tokens_per_view_forward"] < report["tokens_per_view_forward_plain"]
    _gpu_memory_check(report)


@pytest.mark.gpu
@needs_cuda
def test_gpu_smoke_7b_fsdp_lightning(gpu_smoke, tmp_path):
    import json

    path = tmp_path / "7b_fsdp.json"
    assert gpu_smoke.main(["--fsdp", "--updates", "2", "--attn", "sdpa", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["mode"] == "fsdp-lightning" and len(report["losses"]) == 2
    _gpu_memory_check(report)
# ----------------------------------------------------------------------------------------------------------------
# modules.shared_base.fsdp
# ----------------------------------------------------------------------------------------------------------------

def test_wrap_policy_and_kwargs_pick_decoder_layers_and_adapters():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from modules.shared_base.fsdp import adapter_modules, decoder_layer_classes, fsdp_auto_wrap_policy, fsdp_kwargs
    from modules.shared_base import SharedBaseLM

    shared = SharedBaseLM(tiny_backbone())
    assert decoder_layer_classes(shared) == {LlamaDecoderLayer}  # from _no_split_modules
    assert decoder_layer_classes(shared, ["LlamaDecoderLayer"]) == {LlamaDecoderLayer}
    with pytest.raises(ValueError):
        decoder_layer_classes(shared, ["NoSuchLayer"])
    policy = fsdp_auto_wrap_policy(shared, ["LlamaDecoderLayer"])
    chosen = policy._run_policy(shared, set(), {})
    assert set(chosen) == set(m for m in shared.modules() if isinstance(m, LlamaDecoderLayer))
    assert shared._lm_head not in chosen  # the head stays in the root unit (SharedBaseLM.head reads its weight)
    adapters = adapter_modules(shared)
    n_linear = 7 * shared.config.tiny_num_layers
    assert len(adapters) == 3 * 2 * n_linear  # lora_A and lora_B of policy, critic, target
    kwargs = fsdp_kwargs(shared)
    assert kwargs["use_orig_params"] is True and len(kwargs["ignored_states"]) == len(adapters)
    assert "ignored_states" not in fsdp_kwargs(shared, adapters="shard")


def test_unsharded_helpers_match_the_model_layer(tmp_path):
    from modules.shared_base.fsdp import (full_adapter_state_dict, global_grad_norm, is_sharded, polyak_update_sharded,
                                  summon_full_params_if_sharded, write_adapters)
    from modules.shared_base import SharedBaseLM

    a, b = SharedBaseLM(tiny_backbone()), SharedBaseLM(tiny_backbone())
    assert not is_sharded(a)
    with torch.no_grad():
        for p, q in zip(a.critic_parameters(), b.critic_parameters()):
            p.normal_()
            q.copy_(p)
    a.polyak_update(0.9)
    polyak_update_sharded(b, 0.9)
    assert all(torch.equal(p, q) for p, q in zip(a.target_parameters(), b.target_parameters()))
    for p in b.policy_parameters():
        p.grad = torch.ones_like(p)
    n = sum(p.numel() for p in b.policy_parameters())
    assert torch.isclose(global_grad_norm(b.policy_parameters()), torch.tensor(float(n)).sqrt())
    with summon_full_params_if_sharded(b, writeback=True):
        pass
    # adapters written from a gathered state dict load back exactly (peft format, like save_adapters)
    write_adapters(b, full_adapter_state_dict(b), tmp_path / "gathered")
    b.save_adapters(tmp_path / "plain")
    c = SharedBaseLM(tiny_backbone())
    c.load_adapters(tmp_path / "gathered")
    assert all(torch.equal(p, q) for p, q in zip(b.target_parameters(), c.target_parameters()))
    from safetensors.torch import load_file

    for adapter in ("policy", "critic", "target"):
        x = load_file(str(tmp_path / "gathered" / adapter / "adapter_model.safetensors"))
        y = load_file(str(tmp_path / "plain" / adapter / "adapter_model.safetensors"))
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


# -- two processes, torch FSDP1 on CPU (gloo) ---------------------------------------------------------------------

def _dist_module():
    from modules.etpo import ETPOModule

    # lora_r 8 with hidden 32 puts a rank boundary inside layer 0's gate_proj adapters (misaligned target / critic)
    module = ETPOModule(tiny_backbone(lora_r=8, lora_alpha=16.0), token_chunk_size=3)
    module.configure_model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.model.critic_parameters() + module.model.policy_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def _dist_batch(k: int):
    from datamodules.batch import GenerationConfig, RolloutBatch, RolloutMetrics

    g = torch.Generator().manual_seed(100 + k)
    B, P, L = 3, 4, 5
    prompt = torch.randint(4, 12, (1, P), generator=g).repeat(B, 1)  # one shared prompt: prefix sharing at work
    return RolloutBatch(
        prompt_ids=prompt, prompt_mask=torch.ones(B, P, dtype=torch.long),
        action_ids=torch.randint(4, 12, (B, L), generator=g), action_mask=torch.ones(B, L, dtype=torch.long),
        rewards=torch.rand(B, generator=g), terminated=torch.tensor([True, False, True]),
        truncated=torch.zeros(B, dtype=torch.bool), next_index=torch.full((B,), -1), next_needed=torch.tensor([1]),
        env_index=torch.arange(B), episode_step=torch.ones(B, dtype=torch.long), runnable=torch.ones(B, dtype=torch.bool),
        policy_version=0, sampling=GenerationConfig(temperature=1.0, top_k=0),
        metrics=RolloutMetrics(0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        next_prompt_ids=torch.randint(4, 12, (1, P), generator=g), next_prompt_mask=torch.ones(1, P, dtype=torch.long))


def _sgd(module, root=None):
    from modules.shared_base import adapter_parameters

    root = root if root is not None else module
    return [torch.optim.SGD([{"params": [p for _, p in adapter_parameters(root, name, trainable_only=True)],
                              "name": name, "max_grad_norm": 1e9}], lr=0.5) for name in ("critic", "policy")]


def _reference_update(world: int):
    """The update of rank-averaged gradients on an unsharded model, phase by phase: the critic step on the
    average of every rank's critic gradient, then the policy step against the updated critic, then Polyak."""
    ref = _dist_module()
    opt_c, opt_p = _sgd(ref)
    batches = [_dist_batch(k) for k in range(world)]
    plans = [ref.plan(b) for b in batches]
    targets = [ref.compute_targets(b, p) for b, p in zip(batches, plans)]
    norms = {}
    for name, opt, loss_fn in (("critic", opt_c, ref.critic_loss), ("policy", opt_p, ref.policy_loss)):
        opt.zero_grad()
        for b, p, t in zip(batches, plans, targets):
            (loss_fn(b, p, t)[0] / world).backward()
        params = opt.param_groups[0]["params"]
        norms[name] = float(torch.sqrt(sum((q.grad ** 2).sum() for q in params)))
        if name == "critic":
            norms["critic_grads"] = {n: p.grad.clone() for n, p in ref.model.named_parameters()
                                     if ".critic." in n and p.grad is not None}
        opt.step()
    ref.model.polyak_update(ref.hparams.polyak)
    state = {n: p.detach().clone() for n, p in ref.model.named_parameters() if "lora_" in n}
    return ref, state, norms


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import json
    import logging
    import warnings

    import torch.distributed as dist
    from lightning.pytorch.strategies.strategy import _ForwardRedirection
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from modules.shared_base import fsdp as D

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    res: dict = {}
    try:
        ref, ref_state, ref_norms = _reference_update(world)
        ref_target = {n: v for n, v in ref_state.items() if ".target." in n}
        ids, mask = ref.model.encode_prompts(["ab", "abcd"])
        torch.manual_seed(0)
        ref_gen = ref.model.generate_from_ids(ids, mask, max_new_tokens=4).action_ids

        for mode in ("shard", "replicate"):
            module = _dist_module()
            root = FSDP(module, device_id=torch.device("cpu"), **D.fsdp_kwargs(module.model, adapters=mode))
            if mode == "shard":  # the naive Polyak update on FSDP1 shards (collective-safe check)
                raised = 0.0
                try:
                    module.model.polyak_update(0.5)
                except RuntimeError:
                    raised = 1.0
                plain = _dist_module()
                plain.model.polyak_update(0.5)
                half = {n: p for n, p in plain.model.named_parameters() if ".target." in n}
                with D.summon_full_params_if_sharded(root):
                    right = all(torch.allclose(p, half[D.clean_name(n)])
                                for n, p in module.model.named_parameters() if ".target." in n)
                flags = torch.tensor([raised, 0.0 if right else 1.0])
                dist.all_reduce(flags)
                res["naive_polyak"] = "raised" if flags[0] > 0 else ("wrong" if flags[1] > 0 else "correct")
                # Lightning's own manual optimisation would run training_step -- and its backward -- inside the
                # root forward: FSDP1 refuses (pytorch-lightning #19685), hence ETPOFSDPStrategy's routing
                try:
                    def backward_inside_forward():
                        b = _dist_batch(rank)
                        plan = module.plan(b)
                        loss, _ = module.critic_loss(b, plan, module.compute_targets(b, plan))
                        loss.backward()
                        return loss

                    module._pending_call = (backward_inside_forward, (), {})
                    _ForwardRedirection()(root, module, "_run_pending_call")
                    with D.summon_full_params_if_sharded(root, with_grads=True):
                        grads = {D.clean_name(n): p.grad for n, p in module.model.named_parameters() if ".critic." in n}
                    want = ref_norms["critic_grads"]
                    right = all(grads.get(n) is not None and torch.allclose(grads[n], g, atol=1e-6)
                                for n, g in want.items())
                    outcome = 0.0 if right else 1.0
                except (AssertionError, RuntimeError):
                    outcome = 2.0
                flag = torch.tensor([outcome])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                res["backward_inside_root_forward"] = {0.0: "correct", 1.0: "wrong", 2.0: "raised"}[float(flag)]
                module = _dist_module()  # fresh weights for the checks below
                root = FSDP(module, device_id=torch.device("cpu"), **D.fsdp_kwargs(module.model, adapters=mode))
            # the whole update, each forward phase inside the root forward and each backward after it
            with module.without_trainer(_sgd(module, root), root):
                charts = module.learn(_dist_batch(rank))
            for name in ("critic", "policy"):
                got = charts[f"charts/grad_norm_{name}"]  # the norm before clipping: of the rank-averaged gradient
                res[f"{mode}_{name}_norm"] = abs(got - ref_norms[name]) <= 1e-5 * max(1.0, ref_norms[name])
            with D.summon_full_params_if_sharded(root):
                got = {D.clean_name(n): p.detach().clone() for n, p in module.model.named_parameters() if "lora_" in n}
            res[f"{mode}_updated_adapters"] = got.keys() == ref_state.keys() and all(
                torch.allclose(got[n], v, atol=1e-6) for n, v in ref_state.items())
            res[f"{mode}_head_sharded_outside_forward"] = module.model._lm_head.weight.dim() != 2
            with D.summon_full_params_if_sharded(root, recurse=False):
                torch.manual_seed(0)
                gen = module.model.generate_from_ids(ids, mask, max_new_tokens=4).action_ids
            res[f"{mode}_generation"] = torch.equal(gen, ref_gen)
            D.save_adapters_sharded(module.model, os.path.join(out_dir, mode), root)
            if rank == 0:
                from safetensors.torch import load_file

                saved = load_file(os.path.join(out_dir, mode, "target", "adapter_model.safetensors"))
                res[f"{mode}_saved"] = len(saved) == len(ref_target) and all(
                    torch.allclose(v, ref_target[f"peft_model.{k.replace('.weight', '.target.weight')}"])
                    for k, v in saved.items())
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(res, fh)


@pytest.mark.slow
def test_fsdp_adapters_on_two_cpu_ranks(tmp_path):
    """torch FSDP1 (gloo, 2 processes) around ETPOModule: the naive Polyak update breaks on flat-parameter shards,
    and a backward inside the root forward (Lightning's manual optimisation) is refused; the module's own update --
    targets, the critic step, the policy step against the updated critic, Polyak, each forward through the root
    and each backward after it, with prefix sharing on -- gives the unsharded update of rank-averaged gradients in
    both adapter modes (gradient norms, every adapter after the step); generation with the root summoned and the
    saved adapters equal the unsharded model's."""
    import json

    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_dist_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res.pop("naive_polyak") in ("raised", "wrong")
        assert res.pop("backward_inside_root_forward") in ("raised", "wrong")
        assert res and all(res.values()), res
    assert json.loads((tmp_path / "rank0.json").read_text())["replicate_saved"] is True


def test_strategy_checkpoint_holds_replicated_adapters_only(tmp_path):
    """ETPOFSDPStrategy (adapters replicated, state_dict_type full): the checkpoint state is the adapter tensors and
    the plain optimizer state, gathered without any collective, and it loads back (torch FSDP on CPU, 1 process)."""
    import types

    import torch.distributed as dist
    from lightning.pytorch.trainer.states import TrainerFn
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from modules.strategy import ETPOFSDPStrategy
    from modules.shared_base.fsdp import fsdp_kwargs
    from modules.etpo import ETPOModule

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        def build():
            module = ETPOModule(tiny_backbone())
            module.configure_model()
            root = FSDP(module, device_id=torch.device("cpu"), **fsdp_kwargs(module.model))
            strategy = ETPOFSDPStrategy()
            strategy.model, strategy._lightning_module = root, module
            module.trainer = types.SimpleNamespace(state=types.SimpleNamespace(fn=TrainerFn.FITTING))
            optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
            strategy.optimizers = [optimizer]
            return module, strategy, optimizer

        module, strategy, optimizer = build()
        for p in module.model.critic_parameters() + module.model.policy_parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        module.model.polyak_update(0.5)
        state = strategy.lightning_module_state_dict()
        assert set(state) == set(module.model.trainable_state_dict(prefix="model."))
        checkpoint = {"state_dict": dict(state), "optimizer_states": [strategy.optimizer_state(optimizer)]}
        torch.save(checkpoint, tmp_path / "last.ckpt")
        other, strategy2, optimizer2 = build()
        rest = strategy2.load_checkpoint(tmp_path / "last.ckpt")
        assert "state_dict" not in rest and "optimizer_states" not in rest
        for name, value in other.model.trainable_state_dict(prefix="model.").items():
            assert torch.equal(value, state[name]), name
        assert optimizer2.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    finally:
        dist.destroy_process_group()
