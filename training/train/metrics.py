"""A training run's metrics files (metrics.json, metrics.csv, metrics.png: one quantity per axis, the best step,\nan overfitting note), written by a helper thread so the loop never waits on the disk."""

from __future__ import annotations

import csv
import io
import json

from subq import storage


class _MetricsWriter:
    """Rank 0's metrics files, written by one helper thread so that matplotlib and storage uploads never stall
    the training loop; each submit supersedes a pending one (only the latest history matters)."""

    def __init__(self, rd: str):
        from concurrent.futures import ThreadPoolExecutor

        self.rd, self.pool, self.pending = rd, ThreadPoolExecutor(1, thread_name_prefix="subq-metrics"), []

    def submit(self, history: list[dict]) -> None:
        for f in self.pending:
            f.cancel()  # not started yet: superseded by this newer history
        self.pending = [f for f in self.pending if not f.cancelled()]
        self.pending.append(self.pool.submit(_write_metrics, self.rd, [dict(h) for h in history]))
        for f in [f for f in self.pending if f.done()]:
            f.result()  # re-raise a failed write in the loop
            self.pending.remove(f)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for f in self.pending:
            if not f.cancelled():
                f.result()


def metric_panels(history: list[dict]) -> list[tuple[str, list[str]]]:
    """metrics.png's axes: (title, metric keys), one quantity per axis, only those logged."""
    keys = sorted({k for h in history for k in h})
    panels = [("loss", [k for k in keys if k.endswith("loss")]), ("val BLEU", ["val_bleu"]),
              ("#sub-questions", ["val_num_subq", "val_ref_num_subq"]), ("no-EOS share", ["val_no_eos_frac"])]
    panels = [(t, [k for k in ks if any(k in h for h in history)]) for t, ks in panels]
    return [(t, ks) for t, ks in panels if ks]


def overfitting_note(history: list[dict], rise: float = 0.05) -> str | None:
    """'overfitting: ...' when the validation loss rose more than `rise` (relative) above its minimum while the
    training loss kept falling; else None. Shown on metrics.png and returned by run_train as `notes`."""
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if len(val) < 2:
        return None
    lo_step, lo = min(val, key=lambda x: x[1])
    last_step, last = val[-1]
    train = {h["step"]: h["loss"] for h in history if "loss" in h}
    if last_step > lo_step and last > lo * (1 + rise) and train.get(last_step, 0) < train.get(lo_step, float("inf")):
        return (f"overfitting: validation loss rose from {lo:.3f} (step {lo_step}) to {last:.3f} (step {last_step}) "
                "while the training loss fell")
    return None


def _write_metrics(rd: str, history: list[dict]) -> None:
    """metrics.json, metrics.csv and metrics.png (loss curves + validation) in the run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    storage.write_bytes_atomic(storage.join(rd, "metrics.json"), json.dumps(history, indent=1).encode())
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "step", k))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    storage.write_bytes_atomic(storage.join(rd, "metrics.csv"), buf.getvalue().encode())
    # one quantity per axis: losses (train and validation), val BLEU, #sub-questions (ours vs the teacher's),
    # share of decompositions cut by the token budget; best/ marked on each; overfitting called out
    panels = metric_panels(history)
    best = next((h.get("best_step") for h in reversed(history) if h.get("best_step")), None)
    note = overfitting_note(history)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, ks) in zip(axes[0], panels):
        for k in ks:
            pts = [(h["step"], h[k]) for h in history if k in h]
            ax.plot(*zip(*pts), marker="o" if k.startswith("val") else ".", label=k)
        if best is not None:
            ax.axvline(best, color="green", linestyle="--", linewidth=1, label=f"best/ (step {best})")
        ax.set_xlabel("step"), ax.set_title(title), ax.legend(fontsize=7)
    if note:
        fig.suptitle(note, color="red", fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)
    plt.close(fig)
    storage.write_bytes_atomic(storage.join(rd, "metrics.png"), png.getvalue())
