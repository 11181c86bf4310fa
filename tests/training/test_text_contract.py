"""One text contract for training and serving (subq.textformat.prompt_ids): the token ids the trainer sees for a
problem are the ids the server feeds the model, for a GPT-2 tokenizer (adds nothing) and a Llama-style tokenizer
(adds BOS), also for a problem longer than max_length (its question, at the end, survives). Decode budgets: a
decomposition longer than 64 tokens comes back whole under the default budget; one cut by the budget is marked
as ended without EOS. No Ray."""

from __future__ import annotations

import pytest

QUESTION = "How many apples does Tom have now?"
LONG_PROBLEM = " ".join(f"On day {i} Tom picked {i + 2} apples and gave {i} of them to his sister Mia." for i in range(30)) \
    + " " + QUESTION


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request, tmp_path_factory):
    from training.init_model import create_tiny_model

    return create_tiny_model(str(tmp_path_factory.mktemp(request.param) / "m"), n_layer=2, n_embd=64,
                             vocab_size=800, max_texts=400, arch=request.param)


def _fed_ids(decomposer, problem: str, **kw) -> list[int]:
    """The ids the model's first forward receives when serving `problem` (left padding removed)."""
    from training.decomposer import generate_subquestions

    seen = []

    def hook(module, args, kwargs):
        if not seen:
            ids, attn = kwargs["input_ids"], kwargs["attention_mask"]
            seen.append(ids[0][attn[0].bool()].tolist())

    h = decomposer.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        generate_subquestions(decomposer, [problem], max_new_tokens=2, **kw)
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize("problem", ["Tom has 3 apples and buys 2 more. " + QUESTION, LONG_PROBLEM])
def test_trainer_and_server_feed_the_same_prompt_ids(model_dir, problem):
    from subq.textformat import get_format
    from training.data import Example, encode
    from training.decomposer import load_decomposer

    d = load_decomposer(model_dir)
    tok = d.tokenizer
    max_length = 96
    ex = Example("p", problem, ["How many apples did Tom pick?", "How many did he give away?"])
    enc = encode(ex, tok, get_format("paper"), max_length)
    n_prompt = enc["target_mask"].index(1)
    trained = enc["input_ids"][:n_prompt]
    served = _fed_ids(d, problem, max_prompt_tokens=n_prompt)
    assert served == trained
    if tok("a", add_special_tokens=True).input_ids[0] == tok.bos_token_id != tok.eos_token_id:  # Llama-style
        assert trained[0] == tok.bos_token_id and trained.count(tok.bos_token_id) == 1
    assert tok.decode(trained, skip_special_tokens=True).rstrip().endswith(QUESTION)  # the question survives
    if problem == LONG_PROBLEM:
        assert len(tok(problem).input_ids) > max_length and len(enc["input_ids"]) <= max_length
        # serving alone (default budget: the context left after max_new_tokens) also keeps the question
        whole = _fed_ids(d, problem)
        assert tok.decode(whole, skip_special_tokens=True).rstrip().endswith(QUESTION)


