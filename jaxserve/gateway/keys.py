"""API keys: the `--api-keys-file` YAML, validated at start-up, and the constant-time lookup.

    keys:
      - name: team-a
        key_sha256: 5e88...        # or  key: sk-...   (the digest keeps the secret out of the file)
        requests_per_minute: 60
        tokens_per_minute: 20000   # prompt + completion
        max_concurrent: 4
        token_budget: 1000000
        budget_period: month       # day | month | total
        models: [qwen2.5-7b]       # optional; default every served name
        admin: false               # optional; an admin key sees everyone's usage

Every mistake (malformed YAML, an unknown field, a bad value, a duplicate name or key) is a
`KeysFileError` naming the file and the line (from the YAML node marks), so the server refuses
to start. A supplied key is hashed with sha256 and compared with `hmac.compare_digest` against
every entry's digest, all of them, whichever matches: the time taken does not depend on which
key (or how much of one) was right.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re

import yaml

PERIODS = ("day", "month", "total")
_LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrent", "token_budget")
_FIELDS = {"name", "key", "key_sha256", "budget_period", "models", "admin", *_LIMITS}
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One key of the file (or the single `--api-key`, named "default"; or no key at all,
    "anonymous"). A limit of None is no limit."""
    name: str
    digest: bytes = b""                      # sha256 of the key
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    token_budget: int | None = None
    budget_period: str = "total"
    models: tuple[str, ...] | None = None    # None: every served name
    admin: bool = False
    from_file: bool = False                  # False: "default" / "anonymous"

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


ANONYMOUS = KeyEntry("anonymous")


def digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


class KeyRing:
    """The keys a server accepts. `lookup` is constant-time over the entries."""

    def __init__(self, entries: list[KeyEntry]):
        self.entries = list(entries)

    @classmethod
    def single(cls, api_key: str) -> "KeyRing":
        return cls([KeyEntry("default", digest(api_key))])

    def lookup(self, supplied: bytes) -> KeyEntry | None:
        d = digest(supplied)
        found = None
        for e in self.entries:   # NOTE: no early exit, every digest is compared
            if hmac.compare_digest(d, e.digest) and supplied:
                found = e
        return found

    @property
    def names(self) -> set[str]:
        return {e.name for e in self.entries}


def _where(path: str, node) -> str:
    return f"{path}, line {node.start_mark.line + 1}"


def _scalar(path: str, node, kind: str):
    if not isinstance(node, yaml.ScalarNode):
        raise KeysFileError(f"{_where(path, node)}: expected {kind}")
    return yaml.safe_load(yaml.serialize(node))


