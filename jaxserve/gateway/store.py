"""Usage accounting in SQLite (`--usage-db`), written off the event loop.

Tables (one row per key, model and UTC day; a second per user and tag too):
    usage(key, model, day, requests, prompt_tokens, cached_tokens, completion_tokens, errors)
    usage_tags(key, model, day, user, tag, requests, prompt_tokens, completion_tokens)
The serving code calls `record` (a cheap append under a lock); a background thread folds the
records into one transaction about every second, and `close` flushes what is left. WAL mode lets
`jaxserve usage` read while the server writes. `cached_tokens` is the part of the prompt served
from the prefix cache when the engine's output reports it (`num_cached_tokens` in its metrics);
the engine does not report it today, so it is 0.
The request log (`--request-log`) is written by the same thread.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sqlite3
import sys
import threading
from typing import IO

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT NOT NULL, model TEXT NOT NULL, day TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key, model, day));
CREATE TABLE IF NOT EXISTS usage_tags (
    key TEXT NOT NULL, model TEXT NOT NULL, day TEXT NOT NULL, user TEXT NOT NULL,
    tag TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key, model, day, user, tag));
"""

COLUMNS = ("key", "model", "day", "requests", "prompt_tokens", "cached_tokens",
           "completion_tokens", "errors")


def default_usage_db() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "jaxserve", "usage.db")


def utc_day(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).date().isoformat()


@dataclasses.dataclass
class Record:
    """One finished (or refused, or failed) request."""
    key: str
    model: str
    time: float
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: bool = False
    user: str = ""
    tag: str = ""


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(_SCHEMA)
    return db


def query(db: sqlite3.Connection, *, key: str | None = None, since: str | None = None) -> list[dict]:
    sql, args = f"SELECT {', '.join(COLUMNS)} FROM usage WHERE 1=1", []
    if key is not None:
        sql, args = sql + " AND key = ?", args + [key]
    if since is not None:
        sql, args = sql + " AND day >= ?", args + [since]
    rows = db.execute(sql + " ORDER BY day, key, model", args).fetchall()
    return [dict(zip(COLUMNS, r)) for r in rows]


class UsageStore:
    """The usage database and the request log, written by one background thread."""

    def __init__(self, path: str | None, *, request_log: str | None = None,
                 interval: float = 1.0):
        self.path = path
        self.db = None
        if path is not None:
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            self.db = connect(path)
        self.log_file: IO[str] | None = None
        if request_log == "-":
            self.log_file = sys.stdout
        elif request_log:
            self.log_file = open(request_log, "a", encoding="utf-8")
        self.interval = interval
        self._records: list[Record] = []
        self._lines: list[str] = []
        self._lock = threading.Lock()       # guards the two lists
        self._db_lock = threading.Lock()    # one writer/reader of the connection at a time
        self._flush_lock = threading.Lock()  # flushes in order (log lines stay in order)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jaxserve-usage", daemon=True)
        self._thread.start()

    # -- called from the event loop: appends only ----------------------------------------------
    def record(self, rec: Record) -> None:
        if self.db is not None:
            with self._lock:
                self._records.append(rec)

    def log(self, entry: dict) -> None:
        if self.log_file is not None:
            line = json.dumps(entry, ensure_ascii=False)
            with self._lock:
                self._lines.append(line)

    # -- reads (start-up, /v1/usage through a thread) ------------------------------------------
    def spent_since(self, key: str, first_day: str) -> int:
        if self.db is None:
            return 0
        with self._db_lock:
            row = self.db.execute("SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) "
                                  "FROM usage WHERE key = ? AND day >= ?", (key, first_day)).fetchone()
        return int(row[0])

    def rows(self, *, key: str | None = None, since: str | None = None) -> list[dict]:
        if self.db is None:
            return []
        self.flush()
        with self._db_lock:
            return query(self.db, key=key, since=since)

    # -- the writer ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def flush(self) -> None:
        with self._flush_lock:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            records, self._records = self._records, []
            lines, self._lines = self._lines, []
        if lines and self.log_file is not None:
            self.log_file.write("".join(line + "\n" for line in lines))
            self.log_file.flush()
        if not records or self.db is None:
            return
        totals: dict[tuple, list[int]] = {}
        tags: dict[tuple, list[int]] = {}
        for r in records:
            day = utc_day(r.time)
            t = totals.setdefault((r.key, r.model, day), [0, 0, 0, 0, 0])
            for i, v in enumerate((1, r.prompt_tokens, r.cached_tokens, r.completion_tokens,
                                   int(r.error))):
                t[i] += v
            if r.user or r.tag:
                g = tags.setdefault((r.key, r.model, day, r.user, r.tag), [0, 0, 0])
                for i, v in enumerate((1, r.prompt_tokens, r.completion_tokens)):
                    g[i] += v
        with self._db_lock, self.db:
            self.db.executemany(
                "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key, model, day) "
                "DO UPDATE SET requests = requests + excluded.requests, prompt_tokens = "
                "prompt_tokens + excluded.prompt_tokens, cached_tokens = cached_tokens + "
                "excluded.cached_tokens, completion_tokens = completion_tokens + "
                "excluded.completion_tokens, errors = errors + excluded.errors",
                [(*k, *v) for k, v in totals.items()])
            if tags:
                self.db.executemany(
                    "INSERT INTO usage_tags VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key, "
                    "model, day, user, tag) DO UPDATE SET requests = requests + excluded.requests, "
                    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, completion_tokens = "
                    "completion_tokens + excluded.completion_tokens",
                    [(*k, *v) for k, v in tags.items()])

    def close(self) -> None:
        """Stop the writer and flush everything recorded so far (at shutdown)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self.flush()
        if self.db is not None:
            with self._db_lock:
                self.db.close()
        if self.log_file is not None and self.log_file is not sys.stdout:
            self.log_file.close()
