"""Model kinds funcpatch can patch: where each graph node lives and which hooks it needs.

A backend answers three questions about one kind of model: its shape (layers, heads,
attention-only, parallel attention/MLP), which module runs each node's hook point, and
how to switch on the per-head hooks the graph needs (and back off afterwards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

from torch import nn

from funcpatch.models.micro import MicroModel


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_heads: int
    attn_only: bool = False
    parallel_attn_mlp: bool = False
    n_key_value_heads: Optional[int] = None


class MissingHooksError(ValueError):
    """The model does not expose the hook points the requested graph needs."""


class Backend:
    name = "abstract"
    is_transformer = True
    reentrant_forward = True  # may two threads run the model's forward at once?

    def shape(self, model: nn.Module) -> ModelShape:
        raise NotImplementedError

    def enable(self, model: nn.Module, flags: Iterable[str]) -> Callable[[], None]:
        """Switch on hook flags; return a function that restores the previous setting."""
        return lambda: None

    def modules(self, model: nn.Module, names: Iterable[str]) -> Dict[str, nn.Module]:
        """The hook module for each node module name (raises MissingHooksError)."""
        raise NotImplementedError

    def carry_to(self, name: str) -> Optional[str]:
        """Where a change patched into hook ``name`` must also be added, if the hook is
        off the residual path; None when the hook is on it."""
        return None


class MicroBackend(Backend):
    name = "MicroModel"
    is_transformer = False

    def shape(self, model):
        return ModelShape(model.n_layers, 2)

    def modules(self, model, names):
        out, missing = {}, []
        for n in names:
            try:
                out[n] = model.get_submodule(n)
            except AttributeError:
                missing.append(n)
        if missing:
            raise MissingHooksError(f"MicroModel has no modules {missing}")
        return out


class _TransformerLensBackend(Backend):
    """HookedTransformer and TransformerBridge share hook names and config flags."""

    def shape(self, model):
        cfg = model.cfg
        return ModelShape(cfg.n_layers, cfg.n_heads, bool(getattr(cfg, "attn_only", False)),
                          bool(getattr(cfg, "parallel_attn_mlp", False)), getattr(cfg, "n_key_value_heads", None))

    def enable(self, model, flags):
        flags = list(flags)
        before = {f: bool(getattr(model.cfg, f, False)) for f in flags}
        done = []
        try:
            for f in flags:
                if not before[f]:
                    getattr(model, f"set_{f}")(True)
                    done.append(f)
        except Exception as e:
            for f in reversed(done):
                getattr(model, f"set_{f}")(False)
            raise MissingHooksError(
                f"{type(model).__name__} refused {f}=True ({type(e).__name__}: {e}); the graph needs per-head "
                f"hooks {flags}. Use a model whose architecture supports them (e.g. GPT-2, Llama, GPT-NeoX "
                f"through fp.models.from_hf) or a HookedTransformer") from e

        def restore():
            for f in reversed(done):
                getattr(model, f"set_{f}")(False)

        return restore

    def modules(self, model, names):
        hooks = model.hook_dict
        missing = [n for n in names if n not in hooks]
        if missing:
            raise MissingHooksError(f"{type(model).__name__} has no hook points {missing}")
        return {n: hooks[n] for n in names}


class HookedTransformerBackend(_TransformerLensBackend):
    name = "HookedTransformer"


class BridgeBackend(_TransformerLensBackend):
    name = "TransformerBridge"
    # Its per-head attention path stores the captured residual on the attention module
    # during a forward (measured: 15 of 40 concurrent forwards wrong), so funcpatch runs
    # one forward at a time per bridge.
    reentrant_forward = False

    def carry_to(self, name):
        # The bridge's hook_resid_mid observes the second norm's input; the residual
        # itself flows on inside the transformers block, to hook_resid_post.
        if name.endswith(".hook_resid_mid"):
            return name[: -len("hook_resid_mid")] + "hook_resid_post"
        return None


class TransformersBackend(Backend):
    """A transformers causal LM given directly: no hooks, funcpatch's own forward only
    (:mod:`funcpatch.decoder`); node names are TransformerLens hook names all the same."""

    name = "transformers"

    def shape(self, model):
        from funcpatch.arch import read_arch
        a = read_arch(model)
        return ModelShape(a.n_layers, a.n_heads, False, a.parallel, a.n_kv_heads)

    def modules(self, model, names):
        raise MissingHooksError(f"a bare {type(model).__name__} has no hook points; funcpatch runs it with its own "
                                "forward only (wrap it with fp.models.from_hf for the hook path)")


def backend_for(model: nn.Module) -> Backend:
    if isinstance(model, MicroModel):
        return MicroBackend()
    from funcpatch.arch import transformers_model
    if transformers_model(model) is model:
        return TransformersBackend()
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # TransformerLens < 3
        TransformerBridge = ()
    if TransformerBridge and isinstance(model, TransformerBridge):
        return BridgeBackend()
    try:
        from transformer_lens import HookedTransformer
    except ImportError:  # TransformerLens >= 4
        HookedTransformer = ()
    if HookedTransformer and isinstance(model, HookedTransformer):
        return HookedTransformerBackend()
    raise TypeError(
        f"funcpatch cannot patch a {type(model).__name__}; supported: funcpatch.MicroModel, a transformers "
        "causal LM (GPT-2, GPT-NeoX/Pythia, Llama, Mistral, Qwen2/2.5, Qwen3, Gemma-2), "
        "transformer_lens TransformerBridge (wrap a transformers model with fp.models.from_hf), "
        "transformer_lens HookedTransformer (TransformerLens < 4)")