def _entry(path: str, node) -> tuple[KeyEntry, object]:
    if not isinstance(node, yaml.MappingNode):
        raise KeysFileError(f"{_where(path, node)}: each key must be a mapping (name, key or "
                            f"key_sha256, limits)")
    fields: dict[str, tuple[object, object]] = {}
    for k, v in node.value:
        name = k.value if isinstance(k, yaml.ScalarNode) else None
        if name not in _FIELDS:
            raise KeysFileError(f"{_where(path, k)}: unknown field {name!r} (known: "
                                f"{', '.join(sorted(_FIELDS))})")
        if name in fields:
            raise KeysFileError(f"{_where(path, k)}: field {name!r} given twice")
        fields[name] = (v, k)
    if "name" not in fields:
        raise KeysFileError(f"{_where(path, node)}: a key needs a 'name'")
    name = _scalar(path, fields["name"][0], "a name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise KeysFileError(f"{_where(path, fields['name'][0])}: 'name' must be 1-64 letters, "
                            f"digits or _ . @ -")
    if ("key" in fields) == ("key_sha256" in fields):
        raise KeysFileError(f"{_where(path, node)}: key {name!r} needs exactly one of 'key' and "
                            f"'key_sha256'")
    if "key" in fields:
        secret = _scalar(path, fields["key"][0], "a string")
        if not isinstance(secret, str) or len(secret) < 8:
            raise KeysFileError(f"{_where(path, fields['key'][0])}: 'key' must be a string of at "
                                f"least 8 characters")
        d, dnode = digest(secret), fields["key"][0]
    else:
        hexd = _scalar(path, fields["key_sha256"][0], "a hex string")
        if not isinstance(hexd, str) or not _HEX64.match(hexd):
            raise KeysFileError(f"{_where(path, fields['key_sha256'][0])}: 'key_sha256' must be "
                                f"64 hex digits (sha256sum of the key)")
        d, dnode = bytes.fromhex(hexd), fields["key_sha256"][0]
    kw: dict = {}
    for lim in _LIMITS:
        if lim in fields:
            v = _scalar(path, fields[lim][0], "an integer")
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise KeysFileError(f"{_where(path, fields[lim][0])}: {lim!r} must be a positive "
                                    f"integer (leave it out for no limit)")
            kw[lim] = v
    if "budget_period" in fields:
        p = _scalar(path, fields["budget_period"][0], "day, month or total")
        if p not in PERIODS:
            raise KeysFileError(f"{_where(path, fields['budget_period'][0])}: 'budget_period' must "
                                f"be one of {', '.join(PERIODS)}")
        kw["budget_period"] = p
    if "models" in fields:
        mnode = fields["models"][0]
        models = yaml.safe_load(yaml.serialize(mnode))
        if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
            raise KeysFileError(f"{_where(path, mnode)}: 'models' must be a non-empty list of "
                                f"model names")
        kw["models"] = tuple(models)
    if "admin" in fields:
        a = _scalar(path, fields["admin"][0], "true or false")
        if not isinstance(a, bool):
            raise KeysFileError(f"{_where(path, fields['admin'][0])}: 'admin' must be true or false")
        kw["admin"] = a
    return KeyEntry(name, d, from_file=True, **kw), dnode


def parse_keys(text: str, path: str = "<keys>") -> KeyRing:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f", line {mark.line + 1}" if mark is not None else ""
        where = ""
        if e.context and e.context_mark is not None and e.context_mark is not mark:
            where = f"; {e.context} that starts on line {e.context_mark.line + 1}"
        raise KeysFileError(f"{path}{line}: not valid YAML ({e.problem or e.context}{where})"
                            ) from None
    except yaml.YAMLError as e:
        raise KeysFileError(f"{path}: not valid YAML ({e})") from None
    if root is None:
        raise KeysFileError(f"{path}: the file is empty (expected `keys:` and a list)")
    if not isinstance(root, yaml.MappingNode):
        raise KeysFileError(f"{_where(path, root)}: expected a mapping with `keys:`")
    keys_node = None
    for k, v in root.value:
        if not (isinstance(k, yaml.ScalarNode) and k.value == "keys"):
            raise KeysFileError(f"{_where(path, k)}: unknown top-level field "
                                f"{getattr(k, 'value', '?')!r} (expected `keys:`)")
        keys_node = v
    if not isinstance(keys_node, yaml.SequenceNode):
        raise KeysFileError(f"{_where(path, keys_node or root)}: `keys:` must be a list")
    entries: list[KeyEntry] = []
    names: dict[str, int] = {}
    digests: dict[bytes, int] = {}
    for item in keys_node.value:
        entry, dnode = _entry(path, item)
        line = item.start_mark.line + 1
        if entry.name in names:
            raise KeysFileError(f"{_where(path, item)}: duplicate name {entry.name!r} (first on "
                                f"line {names[entry.name]})")
        if entry.name in ("default", "anonymous"):
            raise KeysFileError(f"{_where(path, item)}: the names 'default' and 'anonymous' are "
                                f"reserved")
        if entry.digest in digests:
            raise KeysFileError(f"{_where(path, dnode)}: duplicate key (the same key as on line "
                                f"{digests[entry.digest]})")
        names[entry.name], digests[entry.digest] = line, line
        entries.append(entry)
    if not entries:
        raise KeysFileError(f"{_where(path, keys_node)}: `keys:` lists no keys")
    return KeyRing(entries)


def load_keys(path: str) -> KeyRing:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise KeysFileError(f"--api-keys-file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise KeysFileError(f"{path}: not UTF-8 text") from None
    return parse_keys(text, path)
