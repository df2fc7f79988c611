"""Today's decoder families on funcpatch's own forward (funcpatch.decoder): GPT-2,
GPT-NeoX/Pythia, Llama (Llama-3 rope scaling), Mistral (sliding window), Qwen2 (q/k/v
biases), Qwen3 (q/k norms), Gemma-2 (sandwich norms, soft-caps, alternating windows,
scaled embeddings, query_pre_attn_scalar), with grouped-query attention in both graph
forms. Checked against transformers' own forward and hand-written hooks on it."""

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch.func import grad

import funcpatch as fp
from conftest import has_hooked

# The matrix needs no TransformerLens; CI runs it once, in the TransformerLens 4 environment.
pytestmark = pytest.mark.skipif(has_hooked(), reason="architecture matrix: TransformerLens 4 environment only")

VOCAB, SEQ = 60, 10  # SEQ > every sliding window below
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=VOCAB,
              max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 4, "rope_theta": 10000.0}
FAMILIES = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                                   layer_norm_epsilon=1e-3)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**COMMON, use_parallel_residual=True, rotary_pct=0.5)),
    "gpt_neox-sequential": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**COMMON, use_parallel_residual=False)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**COMMON, num_key_value_heads=4)),
    "llama3-gqa": lambda: T.LlamaForCausalLM(T.LlamaConfig(**COMMON, num_key_value_heads=2, rope_scaling=LLAMA3_ROPE,
                                                           attention_bias=True, mlp_bias=True, rms_norm_eps=1e-3)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=3)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON, num_key_value_heads=1)),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=8)),
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16, sliding_window=3,
                                                         query_pre_attn_scalar=12, attn_logit_softcapping=5.0,
                                                         final_logit_softcapping=3.0)),
}
_models = {}


def model(name):
    """Seeded weights, every parameter moved off its initial value so that norms, biases
    and soft-caps matter."""
    if name not in _models:
        torch.manual_seed(sum(map(ord, name)))
        m = FAMILIES[name]().eval()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        _models[name] = m
    return _models[name]


def toks(seed, batch=3):
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


ANSWERS, WRONG = torch.tensor([[1], [2], [3], [4]]), torch.tensor([[5], [6], [7], [8]])


def task(name, grouped, seed):
    """``(pm, clean, corrupt, loader)``: 4 prompt pairs scored at the last position."""
    clean, corrupt = toks(seed, batch=4), toks(seed + 1, batch=4)
    pm = fp.patchable(model(name), grouped_kv=grouped, slice_output="last_seq")
    loader = fp.PromptDataLoader(fp.PromptDataset(clean, corrupt, ANSWERS, WRONG), seq_len=SEQ, diverge_idx=0,
                                 batch_size=4)
    return pm, clean, corrupt, loader


@torch.no_grad()
def rel(a, b):
    return float((a - b).abs().max() / b.abs().max()) if a.shape == b.shape else float("inf")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_forward_equals_transformers(name):
    hf = model(name)
    x = toks(0)
    pm = fp.patchable(hf)
    assert type(pm.forward).__name__ == "OwnForward"
    assert rel(pm(x), hf(x).logits) <= 1e-5
    mask = torch.ones_like(x)
    mask[0, -3:] = 0  # right padding: compare real positions
    got, want = pm(x, attention_mask=mask), hf(x, attention_mask=mask).logits
    assert rel(got[mask.bool()], want[mask.bool()]) <= 1e-5
    assert rel(pm(x, logits_to_keep=2), hf(x).logits[:, -2:]) <= 1e-5


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_sliding_windows_are_honoured(name):
    """Sequences longer than the window: the windowed model differs from the same weights
    without a window, and funcpatch follows the windowed one."""
    hf = model(name)
    x = toks(1)
    config = type(hf.config).from_dict(hf.config.to_dict())
    config.sliding_window = 2 * SEQ  # as wide as the sequence: no window in effect
    unwindowed = type(hf)(config).eval()
    unwindowed.load_state_dict(hf.state_dict())
    assert rel(hf(x).logits, unwindowed(x).logits) > 1e-2
    assert rel(fp.patchable(hf)(x), hf(x).logits) <= 1e-5
    assert rel(fp.patchable(unwindowed)(x), unwindowed(x).logits) <= 1e-5


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_no_edge_is_clean_and_every_edge_is_corrupt(name, grouped):
    hf = model(name)
    clean, corrupt = toks(2), toks(3)
    pm = fp.patchable(hf, grouped_kv=grouped)
    patch = fp.src_ablations(pm, corrupt)
    state = fp.patch_mode(pm, fp.init_state(pm), patch)
    want_clean, want_corrupt = hf(clean).logits, hf(corrupt).logits
    assert rel(fp.patched_forward(pm, state, clean), want_clean) <= 1e-5
    every = fp.set_all_masks(state, 1.0)
    for grad_enabled in (False, True):
        with torch.set_grad_enabled(grad_enabled):
            assert rel(fp.patched_forward(pm, every, clean), want_corrupt) <= 1e-5


