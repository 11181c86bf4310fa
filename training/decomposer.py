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

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from subq.errors import ConfigError
from subq.evaluation import Decomposition, stage_usage
from subq.settings import DecomposerSettings
from subq.textformat import DEFAULT_MAX_NEW_TOKENS, DecomposerFormat, get_format, prompt_ids

CONFIG_FILE = "training_config.yaml"


@dataclass
class Generation:
    questions: list[str]  # sub-questions parsed from `text` with the checkpoint's text format
    text: str  # the generated continuation (after the prompt), special tokens removed
    prompt_tokens: int
    completion_tokens: int  # generated tokens, EOS included when produced (up to the one completing a stop sequence)
    eos: bool = True  # False: the token budget ended the decomposition before EOS (its last sub-question may be cut)
    finish_reason: str = "stop"  # OpenAI's: "stop" (EOS or a stop sequence), "length" (the token budget ran out)


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


def _nucleus(probs, top_p: float):
    """probs with everything outside the smallest set of most likely tokens whose mass reaches top_p zeroed (the
    most likely token always stays)."""
    import torch

    sorted_p, order = probs.sort(-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p
    drop[..., 0] = False
    return probs.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), 0.0)


def _stop_cut(tok, row: list[int], stop: list[str]):
    """(tokens, text) of a row ended by its first stop sequence: the fewest tokens whose text holds one, and that
    text up to (without) the earliest stop sequence in it; None when no stop sequence occurs."""
    full = tok.decode(row, skip_special_tokens=True)
    if not any(s in full for s in stop):
        return None
    lo, hi = 1, len(row)  # the text of a prefix only grows with it: the first prefix holding a stop sequence
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in tok.decode(row[:mid], skip_special_tokens=True) for s in stop):
            hi = mid
        else:
            lo = mid + 1
    text = tok.decode(row[:lo], skip_special_tokens=True)
    return lo, text[:min(text.index(s) for s in stop if s in text)]


def _per_row(value, n_problems: int, n: int, field: str, is_list) -> list:
    """A setting given once (every row) or per problem (a list), expanded to one value per decoded row."""
    if is_list(value):
        if len(value) != n_problems:
            raise ConfigError(f"{len(value)} values for {n_problems} problems", field=field)
        return [v for v in value for _ in range(n)]
    return [value] * (n_problems * n)


