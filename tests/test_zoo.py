"""Tests for funcpatch.zoo: the trained models load offline, solve their held-out tasks,
and the induction models (GPT-2, and Llama with grouped-query attention) work by induction
(previous-token head + induction head)."""

from __future__ import annotations

import importlib.util
import json
import random
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from funcpatch import zoo
from funcpatch.datasets import load_datasets_from_json

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["induction", "induction_gqa", "ioi"]
ARCHITECTURES = {"induction": "GPT2LMHeadModel", "induction_gqa": "LlamaForCausalLM", "ioi": "GPT2LMHeadModel"}
INDUCTION = ["induction", "induction_gqa"]


@lru_cache(maxsize=None)
def loaded(name):
    return zoo.load_hf(name)


@lru_cache(maxsize=None)
def all_prompts(name):
    """Every prompt pair of the model's dataset.json, in file order, as one batch."""
    _, tok = loaded(name)
    n = len(json.loads(zoo.dataset_path(name).read_text())["prompts"])
    train, test = load_datasets_from_json(tok, zoo.dataset_path(name), train_test_size=(n - 1, 1),
                                          shuffle=False, batch_size=n)
    (a,), (b,) = list(train), list(test)
    return (torch.cat([a.clean, b.clean]), torch.cat([a.corrupt, b.corrupt]),
            torch.cat([a.answers, b.answers]), torch.cat([a.wrong_answers, b.wrong_answers]))


@lru_cache(maxsize=None)
def script():
    spec = importlib.util.spec_from_file_location("train_zoo", ROOT / "scripts" / "train_zoo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------- API


def test_list_models():
    assert zoo.list_models() == NAMES


@pytest.mark.parametrize("call", [zoo.info, zoo.model_dir, zoo.dataset_path, zoo.load_hf])
def test_unknown_name_lists_valid_ones(call):
    with pytest.raises(ValueError, match="unknown zoo model 'gpt9'; valid names: induction, induction_gqa, ioi"):
        call("gpt9")


@pytest.mark.parametrize("name", NAMES)
def test_folder_and_card(name):
    folder = zoo.model_dir(name)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "dataset.json",
              "card.json"):
        assert (folder / f).is_file(), f
    assert (folder / "model.safetensors").stat().st_size <= 5 * 2**20
    card = zoo.info(name)
    assert card["name"] == name and card["architecture"] == ARCHITECTURES[name]
    assert card["accuracy"] >= 0.95 and isinstance(card["training"]["seed"], int)
    assert zoo.dataset_path(name) == folder / "dataset.json"


@pytest.mark.parametrize("name", NAMES)
def test_load_hf(name):
    from transformers import PreTrainedTokenizerFast

    model, tok = loaded(name)
    assert type(model).__name__ == ARCHITECTURES[name] and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok.bos_token is not None and tok.bos_token_id == model.config.bos_token_id
    assert tok.convert_ids_to_tokens(tok.bos_token_id) == tok.bos_token
    again = PreTrainedTokenizerFast.from_pretrained(zoo.model_dir(name), local_files_only=True)
    assert again("a b")["input_ids"] == tok("a b")["input_ids"]
    card = zoo.info(name)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, len(tok)) == (
        card["n_layer"], card["d_model"], card["n_head"], card["d_vocab"])
    n_kv = getattr(c, "num_key_value_heads", c.num_attention_heads)
    assert n_kv == card.get("n_kv_head", card["n_head"])


def test_induction_gqa_has_grouped_query_attention():
    model, _ = loaded("induction_gqa")
    attn = model.model.layers[0].self_attn
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert attn.q_proj.weight.shape == (64, 64) and attn.k_proj.weight.shape == attn.v_proj.weight.shape == (32, 64)


# ---------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_held_out_accuracy(name):
    model, _ = loaded(name)
    clean, corrupt, answers, wrong = all_prompts(name)
    assert clean.shape[1] == zoo.info(name)["seq_len"]
    acc = (model(clean).logits[:, -1].argmax(-1) == answers[:, 0]).float().mean().item()
    assert acc >= 0.95
    assert acc == pytest.approx(zoo.info(name)["accuracy"], abs=1e-6)
    # the corrupt prompts point at the wrong answer instead
    corrupt_acc = (model(corrupt).logits[:, -1].argmax(-1) == wrong[:, 0]).float().mean().item()
    assert corrupt_acc == pytest.approx(zoo.info(name)["corrupt_accuracy"], abs=1e-6)
    assert corrupt_acc >= 0.8


@pytest.mark.parametrize("name", INDUCTION)
def test_induction_dataset_is_the_held_out_one(name):
    """dataset.json is what the training script draws, before training, from the card's seed
    (the training rows equal to these prompts' first halves are redrawn)."""
    seed = zoo.info(name)["training"]["seed"]
    expected = script().induction_dataset(random.Random(seed), 400)
    assert json.loads(zoo.dataset_path(name).read_text()) == expected


