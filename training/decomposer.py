"""Load a trained decomposer (BC / Filtered BC / ILQL) and write sub-questions with it: the functions the serving
and evaluation layers call.

    from training.decomposer import load_decomposer, generate_subquestions
    d = load_decomposer("runs/bc/final")                 # HF model + tokenizer (+ ILQL heads if saved beside it)
    gens = generate_subquestions(d, ["Natalia sold clips ..."], max_new_tokens=256)
    gens[0].questions                                     # parsed with subq.textformat (the format it was trained in)

A checkpoint directory is what `subq train` writes as `final/`: `save_pretrained` model + tokenizer, the training
config (`training_config.yaml`, which names the text format) and, for ILQL, `ilql_heads.safetensors`. A plain HF
causal LM directory (e.g. `subq init-model`) also loads, with the "paper" text format.

Decoding is batched with left padding and a KV cache. With ILQL heads and beta != 0 each step picks from
log pi(a|s) + beta * (minQ(s,a) - V(s)) (training.ilql.guided_logits); otherwise from the LM alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subq.errors import ConfigError
from subq.textformat import DecomposerFormat, get_format, prompt_ids

CONFIG_FILE = "training_config.yaml"
# Decode budget: the release allowed the reference length + 200 tokens; 9% of the released test sub-question sets
# are longer than 128 tokens of the tiny tokenizer, so every default (validation, serving, evaluation) is >= 256.
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class Generation:
    questions: list[str]  # sub-questions parsed from `text` with the checkpoint's text format
    text: str  # the generated continuation (after the prompt), special tokens removed
    prompt_tokens: int
    completion_tokens: int  # generated tokens, EOS included when produced
    eos: bool = True  # False: the token budget ended the decomposition before EOS (its last sub-question may be cut)


@dataclass
class Decomposer:
    model: Any  # transformers causal LM (eval mode)
    tokenizer: Any
    text_format: DecomposerFormat
    device: str = "cpu"
    heads: Any = None  # training.ilql.ILQLHeads or None
    target_heads: Any = None  # training.ilql.TargetQHeads or None
    path: str = ""
    config: dict = field(default_factory=dict)  # the saved training config (empty for a plain HF model)

    @property
    def has_heads(self) -> bool:
        return self.heads is not None


def read_training_config(path: str | Path) -> dict:
    import yaml

    f = Path(path) / CONFIG_FILE
    if not f.exists():
        return {}
    return yaml.safe_load(f.read_text()) or {}


RUN_CHECKPOINTS = ("best", "final")  # what a run directory stands for, in order of preference


def resolve_checkpoint(path: str | Path) -> Path:
    """A model directory as given, or for a `subq train` run directory its best/ (best validation BLEU, as the
    release) if it has one, else its final/. The chosen directory is the returned Decomposer's `path`."""
    p = Path(path)
    if (p / "config.json").exists():
        return p
    for sub in RUN_CHECKPOINTS:
        if (p / sub / "config.json").exists():
            return p / sub
    return p


def fetch_checkpoint(path: str | Path) -> str:
    """A model or run directory given as a URI (s3://, gs://, file://, ...): the directory `resolve_checkpoint`
    would pick there (the model directory itself, else best/, else final/) copied once to this node's cache
    (`training.preflight.fetch_model`), and that local copy returned. A local path is returned as it is."""
    if "://" not in str(path):
        return str(path)
    from subq import storage
    from training.preflight import fetch_model

    loc = str(path).rstrip("/")
    for cand in (loc, *(storage.join(loc, sub) for sub in RUN_CHECKPOINTS)):
        if storage.exists(storage.join(cand, "config.json")):
            return fetch_model(cand)
    raise ConfigError("no model there (no config.json in it, its best/ or its final/)", field="decomposer.path",
                      source=loc)


