"""Where the abuse limits keep their counts: in this process, or in Redis shared by several instances.

Two kinds of record, both keyed by a short string ("ip:203.0.113.9", "messages:printer"):

- AUTH failure windows with a block that doubles each time the threshold is reached again
  (``record_failure`` / ``blocked_until``);
- weighted sliding windows of events (``window_add`` / ``window_frees_at``) for sending budgets.

Times are the caller's clock (the reactor's ``seconds()``), passed in: several instances sharing a
Redis store must have their clocks in sync (NTP), as they must for their logs anyway. In Redis each
operation is one EVAL of a small Lua script, so it is atomic however many instances share the keys,
and every key is under ``relayproxy:`` and expires once it can no longer matter.
"""

from __future__ import annotations

import abc
import secrets
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from relayproxy.redis import RedisClient, RedisError, RedisUnavailable, RedisURL, RedisValue

MAX_TRACKED = 100_000
"""Keys of one kind the memory store remembers at most: random user names cannot grow memory."""

KEY_PREFIX = "relayproxy:"

STORE_TIMEOUT = 2.0
"""Seconds a Redis store may take to connect or to answer one operation."""


class StoreUnavailable(Exception):
    """The store could not answer; callers fail safe (a temporary refusal), never open."""

    def __init__(self, store: str, detail: str) -> None:
        super().__init__(f"{store}: {detail}")
        self.store = store
        self.detail = detail


@dataclass(frozen=True)
class WindowCheck:
    """Would ``need`` more fit under ``limit`` in the window of ``window`` seconds at ``key``?"""

    key: str
    window: float
    limit: int
    need: int


class LimitStore(abc.ABC):
    name: str
    """For logs: "memory", or the Redis URL without its password."""

    @abc.abstractmethod
    async def blocked_until(self, keys: Sequence[str]) -> list[float]:
        """For each AUTH key, the time its block ends (0 or a past time: not blocked)."""

    @abc.abstractmethod
    async def record_failure(
        self, keys: Sequence[tuple[str, int]], now: float, window: float, backoff: float, backoff_max: float
    ) -> list[float]:
        """Count a failure at each (key, threshold); for each, the block (seconds) it started, or 0.

        A key with ``threshold`` failures within ``window`` is blocked for ``backoff``, doubling each
        time up to ``backoff_max``; a key that stayed quiet for a whole window after its last block
        starts over at ``backoff``.
        """

    @abc.abstractmethod
    async def window_frees_at(self, checks: Sequence[WindowCheck], now: float) -> list[float | None]:
        """For each check: None when ``need`` fits now, else the time from which it will."""

    @abc.abstractmethod
    async def window_add(self, adds: Sequence[tuple[str, float, int]], now: float) -> None:
        """Record an event of weight ``weight`` at ``now`` in each (key, window, weight)."""

    def close(self) -> None:
        """Let go of connections (at shutdown)."""


def frees_at(entries: Iterable[tuple[float, int]], limit: int, need: int, window: float, now: float) -> float | None:
    """When ``need`` more fits under ``limit``, given the (time, weight) entries still in the window, oldest first.

    A need larger than the whole limit (an envelope with more recipients than a day allows) never
    fits; the answer is then when everything counted so far, this transaction included, has left the window.
    """
    entries = list(entries)
    total = sum(weight for _, weight in entries)
    if total + need <= limit:
        return None
    if need > limit:
        return max([now] + [at for at, _ in entries]) + window
    excess = total + need - limit
    for at, weight in entries:
        excess -= weight
        if excess <= 0:
            return at + window
    raise AssertionError("unreachable: the entries add up to more than the excess")


# -- in this process ----------------------------------------------------------------------------


@dataclass
class _AuthRecord:
    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0
    backoff: float = 0.0


class _Bounded(OrderedDict[str, Any]):
    """Least recently used keys go first past MAX_TRACKED."""

    def touch(self, key: str, default: Any) -> Any:
        value = self.pop(key, None)
        if value is None:
            value = default()
        self[key] = value
        while len(self) > MAX_TRACKED:
            self.popitem(last=False)
        return value


def _kind(key: str) -> str:
    return key.split(":", 1)[0]


