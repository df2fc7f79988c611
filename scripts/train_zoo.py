"""Train the models of ``funcpatch.zoo`` and write their folders.

    python scripts/train_zoo.py induction       # ~1 min on 2 CPU cores
    python scripts/train_zoo.py induction_gqa   # the same task on a Llama with grouped-query attention
    python scripts/train_zoo.py ioi         # ~1-2 min
    python scripts/train_zoo.py all

Each run is reproducible: fixed seeds, CPU, 2 threads, deterministic algorithms, and the
held-out prompts (``dataset.json``) are chosen before training and never trained on.
A folder gets: ``config.json``, ``generation_config.json``, ``model.safetensors``
(transformers ``save_pretrained``), ``tokenizer.json`` + ``tokenizer_config.json`` (a
word-level ``tokenizers`` tokenizer with a BOS token), ``dataset.json`` and ``card.json``.
The card's accuracy is measured after reloading the folder through
``funcpatch.zoo.load_hf`` and ``funcpatch.load_datasets_from_json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from funcpatch import zoo  # noqa: E402
from funcpatch.datasets import load_datasets_from_json  # noqa: E402

SPECIALS = ["<bos>", "<eos>", "<pad>", "<unk>"]  # ids 0..3
BOS, EOS, PAD, UNK = range(4)


# ---------------------------------------------------------------------------- shared helpers


def build_tokenizer(words: Sequence[str], max_len: int):
    """A word-level ``PreTrainedTokenizerFast``: the specials, then ``words`` in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + list(words))}
    assert len(vocab) == len(SPECIALS) + len(words), "duplicate words"
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # splits words and punctuation
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=max_len,
    )


def save_tokenizer(tokenizer, folder: Path) -> None:
    """``tokenizer.json`` + a ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast``,
    which both ``AutoTokenizer`` and ``PreTrainedTokenizerFast.from_pretrained`` load (in
    transformers 4 and 5 alike)."""
    tokenizer.save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("backend", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for extra in ("special_tokens_map.json", "chat_template.jinja"):
        (folder / extra).unlink(missing_ok=True)


def build_gpt2(vocab_size: int, n_positions: int, d_model: int, n_layer: int, n_head: int, n_inner: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=d_model, n_layer=n_layer,
        n_head=n_head, n_inner=n_inner, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
    )
    # No pad_token_id in the model config: with one set, transformers checks the inputs for
    # padding inside forward, a data-dependent branch that torch.func.vmap cannot run.
    # Padding is the tokenizer's business (its pad token) and the attention mask's.
    cfg.pad_token_id = None
    return GPT2LMHeadModel(cfg)


def build_llama(vocab_size: int, n_positions: int, d_model: int, n_layer: int, n_head: int, n_kv_head: int,
                d_mlp: int):
    """A Llama (RMSNorm, rotary positions, gated SiLU MLP) with ``n_head`` query heads
    sharing ``n_kv_head`` key/value heads (grouped-query attention), untied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=n_positions, hidden_size=d_model, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_kv_head, intermediate_size=d_mlp, attention_dropout=0.0,
        bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
    )
    cfg.pad_token_id = None  # as in build_gpt2: no data-dependent padding check under vmap
    return LlamaForCausalLM(cfg)


def blocks(model) -> List[torch.nn.Module]:
    """The transformer blocks of a GPT-2 (``transformer.h``) or Llama (``model.layers``)."""
    base = model.base_model
    return list(base.h if hasattr(base, "h") else base.layers)


def train(model, make_batch: Callable[[int], Tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float,
          weight_decay: float = 0.01, log_every: int = 250) -> float:
    """AdamW, linear warm-up then cosine decay; ``make_batch(step) -> (input_ids, labels)``
    with labels ``-100`` where there is no loss. Returns the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        ids, labels = make_batch(step)
        logits = model(ids).logits  # [batch, seq, vocab]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    return loss.item()


@torch.no_grad()
def measure(name: str) -> Dict[str, float]:
    """Reload the saved folder through the zoo and score every prompt of dataset.json:
    clean accuracy (argmax at the last position == answer) and corrupt accuracy
    (argmax on the corrupt prompt == wrong answer)."""
    model, tok = zoo.load_hf(name)
    n = len(json.loads(zoo.dataset_path(name).read_text())["prompts"])
    loader, rest = load_datasets_from_json(tok, zoo.dataset_path(name), train_test_size=(n - 1, 1),
                                           shuffle=False, batch_size=256)
    clean_hits = corrupt_hits = total = 0
    for dl in (loader, rest):
        for b in dl:
            clean_hits += (model(b.clean).logits[:, -1].argmax(-1) == b.answers[:, 0]).sum().item()
            corrupt_hits += (model(b.corrupt).logits[:, -1].argmax(-1) == b.wrong_answers[:, 0]).sum().item()
            total += len(b.clean)
    return {"accuracy": clean_hits / total, "corrupt_accuracy": corrupt_hits / total, "n_eval": total}


def write_folder(name: str, model, tokenizer, dataset: dict) -> Path:
    folder = zoo.ZOO_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1) + "\n")
    return folder


