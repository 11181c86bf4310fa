"""The `subq` command line. Core commands live here; each layer adds its own in a `*_cmd.py`
module listed in COMMAND_MODULES (each exposes `register(app)` and keeps Ray/torch imports inside
its command bodies, so `subq --help` stays fast)."""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Optional

from subq import stop as _stop

if os.path.basename(sys.argv[0] if sys.argv else "") == "subq":
    # the `subq` console script: a Ctrl-C/SIGTERM during the imports below ends it at once, with its exit code
    # (subq.stop; main() installs the handlers that let each command stop cleanly)
    _stop.install_early()

import typer

from subq.errors import SubqError

app = typer.Typer(
    name="subq",
    help="Distil an LLM's problem-decomposition skill into a compact model, on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # click's plain help: flags show no type, every default is shown
    context_settings={"show_default": True, "help_option_names": ["-h", "--help"]},
)

@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray, DeepSpeed and Serve output on the terminal instead of the run's log file (also SUBQ_VERBOSE=1)."),
) -> None:
    """Distil an LLM's problem-decomposition skill into a compact model, on Ray."""
    from subq import console

    console.set_verbose(verbose)


# One line per layer; each module defines register(app).
COMMAND_MODULES: list[str] = [
    "pipelines.serve_cmd",
    "pipelines.generate_cmd",
    "cluster.cluster_cmd",
    "training.train_cmd",
    "pipelines.demo_cmd",
    "cluster.doctor",
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
    """Console entry point: user errors print one line and exit 2, without a traceback. Ctrl-C exits 130 and
    SIGTERM 143, each after the command's own stop path ran (subq.stop)."""
    import faulthandler
    import signal

    from subq import console

    _stop.install()  # SIGINT and SIGTERM raise here, every time (subq.stop)
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>` prints every thread's stack to stderr (a job that seems stuck)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        try:
            app(args=argv, standalone_mode=True)
        except SystemExit as e:  # typer turns a KeyboardInterrupt from the command into exit 130
            if e.code == 130 and _stop.requested() is not None:
                raise (_stop.Terminated() if _stop.requested() == signal.SIGTERM else KeyboardInterrupt()) from None
            raise
    except SubqError as e:
        console.echo(f"error: {e}")
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (subq.stop.Terminated)
        console.echo(f"\nstopped ({_stop.describe(e)})")
        sys.exit(_stop.exit_code(e))
    except Exception as e:  # an unexpected failure: one line on the terminal, the traceback in the run's log
        import traceback

        traceback.print_exc()  # to the log file when one is active
        where = f" (traceback in {console.log_path()})" if console.log_path() else ""
        console.echo(f"error: {type(e).__name__}: {e}{where}")
        sys.exit(1)
    finally:
        _stop.uninstall()  # an in-process caller (a test) gets its own handlers back


if __name__ == "__main__":
    main()