def test_ioi_dataset_uses_only_held_out_name_pairs():
    seed = zoo.info("ioi")["training"]["seed"]
    train_pairs, held_pairs = script().ioi_pairs(random.Random(seed))
    held = {frozenset(p) for p in held_pairs}
    assert held.isdisjoint(frozenset(p) for p in train_pairs)
    for p in json.loads(zoo.dataset_path("ioi").read_text())["prompts"]:
        assert frozenset([p["answers"][0], p["wrong_answers"][0]]) in held


# ---------------------------------------------------------------------------- induction mechanism


@pytest.mark.parametrize("name", INDUCTION)
def test_induction_model_is_attention_only(name):
    model, _ = loaded(name)
    blocks = model.transformer.h if name == "induction" else model.model.layers
    for block in blocks:
        assert all(float(p.detach().abs().max()) == 0.0 for p in block.mlp.parameters())
    clean, *_ = all_prompts(name)
    outs = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: outs.append(o)) for b in blocks]
    try:
        with torch.no_grad():
            model(clean[:8])
    finally:
        for h in hooks:
            h.remove()
    assert len(outs) == 2 and all(float(o.abs().max()) == 0.0 for o in outs)


@pytest.mark.parametrize("name", INDUCTION)
@torch.no_grad()
def test_induction_attention_patterns(name):
    """Layer 0 has a previous-token head; layer 1 has an induction head that attends to the
    token after the previous occurrence of the current token (which no layer-0 head can)."""
    model, _ = loaded(name)
    clean, corrupt, *_ = all_prompts(name)
    half = zoo.info(name)["half_len"]
    att = model(clean, output_attentions=True).attentions  # n_layer x [batch, query head, query, key]
    seq = clean.shape[1]  # [BOS] x1..x_half x1..x_{half-1}
    q = torch.arange(2, seq)
    prev_score = att[0][:, :, q, q - 1].mean(dim=(0, 2))  # [head]
    q2 = torch.arange(half + 1, seq)  # the second copy: token x_j at position half + j
    def induction_score(layer):  # attention to x_{j+1} in the first copy
        return att[layer][:, :, q2, q2 - half + 1].mean(dim=(0, 2))  # [head]
    assert prev_score.max() > 0.8, prev_score
    assert induction_score(1).max() > 0.8, induction_score(1)
    assert induction_score(0).max() < 0.2, induction_score(0)
    # corrupt prompt y1..y_half x1..x_{half-1} with y_{half-1} = x_{half-1}: from the last
    # position the induction head looks at y_half (position half), the wrong answer
    att = model(corrupt, output_attentions=True).attentions
    assert att[1][:, :, -1, half].mean(0).max() > 0.8


# ---------------------------------------------------------------------------- TransformerLens


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_boots_in_transformer_bridge(name):
    from transformer_lens.model_bridge import TransformerBridge

    model, tok = zoo.load_hf(name)  # a fresh copy: the bridge rewires the model it wraps
    clean = all_prompts(name)[0][:4]
    expected = loaded(name)[0](clean).logits
    bridge = TransformerBridge.boot_transformers(str(zoo.model_dir(name)), hf_model=model, tokenizer=tok)
    bridge.set_use_attn_result(True)
    bridge.set_use_split_qkv_input(True)
    bridge.set_use_hook_mlp_in(True)
    logits, cache = bridge.run_with_cache(clean)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    cfg = zoo.info(name)
    assert cache["blocks.1.attn.hook_result"].shape == (4, clean.shape[1], cfg["n_head"], cfg["d_model"])
    assert "blocks.0.attn.hook_q_input" in cache and "blocks.1.hook_mlp_in" in cache


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_converts_to_hooked_transformer_on_transformer_lens_3(name):
    """On TransformerLens < 4 the same weights load into a HookedTransformer (the induction
    models as genuinely attention-only ones, their zero MLPs dropped; the Llama one with
    grouped-query attention and rotary positions)."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        pytest.skip("TransformerLens >= 4 has no HookedTransformer")
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

    model, _ = loaded(name)
    c, card = model.config, zoo.info(name)
    common = dict(n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads,
                  d_head=card["d_head"], d_vocab=c.vocab_size, n_ctx=card["n_ctx"], attn_only=card["attention_only"],
                  tokenizer_name=None, default_prepend_bos=False)
    if card["architecture"] == "LlamaForCausalLM":
        cfg = HookedTransformerConfig(
            **common, d_mlp=c.intermediate_size, n_key_value_heads=c.num_key_value_heads, act_fn="silu",
            gated_mlp=True, normalization_type="RMS", eps=c.rms_norm_eps, final_rms=True,
            positional_embedding_type="rotary", rotary_dim=card["d_head"], rotary_base=c.rope_parameters["rope_theta"],
            rotary_adjacent_pairs=False)
        state = convert_llama_weights(model, cfg)
    else:
        cfg = HookedTransformerConfig(**common, d_mlp=None if card["attention_only"] else c.n_inner,
                                      act_fn="gelu_new", normalization_type="LN")
        state = convert_gpt2_weights(model, cfg)
    if card["attention_only"]:
        state = {k: v for k, v in state.items() if ".mlp." not in k and ".ln2." not in k}
    ht = HookedTransformer(cfg)
    ht.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False)
    clean = all_prompts(name)[0][:4]
    torch.testing.assert_close(ht(clean), model(clean).logits, atol=1e-4, rtol=1e-4)