def write_card(name: str, card: dict) -> None:
    # a placeholder card first, so that zoo.load_hf finds the folder while measuring
    path = zoo.ZOO_DIR / name / "card.json"
    path.write_text(json.dumps({"name": name}) + "\n")
    card.update(measure(name))
    path.write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))
    if card["accuracy"] < 0.95:
        raise SystemExit(f"{name}: held-out accuracy {card['accuracy']:.3f} is below 0.95")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- induction

IND_WORDS = [f"t{i:02d}" for i in range(60)]
IND_HALF = 8  # dataset prompts: [BOS] x1..x8 x1..x7 -> x8
IND_CTX = 32


def induction_dataset(rng: random.Random, n_prompts: int) -> dict:
    """Clean: ``x1..x8 x1..x7`` (answer ``x8``). Corrupt: ``y1..y8 x1..x7`` where the y's are
    new tokens except ``y7 = x7``, so induction on the corrupt prompt predicts ``y8`` (the
    wrong answer). Every token within a prompt is distinct otherwise."""
    prompts, seen = [], set()
    while len(prompts) < n_prompts:
        toks = rng.sample(IND_WORDS, 2 * IND_HALF - 1)
        x, y = toks[:IND_HALF], toks[IND_HALF:]
        y = y[:IND_HALF - 2] + [x[IND_HALF - 2]] + y[IND_HALF - 2:]  # y7 = x7
        if tuple(x) in seen:
            continue
        seen.add(tuple(x))
        prompts.append({
            "clean": " ".join(x + x[:-1]),
            "corrupt": " ".join(y + x[:-1]),
            "answers": [x[-1]],
            "wrong_answers": [y[-1]],
        })
    return {
        "seq_labels": [f"A{i + 1}" for i in range(IND_HALF)] + [f"A{i + 1}'" for i in range(IND_HALF - 1)],
        "word_idxs": {"first_half": 0, "second_half": IND_HALF, "end": 2 * IND_HALF - 2},
        "prompts": prompts,
    }