def generate_subquestions(decomposer: Decomposer, problems: list[str], *,
                          max_new_tokens: int | list[int] = DEFAULT_MAX_NEW_TOKENS,
                          do_sample: bool | list[bool] = False, temperature: float | list[float] = 1.0,
                          beta: float | None = None, seed: int | list[int | None] | None = None,
                          fixed_steps: bool = False, max_prompt_tokens: int | None = None,
                          top_p: float | list[float | None] | None = None,
                          stop: list[str] | list[list[str] | None] | None = None, n: int = 1,
                          cancelled: Sequence | None = None) -> list[Generation]:
    """Sub-questions for each problem (one batched decode). Prompts are `subq.textformat.prompt_ids` (as in
    training), left-padded; max_prompt_tokens: their budget (default: the context left after max_new_tokens).
    beta: ILQL guidance weight (None: the config's
    ilql beta, or 1; 0: plain LM decoding); ignored without heads. seed: sampling seed. fixed_steps: always run
    max_new_tokens steps (keeps ZeRO-3 ranks in lockstep during training-time validation).

    For an OpenAI-style endpoint (pipelines.serve batches requests with different settings into one call):
    max_new_tokens, do_sample, temperature, top_p (nucleus sampling) and stop may be given per problem (lists);
    n: samples per problem (the result is problem-major: gens[i * n + j] is sample j of problem i), decoded in the
    same batch; seed as a list (one per problem, None for unseeded): every sampled row draws from its own generator
    seeded seed[i] + j, so its text depends on its seed only, never on the rows it shares a batch with (an int seed
    seeds one generator for the whole batch, as before); stop: up to 4 strings: a row ends once its text holds one,
    its text is cut before it, and completion_tokens counts the tokens up to the one completing it.
    Generation.finish_reason is "length" exactly when the row's budget ran out (no EOS, no stop sequence).
    cancelled: one flag per problem (anything with `is_set()`, e.g. a threading.Event set when a served request's
    client left); at each host check the rows of a set flag leave the batch like finished rows, and their
    Generation says finish_reason "cancelled" (what it had decoded so far is kept in it)."""
    import torch

    from training.ilql import guided_logits

    if not problems:
        return []
    if n < 1:
        raise ConfigError("must be >= 1", field="n")
    P = len(problems)
    if cancelled is not None and len(cancelled) != P:
        raise ConfigError(f"{len(cancelled)} cancel flags for {P} problems", field="cancelled")
    is_list = lambda v: isinstance(v, (list, tuple))  # noqa: E731
    limits = _per_row(max_new_tokens, P, n, "max_new_tokens", is_list)
    samples = _per_row(do_sample, P, n, "do_sample", is_list)
    temps = _per_row(temperature, P, n, "temperature", is_list)
    top_ps = _per_row(top_p, P, n, "top_p", is_list)
    per_problem_stop = is_list(stop) and any(s is None or is_list(s) for s in stop)
    stops = [[s for s in (row or []) if s] for row in (_per_row(stop, P, n, "stop", lambda v: per_problem_stop))]
    if any(int(m) <= 0 for m in limits):
        raise ConfigError("must be > 0", field="max_new_tokens")
    if any(smp and t <= 0 for smp, t in zip(samples, temps)):
        raise ConfigError("must be > 0 when sampling", field="temperature")
    if any(tp is not None and not 0 <= tp <= 1 for tp in top_ps):
        raise ConfigError("must be in [0, 1]", field="top_p")
    row_seeds = None
    if is_list(seed):
        if len(seed) != P:
            raise ConfigError(f"{len(seed)} seeds for {P} problems", field="seed")
        row_seeds = [None if s is None else int(s) + j for s in seed for j in range(n)]
        seed = None
    problems = [p for p in problems for _ in range(n)]
    steps = max(int(m) for m in limits)
    d = decomposer
    if beta is None:
        beta = float((d.config.get("ilql") or {}).get("beta", 1.0))
    guided = d.has_heads and beta != 0
    tok, model = d.tokenizer, d.model
    eos = tok.eos_token_id
    max_ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 2048)
    budget = max_prompt_tokens or max(1, max_ctx - steps)
    ids, attn = encode_prompts(d, problems, budget)
    ids, attn = ids.to(d.device), attn.to(d.device)
    prompt_tokens = attn.sum(1).tolist()
    # the whole decode stays on the device: tokens accumulate in cur_ids, sampling uses a device generator, and the
    # host reads a value only every SYNC_EVERY steps (which rows finished?) and once at the end (no per-row syncs).
    # At each such check the rows that reached EOS leave the batch (their ids, mask and KV cache rows), so a batch of
    # mixed lengths costs what its rows still decoding cost, not what the longest costs at the full batch size.
    gen = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
    B, T0 = ids.shape
    dev = d.device
    any_sample, all_sample = any(samples), all(samples)
    uniform = len(set(limits)) == 1
    limit_t = torch.tensor([int(m) for m in limits], device=dev)
    temp_t = torch.tensor([float(t) if smp else 1.0 for t, smp in zip(temps, samples)], device=dev)[:, None]
    nucleus = any(smp and tp is not None and tp < 1 for smp, tp in zip(samples, top_ps))
    topp_t = torch.tensor([1.0 if tp is None else float(tp) for tp in top_ps], device=dev)[:, None]
    sample_t = torch.tensor(samples, dtype=torch.bool, device=dev)
    row_gens = None
    if any_sample and row_seeds is not None:  # one generator per sampled row: its sample ignores its batch
        row_gens = [torch.Generator(device=ids.device).manual_seed(
            sd if sd is not None else int(torch.randint(2**62, (1,)).item())) if smp else None
            for sd, smp in zip(row_seeds, samples)]
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    eos_t = torch.full((B,), eos, dtype=ids.dtype, device=dev)
    rows = list(range(B))  # the original row of each row still in the batch
    new_ids: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    aborted = [False] * B  # rows whose request was cancelled
    past = None
    cur_ids, cur_attn = ids, attn
    with torch.no_grad():
        for step in range(steps):
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
            if any_sample:
                probs = torch.softmax(scores / temp_t, dim=-1)
                if nucleus:
                    probs = _nucleus(probs, topp_t)
                if row_gens is not None:  # exponential race: argmax p / E, E ~ Exp(1) from the row's own generator
                    e = torch.stack([torch.empty(probs.shape[-1], device=probs.device).exponential_(generator=g)
                                     if (g := row_gens[r]) is not None else torch.ones(probs.shape[-1], device=probs.device)
                                     for r in rows])
                    nxt = (probs / e).argmax(-1)
                else:
                    nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
                if not all_sample:
                    nxt = torch.where(sample_t, nxt, scores.argmax(-1))
            else:
                nxt = scores.argmax(-1)
            nxt = torch.where(finished, eos_t, nxt)  # a finished row only pads with EOS
            finished |= nxt == eos
            if not uniform:
                finished |= limit_t <= step + 1  # the row's own budget is spent (its row is cut there at the end)
            cur_ids = torch.cat([cur_ids, nxt[:, None]], dim=1)
            cur_attn = torch.cat([cur_attn, torch.ones_like(nxt[:, None])], dim=1)
            if not fixed_steps and (step + 1) % SYNC_EVERY == 0 and step + 1 < steps:
                if any(stops):  # a row whose text holds a stop sequence is finished (cut at the end)
                    hit = [not f and bool(stops[rows[i]]) and any(
                        sq in tok.decode(r, skip_special_tokens=True) for sq in stops[rows[i]])
                        for i, (f, r) in enumerate(zip(finished.tolist(), cur_ids[:, T0:].tolist()))]
                    if any(hit):
                        finished |= torch.tensor(hit, device=finished.device)
                if cancelled is not None:  # a row whose request was cancelled leaves as if finished
                    gone = [not f and cancelled[rows[i] // n].is_set() for i, f in enumerate(finished.tolist())]
                    if any(gone):
                        for i in (i for i, g in enumerate(gone) if g):
                            aborted[rows[i]] = True
                        finished |= torch.tensor(gone, device=finished.device)
                fin = finished.tolist()
                if all(fin):
                    break
                if any(fin):  # the finished rows leave the batch
                    for i in (i for i, f in enumerate(fin) if f):
                        new_ids[rows[i]], done[rows[i]] = cur_ids[i, T0:].tolist(), True
                    keep = [i for i, f in enumerate(fin) if not f]
                    idx = torch.tensor(keep, device=cur_ids.device)
                    cur_ids, cur_attn, finished, eos_t = cur_ids[idx], cur_attn[idx], finished[idx], eos_t[idx]
                    limit_t, temp_t, topp_t, sample_t = limit_t[idx], temp_t[idx], topp_t[idx], sample_t[idx]
                    past.reorder_cache(idx)
                    rows = [rows[i] for i in keep]
    for i, (row_ids, fin) in enumerate(zip(cur_ids[:, T0:].tolist(), finished.tolist())):
        new_ids[rows[i]], done[rows[i]] = row_ids, fin
    gens = []
    for i in range(B):
        row = new_ids[i][:int(limits[i])]  # the row's own budget (the batch ran to the largest)
        row = row[:row.index(eos) + 1] if eos in row else row  # up to and with the first EOS
        cut = _stop_cut(tok, row, stops[i]) if stops[i] else None
        if cut is not None:
            n_tokens, text = cut
        else:
            n_tokens, text = len(row), tok.decode(row, skip_special_tokens=True)
        ended = cut is not None or eos in row
        gens.append(Generation(d.text_format.parse(text), text, int(prompt_tokens[i]), n_tokens, ended,
                               "stop" if ended else "cancelled" if aborted[i] else "length"))
    return gens


class LocalDecomposer:
    """The distilled decomposer in-process (training.decomposer): batch of problems -> Decompositions."""

    def __init__(self, settings: DecomposerSettings):
        from training.decomposer import load_decomposer

        if not settings.path:
            raise ConfigError("no decomposer checkpoint given", field="decomposer.path")
        self.settings = settings
        self.price = settings.price()
        self.model = load_decomposer(settings.path, device=settings.device)

    def decompose_batch(self, problems: list[str], *, max_new_tokens: Optional[int] = None,
                        do_sample: Optional[bool] = None, temperature: Optional[float] = None,
                        beta: Optional[float] = None, top_p: Optional[float] = None,
                        stop: Optional[list[str]] = None, n: int = 1,
                        seed: Optional[list[Optional[int]]] = None, cancelled: Optional[Sequence] = None,
                        ) -> list[Decomposition]:
        """n decompositions per problem, problem-major. max_new_tokens, do_sample, temperature, top_p and stop may
        also be lists (one per problem: requests with different settings share one decode); seed: one per problem
        (sample j seeded seed + j). See training.decomposer.generate_subquestions."""
        from training.decomposer import generate_subquestions

        s, t0 = self.settings, time.perf_counter()
        gens = generate_subquestions(
            self.model, problems,
            max_new_tokens=s.max_new_tokens if max_new_tokens is None else max_new_tokens,
            do_sample=s.do_sample if do_sample is None else do_sample,
            temperature=s.temperature if temperature is None else temperature,
            beta=s.beta if beta is None else beta, top_p=top_p, stop=stop, n=n, seed=seed, cancelled=cancelled,
        )
        out = []
        for g in gens:
            u = stage_usage(s.name, self.price, g.prompt_tokens, g.completion_tokens, t0)
            out.append(Decomposition(list(g.questions), g.text, u, g.finish_reason))
        return out
