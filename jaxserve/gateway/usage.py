"""`jaxserve usage`: the per-key, per-model, per-day usage a server recorded in its --usage-db,
as a table or (--json) a list of rows with key, model, day, requests, prompt_tokens,
cached_tokens, completion_tokens and errors. It opens the database read-only: the server may be
running (WAL mode lets it read alongside the writer).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys

from jaxserve.gateway.store import COLUMNS, default_usage_db, query


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--usage-db", default=None, metavar="FILE",
                   help="the server's --usage-db (default: $XDG_DATA_HOME/jaxserve/usage.db)")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows")
    p.add_argument("--key", default=None, help="only this key's rows")
    p.add_argument("--since", default=None, metavar="YYYY-MM-DD",
                   help="only the days from this one on (UTC)")


def _table(rows: list[dict]) -> str:
    heads = list(COLUMNS)
    cells = [[str(r[c]) for c in heads] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(heads)]
    numeric = [i >= 3 for i in range(len(heads))]

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = [line(heads)] + [line(c) for c in cells]
    if rows:
        totals = ["total", "", ""] + [str(sum(r[c] for r in rows)) for c in heads[3:]]
        out.append(line(totals))
    return "\n".join(out)


def cmd_usage(args) -> int:
    path = args.usage_db or default_usage_db()
    if not os.path.isfile(path):
        print(f"error: no usage database at {path} (the server's --usage-db)", file=sys.stderr)
        return 2
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
        rows = query(db, key=args.key, since=args.since)
    except sqlite3.Error as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 2
    finally:
        if "db" in locals():
            db.close()
    print(json.dumps(rows, indent=1) if args.json else _table(rows))
    return 0
