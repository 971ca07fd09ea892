"""The small proxy operators would otherwise put in front of the server, inside it: API keys from
a file (`keys.py`), per-key limits and token budgets (`limits.py`), usage in SQLite and the
request log (`store.py`), all held by one `Gateway` (`gate.py`) that the server's middleware and
handlers call; `usage.py` is the `jaxserve usage` command. Nothing here imports the engine.
docs/gateway.md describes the behaviour.
"""

from __future__ import annotations


def build_gateway(*, api_key: str | None = None, keys_file: str | None = None,
                  usage_db: str | None = None, request_log: str | None = None,
                  log_content: bool = False):
    """The server's gateway from its flags. A bad keys file raises KeysFileError (a ValueError
    naming the line), before anything else starts."""
    from jaxserve.gateway.gate import Gateway
    from jaxserve.gateway.keys import KeyRing, load_keys
    from jaxserve.gateway.store import UsageStore

    keys = load_keys(keys_file) if keys_file else (KeyRing.single(api_key) if api_key else None)
    store = UsageStore(usage_db, request_log=request_log) if (usage_db or request_log) else None
    return Gateway(keys=keys, keys_path=keys_file, store=store, log_content=log_content)