def induction_batches(tokenizer, held_out: set, seed: int, batch: int):
    """Training rows: ``[BOS] prefix(p) x(n) x(n) x(n)...`` cut to IND_CTX tokens, with the
    ``p + n`` tokens of prefix and ``x`` distinct, ``n`` in [4, 12], ``p`` in [0, 8]; loss
    wherever induction predicts the next token (from the second copy of ``x`` on).
    Varying ``p`` and ``n`` rules out a fixed positional offset, so the model has to learn
    induction. Rows whose ``x`` is a held-out prompt's first half are redrawn."""
    gen = torch.Generator().manual_seed(seed)
    word_ids = torch.tensor(tokenizer.convert_tokens_to_ids(IND_WORDS))

    def make(step: int):
        ids = torch.full((batch, IND_CTX), BOS, dtype=torch.long)
        labels = torch.full((batch, IND_CTX), -100, dtype=torch.long)
        r = 0
        while r < batch:
            n = int(torch.randint(4, 13, (), generator=gen))
            p = int(torch.randint(0, min(8, IND_CTX - 1 - 2 * n) + 1, (), generator=gen))
            toks = word_ids[torch.randperm(len(word_ids), generator=gen)[: p + n]]
            x = toks[p:]
            if n == IND_HALF and tuple(x.tolist()) in held_out:
                continue
            reps = -(-(IND_CTX - 1 - p) // n)  # ceil
            ids[r, 1:] = torch.cat([toks[:p], x.repeat(reps)])[: IND_CTX - 1]
            first = 1 + p + n  # position of the second copy's first token
            labels[r, first:-1] = ids[r, first + 1:]  # position i predicts token i + 1
            r += 1
        return ids, labels

    return make


# The induction models: one task, one recipe, an architecture each. Every one is
# attention-only in effect: its MLPs have one hidden unit with every weight exactly 0.
IND_D_MODEL, IND_N_LAYER, IND_N_HEAD = 64, 2, 4
INDUCTION_ARCHS = {
    # name: (build(vocab_size) -> model, training steps, card fields)
    "induction": (
        lambda vocab: build_gpt2(vocab, IND_CTX, IND_D_MODEL, IND_N_LAYER, IND_N_HEAD, n_inner=1), 1500,
        {"attention_only_note": "transformers has no attention-only GPT-2; each MLP has n_inner=1 with all "
                                "weights and biases exactly 0 (frozen during training), so every MLP outputs "
                                "exactly 0"},
    ),
    "induction_gqa": (
        # fewer steps: in a 1500-step trial its loss was already 0.0098 at step 250
        lambda vocab: build_llama(vocab, IND_CTX, IND_D_MODEL, IND_N_LAYER, IND_N_HEAD, n_kv_head=2, d_mlp=1), 400,
        {"attention_only_note": "transformers has no attention-only Llama; each gated MLP has "
                                "intermediate_size=1 with all weights exactly 0 (frozen during training), so "
                                "every MLP outputs exactly 0",
         "n_kv_head": 2, "positions": "rotary", "norm": "RMSNorm",
         "grouped_query_attention": "4 query heads share 2 key/value heads: heads 0, 1 read K/V head 0; "
                                    "heads 2, 3 read K/V head 1"},
    ),
}


def train_induction(name: str = "induction", seed: int = 0, steps: Optional[int] = None) -> None:
    """Train the induction model ``name`` (a key of ``INDUCTION_ARCHS``) and write its folder;
    ``steps`` defaults to the architecture's."""
    build, default_steps, arch_fields = INDUCTION_ARCHS[name]
    steps = default_steps if steps is None else steps
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = build_tokenizer(IND_WORDS, IND_CTX)
    dataset = induction_dataset(rng, 400)
    held_out = {tuple(tok.convert_tokens_to_ids(p["clean"].split()[:IND_HALF])) for p in dataset["prompts"]}

    model = build(len(tok))
    # Attention-only: transformers' GPT-2 and Llama always have an MLP, so each block's MLP
    # gets one hidden unit and all its weights and biases are zeroed and frozen -- the MLP
    # outputs exactly 0.
    for block in blocks(model):
        for p in block.mlp.parameters():
            torch.nn.init.zeros_(p)
            p.requires_grad_(False)

    t0 = time.time()
    loss = train(model, induction_batches(tok, held_out, seed + 1, batch=64), steps=steps, lr=3e-3)
    seconds = time.time() - t0
    print(f"{name}: trained in {seconds:.0f} s, final loss {loss:.4f}")
    assert all(float(p.abs().max()) == 0.0 for b in blocks(model) for p in b.mlp.parameters())

    write_folder(name, model, tok, dataset)
    write_card(name, {
        "name": name,
        "task": "induction on repeated random tokens",
        "description": (
            "Prompt [BOS] x1..x8 x1..x7 of distinct random tokens; answer x8 (the token after the "
            "previous occurrence of the last token). Corrupt prompt y1..y8 x1..x7 with new tokens "
            "except y7 = x7, so induction predicts y8, the wrong answer."
        ),
        "architecture": type(model).__name__,
        "attention_only": True,
        **arch_fields,
        "n_layer": IND_N_LAYER, "d_model": IND_D_MODEL, "n_head": IND_N_HEAD, "d_head": IND_D_MODEL // IND_N_HEAD,
        "d_mlp": 1, "n_ctx": IND_CTX,
        "d_vocab": len(tok), "n_params": n_params(model),
        "seq_len": 2 * IND_HALF, "half_len": IND_HALF,
        "training": {"seed": seed, "threads": torch.get_num_threads(), "steps": steps, "batch_size": 64,
                     "lr": 3e-3, "final_loss": round(loss, 4),
                     "data": "[BOS] p random tokens (p in [0, 8]) then n random tokens (n in [4, 12]) repeated to 32 "
                             "tokens; loss from the second copy on"},
        "held_out": "dataset.json prompts are drawn before training; training rows equal to them are redrawn",
        "train_command": f"python scripts/train_zoo.py {name}",
    })


# ---------------------------------------------------------------------------- ioi

IOI_NAMES = ["Mary", "John", "Alice", "Bob", "Anna", "Tom", "Sarah", "James", "Emma", "David", "Lucy", "Paul",
             "Kate", "Mark", "Julia", "Peter", "Laura", "Sam", "Rose", "Jack", "Nina", "Ben", "Clara", "Dan"]
IOI_PLACES = ["store", "park", "school", "beach", "garden", "office", "market", "station", "library", "cafe"]
IOI_OBJECTS = ["drink", "book", "ball", "gift", "letter", "key", "pen", "ring", "cake", "bag"]
# every template has 14 words with the names at positions 1, 3 and 9
IOI_TEMPLATES = [
    "When {A} and {B} went to the {P} , {C} gave a {O} to",
    "After {A} and {B} went to the {P} , {C} gave a {O} to",
    "While {A} and {B} were at the {P} , {C} handed a {O} to",
    "Once {A} and {B} got to the {P} , {C} passed a {O} to",
    "Then {A} and {B} arrived at the {P} , {C} threw a {O} to",
]
IOI_LEN = 14
# training sentences may start with one of these, which shifts every position: the model
# cannot solve the task by absolute positions alone (dataset.json has no prefix)
IOI_PREFIXES = ["", "Yesterday ,", "Later that day ,", "On a cold morning ,"]


def ioi_words() -> List[str]:
    words = set()
    for t in IOI_TEMPLATES + IOI_PREFIXES:
        words.update(w for w in t.split() if not w.startswith("{"))
    return sorted(words) + IOI_NAMES + IOI_PLACES + IOI_OBJECTS


def ioi_pairs(rng: random.Random) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """Unordered name pairs, split 80/20 into training and held-out pairs."""
    pairs = [(a, b) for i, a in enumerate(IOI_NAMES) for b in IOI_NAMES[i + 1:]]
    rng.shuffle(pairs)
    k = len(pairs) // 5
    return pairs[k:], pairs[:k]


def ioi_sentence(rng: random.Random, pair: Tuple[str, str]) -> Tuple[str, str, str, str]:
    """``(clean, corrupt, answer, wrong_answer)``: clean repeats the subject S at position 9
    (answer: the other name, IO); corrupt puts IO there instead (answer S)."""
    a, b = rng.sample(pair, 2)  # a random order of the two names
    s, io = rng.sample([a, b], 2)
    t, place, obj = rng.choice(IOI_TEMPLATES), rng.choice(IOI_PLACES), rng.choice(IOI_OBJECTS)
    fill = dict(A=a, B=b, P=place, O=obj)
    return t.format(C=s, **fill), t.format(C=io, **fill), io, s


def ioi_dataset(rng: random.Random, held_out_pairs, n_prompts: int) -> dict:
    prompts, seen = [], set()
    while len(prompts) < n_prompts:
        clean, corrupt, ans, wrong = ioi_sentence(rng, rng.choice(held_out_pairs))
        if clean in seen:
            continue
        seen.add(clean)
        prompts.append({"clean": clean, "corrupt": corrupt, "answers": [ans], "wrong_answers": [wrong]})
    return {
        "seq_labels": ["start", "name1", "and", "name2", "verb", "prep", "the", "place", ",", "S2", "verb2",
                       "a", "object", "to"],
        "word_idxs": {"name1": 1, "name2": 3, "S2": 9, "end": 13},
        "prompts": prompts,
    }


def ioi_batches(tokenizer, train_pairs, seed: int, batch: int, prefixes: Sequence[str] = ("",)):
    """Fresh sentences (the same distribution as :func:`ioi_sentence`) from the training
    name pairs only, built directly as token ids, each batch after one of ``prefixes``;
    loss at the last position (the answer)."""
    gen = torch.Generator().manual_seed(seed)
    tid = tokenizer.convert_tokens_to_ids
    # word ids of each template, with the slots (names at 1, 3, 9; place 7; object 12) left as <unk>
    templates = torch.tensor([tid(t.split()) for t in IOI_TEMPLATES])  # [n_templates, 14]
    pairs = torch.tensor([tid(list(p)) for p in train_pairs])  # [n_pairs, 2]
    places, objects = torch.tensor(tid(IOI_PLACES)), torch.tensor(tid(IOI_OBJECTS))

    def pick(options: torch.Tensor) -> torch.Tensor:
        return options[torch.randint(len(options), (batch,), generator=gen)]

    prefix_ids = [tid(p.split()) for p in prefixes]

    def make(step: int):
        prefix = prefix_ids[int(torch.randint(len(prefix_ids), (), generator=gen))]
        ab = pick(pairs)  # [batch, 2]: names A, B
        swap = torch.randint(2, (batch, 1), generator=gen).bool()
        ab = torch.where(swap, ab.flip(1), ab)
        s_first = torch.randint(2, (batch,), generator=gen).bool()  # is the subject S = A?
        s = torch.where(s_first, ab[:, 0], ab[:, 1])
        io = torch.where(s_first, ab[:, 1], ab[:, 0])
        words = pick(templates).clone()
        words[:, 1], words[:, 3], words[:, 9] = ab[:, 0], ab[:, 1], s
        words[:, 7], words[:, 12] = pick(places), pick(objects)
        head = torch.tensor([BOS] + prefix).expand(batch, -1)
        ids = torch.cat([head, words], dim=1)  # [batch, 1 + len(prefix) + 14]
        labels = torch.full_like(ids, -100)
        labels[:, -1] = io
        return ids, labels

    return make


def train_ioi(seed: int = 0, steps: int = 1000) -> None:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = build_tokenizer(ioi_words(), 32)
    train_pairs, held_pairs = ioi_pairs(rng)
    dataset = ioi_dataset(rng, held_pairs, 400)

    d_model, n_layer, n_head, n_inner = 64, 2, 8, 256
    model = build_gpt2(len(tok), 32, d_model=d_model, n_layer=n_layer, n_head=n_head, n_inner=n_inner)
    t0 = time.time()
    batches = ioi_batches(tok, train_pairs, seed + 1, batch=128, prefixes=IOI_PREFIXES)
    loss = train(model, batches, steps=steps, lr=3e-3)
    seconds = time.time() - t0
    print(f"ioi: trained in {seconds:.0f} s, final loss {loss:.4f}")

    write_folder("ioi", model, tok, dataset)
    write_card("ioi", {
        "name": "ioi",
        "task": "indirect object identification",
        "description": (
            "'When A and B went to the P , S gave a O to' -> the name that is not S (IO). "
            "Corrupt prompt: the third name is IO instead of S, so the answer flips; wrong answer = S. "
            "Five templates of 14 words, names at positions 1, 3 and 9 (counted without BOS)."
        ),
        "architecture": "GPT2LMHeadModel",
        "attention_only": False,
        "n_layer": n_layer, "d_model": d_model, "n_head": n_head, "d_head": d_model // n_head,
        "d_mlp": n_inner, "n_ctx": 32, "d_vocab": len(tok), "n_params": n_params(model),
        "seq_len": IOI_LEN + 1,
        "training": {"seed": seed, "threads": torch.get_num_threads(), "steps": steps, "batch_size": 128,
                     "lr": 3e-3, "final_loss": round(loss, 4),
                     "data": "sentences with names from the training name pairs, each batch after one of the "
                             f"prefixes {IOI_PREFIXES}; loss on the last position"},
        "held_out": (f"{len(held_pairs)} of {len(held_pairs) + len(train_pairs)} unordered name pairs never "
                     "appear together in training; dataset.json uses only those pairs"),
        "train_command": "python scripts/train_zoo.py ioi",
    })


TRAINERS = {**{name: functools.partial(train_induction, name) for name in INDUCTION_ARCHS}, "ioi": train_ioi}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=[*TRAINERS, "all"])
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (the committed weights were trained with 2; other counts may "
                             "round differently)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    for name in TRAINERS if args.model == "all" else [args.model]:
        kwargs = {} if args.steps is None else {"steps": args.steps}
        t0 = time.time()
        TRAINERS[name](**kwargs)
        print(f"{name}: done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
