"""The `subq` command line: the front door, on the top floor. Every verb comes from its layer's `register(app)` by
a plain import (each keeps Ray/torch imports inside its command bodies, so `subq --help` stays fast); the app's
shell and exit-code policy are `subq.cli_options.new_app`/`run`, which each job's `python -m` twin shares."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

from subq import stop as _stop

if os.path.basename(sys.argv[0] if sys.argv else "") == "subq":
    # the `subq` console script: a Ctrl-C/SIGTERM during the imports below ends it at once, with its exit code
    # (subq.stop; run() installs the handlers that let each command stop cleanly)
    _stop.install_early()

import typer

from cluster import cluster_cmd
from pipelines import (cluster_check, demo_cmd, doctor, evaluate_cmd, generate_cmd, serve_cmd,
                       teacher_server_cmd)
from subq.cli_options import new_app, run
from subq.errors import SubqError
from training import train_cmd

app = new_app()


@app.command()
def score(
    file: str = typer.Argument(..., help="Released or subq file: raw .jsonl, JSON list (chat/dataset) or Parquet."),
    mode: str = typer.Option("paper", "--mode", help="paper | strict | flexible (see subq.scoring)."),
    per_item: bool = typer.Option(False, "--per-item", help="Also print one JSON line per scored reply."),
) -> None:
    """Score the final answers in FILE against its gold answers; print one JSON object."""
    from subq.schema import detect_format, read_rows
    from subq.scoring import MODES, score as score_one, summarize

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


for _register in (serve_cmd.register, evaluate_cmd.register, generate_cmd.register, teacher_server_cmd.register, cluster_cmd.register, cluster_check.register,
                  train_cmd.register, demo_cmd.register, doctor.register):
    _register(app)


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point (`subq`, `python -m pipelines`): see subq.cli_options.run for exit codes."""
    run(app, argv)


if __name__ == "__main__":
    main()