def load_decomposer(path: str, device: str = "cpu") -> Decomposer:
    """Load (a run directory: its best/, else final/; see resolve_checkpoint; a URI is copied to this node first:
    fetch_checkpoint) model + tokenizer with `from_pretrained`, the ILQL heads if `ilql_heads.safetensors` is beside them,
    and the text format from the saved training config (default "paper")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.ilql import HEADS_FILE, load_heads

    p = resolve_checkpoint(fetch_checkpoint(path))
    if not (p / "config.json").exists():
        raise ConfigError("not a model directory (no config.json); give a `subq train` final/ directory or an HF "
                          "causal LM saved with save_pretrained", field="decomposer.path", source=str(path))
    cfg = read_training_config(p)
    fmt = get_format(cfg.get("text_format") or "paper")
    tok = AutoTokenizer.from_pretrained(str(p))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(p)).to(device).eval()
    heads = target = None
    if (p / HEADS_FILE).exists():
        heads, target = load_heads(p, device=device)
    return Decomposer(model, tok, fmt, device, heads, target, str(p), cfg)


def encode_prompts(decomposer: Decomposer, problems: list[str], max_prompt_tokens: int):
    """Left-padded (input_ids, attention_mask) of the prompts, built with the training text contract."""
    import torch

    tok = decomposer.tokenizer
    pf = decomposer.config.get("prompt_format") or "plain"  # as it was trained (training_config.yaml)
    rows = [prompt_ids(tok, decomposer.text_format, p, max_prompt_tokens, pf) for p in problems]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        attn[i, T - len(r):] = 1
    return ids, attn


SYNC_EVERY = 8  # decode steps between the host's 'all rows finished?' checks


def generate_subquestions(decomposer: Decomposer, problems: list[str], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                          do_sample: bool = False, temperature: float = 1.0, beta: float | None = None,
                          seed: int | None = None, fixed_steps: bool = False,
                          max_prompt_tokens: int | None = None) -> list[Generation]:
    """Sub-questions for each problem (one batched decode). Prompts are `subq.textformat.prompt_ids` (as in
    training), left-padded; max_prompt_tokens: their budget (default: the context left after max_new_tokens).
    beta: ILQL guidance weight (None: the config's
    ilql beta, or 1; 0: plain LM decoding); ignored without heads. seed: sampling seed. fixed_steps: always run
    max_new_tokens steps (keeps ZeRO-3 ranks in lockstep during training-time validation)."""
    import torch

    from training.ilql import guided_logits

    if not problems:
        return []
    if max_new_tokens <= 0:
        raise ConfigError("must be > 0", field="max_new_tokens")
    if do_sample and temperature <= 0:
        raise ConfigError("must be > 0 when sampling", field="temperature")
    d = decomposer
    if beta is None:
        beta = float((d.config.get("ilql") or {}).get("beta", 1.0))
    guided = d.has_heads and beta != 0
    tok, model = d.tokenizer, d.model
    eos = tok.eos_token_id
    max_ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 2048)
    budget = max_prompt_tokens or max(1, max_ctx - max_new_tokens)
    ids, attn = encode_prompts(d, problems, budget)
    ids, attn = ids.to(d.device), attn.to(d.device)
    prompt_tokens = attn.sum(1).tolist()
    # the whole decode stays on the device: tokens accumulate in cur_ids, sampling uses a device generator, and the
    # host reads a value only every SYNC_EVERY steps (which rows finished?) and once at the end (no per-row syncs).
    # At each such check the rows that reached EOS leave the batch (their ids, mask and KV cache rows), so a batch of
    # mixed lengths costs what its rows still decoding cost, not what the longest costs at the full batch size.
    gen = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
    B, T0 = ids.shape
    finished = torch.zeros(B, dtype=torch.bool, device=d.device)
    eos_t = torch.full((B,), eos, dtype=ids.dtype, device=d.device)
    rows = list(range(B))  # the original row of each row still in the batch
    new_ids: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    past = None
    cur_ids, cur_attn = ids, attn
    with torch.no_grad():
        for step in range(max_new_tokens):
            pos = (cur_attn.cumsum(-1) - 1).clamp(min=0)
            step_pos = pos if past is None else pos[:, -1:]
            res = model(input_ids=cur_ids if past is None else cur_ids[:, -1:], attention_mask=cur_attn,
                        position_ids=step_pos, past_key_values=past, use_cache=True, output_hidden_states=guided)
            past = res.past_key_values
            logits = res.logits[:, -1, :].float()
            if guided:
                h = res.hidden_states[-1][:, -1, :]
                tq1, tq2 = d.target_heads(h)
                v = d.heads.v_head(h.to(d.heads.v_head[0].weight.dtype)).squeeze(-1)
                scores = guided_logits(logits, tq1, tq2, v, beta)
            else:
                scores = torch.log_softmax(logits, dim=-1)
            if do_sample:
                probs = torch.softmax(scores / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            else:
                nxt = scores.argmax(-1)
            nxt = torch.where(finished, eos_t, nxt)  # a finished row only pads with EOS
            finished |= nxt == eos
            cur_ids = torch.cat([cur_ids, nxt[:, None]], dim=1)
            cur_attn = torch.cat([cur_attn, torch.ones_like(nxt[:, None])], dim=1)
            if not fixed_steps and (step + 1) % SYNC_EVERY == 0 and step + 1 < max_new_tokens:
                fin = finished.tolist()
                if all(fin):
                    break
                if any(fin):  # the finished rows leave the batch
                    for i in (i for i, f in enumerate(fin) if f):
                        new_ids[rows[i]], done[rows[i]] = cur_ids[i, T0:].tolist(), True
                    keep = [i for i, f in enumerate(fin) if not f]
                    idx = torch.tensor(keep, device=cur_ids.device)
                    cur_ids, cur_attn, finished, eos_t = cur_ids[idx], cur_attn[idx], finished[idx], eos_t[idx]
                    past.reorder_cache(idx)
                    rows = [rows[i] for i in keep]
    for i, (row_ids, fin) in enumerate(zip(cur_ids[:, T0:].tolist(), finished.tolist())):
        new_ids[rows[i]], done[rows[i]] = row_ids, fin
    gens = []
    for i in range(B):
        row = new_ids[i]
        row = row[:row.index(eos) + 1] if eos in row else row  # up to and with the first EOS
        text = tok.decode(row, skip_special_tokens=True)
        gens.append(Generation(d.text_format.parse(text), text, int(prompt_tokens[i]), len(row), bool(done[i])))
    return gens