def _random_masks(state, generator, batch=None):
    lead = () if batch is None else (batch,)
    return dataclasses.replace(state, masks={k: torch.rand(lead + v.shape, generator=generator)
                                             for k, v in state.masks.items()})


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_no_grad_forward_equals_the_autograd_forward_on_random_masks(name, grouped):
    """Without autograd the forward takes its own path (differences in one buffer, running
    sums for single-row destinations, rotations in place as complex products, weight
    layouts reused across calls); with autograd everything is out of place and rebuilt.
    Both agree on random masks, shared by the batch and per row, and a repeated no-grad
    call gives the same bits."""
    hf = model(name)
    clean, corrupt = toks(8), toks(9)
    pm = fp.patchable(hf, grouped_kv=grouped)
    state = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, corrupt))
    g = torch.Generator().manual_seed(3)
    for batch in (None, clean.shape[0]):
        s = _random_masks(state, g, batch)
        with torch.no_grad():
            fast = fp.patched_forward(pm, s, clean)
            again = fp.patched_forward(pm, s, clean)
        slow = fp.patched_forward(pm, s, clean)
        assert rel(fast, slow) <= 1e-5
        assert torch.equal(fast, again)
        assert rel(fast, hf(clean).logits) > 1e-3  # the masks matter


@pytest.mark.parametrize("separate_qkv", [True, False])
def test_one_head_per_layer_no_grad_equals_autograd(separate_qkv):
    """A group of one head has one row, like an MLP input, but is not one of the running
    sums (those are the destinations without heads): it takes the plain product."""
    torch.manual_seed(3)
    hf = T.LlamaForCausalLM(T.LlamaConfig(**{**COMMON, "num_attention_heads": 1, "num_key_value_heads": 1})).eval()
    clean, corrupt = toks(12), toks(13)
    pm = fp.patchable(hf, separate_qkv=separate_qkv)
    state = _random_masks(fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, corrupt)),
                          torch.Generator().manual_seed(6))
    with torch.no_grad():
        fast = fp.patched_forward(pm, state, clean)
    assert rel(fast, fp.patched_forward(pm, state, clean)) <= 1e-5
    assert rel(fast, hf(clean).logits) > 1e-3


def test_weights_changed_between_no_grad_calls_are_used():
    """The weight layouts a no-grad forward reuses across calls are rebuilt when a weight
    they come from changes: in place (an optimizer step, load_state_dict) or replaced
    (``.data``), the projection's or the norm's folded into it."""
    import copy
    hf = copy.deepcopy(model("llama3-gqa"))
    clean, corrupt = toks(10), toks(11)
    pm = fp.patchable(hf)
    state = _random_masks(fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, corrupt)),
                          torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(5)
    layer = hf.model.layers[1]
    changes = [
        lambda: layer.self_attn.q_proj.weight.add_(0.2 * torch.randn(layer.self_attn.q_proj.weight.shape, generator=g)),
        lambda: setattr(layer.self_attn.k_proj.weight, "data", layer.self_attn.k_proj.weight.data + 0.2),
        lambda: layer.input_layernorm.weight.mul_(1.5),
        lambda: layer.self_attn.v_proj.bias.add_(0.3),
        lambda: hf.load_state_dict(model("llama3-gqa").state_dict()),
    ]
    with torch.no_grad():
        before = fp.patched_forward(pm, state, clean)
    for change in changes:
        with torch.no_grad():
            change()
            after = fp.patched_forward(pm, state, clean)
        assert rel(after, before) > 1e-4
        assert rel(after, fp.patched_forward(pm, state, clean)) <= 1e-6  # autograd: nothing reused
        before = after


