"""A generation run's output directory: parts (one per batch, named by its problem ids: exactly-once), the
failures table, resume state (`done_ids`, `read_failures`), compaction and exports, the run manifest and the output
lease that keeps a second job off the same output."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Optional

from pipelines.generate_config import GenerateConfig
from subq import storage
from subq.errors import ConfigError, SubqError


def _part_name(ids: list[str]) -> str:
    return "part-" + hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16] + ".parquet"


def _failure_schema():
    import pyarrow as pa

    return pa.schema([("problem_id", pa.string()), ("problem", pa.string()), ("source", pa.string()),
                      ("source_index", pa.int64()), ("stage", pa.string()), ("error_type", pa.string()),
                      ("reason", pa.string()), ("attempts", pa.int64()), ("time", pa.float64())])


FAILURE_SCHEMA = _failure_schema()


def _write_table(table, location: str) -> None:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(location, buf.getvalue())


# ------------------------------------------------------------------ driver side


def done_ids(output: str):
    """The ids of the problems with a row in OUTPUT, as a pyarrow array: one column read from the finished parts
    (writers' temps skipped), no row objects, so resuming a million problems stays small and fast."""
    import pyarrow as pa

    from subq.schema import read_parquet_table

    parts = storage.join(output, "parts")
    if not storage.list_files(parts, ".parquet"):
        return pa.array([], pa.string())
    return read_parquet_table(parts, columns=["problem_id"]).column(0).combine_chunks()


def read_failures(output: str, done) -> dict:
    """The open failures in OUTPUT by problem id (the newest of each), leaving out problems in DONE (a row wins)."""
    import pyarrow.compute as pc

    fails: dict = {}
    fdir = storage.join(output, "failures")
    if storage.list_files(fdir, ".parquet"):
        from subq.schema import read_parquet_table

        ft = read_parquet_table(fdir, schema=FAILURE_SCHEMA)
        ft = ft.filter(pc.invert(pc.is_in(ft.column("problem_id"), value_set=done)))
        for f in ft.to_pylist():
            if f["problem_id"] not in fails or f["time"] > fails[f["problem_id"]]["time"]:
                fails[f["problem_id"]] = f
    return fails


def compact_parts(output: str) -> int:
    """Safety net for exactly-once: if any problem id appears in more than one part (it cannot in normal
    operation: a retried batch overwrites its own part), rewrite the parts as one part holding one row per id.
    Returns the number of duplicate rows removed."""
    from subq.schema import read_parquet, read_parquet_table, rows_to_table, sort_rows

    parts_dir = storage.join(output, "parts")
    files = storage.list_files(parts_dir, ".parquet")
    if len(files) < 2:
        return 0
    fs, _ = storage.resolve(parts_dir)
    import pyarrow.compute as pc

    ids = read_parquet_table(parts_dir, columns=["problem_id"]).column(0)
    n_ids = len(ids)
    if pc.count_distinct(ids).as_py() == n_ids:
        return 0
    rows: dict = {}
    for r in read_parquet(parts_dir):
        rows.setdefault(r.problem_id, r)
    ordered = sort_rows(list(rows.values()))
    name = "part-compacted-" + _part_name([r.problem_id for r in ordered])[5:]
    _write_table(rows_to_table(ordered), storage.join(parts_dir, name))
    for f in files:
        if not f.endswith(name):
            fs.delete_file(f)
    return n_ids - len(ordered)


def export(output: str) -> dict:
    """Write paper_raw.jsonl, paper_dataset.json and failures.jsonl from the parts; return counts and paths."""
    from subq.schema import iter_parquet_sorted, write_paper_chunks

    compact_parts(output)
    done = done_ids(output)
    fails = read_failures(output, done)
    parts = storage.join(output, "parts")
    paths = {"paper_raw": storage.join(output, "paper_raw.jsonl"),
             "paper_dataset": storage.join(output, "paper_dataset.json"),
             "failures": storage.join(output, "failures.jsonl"), "parts": storage.join(output, "parts")}
    if len(done):  # streamed in source order, one chunk of row objects at a time (a million rows fit in memory)
        write_paper_chunks(iter_parquet_sorted(parts), {f: paths[f] for f in ("paper_raw", "paper_dataset")})
    storage.write_bytes_atomic(paths["failures"], "".join(json.dumps(f) + "\n" for f in fails.values()).encode())
    return {"rows": len(done), "failures": len(fails), "paths": paths}


# ------------------------------------------------------------------ run manifest and lease

# settings that change what a row holds: a re-run into the same OUTPUT with other values is refused
MANIFEST_FIELDS = ("model", "base_url", "template", "n_sets", "n_feedback", "temperature", "max_tokens")


def manifest_settings(cfg: GenerateConfig) -> dict:
    from actors.cache import normalize_endpoint

    d = {k: getattr(cfg, k) for k in MANIFEST_FIELDS}
    d["base_url"] = normalize_endpoint(cfg.base_url)
    return d


def check_manifest(cfg: GenerateConfig) -> Optional[dict]:
    """Compare with OUTPUT/manifest.json (written by the first run): SubqError naming each differing field,
    before any call. Returns the recorded settings (None: a new output)."""
    loc = storage.join(cfg.output, "manifest.json")
    if not storage.exists(loc):
        return None
    recorded = json.loads(storage.read_bytes(loc))["settings"]
    now = manifest_settings(cfg)
    diff = [f"{k} {recorded.get(k)!r} -> {now[k]!r}" for k in MANIFEST_FIELDS if recorded.get(k) != now[k]]
    if diff:
        raise SubqError("settings differ from the run that wrote this output: " + ", ".join(diff), source=cfg.output,
                        hint=f"use another --output, or the recorded settings in {loc}")
    return recorded


def write_manifest(cfg: GenerateConfig) -> None:
    loc = storage.join(cfg.output, "manifest.json")
    if not storage.exists(loc):
        storage.write_bytes_atomic(loc, json.dumps({"settings": manifest_settings(cfg), "created": time.time()},
                                                   indent=2).encode())


class OutputLease:
    """OUTPUT/_lease.json = {host, pid, run_id, heartbeat}: one job writes an output at a time.

    Taken with an atomic create-if-absent (`storage.create_exclusive`: link of a complete temp, O_EXCL semantics),
    so of two jobs started at the same instant exactly one gets it. A lease is stale after `timeout_s` without a
    heartbeat (a thread renews it every timeout_s/4, and only while the file is still ours), or at once when its
    process is gone from this host. A stale lease is taken over under a second exclusive file
    (`_lease.json.takeover`): the taker re-reads the lease, deletes it only if it is still the stale one it judged,
    and creates its own with the same atomic create, so two takers cannot both win. A second job refuses with the
    holder named; the same process may re-enter. Object stores offer no conditional put through pyarrow: there the
    lease is refused with a clear error (`--output-lease off` runs without one, for a single writer you control)."""

    def __init__(self, output: str, timeout_s: float = 120.0, mode: str = "exclusive"):
        self.output, self.timeout_s, self.mode = output, timeout_s, mode
        self.path = storage.join(output, "_lease.json")
        self.takeover_path = storage.join(output, "_lease.json.takeover")
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "run_id": hashlib.sha256(f"{output}|{os.getpid()}|{time.time_ns()}".encode()).hexdigest()[:12]}
        self._stop = None
        self.lost = False  # set by the heartbeat when another job holds the file (we were judged stale)

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(storage.read_bytes(self.path))
        except (SubqError, ValueError):
            return None

    def _stale(self, info: dict) -> bool:
        if time.time() - float(info.get("heartbeat", 0)) > self.timeout_s:
            return True
        if info.get("host") == self.me["host"]:
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, KeyError):
                pass
        return False

    def _data(self) -> bytes:
        return json.dumps({**self.me, "heartbeat": time.time()}).encode()

    def _write(self) -> None:
        storage.write_bytes_atomic(self.path, self._data())

    def _refuse(self, info: dict):
        age = time.time() - float(info.get("heartbeat", 0))
        return SubqError(f"another job is writing this output (host {info.get('host')}, pid {info.get('pid')}, "
                         f"heartbeat {age:.0f}s ago)", source=self.output,
                         hint=f"wait for it to finish, or delete {self.path} if that job is gone")

    def _take_over(self, judged: dict) -> bool:
        """Replace the stale lease `judged` by ours; True when ours is now the lease."""
        if not storage.create_exclusive(self.takeover_path, self._data()):
            try:  # a taker that died mid-takeover leaves its file: stale after timeout_s
                t = json.loads(storage.read_bytes(self.takeover_path))
                if time.time() - float(t.get("heartbeat", 0)) > self.timeout_s:
                    storage.delete(self.takeover_path)
            except (SubqError, ValueError):
                pass
            return False
        try:
            now = self._read()
            if now is not None and (now.get("run_id"), now.get("heartbeat")) != (judged.get("run_id"),
                                                                                 judged.get("heartbeat")):
                return False  # it changed since we judged it: not ours to delete
            storage.delete(self.path)
            return storage.create_exclusive(self.path, self._data())
        finally:
            storage.delete(self.takeover_path)

    def acquire(self) -> "OutputLease":
        import threading

        if self.mode == "off":
            return self
        storage.makedirs(self.output)
        try:
            got = storage.create_exclusive(self.path, self._data())
        except storage.NoAtomicCreate as e:
            raise ConfigError(f"the output's store offers no atomic create (conditional put), so two jobs could "
                              f"both take its lease: {e}", field="output_lease", source=self.output,
                              hint="write to a local or mounted path, or pass --output-lease off if you make sure "
                                   "only one job writes this output") from None
        for _ in range(20):
            if got:
                break
            info = self._read()
            if info is None:  # removed between our create and our read (a release): try again
                got = storage.create_exclusive(self.path, self._data())
                continue
            if info.get("host") == self.me["host"] and info.get("pid") == self.me["pid"]:
                self.me["run_id"] = info.get("run_id", self.me["run_id"])  # the same process re-enters
                self._write()
                got = True
                break
            if not self._stale(info):
                raise self._refuse(info)
            got = self._take_over(info)
            if not got:
                time.sleep(0.05)
        if not got:
            raise SubqError("another job took this output's lease at the same moment", source=self.output)
        self._stop = threading.Event()
        stop = self._stop

        def beat():
            while not stop.wait(self.timeout_s / 4):
                try:
                    info = self._read()
                    if info is not None and info.get("run_id") != self.me["run_id"]:
                        self.lost = True  # another job took it over: never overwrite its lease
                        return
                    self._write()
                except Exception:  # a transient storage error: the next beat tries again
                    pass

        threading.Thread(target=beat, name="subq-lease", daemon=True).start()
        return self

    def release(self) -> None:
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        info = self._read()
        if info is not None and info.get("run_id") == self.me["run_id"]:
            storage.delete(self.path)

    def __enter__(self) -> "OutputLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
