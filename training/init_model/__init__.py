"""A tiny random-init GPT-2 with a byte-level BPE tokenizer trained locally on GSM8K text: the offline
stand-in for `gpt2` in tests and demos (nothing is downloaded).

    subq init-model models/tiny --layers 2 --width 64 --heads 2 --vocab-size 2048
    ray job submit --working-dir . -- python -m training.init_model models/tiny --layers 2 --width 64

The tokenizer is trained on GSM8K problems and on decomposer-formatted sub-questions (both text formats of
`subq.textformat`), so `<QUE>`/`</QUE>` and `Q1:` cost few tokens. The result loads with
`AutoModelForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)`.
"""

from __future__ import annotations

from pathlib import Path

from subq.errors import ConfigError

EOS = "<|endoftext|>"


def _corpus(corpus: str, max_texts: int | None) -> list[str]:
    """Problem texts + sub-questions rendered in every decomposer text format (subq.textformat)."""
    from subq.problems import load_problems
    from subq.schema import read_rows
    from subq.problems import DATA_DIR
    from subq.textformat import FORMATS

    texts = [p.problem for p in load_problems(corpus, limit=max_texts)]
    released = DATA_DIR / "gsm8k-ai-subq" / "qg_test_dataset.jsonl"
    if released.exists():
        rows = read_rows(str(released))
        for row in rows[: max_texts or len(rows)]:
            for s in row.sets[:1]:
                for fmt in FORMATS.values():
                    texts.append(fmt.prompt(row.problem) + fmt.target(s.questions) + EOS)
    return texts


ARCHS = ("gpt2", "llama")


def create_tiny_model(out_dir: str, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, vocab_size: int = 2048,
                      n_positions: int = 512, seed: int = 0, corpus: str = "gsm8k:train",
                      max_texts: int | None = 2000, arch: str = "gpt2") -> str:
    """Create a random-init causal LM + byte-level BPE tokenizer in `out_dir` (HF format); return out_dir.

    arch: "gpt2" (GPT-2, one `<|endoftext|>` token for BOS/EOS/pad, nothing added when tokenizing) or "llama"
    (Llama architecture with a Llama-style tokenizer: `<s>` BOS added in front of every text, `</s>` EOS);
    n_layer/n_embd/n_head: transformer depth, width and heads (n_embd % n_head == 0); vocab_size: BPE vocabulary;
    n_positions: context length; seed: weight init; corpus: problems the tokenizer is trained on
    (a subq.problems name or path); max_texts: cap on texts used (speed)."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}", field="arch")
    for name, v in (("layers", n_layer), ("width", n_embd), ("heads", n_head), ("vocab_size", vocab_size),
                    ("n_positions", n_positions)):
        if v <= 0:
            raise ConfigError("must be > 0", field=name)
    if n_embd % n_head:
        raise ConfigError(f"width {n_embd} is not divisible by heads {n_head}", field="heads")
    if vocab_size < 300:
        raise ConfigError("must be >= 300 (256 bytes + merges + special tokens)", field="vocab_size")

    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    specials = [EOS] if arch == "gpt2" else ["<unk>", "<s>", "</s>"]
    bpe.train_from_iterator(_corpus(corpus, max_texts), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=specials, show_progress=False)
    torch.manual_seed(seed)
    if arch == "llama":
        return _save_llama(out, bpe, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                  pad_token=EOS, model_max_length=n_positions)
    tok.padding_side = "left"  # decoder-only generation pads on the left
    tok.save_pretrained(str(out))

    eos_id = tok.convert_tokens_to_ids(EOS)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    model = GPT2LMHeadModel(cfg)
    model.generation_config.pad_token_id = eos_id
    model.save_pretrained(str(out))
    return str(out)


def _save_llama(out: Path, bpe, *, n_layer: int, n_embd: int, n_head: int, n_positions: int) -> str:
    """A Llama-architecture model whose tokenizer adds `<s>` in front of every text (as Llama/Mistral do), no pad
    token (as Llama): the case where train/serve special-token handling differs."""
    from tokenizers.processors import TemplateProcessing
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = bpe._tokenizer
    bos_id = tk.token_to_id("<s>")
    tk.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  model_max_length=n_positions)
    tok.save_pretrained(str(out))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=n_embd, intermediate_size=2 * n_embd, num_hidden_layers=n_layer,
                      num_attention_heads=n_head, num_key_value_heads=n_head, max_position_embeddings=n_positions,
                      bos_token_id=bos_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return str(out)