def test_grouped_graph_names_and_counts():
    hf = model("llama3-gqa")  # 3 layers, 4 query heads, 2 key/value heads
    per_head, grouped = fp.patchable(hf), fp.patchable(hf, grouped_kv=True)
    assert per_head.graph.n_edges == fp.patchable(model("llama")).graph.n_edges  # MIB's graph: as if ungrouped
    names = {d.name for d in grouped.graph.dests}
    assert {"A0.0.Q", "A0.3.Q", "A0.kv0.K", "A0.kv1.V", "A2.kv1.K"} <= names
    assert not {"A0.0.K", "A0.2.V"} & names
    # per layer 2 * (4 - 2) fewer K/V destinations, each with the layer's incoming sources
    n_in = [1 + b * 5 for b in range(3)]
    assert per_head.graph.n_edges - grouped.graph.n_edges == sum(2 * 2 * n for n in n_in)
    with pytest.raises(ValueError, match="separate_qkv"):
        fp.patchable(hf, separate_qkv=False)


@pytest.mark.parametrize("x", ["K", "V"])
def test_every_query_heads_kv_edge_in_a_group_equals_the_groups_kv_edge(x):
    hf = model("llama3-gqa")
    clean, corrupt = toks(4), toks(5)
    per_head, grouped = fp.patchable(hf), fp.patchable(hf, grouped_kv=True)
    for src in ("MLP 0", "A0.1", "Resid Start"):
        for g, heads in ((0, (0, 1)), (1, (2, 3))):
            a = fp.patch_mode(per_head, fp.init_state(per_head), fp.src_ablations(per_head, corrupt),
                              edges=[f"{src}->A1.{h}.{x}" for h in heads])
            b = fp.patch_mode(grouped, fp.init_state(grouped), fp.src_ablations(grouped, corrupt),
                              edges=[f"{src}->A1.kv{g}.{x}"])
            out_a, out_b = fp.patched_forward(per_head, a, clean), fp.patched_forward(grouped, b, clean)
            assert rel(out_a, out_b) <= 1e-5
            assert rel(out_a, hf(clean).logits) > 1e-4  # the edge matters
            # one query head alone is not the group
            half = fp.patch_mode(per_head, fp.init_state(per_head), fp.src_ablations(per_head, corrupt),
                                 edges=[f"{src}->A1.{heads[0]}.{x}"])
            assert rel(fp.patched_forward(per_head, half, clean), out_b) > 1e-5


def _hand_patched(hf, clean, corrupt, dest_layer, kind, index):
    """transformers' own forward on ``clean`` where one destination's input gets
    ``MLP 0(corrupt) - MLP 0(clean)`` added, by hand-written hooks: ``kind`` "q"/"k"/"v"
    (the query head or key/value group ``index`` of layer ``dest_layer``; its projection
    recomputed from the shifted input) or "mlp" (layer ``dest_layer``'s MLP input)."""
    layers = hf.model.layers
    outs = {}
    h = layers[0].mlp.register_forward_hook(lambda m, a, o: outs.__setitem__("mlp0", o))
    hf(corrupt)
    patch = outs["mlp0"]
    hf(clean)
    h.remove()
    delta = patch - outs["mlp0"]
    layer = layers[dest_layer]
    handles = []
    if kind == "mlp":
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: (a[0] + delta,)))
    else:
        resid = {}
        handles.append(layer.register_forward_pre_hook(lambda m, a, kw: resid.__setitem__("x", a[0] if a else kw["hidden_states"]),
                                                       with_kwargs=True))
        proj = getattr(layer.self_attn, f"{kind}_proj")
        dh = hf.config.head_dim

        def swap(m, a, o):
            shifted = F.linear(layer.input_layernorm(resid["x"] + delta), m.weight, m.bias)
            o = o.clone()
            o[..., index * dh:(index + 1) * dh] = shifted[..., index * dh:(index + 1) * dh]
            return o
        handles.append(proj.register_forward_hook(swap))
    try:
        return hf(clean).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("dest,kind,index", [("A1.3.Q", "q", 3), ("A2.kv1.K", "k", 1), ("A1.kv0.V", "v", 0),
                                             ("MLP 2", "mlp", None)])
