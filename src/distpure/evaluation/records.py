"""The append-only results file: one JSON record per (sample, defence, attack).

Each record is written and flushed as soon as it exists. A run killed mid-write leaves at most
a torn last line, which ``read_records`` detects and drops (and ``RecordWriter`` truncates), so
a restarted run recomputes exactly the missing records: nothing lost, nothing duplicated.

A record names its sample twice: ``index`` is its position in the evaluation order (the seeded
random order of the data; part of the record's key) and ``dataset_index`` its position in the
dataset itself. Records written before the order was randomised have ``index`` only (then the
position in the class-ordered subset).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..atomic import write_atomically

Key = tuple[int, str, str]


def record_key(record: dict) -> Key:
    return (int(record["index"]), str(record["defense"]), str(record["attack"]))


def _complete_lines(path: Path) -> Iterator[tuple[bytes, dict]]:
    """(raw line, record) for each complete, parseable line, stopping at the first torn one."""
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                return
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError:
                return


def check_dataset_indices(records: Iterable[dict], dataset_indices: Sequence[int]) -> None:
    """Refuse to resume ``records`` unless each one's ``dataset_index`` is the image the data now
    puts at its ``index`` (the position in the evaluation order): otherwise the resumed run
    would mix two orders, evaluating some images twice and others never. Runs written before
    the order was randomised (class order) stored no ``dataset_index``; they can be reported
    but not resumed."""
    for record in records:
        position = int(record["index"])
        stored = record.get("dataset_index")
        expected = dataset_indices[position] if position < len(dataset_indices) else None
        if stored is None or int(stored) != expected:
            found = "no dataset index" if stored is None else f"dataset image {stored}"
            now = (f"dataset image {expected} there" if expected is not None
                   else f"only {len(dataset_indices)} images")
            raise ValueError(f"results record {position} ({record['defense']} / {record['attack']}) "
                             f"names {found}, but the data now holds {now} "
                             "(records without a dataset index come from before evaluation order "
                             "was randomised); finish the run with the version that started it, "
                             "or use another --out directory")


def read_records(path: str | Path) -> list[dict]:
    """All complete records of ``path`` (a torn or corrupt trailing line is ignored)."""
    path = Path(path)
    return [record for _, record in _complete_lines(path)] if path.is_file() else []


class RecordWriter:
    """Appends records durably; on open, cuts off anything after the last complete record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_torn_tail()
        self._handle = open(self.path, "a", encoding="utf-8")

    def _truncate_torn_tail(self) -> None:
        if not self.path.is_file():
            return
        complete = sum(len(line) for line, _ in _complete_lines(self.path))
        if complete != self.path.stat().st_size:
            with open(self.path, "r+b") as handle:
                handle.truncate(complete)

    def write(self, records: Iterable[dict]) -> None:
        for record in records:
            self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_sorted(records: list[dict], path: str | Path) -> None:
    """Write ``records`` in canonical order (by sample, defence, attack), atomically."""
    ordered = sorted(records, key=record_key)
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in ordered)
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
