"""Append-only JSONL results for the speed benchmarks: one line per measurement, plus `run` marker
lines (command line, machine) so a report can say what produced it. A rerun into the same folder
skips measurements whose key is already there (`--fresh` starts over)."""
from __future__ import annotations

import json
from pathlib import Path


class ResultsLog:
    def __init__(self, path: Path, fresh: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()
        self._by_key = {r["key"]: r for r in self.rows() if "key" in r}  # the latest row per key

    def rows(self, kind: str | None = None) -> list[dict]:
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return rows if kind is None else [r for r in rows if r.get("kind") == kind]

    def has(self, key: str) -> bool:
        return key in self._by_key

    def get(self, key: str) -> dict | None:
        """The recorded measurement with this key (the latest, if a key was written twice)."""
        return self._by_key.get(key)

    def add(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if "key" in record:
            self._by_key[record["key"]] = record
