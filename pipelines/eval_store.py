"""Durable evaluations of the Serve app: one directory per evaluation under the operator's results root.

    <results_root>/<evaluation id>/meta.json          request, status, totals, times (rewritten atomically)
    <results_root>/<evaluation id>/items/<index>.json one finished item (written as it finishes)
    <results_root>/<evaluation id>/report/            the report directory (subq.report.write_report)

The Ingress writes items as they finish; after a restart it reads every evaluation back: finished ones are served
as before, and ones that were running are marked `interrupted` with their finished items kept. Local paths or any
pyarrow filesystem URI (subq.storage). Clients never name a location: only the evaluation id addresses it.
"""

from __future__ import annotations

import json
import re
from typing import Optional

from subq import storage
from subq.errors import DataError

ID_RE = re.compile(r"^eval-[0-9a-f]{12}$")


class EvalStore:
    def __init__(self, root: str):
        self.root = str(root)

    def _dir(self, eid: str) -> str:
        if not ID_RE.match(eid):  # ids are ours; anything else never becomes a path
            raise ValueError(f"bad evaluation id {eid!r}")
        return storage.join(self.root, eid)

    def report_dir(self, eid: str) -> str:
        return storage.join(self._dir(eid), "report")

    def save_meta(self, eid: str, meta: dict) -> None:
        storage.write_bytes_atomic(storage.join(self._dir(eid), "meta.json"), json.dumps(meta).encode())

    def save_item(self, eid: str, item: dict) -> None:
        storage.write_bytes_atomic(storage.join(self._dir(eid), "items", f"{int(item['index']):06d}.json"),
                                   json.dumps(item).encode())

    def _list(self, location: str, dirs: bool) -> list[str]:
        import pyarrow.fs as pafs

        fs, root = storage.resolve(location)
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return []
        want = pafs.FileType.Directory if dirs else pafs.FileType.File
        return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == want)

    def load(self, eid: str) -> Optional[tuple[dict, list[dict]]]:
        try:
            meta = json.loads(storage.read_bytes(storage.join(self._dir(eid), "meta.json")))
        except (DataError, ValueError):
            return None
        items = []
        for name in self._list(storage.join(self._dir(eid), "items"), dirs=False):
            try:
                items.append(json.loads(storage.read_bytes(storage.join(self._dir(eid), "items", name))))
            except (DataError, ValueError):
                continue  # atomic writes: a torn file cannot happen; skip anything foreign
        return meta, items

    def ids(self) -> list[str]:
        return [n for n in self._list(self.root, dirs=True) if ID_RE.match(n)]

    def delete(self, eid: str) -> None:
        import pyarrow.fs as pafs

        fs, path = storage.resolve(self._dir(eid))
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
