"""Shared small models. Transformer fixtures skip where the installed TransformerLens
lacks the model kind (4.x has no HookedTransformer)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import funcpatch as fp

#: Where the shared model fixtures and ``tokens`` live: ``FUNCPATCH_TEST_DEVICE=cuda pytest``
#: runs the tests that use them on a GPU (default: the CPU).
DEVICE = torch.device(os.environ.get("FUNCPATCH_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("FUNCPATCH_TEST_DEVICE asks for CUDA but torch.cuda.is_available() is False; "
                       "unset it or set it to 'cpu'")


def has_bridge() -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
        return True
    except ImportError:
        return False


def run_main(argv):
    """``funcpatch`` with ``argv`` in this process: ``(exit code, stdout, stderr)``."""
    import contextlib
    import io

    from funcpatch import cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def has_hooked() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
        return True
    except ImportError:
        return False


def tiny_gpt2_bridge(n_layers=2, d_model=32, n_heads=2, vocab=50, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, vocab_size=vocab,
                                    n_positions=32)).eval()
    return fp.models.from_hf(hf.to(DEVICE))


def tiny_llama_bridge(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=50,
                                      max_position_embeddings=32)).eval()
    return fp.models.from_hf(hf.to(DEVICE))


def tiny_neox_bridge(seed=0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(seed)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, vocab_size=50, max_position_embeddings=32,
                                          use_parallel_residual=True)).eval()
    return fp.models.from_hf(hf.to(DEVICE))


def tiny_hooked(attn_only=False, seed=0):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=None if attn_only else 64,
                                  n_ctx=32, d_vocab=50, act_fn=None if attn_only else "gelu", attn_only=attn_only,
                                  seed=seed, tokenizer_name=None, device=str(DEVICE))
    return HookedTransformer(cfg).eval()


TRANSFORMERS = {
    "gpt2-bridge": (has_bridge, tiny_gpt2_bridge),
    "llama-bridge": (has_bridge, tiny_llama_bridge),
    "neox-bridge": (has_bridge, tiny_neox_bridge),
    "hooked": (has_hooked, tiny_hooked),
    "hooked-attn-only": (has_hooked, lambda: tiny_hooked(attn_only=True)),
}
_cache = {}


@pytest.fixture(params=list(TRANSFORMERS))
def transformer(request):
    available, build = TRANSFORMERS[request.param]
    if not available():
        pytest.skip(f"{request.param}: not in this TransformerLens")
    if request.param not in _cache:
        _cache[request.param] = build()
    return _cache[request.param]


@pytest.fixture
def gpt2():
    if not has_bridge():
        pytest.skip("no TransformerBridge")
    if "gpt2-bridge" not in _cache:
        _cache["gpt2-bridge"] = tiny_gpt2_bridge()
    return _cache["gpt2-bridge"]


@pytest.fixture
def any_lm():
    """One transformer available in this environment (bridge preferred)."""
    name = "gpt2-bridge" if has_bridge() else "hooked"
    if name not in _cache:
        _cache[name] = TRANSFORMERS[name][1]()
    return _cache[name]


def tokens(seed, batch=3, seq=6, vocab=50):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(DEVICE)