class MemoryStore(LimitStore):
    """Counts in this process only (the default): each instance limits on its own."""

    name = "memory"

    def __init__(self) -> None:
        # One bounded table per kind of key ("ip", "user", ...): a flood of one kind cannot evict another.
        self._auth: dict[str, _Bounded] = {}
        self._windows: dict[str, _Bounded] = {}

    async def blocked_until(self, keys: Sequence[str]) -> list[float]:
        out = []
        for key in keys:
            table = self._auth.get(_kind(key))
            record = table.get(key) if table is not None else None
            out.append(record.blocked_until if record is not None else 0.0)
        return out

    async def record_failure(
        self, keys: Sequence[tuple[str, int]], now: float, window: float, backoff: float, backoff_max: float
    ) -> list[float]:
        out = []
        for key, threshold in keys:
            record: _AuthRecord = self._auth.setdefault(_kind(key), _Bounded()).touch(key, _AuthRecord)
            while record.failures and record.failures[0] <= now - window:
                record.failures.popleft()
            if not record.failures and record.blocked_until + window < now:
                record.backoff = 0.0
            record.failures.append(now)
            blocked = 0.0
            if len(record.failures) >= threshold:
                record.backoff = min(backoff_max, record.backoff * 2 if record.backoff else backoff)
                record.blocked_until = now + record.backoff
                record.failures.clear()
                blocked = record.backoff
            out.append(blocked)
        return out

    def _entries(self, key: str, window: float, now: float) -> deque[tuple[float, int]]:
        entries: deque[tuple[float, int]] = self._windows.setdefault(_kind(key), _Bounded()).touch(key, deque)
        while entries and entries[0][0] <= now - window:
            entries.popleft()
        return entries

    async def window_frees_at(self, checks: Sequence[WindowCheck], now: float) -> list[float | None]:
        return [frees_at(self._entries(c.key, c.window, now), c.limit, c.need, c.window, now) for c in checks]

    async def window_add(self, adds: Sequence[tuple[str, float, int]], now: float) -> None:
        for key, window, weight in adds:
            self._entries(key, window, now).append((now, weight))


# -- in Redis -----------------------------------------------------------------------------------

# KEYS: the block state hashes. Returns each one's end of block, as a string (Lua numbers lose digits).
_BLOCKED_UNTIL = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HGET', key, 'until') or '0'
end
return out
"""

# KEYS: (failures zset, block state hash) per key. ARGV: now, window, backoff, backoff_max, a unique
# member for this failure, then one threshold per key. Returns the block each key started, or '0'.
_RECORD_FAILURE = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local backoff, backoff_max = tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
for i = 1, #KEYS, 2 do
  local failures, state = KEYS[i], KEYS[i + 1]
  local threshold = tonumber(ARGV[5 + (i + 1) / 2])
  redis.call('ZREMRANGEBYSCORE', failures, '-inf', now - window)
  local blocked_until = tonumber(redis.call('HGET', state, 'until') or '0')
  local current = tonumber(redis.call('HGET', state, 'backoff') or '0')
  if redis.call('ZCARD', failures) == 0 and blocked_until + window < now then
    current = 0
  end
  redis.call('ZADD', failures, ARGV[1], ARGV[5])
  local blocked = '0'
  if redis.call('ZCARD', failures) >= threshold then
    if current > 0 then current = current * 2 else current = backoff end
    current = math.min(backoff_max, current)
    blocked_until = now + current
    blocked = tostring(current)
    redis.call('DEL', failures)
  else
    redis.call('PEXPIRE', failures, math.ceil(window * 1000))
  end
  redis.call('HSET', state, 'until', tostring(blocked_until), 'backoff', tostring(current))
  redis.call('PEXPIRE', state, math.ceil((math.max(blocked_until, now) - now + window) * 1000))
  out[#out + 1] = blocked
end
return out
"""

# Members are "WEIGHT:unique", scored by time. KEYS: the windows. ARGV: now, then window, limit and
# need per key. Returns per key '' when the need fits, else the time it will (as frees_at does).
_WINDOW_FREES_AT = """
local now = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local window, limit, need = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local total = 0
  for j = 1, #entries, 2 do
    total = total + tonumber(string.match(entries[j], '^%d+'))
  end
  local frees = ''
  if total + need > limit then
    if need > limit then
      local last = now
      if #entries > 0 then last = math.max(now, tonumber(entries[#entries])) end
      frees = tostring(last + window)
    else
      local excess = total + need - limit
      for j = 1, #entries, 2 do
        excess = excess - tonumber(string.match(entries[j], '^%d+'))
        if excess <= 0 then
          frees = tostring(tonumber(entries[j + 1]) + window)
          break
        end
      end
    end
  end
  out[i] = frees
end
return out
"""

