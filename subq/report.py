"""The report directory of an evaluation: `results.json`, `report.md` (decomposer x solver table), the figures
(`accuracy_vs_cost.png`, `subquestions_hist.png`), per pair the paper's raw file, and lm-eval style samples."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

from subq import storage
from subq.evaluation import ItemResult, write_paper_raw
from subq.scoring import MODES, mcnemar_exact

# ---------------------------------------------------------------- reports


def pair_name(decomposer: str, solver: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{decomposer}__{solver}")


OFFLINE_CAVEAT = ("OFFLINE: the solver is the local replay teacher server (x-subq-provenance: replay/synthetic): "
                  "its replies are the release's recorded ChatGPT answers, so accuracy measures no decomposer.")


def versions() -> dict:
    """Versions a reader needs to trust a report: subq, ray, torch, transformers, openai, python."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("subq", "ray", "torch", "transformers", "openai"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def git_hash() -> Optional[str]:
    import subprocess

    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def is_offline(runs: list[dict]) -> bool:
    return any(r["summary"].get("offline") for r in runs)


def paired_vs_none(runs: list[dict], mode: str = "paper") -> list[dict]:
    """Each decomposer against `none` on the problems both scored: accuracy difference, discordant pairs
    (b = only `none` right, c = only this one right) and the exact McNemar p-value."""
    base = next((r for r in runs if r["decomposer"] == "none"), None)
    if base is None:
        return []
    ref = {it.problem_id: it.scores[mode]["correct"] for it in base["items"] if it.scores}
    out = []
    for r in runs:
        if r is base:
            continue
        pairs = [(ref[it.problem_id], it.scores[mode]["correct"]) for it in r["items"]
                 if it.scores and it.problem_id in ref]
        n = len(pairs)
        b = sum(1 for x, y in pairs if x and not y)
        c = sum(1 for x, y in pairs if y and not x)
        out.append({"decomposer": r["decomposer"], "solver": r["solver"], "mode": mode, "n_paired": n,
                    "delta": (c - b) / n if n else 0.0, "only_none_correct": b, "only_this_correct": c,
                    "mcnemar_p": mcnemar_exact(b, c)})
    return out


def _hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sample_record(it: ItemResult) -> dict:
    """One line of samples_<decomposer>.jsonl, in lm-eval's layout (doc_id, doc, target, arguments, resps,
    filtered_resps, filter, metrics, doc_hash, prompt_hash, target_hash, one key per metric) plus subq's fields."""
    metrics = {f"acc_{m}": (float(it.scores[m]["correct"]) if it.scores else None) for m in MODES}
    prompt = "\n".join(it.sub_questions)
    return {
        "doc_id": it.index,
        "doc": {"problem_id": it.problem_id, "question": it.problem, "answer": it.gold_answer},
        "target": it.gold_answer,
        "arguments": {"sub_questions": it.sub_questions, "decomposer": it.decomposer, "solver": it.solver},
        "resps": [[it.answer_text]] if it.answer_text is not None else [],
        "filtered_resps": [it.final_answer],
        "filter": "none",
        "metrics": list(metrics),
        "doc_hash": _hash(it.problem), "prompt_hash": _hash(prompt), "target_hash": _hash(it.gold_answer),
        **metrics,
        "missing_marker": {m: it.scores[m]["missing_final_answer"] for m in MODES} if it.scores else None,
        "few_shot": it.few_shot, "fell_back_single_stage": it.fell_back, "provenance": it.provenance,
        "error": it.error, "error_stage": it.error_stage, "usage": it.usage,
    }


