"""Per-key limits, checked before a request reaches the engine: requests and tokens per minute
(sliding window), open requests, and a token budget per day, month or in total.

All state sits in one `Limiter` object, touched only from the event loop (no locks): there is
one front-end process today. NOTE: a multi-process front end must move this object behind the
engine (or into shared storage) so that every front end sees the same counts.

How each limit counts:
- requests_per_minute: a request is refused when the window already holds that many.
- tokens_per_minute: prompt tokens are counted at admission, completion tokens as they are
  generated; a request is refused when the window already holds >= the limit (a request that is
  admitted may take the window past it; the next waits).
- max_concurrent: open requests of the key; never more than the limit.
- token_budget (prompt + completion): refused (`insufficient_quota`) once spent; a streamed
  request that spends the rest mid-stream is cut there (the caller ends it with finish_reason
  "length"). The spent amount at start-up comes from the usage database, so budgets survive
  restarts.
The window length and the clock are parameters, so tests need not wait a minute.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import math
import time
from typing import Callable

from jaxserve.gateway.keys import KeyEntry


def period_start(period: str, now: float) -> str:
    """The first day (UTC, YYYY-MM-DD) a budget of `period` counts from at time `now`."""
    day = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).date()
    if period == "day":
        return day.isoformat()
    if period == "month":
        return day.replace(day=1).isoformat()
    return "0000-00-00"


@dataclasses.dataclass
class Refusal(Exception):
    """Why a request may not run now: `code` is rate_limit_exceeded or insufficient_quota."""
    reason: str          # requests_per_minute | tokens_per_minute | max_concurrent | token_budget
    message: str
    retry_after: int     # seconds

    @property
    def code(self) -> str:
        return "insufficient_quota" if self.reason == "token_budget" else "rate_limit_exceeded"


@dataclasses.dataclass
class _KeyState:
    requests: collections.deque = dataclasses.field(default_factory=collections.deque)  # times
    tokens: collections.deque = dataclasses.field(default_factory=collections.deque)    # (t, n)
    window_tokens: int = 0
    open: int = 0
    period: str = ""     # the budget period the spent count belongs to
    spent: int = 0


class Limiter:
    def __init__(self, *, window_seconds: float = 60.0, clock: Callable[[], float] = time.time,
                 spent_since: Callable[[str, str], int] | None = None):
        """`spent_since(key_name, first_day)`: tokens the key used from that day on (the usage
        store's count), read once per key and budget period."""
        self.window = window_seconds
        self.clock = clock
        self.spent_since = spent_since
        self.keys: dict[str, _KeyState] = {}

    def _state(self, key: KeyEntry, now: float) -> _KeyState:
        st = self.keys.setdefault(key.name, _KeyState())
        horizon = now - self.window
        while st.requests and st.requests[0] <= horizon:
            st.requests.popleft()
        while st.tokens and st.tokens[0][0] <= horizon:
            st.window_tokens -= st.tokens.popleft()[1]
        if key.token_budget is not None:
            first = period_start(key.budget_period, now)
            if st.period != first:   # a new day/month, or the first look at this key
                st.period = first
                st.spent = self.spent_since(key.name, first) if self.spent_since else 0
        return st

    def _retry(self, oldest: float, now: float) -> int:
        return max(1, math.ceil(oldest + self.window - now))

    def admit(self, key: KeyEntry, prompt_tokens: int) -> None:
        """Count one request with its prompt tokens, or raise Refusal. Pair with `release`."""
        now = self.clock()
        st = self._state(key, now)
        if key.token_budget is not None and st.spent >= key.token_budget:
            raise Refusal("token_budget", f"key {key.name!r} has used its token budget "
                          f"({key.token_budget} tokens per {key.budget_period})",
                          _until_next_period(key.budget_period, now))
        if key.max_concurrent is not None and st.open >= key.max_concurrent:
            raise Refusal("max_concurrent", f"key {key.name!r} already has {st.open} requests "
                          f"open (its limit is {key.max_concurrent}); retry when one finishes", 1)
        rpm = key.requests_per_minute
        if rpm is not None and len(st.requests) >= rpm:
            raise Refusal("requests_per_minute", f"key {key.name!r} is over its limit of {rpm} "
                          f"requests per minute", self._retry(st.requests[0], now))
        tpm = key.tokens_per_minute
        if tpm is not None and st.window_tokens >= tpm:
            raise Refusal("tokens_per_minute", f"key {key.name!r} is over its limit of {tpm} "
                          f"tokens per minute", self._retry(st.tokens[0][0], now))
        st.requests.append(now)
        st.open += 1
        self.add_tokens(key, prompt_tokens)

    def add_tokens(self, key: KeyEntry, n: int) -> bool:
        """Count `n` more tokens of an admitted request; False when the key's budget is spent."""
        now = self.clock()
        st = self._state(key, now)
        if n > 0:
            if key.tokens_per_minute is not None:   # the window is kept only where it is limited
                st.tokens.append((now, n))
                st.window_tokens += n
            st.spent += n
        return key.token_budget is None or st.spent < key.token_budget

    def budget_left(self, key: KeyEntry) -> int | None:
        if key.token_budget is None:
            return None
        return max(0, key.token_budget - self._state(key, self.clock()).spent)

    def release(self, key: KeyEntry) -> None:
        st = self.keys.get(key.name)
        if st is not None:
            st.open = max(0, st.open - 1)

    def open_requests(self, name: str) -> int:
        st = self.keys.get(name)
        return st.open if st else 0


def _until_next_period(period: str, now: float) -> int:
    t = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    if period == "day":
        nxt = (t + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    elif period == "month":
        first = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = (first + datetime.timedelta(days=32)).replace(day=1)
    else:
        return 86400   # a total budget never renews: a day is as good a hint as any
    return max(1, math.ceil((nxt - t).total_seconds()))