# KEYS: the windows. ARGV: now, a unique suffix, then window and weight per key.
_WINDOW_ADD = """
local now = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local window, weight = tonumber(ARGV[2 * i + 1]), ARGV[2 * i + 2]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  redis.call('ZADD', key, ARGV[1], weight .. ':' .. ARGV[2])
  redis.call('PEXPIRE', key, math.ceil(window * 1000))
end
return 1
"""


def _float(value: RedisValue) -> float:
    if not isinstance(value, bytes):
        raise RedisUnavailable(f"unexpected reply {value!r}")
    try:
        return float(value)
    except ValueError:
        raise RedisUnavailable(f"unexpected reply {value[:40]!r}") from None


def _strings(value: RedisValue, count: int) -> list[bytes]:
    if not isinstance(value, list) or len(value) != count or not all(isinstance(v, bytes) for v in value):
        raise RedisUnavailable(f"unexpected reply {value!r:.80}")
    return [v for v in value if isinstance(v, bytes)]


class RedisStore(LimitStore):
    """Counts shared by every instance that names the same Redis database."""

    def __init__(self, reactor: Any, url: RedisURL, timeout: float = STORE_TIMEOUT) -> None:
        self.name = str(url)
        self._client = RedisClient(reactor, url, timeout)

    async def _eval(self, script: str, keys: Sequence[str], args: Sequence[str | float | int]) -> RedisValue:
        try:
            return await self._client.execute("EVAL", script, len(keys), *keys, *args)
        except (RedisUnavailable, RedisError) as e:
            raise StoreUnavailable(self.name, str(e)) from None

    async def blocked_until(self, keys: Sequence[str]) -> list[float]:
        reply = await self._eval(_BLOCKED_UNTIL, [f"{KEY_PREFIX}auth:block:{key}" for key in keys], [])
        try:
            return [_float(v) for v in _strings(reply, len(keys))]
        except RedisUnavailable as e:
            raise StoreUnavailable(self.name, str(e)) from None

    async def record_failure(
        self, keys: Sequence[tuple[str, int]], now: float, window: float, backoff: float, backoff_max: float
    ) -> list[float]:
        redis_keys = [name for key, _ in keys for name in (f"{KEY_PREFIX}auth:fail:{key}", f"{KEY_PREFIX}auth:block:{key}")]
        member = f"{now!r}:{secrets.token_hex(6)}"
        args: list[str | int] = [repr(now), repr(window), repr(backoff), repr(backoff_max), member]
        args += [threshold for _, threshold in keys]
        reply = await self._eval(_RECORD_FAILURE, redis_keys, args)
        try:
            return [_float(v) for v in _strings(reply, len(keys))]
        except RedisUnavailable as e:
            raise StoreUnavailable(self.name, str(e)) from None

    async def window_frees_at(self, checks: Sequence[WindowCheck], now: float) -> list[float | None]:
        args: list[str | int] = [repr(now)]
        for check in checks:
            args += [repr(check.window), check.limit, check.need]
        reply = await self._eval(_WINDOW_FREES_AT, [f"{KEY_PREFIX}window:{c.key}" for c in checks], args)
        try:
            return [_float(v) if v else None for v in _strings(reply, len(checks))]
        except RedisUnavailable as e:
            raise StoreUnavailable(self.name, str(e)) from None

    async def window_add(self, adds: Sequence[tuple[str, float, int]], now: float) -> None:
        args: list[str | int] = [repr(now), secrets.token_hex(8)]
        for _, window, weight in adds:
            args += [repr(window), weight]
        await self._eval(_WINDOW_ADD, [f"{KEY_PREFIX}window:{key}" for key, _, _ in adds], args)

    def close(self) -> None:
        self._client.close()


def open_store(reactor: Any, store: Literal["memory"] | RedisURL) -> LimitStore:
    """The store ``[limits] store`` names, as load_config parsed it."""
    return MemoryStore() if store == "memory" else RedisStore(reactor, store)