def test_single_edges_equal_hand_written_hooks(dest, kind, index):
    hf = model("llama3-gqa")
    clean, corrupt = toks(6), toks(7)
    pm = fp.patchable(hf, grouped_kv=True)
    state = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, corrupt), edges=[f"MLP 0->{dest}"])
    got = fp.patched_forward(pm, state, clean)
    layer = int(dest[1]) if dest[0] == "A" else int(dest.split()[1])
    with torch.no_grad():
        want = _hand_patched(hf, clean, corrupt, layer, kind, index)
    assert rel(want, hf(clean).logits) > 1e-4  # the edge matters
    assert rel(got, want) <= 1e-5


def test_gemma2_head_edges_carry_the_change_in_the_normalized_output():
    """A post-normalized head's edge gives its destination ``post_norm(S + d_h) -
    post_norm(S)`` (S: the layer's pre-norm head sum, d_h the head's patch difference),
    written here with hooks on transformers' Gemma-2."""
    hf = model("gemma2")
    clean, corrupt = toks(8), toks(9)
    pm = fp.patchable(hf)
    state = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, corrupt), edges=["A0.2->MLP 1"])
    got = fp.patched_forward(pm, state, clean)
    attn, dh = hf.model.layers[0].self_attn, hf.config.head_dim
    z = {}
    h = attn.o_proj.register_forward_hook(lambda m, a, o: z.__setitem__("z", a[0]))
    with torch.no_grad():
        hf(corrupt)
        z_corrupt = z["z"]
        hf(clean)
        h.remove()
        summed = z["z"] @ attn.o_proj.weight.T
        head = slice(2 * dh, 3 * dh)
        d_h = (z_corrupt[..., head] - z["z"][..., head]) @ attn.o_proj.weight[:, head].T
        post = hf.model.layers[0].post_attention_layernorm
        change = post(summed + d_h) - post(summed)
        hook = hf.model.layers[1].pre_feedforward_layernorm.register_forward_pre_hook(lambda m, a: (a[0] + change,))
        want = hf(clean).logits
        hook.remove()
    assert rel(want, hf(clean).logits) > 1e-4
    assert rel(got, want) <= 1e-5
    # not additive: the head's pre-norm difference added as is gives another answer
    assert rel(got, hf(clean).logits) > 1e-4


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("name", ["llama3-gqa", "qwen3", "gemma2", "gpt_neox", "mistral", "qwen2"])
def test_eap_equals_torch_func_grad_at_masks_zero(name, grouped):
    pm, clean, corrupt, loader = task(name, grouped, 10)
    ans, wrong = ANSWERS, WRONG
    scores = fp.algos.eap(pm, loader, progress=False)
    state = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, corrupt))

    def loss(masks):
        out = fp.patched_forward(pm, dataclasses.replace(state, masks=masks), clean)[pm.out_slice]
        logp = out  # grad_function="logit", answer_function="avg_diff": minus the mean logit difference
        return -(logp.gather(-1, ans) - logp.gather(-1, wrong)).mean()

    want = grad(loss)(state.masks)
    for k in want:
        torch.testing.assert_close(scores[k], want[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    per_prompt = fp.algos.eap(pm, loader, per_prompt=True, progress=False)
    for j in range(4):
        one = fp.PromptDataLoader(fp.PromptDataset(clean[j:j + 1], corrupt[j:j + 1], ans[j:j + 1], wrong[j:j + 1]),
                                  seq_len=SEQ, diverge_idx=0, batch_size=1)
        single = fp.algos.eap(pm, one, progress=False)
        for k in single:
            torch.testing.assert_close(per_prompt[k][j], single[k], atol=1e-5, rtol=1e-4)


def _meta(config_cls, **kw):
    with torch.device("meta"):
        return T.AutoModelForCausalLM.from_config(config_cls(**kw))


@pytest.mark.slow
@pytest.mark.parametrize("name,build,edges", [
    ("gpt2-small", lambda: _meta(T.GPT2Config, n_layer=12, n_embd=768, n_head=12), 32_491),
    ("qwen2.5-0.5b", lambda: _meta(T.Qwen2Config, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, intermediate_size=4864, vocab_size=151936), 179_749),
    ("gemma-2-2b", lambda: _meta(T.Gemma2Config, hidden_size=2304, num_hidden_layers=26, num_attention_heads=8,
                                 num_key_value_heads=4, head_dim=256, intermediate_size=9216, vocab_size=256000),
     74_218),
    ("llama-3.1-8b", lambda: _meta(T.LlamaConfig, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=14336, vocab_size=128256), 1_592_881),
])
def test_edge_counts_equal_mibs_from_configs_alone(name, build, edges):
    """MIB's edge counts for its four models, from configs on the meta device (no weights)."""
    m = build()
    assert next(m.parameters()).device.type == "meta"
    assert fp.patchable(m).graph.n_edges == edges


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bridges_take_the_own_forward_with_the_same_results(name):
    import copy
    pytest.importorskip("transformer_lens.model_bridge")
    hf = model(name)
    bridge = fp.models.from_hf(copy.deepcopy(hf))
    pm_bridge, pm_hf = fp.patchable(bridge), fp.patchable(hf)
    assert type(pm_bridge.forward).__name__ == "OwnForward"
    clean, corrupt = toks(12), toks(13)
    g = torch.Generator().manual_seed(0)
    state = fp.patch_mode(pm_hf, fp.init_state(pm_hf), fp.src_ablations(pm_hf, corrupt))
    state = dataclasses.replace(state, masks={k: torch.rand(v.shape, generator=g) for k, v in state.masks.items()})
    assert rel(fp.patched_forward(pm_bridge, state, clean), fp.patched_forward(pm_hf, state, clean)) <= 1e-5


def test_bare_transformers_models_refuse_calls_the_own_forward_does_not_take():
    pm = fp.patchable(model("llama"))
    with pytest.raises(ValueError, match="token ids"):
        pm(toks(0).float())
    with pytest.raises(ValueError, match="keyword"):
        pm(toks(0), output_attentions=True)
    with pytest.raises(TypeError, match="supported"):
        fp.patchable(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name,grouped", [("llama3-gqa", True), ("gpt_neox", False)])
def test_every_algorithm_runs_on_both_graph_forms(name, grouped, tmp_path):
    """Every algorithm, run_circuits and the drawing on the grouped graph form and on
    parallel blocks (ACDC's resumed evaluations: test_resumed_forward_equals_the_whole_forward)."""
    hf = model(name)
    pm, clean, corrupt, loader = task(name, grouped, 14)
    n = pm.graph.n_edges
    results = {
        "eap_ig": fp.algos.eap_ig(pm, loader, samples=2, progress=False),
        "eap_ig_inputs": fp.algos.eap_ig(pm, loader, samples=2, variant="inputs", progress=False),
        "exact": fp.algos.exact_patching(pm, loader, progress=False),
        "acdc": fp.algos.acdc(pm, loader, tao_exps=[-2], progress=False),
        "probing": fp.algos.subnetwork_probing(pm, loader, learning_rate=0.1, epochs=2, progress=False),
        "magnitude": fp.algos.activation_magnitude(pm, loader),
    }
    for what, scores in results.items():
        assert set(scores) == {m.module_name for m in pm.graph.dest_modules}, what
        assert sum(v.numel() for v in scores.values()) == n, what
        assert not any(torch.isnan(v).any() for v in scores.values()), what
    outs = fp.run_circuits(pm, loader, [0, n // 2, n], results["exact"], progress=False)
    key = next(iter(outs[n]))
    torch.testing.assert_close(outs[n][key], hf(clean).logits[:, -1], atol=1e-4, rtol=1e-4)  # every edge: clean
    torch.testing.assert_close(outs[0][key], hf(corrupt).logits[:, -1], atol=1e-4, rtol=1e-4)  # none: corrupt
    from funcpatch import viz
    viz.draw_circuit(pm, results["exact"], 10, path=tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0


@pytest.mark.parametrize("name", ["llama3-gqa", "gpt_neox", "qwen3"])
def test_resumed_forward_equals_the_whole_forward(name):
    """ACDC's evaluations start at a checkpoint of a clean forward: exact when nothing
    before it is patched, also in parallel blocks and over repeats of one batch."""
    hf = model(name)
    pm = fp.patchable(hf, grouped_kv=True)
    clean, corrupt = toks(16), toks(17)
    _, src_outs, checkpoints = pm.forward.checkpoints(pm, (clean,), {})
    assert sorted(checkpoints) == [(b, s) for b in range(3) for s in (0, 1)] + [(3, 0)]
    g = torch.Generator().manual_seed(1)
    state = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, corrupt))
    state = dataclasses.replace(state, masks={k: torch.rand((6,) + v.shape, generator=g) for k, v in state.masks.items()})
    parallel = pm.forward.decoder.arch.parallel
    for point in sorted(checkpoints):
        def after(name):
            block, stage = int(name.split(".")[1]), int(name.endswith("hook_mlp_in"))
            if name.endswith("hook_resid_post"):
                return (block + 1, 0) >= point
            return (block, 0 if parallel else stage) >= (point[0], 0 if parallel else point[1])
        resid, n_before = checkpoints[point]
        # masks per row, with autograd; masks shared by the batch, without (the buffer and running sums)
        for per_row, grad in ((True, True), (False, False)):
            masks = {k: (v if per_row else v[0]) if after(k) else torch.zeros_like(v if per_row else v[0])
                     for k, v in state.masks.items()}
            with torch.set_grad_enabled(grad):
                whole = fp.patched_forward(pm, dataclasses.replace(
                    state, masks=masks, patch_src_outs=state.patch_src_outs.repeat(1, 2, 1, 1)), clean.repeat(2, 1))
                got = pm.forward.resumed(pm, dataclasses.replace(state, masks=masks), point, resid.repeat(2, 1, 1),
                                         src_outs[:n_before], (clean.repeat(2, 1),), {}, repeats=2)
            assert rel(got, whole) <= 1e-5, (point, per_row)


@pytest.fixture
def one_thread():
    # tiny tensors: more threads only contend (minutes instead of seconds on a loaded 2-core machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name,graph", [("gpt2", {}), ("gpt2", {"separate_qkv": False}), ("gpt2", {"seq_len": SEQ}),
                                        ("gpt_neox", {}), ("llama3-gqa", {}), ("llama3-gqa", {"grouped_kv": True}),
                                        ("qwen3", {"grouped_kv": True}), ("gemma2", {})])
def test_eap_ig_inputs_one_backward_equals_torch_func_grad(name, graph, monkeypatch, one_thread):
    """EAP-IG-inputs from one plain forward/backward per step (funcpatch.zero_grads with
    ``resid``) equals the torch.func.grad path, which runs when the forward declines the
    shortcut: both endpoints, per prompt or not, with and without padding. Gemma-2's
    post-normalized heads always take the torch.func path."""
    pm = fp.patchable(model(name), slice_output="last_seq", **graph)
    clean, corrupt = toks(20, batch=4), toks(21, batch=4)
    mask, cmask = torch.ones_like(clean), torch.ones_like(clean)
    mask[0, :3], mask[2, :1], cmask[1, :2] = 0, 0, 0  # left padding, clean and corrupt apart
    plain = fp.PromptPairBatch(0, 0, clean, corrupt, ANSWERS, WRONG)
    padded = dataclasses.replace(plain, attention_mask=mask, corrupt_attention_mask=cmask)
    real = pm.forward.zero_mask_grads
    fast = []

    def spy(*a, **k):
        out = real(*a, **k)
        fast.append(out is not None and (len(a) > 5 or "resid" in k))
        return out

    def scores(batch, **kw):
        got = fp.algos.eap_ig(pm, [batch], samples=3, variant="inputs", progress=False, **kw)
        return torch.cat([v.flatten() for v in got.values()])

    cases = list(itertools.product((plain, padded), ("clean", "corrupt"), (False, True)))
    for batch, endpoint, per_prompt in cases[:1] if name == "gemma2" else cases:  # gemma2: two torch.func runs
        monkeypatch.setattr(pm.forward, "zero_mask_grads", spy)
        fast.clear()
        got = scores(batch, endpoint=endpoint, per_prompt=per_prompt)
        assert fast and all(fast) == (name != "gemma2")
        monkeypatch.setattr(pm.forward, "zero_mask_grads", lambda *a, **k: None)  # the torch.func path
        want = scores(batch, endpoint=endpoint, per_prompt=per_prompt)
        assert rel(got, want) <= 1e-5, (endpoint, per_prompt, batch is padded)
