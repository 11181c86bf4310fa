"""The demo's report: report.json and report.md (what was generated, trained and evaluated, what it cost, how long each\nstage took) and the summary table printed at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipelines.demo.config import DemoConfig


def _fmt(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def write_demo_report(cfg: DemoConfig, out: Path, gen: dict, runs: dict, ev: dict, times: StageTimes,
                      this_run_s: float) -> dict:
    from subq.report import markdown_table

    this = gen["this_run"]
    spent = _spent(out)
    g = {"rows": gen["rows_total"], "failures_open": gen["failures_open"], "problems": gen["problems"],
         "teacher_calls": spent["calls"], "requests_sent_this_run": this["requests_sent"], "prompt_tokens": spent["prompt_tokens"],
         "completion_tokens": spent["completion_tokens"], "cost_usd": round(spent["cost_usd"], 6),
         "n_429": spent["n_429"], "this_run": this, "actors_used": this.get("actors_used")}
    evals = [{"decomposer": r["decomposer"], "solver": r["solver"], "evaluation_id": r["evaluation_id"],
              "accuracy": {m: r["summary"]["accuracy"][m]["accuracy"] for m in ("paper", "strict", "flexible")},
              "correct_paper": r["summary"]["accuracy"]["paper"]["correct"], "n": r["summary"]["n"],
              "usage": r["summary"]["usage"], "mean_subq": r["summary"]["sub_questions"]["mean"],
              "errors": r["summary"]["errors"], "ran": r.get("ran")} for r in ev["runs"]]
    report = {"config": cfg.model_dump(), "offline": cfg.offline, "generation": g,
              "training": {a: {k: v for k, v in r.items() if k != "history"} for a, r in runs.items()},
              "evaluation": evals, "timings_s": times.seconds(), "stages": times.now,
              "this_run_s": round(this_run_s, 2), "paths": {"eval": str(out / "eval"),
                                                                  "generate": str(out / "generate")}}
    _write_json(out / "report.json", report)

    md = ["# subq demo report", ""]
    if cfg.offline:
        md += ["**Offline run: read the accuracy column with care.** The teacher and the solver were the local replay "
               "server (`subq teacher-server`). Its sub-question sets and answers are the released ChatGPT replies "
               "of GSM8K-AI-SubQ (test split) where recorded, and labelled synthetic replies built from the GSM8K "
               "gold solutions elsewhere; every feedback vote is synthetic. Every solver reply for a problem ends "
               "with the final answer ChatGPT gave for it in the release: replayed verbatim for a recorded "
               "sub-question set, synthesised around that final answer otherwise (no sub-questions, or a set written "
               "by our decomposer). So:",
               "",
               "- the accuracy is the release's teacher accuracy on these problems, the same for every row: it is "
               "not a measurement of single-stage solving or of any decomposer;",
               "- what IS measured here: rows, calls, tokens, $ (at the price table's rates) and 429s of generation; "
               "the training curves; the decomposers' sub-questions, their counts and tokens; tokens and $ per "
               "stage in evaluation; and that every part ran on Ray (actors, Train + DeepSpeed, Serve);",
               f"- the decomposer is {'a tiny random-init GPT-2 (`subq init-model`)' if not cfg.model else cfg.model} "
               f"trained for {cfg.steps} steps on {gen['rows_total']} problems: it shows the pipeline, not the "
               "paper's result.",
               "",
               "With `--base-url` (and its key) and a real `--model`, the same command and this same report are the "
               "real experiment.", ""]
    else:
        md += [f"**Live run** against {cfg.base_url} (teacher {cfg.teacher_model}, solver {cfg.solver}); base "
               f"decomposer {cfg.model or 'tiny random-init GPT-2'}.", ""]
    md += ["## Generation (GSM8K-AI-SubQ rows)", "",
           "| rows | failures | teacher calls paid | requests sent (this run) | prompt tokens | completion tokens | $ | 429s |",
           "|---|---|---|---|---|---|---|---|",
           f"| {g['rows']}/{g['problems']} | {g['failures_open']} | {g['teacher_calls']} | {g['requests_sent_this_run']} | "
           f"{g['prompt_tokens']} | {g['completion_tokens']} | {g['cost_usd']:.4f} | {g['n_429']} |", "",
           "Calls, tokens, $ and 429s are totals over every run of this demo directory, read from the durable "
           "request cache (one record per paid reply; a resumed run adds only the calls it sent). Data: "
           "`generate/parts/` (Parquet), `generate/paper_raw.jsonl`, `generate/paper_dataset.json`.", "",
           "## Training (Ray Train + DeepSpeed)", "",
           "| algo | steps | from | loss first -> last | val loss | val BLEU | val #subq (ref) | curves |",
           "|---|---|---|---|---|---|---|---|"]
    for algo, r in runs.items():
        e = r["end"]
        md.append(f"| {algo} | {r['steps']} | {Path(r['init_from']).parent.name if r['init_from'] else 'base'} | "
                  f"{_fmt(e.get('loss_first'))} -> {_fmt(e.get('loss_last'))} | {_fmt(e.get('val_loss'))} | "
                  f"{_fmt(e.get('val_bleu'), 2)} | {_fmt(e.get('val_num_subq'), 2)} ({_fmt(e.get('val_ref_num_subq'), 2)}) | "
                  f"[metrics.png](runs/{r['name']}/metrics.png) |")
    md += ["", "## Evaluation through the Serve endpoint (`POST /v1/evaluations`, held-out problems)", "",
           markdown_table(ev["runs"]).rstrip(), "",
           "Plots: [accuracy vs cost](eval/accuracy_vs_cost.png), [sub-questions](eval/subquestions_hist.png). "
           "Per pair, `eval/<pair>.paper_raw.jsonl` re-scores with `subq score FILE --mode paper|strict|flexible`.",
           "", "## Time", "", "| stage | time |", "|---|---|",
           *[f"| {k} | {StageTimes.describe(v)} |" for k, v in times.now.items()],
           f"| this run, end to end | {this_run_s:.0f}s |", ""]
    (out / "report.md").write_text("\n".join(md))
    return report


def _spent(out: Path) -> dict:
    """Teacher calls, tokens, $ and 429s recorded in the durable cache (every paid reply, over every run)."""
    tot = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "n_429": 0}
    for f in (out / "generate" / "cache").rglob("*.json"):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        tot["calls"] += 1
        tot["prompt_tokens"] += int(d.get("prompt_tokens", 0) or 0)
        tot["completion_tokens"] += int(d.get("completion_tokens", 0) or 0)
        tot["cost_usd"] += float(d.get("cost_usd", 0.0) or 0.0)
        tot["n_429"] += int(d.get("n_429", 0) or 0)
    return tot


def summary_table(report: dict) -> str:
    """The short table `subq demo` prints at the end."""
    g = report["generation"]
    lines = [f"rows generated      {g['rows']}/{g['problems']} (failures {g['failures_open']})",
             f"teacher spend       {g['teacher_calls']} calls, {g['prompt_tokens'] + g['completion_tokens']} tokens, "
             f"${g['cost_usd']:.4f}, 429s {g['n_429']}"]
    for algo, r in report["training"].items():
        e = r["end"]
        lines.append(f"train {algo:<13} loss {_fmt(e.get('loss_first'))} -> {_fmt(e.get('loss_last'))}, "
                     f"val loss {_fmt(e.get('val_loss'))}, val BLEU {_fmt(e.get('val_bleu'), 2)}")
    lines.append("")
    lines.append(f"{'decomposer':<12} {'paper':>6} {'strict':>6} {'flex':>6}  {'decomp tok':>10} {'solve tok':>9} "
                 f"{'total $':>9}  #subq")
    for e in report["evaluation"]:
        u = e["usage"]
        lines.append(f"{e['decomposer']:<12} {e['accuracy']['paper']:>6.3f} {e['accuracy']['strict']:>6.3f} "
                     f"{e['accuracy']['flexible']:>6.3f}  {u['decompose']['tokens']:>10} {u['solve']['tokens']:>9} "
                     f"{u['total']['cost_usd']:>9.5f}  {e['mean_subq']:.2f}")
    return "\n".join(lines)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


class StageTimes:
    """Wall time per stage, kept in OUT/stages.json across re-runs. A stage that re-used earlier work keeps the
    time it took when it ran and is marked re-used (with the date it ran), so a resumed demo's report never passes
    a 2-second re-use off as the training time."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.prev: dict = json.loads(path.read_text())
        except (OSError, ValueError):
            self.prev = {}
        self.now: dict[str, dict] = {}

    def record(self, stage: str, took_s: float, reused: bool = False) -> dict:
        prev = self.prev.get(stage)
        if reused and prev and prev.get("ran_at"):
            entry = {"took_s": prev["took_s"], "ran_at": prev["ran_at"], "reused": True}
        else:
            entry = {"took_s": round(took_s, 2), "ran_at": time.strftime("%Y-%m-%d %H:%M:%S"), "reused": reused}
        self.now[stage] = entry
        _write_json(self.path, {**self.prev, **self.now})
        return entry

    @staticmethod
    def describe(entry: dict) -> str:
        if entry.get("reused"):
            return f"re-used (from {entry['ran_at']}, took {entry['took_s']:.0f}s)"
        return f"{entry['took_s']:.0f}s"

    def seconds(self) -> dict[str, float]:
        return {k: v["took_s"] for k, v in self.now.items()}