def _overfit(model, batch: dict, steps: int):
    """Train `model` on one collated batch (BC loss, AdamW 3e-3, seed 0) until the loss is under 0.01 or `steps`
    steps; returns it in eval mode."""
    import torch

    from training.bc import bc_loss

    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = bc_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                       batch["input_ids"], batch["target_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    return model.eval()


def test_long_decomposition_is_served_whole_and_a_cut_one_is_marked(tmp_path_factory):
    """Overfit a tiny GPT-2 on one example whose decomposition is > 64 tokens; the default decode budget returns
    it whole (EOS reached); a 64-token budget cuts it and says so (eos False)."""
    from subq.textformat import get_format
    from training.data import Example, collate, encode
    from training.decomposer import DEFAULT_MAX_NEW_TOKENS, generate_subquestions, load_decomposer
    from training.init_model import create_tiny_model

    assert DEFAULT_MAX_NEW_TOKENS >= 256
    path = create_tiny_model(str(tmp_path_factory.mktemp("long") / "m"), n_layer=2, n_embd=64, vocab_size=800,
                             max_texts=400)
    d = load_decomposer(path)
    qs = [f"How many apples did Tom pick on day {i} and how many did he give to Mia?" for i in range(5)]
    enc = encode(Example("p", "Tom picks apples. " + QUESTION, qs), d.tokenizer, get_format("paper"), 400)
    n_target = sum(enc["target_mask"])
    assert n_target > 64 + 8
    batch = collate([enc], d.tokenizer.pad_token_id)
    _overfit(d.model, batch, 300)
    whole = generate_subquestions(d, ["Tom picks apples. " + QUESTION])[0]
    assert whole.questions == qs and whole.eos and whole.completion_tokens == n_target
    cut = generate_subquestions(d, ["Tom picks apples. " + QUESTION], max_new_tokens=64)[0]
    assert not cut.eos and cut.completion_tokens == 64 and len(cut.questions) < len(qs)


def test_chat_prompt_format_is_the_same_ids_in_training_and_serving(model_dir):
    """--prompt-format chat: the problem is the user message of the tokenizer's chat template, in both paths,
    and a long problem is cut inside the message (the template's frame and the question survive)."""
    from subq.textformat import chat_frame, get_format
    from training.data import Example, encode
    from training.decomposer import load_decomposer

    d = load_decomposer(model_dir)
    d.tokenizer.chat_template = ("{% for m in messages %}<|user|>\n{{ m['content'] }}\n{% endfor %}"
                                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    d.config["prompt_format"] = "chat"
    ex = Example("p", LONG_PROBLEM, ["How many apples did Tom pick?"])
    enc = encode(ex, d.tokenizer, get_format("paper"), 96, None, "chat")
    n_prompt = enc["target_mask"].index(1)
    trained = enc["input_ids"][:n_prompt]
    assert _fed_ids(d, LONG_PROBLEM, max_prompt_tokens=n_prompt) == trained
    head, tail = chat_frame(d.tokenizer)
    assert trained[:len(head)] == head and trained[-len(tail):] == tail
    assert QUESTION in d.tokenizer.decode(trained[len(head):-len(tail)])


def test_rows_that_end_leave_the_batch_and_every_row_decodes_as_alone(tmp_path_factory):
    """A batched decode drops a row that reached EOS at the next host check (every SYNC_EVERY steps): the steps
    after run only the rows still decoding (what makes a served batch of mixed lengths cheap), and every row's
    decomposition is the one it gets decoded alone. Constructed case: a tiny GPT-2 overfit on a one-question and a
    five-question decomposition."""
    from subq.textformat import get_format
    from training.data import Example, collate, encode
    from training.decomposer import SYNC_EVERY, generate_subquestions, load_decomposer
    from training.init_model import create_tiny_model

    path = create_tiny_model(str(tmp_path_factory.mktemp("mixed") / "m"), n_layer=2, n_embd=64, vocab_size=800,
                             max_texts=400)
    d = load_decomposer(path)
    short_p, long_p = "Mia has 4 pears. " + QUESTION, "Tom picks apples. " + QUESTION
    targets = {short_p: ["How many pears does Mia have?"],
               long_p: [f"How many apples did Tom pick on day {i} and how many did he give to Mia?" for i in range(5)]}
    encs = [encode(Example(str(i), p, qs), d.tokenizer, get_format("paper"), 400) for i, (p, qs) in enumerate(targets.items())]
    batch = collate(encs, d.tokenizer.pad_token_id)
    model = _overfit(d.model, batch, 400)
    alone = {p: generate_subquestions(d, [p])[0] for p in targets}
    assert [alone[p].questions for p in targets] == list(targets.values()) and all(g.eos for g in alone.values())
    short_n, long_n = alone[short_p].completion_tokens, alone[long_p].completion_tokens
    assert short_n + 2 * SYNC_EVERY < long_n

    sizes = []
    h = model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        together = generate_subquestions(d, [short_p, long_p])
    finally:
        h.remove()
    for g, p in zip(together, targets):
        assert (g.questions, g.text, g.eos, g.completion_tokens, g.prompt_tokens) == \
            (alone[p].questions, alone[p].text, alone[p].eos, alone[p].completion_tokens, alone[p].prompt_tokens)
    assert long_n <= len(sizes) < long_n + SYNC_EVERY  # one forward per new token of the longest row, to the check
    assert sizes[0] == 2 and sizes.count(2) <= short_n + SYNC_EVERY  # the short row left at the next check
    assert set(sizes[sizes.count(2):]) == {1}

    # a row whose request was cancelled (its client left) leaves the same way at the next check; the others go on
    import threading

    gone, stay = threading.Event(), threading.Event()
    gone.set()
    sizes.clear()
    h = model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        left, kept = generate_subquestions(d, [long_p, short_p], cancelled=[gone, stay])
    finally:
        h.remove()
    assert (left.finish_reason, left.completion_tokens, left.eos) == ("cancelled", SYNC_EVERY, False)
    assert (kept.text, kept.finish_reason) == (alone[short_p].text, "stop")
    assert sizes.count(2) == SYNC_EVERY and len(sizes) < long_n  # the long row stopped at the first check