def write_report(out: str, runs: list[dict], config: Optional[dict] = None) -> dict:
    """Write results.json, report.md, the PNGs, one paper_raw file and one lm-eval style samples file per pair.
    `runs` are {"decomposer", "solver", "summary", "items": [ItemResult]}. Returns {name: location}."""
    import datetime

    written: dict[str, str] = {}
    offline = is_offline(runs)
    payload: dict[str, Any] = {
        "results": {}, "n-samples": {}, "config": config or {}, "versions": versions(), "git_hash": git_hash(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "offline": offline, "caveat": OFFLINE_CAVEAT if offline else None,
        "paired_vs_none": paired_vs_none(runs), "runs": []}
    for r in runs:
        name = pair_name(r["decomposer"], r["solver"])
        raw = storage.join(out, f"{name}.paper_raw.jsonl")
        write_paper_raw(r["items"], raw)
        written[f"{name}.paper_raw.jsonl"] = raw
        sname = f"samples_{pair_name(r['decomposer'], '')[:-2] or 'run'}.jsonl"
        loc = storage.join(out, sname)
        storage.write_bytes_atomic(loc, "".join(json.dumps(sample_record(it)) + "\n"
                                                for it in sorted(r["items"], key=lambda i: i.index)).encode())
        written[sname] = loc
        s = r["summary"]
        payload["results"][r["decomposer"]] = {
            **{f"acc_{m},none": s["accuracy"][m]["accuracy"] for m in MODES},
            **{f"acc_{m}_ci95,none": s["accuracy"][m]["ci95"] for m in MODES}, "alias": r["decomposer"]}
        payload["n-samples"][r["decomposer"]] = {"original": s["n"], "effective": s.get("scored", s["n"])}
        payload["runs"].append({"decomposer": r["decomposer"], "solver": r["solver"], "summary": s,
                                "paper_raw": f"{name}.paper_raw.jsonl", "samples": sname,
                                "items": [it.to_dict() for it in r["items"]]})
    loc = storage.join(out, "results.json")
    storage.write_bytes_atomic(loc, json.dumps(payload, indent=2).encode())
    written["results.json"] = loc
    loc = storage.join(out, "report.md")
    storage.write_bytes_atomic(loc, markdown_report(runs).encode())
    written["report.md"] = loc
    for fname, png in plot_report(runs).items():
        loc = storage.join(out, fname)
        storage.write_bytes_atomic(loc, png)
        written[fname] = loc
    return written


def markdown_table(runs: list[dict]) -> str:
    head = ["decomposer", "solver", "n"] + [f"acc {m}" for m in MODES] + [
        "decomp tokens", "decomp $", "solve tokens", "solve $", "total $", "$ / problem", "mean #subq", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        s = r["summary"]
        u = s["usage"]
        cells = [r["decomposer"], r["solver"], str(s["n"])] + [f"{s['accuracy'][m]['accuracy']:.3f}" for m in MODES] + [
            str(u["decompose"]["tokens"]), f"{u['decompose']['cost_usd']:.5f}", str(u["solve"]["tokens"]),
            f"{u['solve']['cost_usd']:.5f}", f"{u['total']['cost_usd']:.5f}", f"{u['total']['per_problem_cost_usd']:.6f}",
            f"{s['sub_questions']['mean']:.2f}", str(s["errors"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ci(a: dict) -> str:
    lo, hi = a.get("ci95", (0.0, 1.0))
    return f"{a['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown_report(runs: list[dict]) -> str:
    text = ["# subq evaluation report", ""]
    if is_offline(runs):
        text += [f"**{OFFLINE_CAVEAT}**", ""]
    text += ["Accuracy per scoring mode (`paper`, `strict`, `flexible`; see `subq.scoring`) over the items that did "
             "not fail (failed items are errors, excluded from accuracy), tokens and $ per stage "
             "(decompose = the decomposer, solve = the solver). `none` = single-stage (solver alone), `teacher` = the "
             "solver endpoint's own decomposition (QG prompt).", "", markdown_table(runs), "",
             "## 95% Wilson intervals, markers, fallbacks", "",
             "| decomposer | scored | acc paper [95% CI] | acc strict [95% CI] | acc flexible [95% CI] | "
             "no marker (paper/strict) | fell back to single-stage | few-shot items | acc paper w/o few-shot |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s, acc = r["summary"], r["summary"]["accuracy"]
        nofew = s.get("accuracy_without_few_shot", acc)["paper"]
        fb = f"{s.get('fell_back_single_stage', 0)} of {s['n']}" if r["decomposer"] != "none" else "-"
        text.append(f"| {r['decomposer']} | {s.get('scored', s['n'])} of {s['n']} | {_ci(acc['paper'])} | "
                    f"{_ci(acc['strict'])} | {_ci(acc['flexible'])} | {acc['paper']['missing_final_answer']}/"
                    f"{acc['strict']['missing_final_answer']} | {fb} | {s.get('few_shot_items', 0)} | {_ci(nofew)} |")
    for r in runs:
        k = r["summary"].get("fell_back_single_stage", 0)
        if k and r["decomposer"] != "none":
            text.append(f"\n`{r['decomposer']}` fell back to single-stage: {k} of {r['summary']['n']} problems (no "
                        f"sub-question written; the solver answered alone, as `none` does).")
    paired = paired_vs_none(runs)
    if paired:
        text += ["", "## Paired comparison against `none` (paper rule, same problems)", "",
                 "| decomposer | paired n | accuracy - none | only none right | only this right | McNemar exact p |",
                 "|---|---|---|---|---|---|"]
        text += [f"| {p['decomposer']} | {p['n_paired']} | {p['delta']:+.3f} | {p['only_none_correct']} | "
                 f"{p['only_this_correct']} | {p['mcnemar_p']:.3g} |" for p in paired]
    errs = [(r["decomposer"], r["summary"]) for r in runs if r["summary"]["errors"]]
    if errs:
        text += ["", "## Errors (excluded from accuracy)", ""]
        for name, s in errs:
            reasons = "; ".join(f"{k}x {reason}" for reason, k in s.get("error_reasons", []))
            text.append(f"- `{name}`: {s['errors']} of {s['n']} failed. Top reasons: {reasons}")
    text += ["", "Per-sample results: `samples_<decomposer>.jsonl` (lm-eval's layout); versions, git commit, date and "
             "the full config: `results.json`.", "",
             "![accuracy vs cost](accuracy_vs_cost.png)", "", "![number of sub-questions](subquestions_hist.png)", ""]
    return "\n".join(text)


def place_labels(ax, points: list[tuple[float, float]], labels: list[str], fontsize: int = 7) -> list:
    """Annotate points so that no two labels overprint: each label starts at a small offset from its point and
    moves down in steps of its own height until its box overlaps no label placed before it (deterministic: points
    are placed in order of x, then y, then label)."""
    from matplotlib.text import Text

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    placed_boxes, texts = [], []
    for i in sorted(range(len(points)), key=lambda k: (points[k][0], points[k][1], labels[k])):
        x, y = points[i]
        dy = 3.0
        for _ in range(200):
            t = ax.annotate(labels[i], (x, y), fontsize=fontsize, xytext=(4, dy), textcoords="offset points",
                            arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5") if dy != 3.0 else None)
            box = Text.get_window_extent(t, renderer)  # the text alone (an Annotation's box includes its arrow)
            if not any(box.overlaps(b) for b in placed_boxes):
                break
            t.remove()
            dy -= box.height * 72.0 / fig.dpi + 1.0
        placed_boxes.append(box)
        texts.append(t)
    return texts


def report_figures(runs: list[dict]) -> dict:
    """The report's matplotlib figures {file name: Figure}; each carries the offline caveat when the replies came
    from the replay teacher server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caveat = "OFFLINE replay teacher: accuracy measures no decomposer" if is_offline(runs) else None
    figs = {}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    pts, labels = [], []
    for r in runs:
        s = r["summary"]
        x, y = s["usage"]["total"]["per_problem_cost_usd"], s["accuracy"]["paper"]["accuracy"]
        lo, hi = s["accuracy"]["paper"].get("ci95", (y, y))
        ax.errorbar([x], [y], yerr=[[max(0.0, y - lo)], [max(0.0, hi - y)]], fmt="o", ms=5, capsize=3, lw=0.8)
        pts.append((x, y))
        labels.append(f"{r['decomposer']} / {r['solver']}")
    ax.set_xlabel("$ per problem (decompose + solve)")
    ax.set_ylabel("accuracy (paper rule, 95% Wilson CI)")
    ax.set_title("accuracy vs cost")
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.06 if caveat else 0, 1, 1))
    place_labels(ax, pts, labels)
    figs["accuracy_vs_cost.png"] = fig

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    counts_all = [[len(it.sub_questions) for it in r["items"]] for r in runs]
    top = max([max(c) for c in counts_all if c] + [1])
    bins = [b - 0.5 for b in range(0, top + 2)]
    ax.hist(counts_all, bins=bins, label=[f"{r['decomposer']} / {r['solver']}" for r in runs])
    ax.set_xticks(range(0, top + 1))
    ax.set_xlabel("number of sub-questions")
    ax.set_ylabel("problems")
    ax.set_title("sub-questions per problem")
    ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.06 if caveat else 0, 1, 1))
    figs["subquestions_hist.png"] = fig
    if caveat:
        for f in figs.values():
            f.text(0.5, 0.01, caveat, ha="center", va="bottom", fontsize=8, color="firebrick")
    return figs


def plot_report(runs: list[dict]) -> dict[str, bytes]:
    import io

    import matplotlib.pyplot as plt

    pngs = {}
    for name, fig in report_figures(runs).items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        pngs[name] = buf.getvalue()
    return pngs
