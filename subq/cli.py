"""The `subq` command line. Core commands live here; each layer adds its own in a `*_cmd.py`
module listed in COMMAND_MODULES (each exposes `register(app)` and keeps Ray/torch imports inside
its command bodies, so `subq --help` stays fast)."""

from __future__ import annotations

import importlib
import json
import sys
from typing import Optional

import typer

from subq.errors import SubqError

app = typer.Typer(
    name="subq",
    help="Distil an LLM's problem-decomposition skill into a compact model, on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

@app.callback()
def _root() -> None:
    """Distil an LLM's problem-decomposition skill into a compact model, on Ray."""


# One line per layer; each module defines register(app).
COMMAND_MODULES: list[str] = [
    "pipelines.serve_cmd",
    "pipelines.generate_cmd",
    "cluster.cluster_cmd",
    "training.train_cmd",
    "pipelines.demo_cmd",
]


@app.command()
def score(
    file: str = typer.Argument(..., help="Released or subq file: raw .jsonl, JSON list (chat/dataset) or Parquet."),
    mode: str = typer.Option("paper", "--mode", help="paper | strict | flexible (see subq.scoring)."),
    per_item: bool = typer.Option(False, "--per-item", help="Also print one JSON line per scored reply."),
) -> None:
    """Score the final answers in FILE against its gold answers; print one JSON object."""
    from subq.scoring import MODES, score as score_one, summarize
    from subq.schema import detect_format, read_rows

    if mode not in MODES:
        raise SubqError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}", field="--mode")
    rows = read_rows(file)
    fmt = detect_format(file)
    if fmt == "paper_dataset":
        raise SubqError("a training dataset file holds rewards, not answers: score a raw or chat file", source=file)
    scores = []
    for row in rows:
        for i, s in enumerate(row.sets):
            if s.answer_text is None:
                continue
            sc = score_one(s.answer_text, row.gold_answer, mode)
            scores.append(sc)
            if per_item:
                print(json.dumps({"problem_id": row.problem_id, "set": i, **sc.to_dict()}))
    out = {"file": file, "format": fmt, "mode": mode, **summarize(scores)}
    print(json.dumps(out))


def _register_layers() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register_layers()


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: user errors print one line and exit 2, without a traceback."""
    try:
        app(args=argv)
    except SubqError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
