"""Typed, frozen settings built once from TOML and the environment, checked, then passed down.

Every key is declared once, as a field of one of the dataclasses below: the field's annotation
is its type, and ``key(default, ...)`` holds its default, what else it must be (a range or a
check) and the ALLOT_* variable that overrides it, if any. ``load_settings`` reads each
``[section]`` of the TOML file (the section is the name of the Settings field), then the
environment (which wins), and checks every value against its declaration: a wrong type, a value
out of range, an unknown section or key raises ConfigError with one line naming the key
(``queue.max_depth``, ``ALLOT_PORT``) and what it must be. ``allot`` exits 2 on it.

To add a key: one line in its section's class, and the same default in config/default.toml
(tests/test_config.py keeps the two equal). To add a section: a frozen dataclass of such lines
and one field of Settings. Addresses and secrets (the fields of Settings itself) come only from
the environment.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

DEFAULT_CONFIG_PATH = Path("config/default.toml")

Check = Callable[[Any], str | None]  # a value's fault ("must be ..."), or None when it is fine


@dataclass(frozen=True, slots=True)
class Rule:
    """What one key accepts beyond its type, and where else it may come from."""

    env: str | None = None  # the ALLOT_* variable that overrides the file
    at_least: float | None = None
    at_most: float | None = None
    above: float | None = None  # strictly greater than this
    check: Check | None = None
    secret: bool = False  # never repeat the value in a message (tokens, URLs with passwords)


def key(
    default: T,
    *,
    env: str | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    above: float | None = None,
    check: Check | None = None,
    secret: bool = False,
) -> T:
    """Declare one setting: its default and what it must be (its type is the annotation)."""
    rule = Rule(env, at_least, at_most, above, check, secret)
    return field(default=default, metadata={"rule": rule})


# -- checks beyond type and range ------------------------------------------------------------


def url(*schemes: str) -> Check:
    """A URL with one of these schemes, a host (or a socket path for unix://) and a numeric port."""
    what = "a " + ", ".join(f"{s}://" for s in schemes[:-1])
    what += f" or {schemes[-1]}:// URL" if len(schemes) > 1 else f"{schemes[0]}:// URL"

    def check(value: str) -> str | None:
        try:
            parts = urlsplit(value)
            _ = parts.port  # raises ValueError on a port that is not a number in range
        except ValueError:
            return f"{what} with a numeric port"
        if parts.scheme not in schemes:
            return what
        if parts.scheme == "unix" and not parts.path:
            return f"{what} (unix:// with a socket path)"
        if parts.scheme != "unix" and not parts.hostname:
            return f"{what} with a host"
        return None

    return check


def redis_urls(value: str) -> str | None:
    """ALLOT_REDIS_URL: one URL, or (``[redis] mode = "cluster"``) comma-separated startup
    nodes; ``check_redis_topology`` then checks the list against the mode."""
    one = url("redis", "rediss", "unix")
    for part in value.split(","):
        fault = one(part.strip())
        if fault is not None:
            return fault + (" (or a comma-separated list of them)" if "," in value else "")
    return None


def networks(value: tuple[str, ...]) -> str | None:
    for text in value:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError as exc:
            return f"a list of IP networks like '10.0.0.0/8' ({exc})"
    return None


def hostname(value: str) -> str | None:
    return "a host name or address" if not value.strip() or value != value.strip() else None


def redis_prefix(value: str) -> str | None:
    """The prefix leads every key; a brace would move the {r:<round>} hash tag (CROSSSLOT)."""
    if not value or re.search(r"[\s{}]", value):
        return "non-empty text without spaces or braces"
    return None


def consumer_name(value: str) -> str | None:
    """A name in the ledger's consumer group (empty: the host's name + ``-ledger``)."""
    if len(value) > 200 or re.search(r"\s", value):
        return "empty, or a name of at most 200 characters without spaces"
    return None


def draw_key_text(value: str) -> str | None:
    """ALLOT_DRAW_KEY: base64url of a raw 32-byte Ed25519 private key (allocator/receipts.py)."""
    from allocator.receipts import DrawKey, DrawKeyError

    try:
        DrawKey.from_text(value)
    except DrawKeyError:
        return "base64url of a raw 32-byte Ed25519 private key (see allocator/receipts.py)"
    return None


# -- the settings --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GateSettings:
    global_rate: float = key(20000.0, above=0)
    global_burst: int = key(40000, at_least=1)
    client_rate: float = key(10.0, above=0)
    client_burst: int = key(20, at_least=1)
    citizen_rate: float = key(1.0, above=0)
    citizen_burst: int = key(3, at_least=1)
    trusted_proxies: tuple[str, ...] = key(("127.0.0.1/32", "::1/128"), check=networks)

    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.trusted_proxies)


@dataclass(frozen=True, slots=True)
class QueueSettings:
    max_depth: int = key(10000, at_least=1)
    max_wait_ms: int = key(2000, at_least=1)


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    batch_size: int = key(500, at_least=1)
    claim_idle_ms: int = key(10000, at_least=1)
    max_attempts: int = key(5, at_least=1)
    linger_ms: int = key(50, at_least=0, at_most=1000)
    # the writer's stable name in the consumer group; "" = "<hostname>-ledger" (docs/operations.md)
    consumer: str = key("", env="ALLOT_LEDGER_CONSUMER", check=consumer_name)


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """The Redis topology and how durable an answer is (docs/operations.md, "Redis topology")."""

    # "cluster": ALLOT_REDIS_URL names startup nodes, comma-separated (allocator/topology.py)
    mode: Literal["standalone", "cluster"] = key("standalone", env="ALLOT_REDIS_MODE")
    # > 0: a claim batch is answered only after that many replicas acknowledged it (WAIT)
    wait_replicas: int = key(0, env="ALLOT_REDIS_WAIT_REPLICAS", at_least=0, at_most=16)
    wait_timeout_ms: int = key(100, at_least=1, at_most=10000)


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    host: str = key("127.0.0.1", check=hostname)
    port: int = key(8080, env="ALLOT_PORT", at_least=1, at_most=65535)
    workers: int = key(1, at_least=1, at_most=256)
    redis_prefix: str = key("allot", env="ALLOT_REDIS_PREFIX", check=redis_prefix)
    redis_timeout_ms: int = key(800, at_least=1)
    # the operations listener (/metrics, /healthz, /readyz): docs/operations.md
    ops_host: str = key("127.0.0.1", env="ALLOT_OPS_HOST", check=hostname)
    ops_port: int = key(9180, env="ALLOT_OPS_PORT", at_least=1, at_most=65535)
    # the front door's limits (service/http.py, allocator/throttle.py)
    header_timeout_ms: int = key(10000, at_least=1)
    body_timeout_ms: int = key(10000, at_least=1)
    connections_per_address: int = key(64, at_least=1)
    auth_failures_per_minute: int = key(10, at_least=1)
    # the expiry sweep (allocator/expiry.py): at most 50 s, so expiry lands within 60 s
    expiry_sweep_ms: int = key(10000, at_least=100, at_most=50000)


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = key(
        "redis://127.0.0.1:6379/0",
        env="ALLOT_REDIS_URL",
        check=redis_urls,
        secret=True,
    )
    database_url: str = key(
        "postgresql://postgres@127.0.0.1:5432/allot",
        env="ALLOT_DATABASE_URL",
        check=url("postgresql", "postgres"),
        secret=True,
    )
    admin_token: str | None = key(None, env="ALLOT_ADMIN_TOKEN", secret=True)
    id_pepper: str | None = key(None, env="ALLOT_ID_PEPPER", secret=True)
    dev_mode: bool = key(False, env="ALLOT_DEV")
    # the lottery's Ed25519 draw key; unset: generated once and kept in PostgreSQL (draw_key)
    draw_key: str | None = key(None, env="ALLOT_DRAW_KEY", check=draw_key_text, secret=True)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)

    @property
    def pepper_bytes(self) -> bytes:
        """The HMAC key for citizen IDs and phones; a fixed one only in development mode."""
        if self.id_pepper:
            return self.id_pepper.encode()
        if self.dev_mode:
            return b"allot-development-pepper-not-for-production"
        raise ConfigError("ALLOT_ID_PEPPER is not set (set ALLOT_DEV=1 for a development pepper)")


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why, in one line."""


# -- loading and checking --------------------------------------------------------------------


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (ALLOT_CONFIG, else config/default.toml if present), then ALLOT_*.

    An empty environment variable counts as unset.
    """
    env = os.environ if environ is None else environ
    if path is None:
        path = Path(env["ALLOT_CONFIG"]) if env.get("ALLOT_CONFIG") else DEFAULT_CONFIG_PATH
        if not path.exists() and not env.get("ALLOT_CONFIG"):
            path = None
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    sections = {
        f.name: f.default_factory
        for f in fields(Settings)
        if f.default_factory is not MISSING and is_dataclass(f.default_factory)
    }
    unknown = sorted(set(data) - set(sections))
    if unknown:
        known = ", ".join(f"[{s}]" for s in sorted(sections))
        raise ConfigError(
            f"unknown section(s) {', '.join(unknown)} in {path}; the file has {known}"
            " (addresses and secrets come from ALLOT_* variables, not the file)"
        )
    values: dict[str, Any] = {}
    for name, cls in sections.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{name} in {path} must be a table ([{name}])")
        values[name] = _build(typing.cast(type[Any], cls), name, table, path, env)
    values.update(_resolve(Settings, None, {}, path, env, only_env=True))
    settings = Settings(**values)
    check_redis_topology(settings.redis_url, settings.redis.mode)
    if settings.redis.wait_replicas and (
        settings.redis.wait_timeout_ms >= settings.service.redis_timeout_ms
    ):
        raise ConfigError(
            "redis.wait_timeout_ms must be below service.redis_timeout_ms"
            f" ({settings.service.redis_timeout_ms}): a claim batch waits for its replicas"
            " within the time it has for Redis"
        )
    return settings


def check_redis_topology(redis_url: str, mode: str) -> None:
    """The URL against ``[redis] mode``: several nodes only in cluster mode; in cluster mode
    each a redis:// or rediss:// host:port without a database number (a cluster has only db 0
    and refuses SELECT). The message names the setting, never the URL (it may hold a password)."""
    parts = [p.strip() for p in redis_url.split(",")]
    if mode == "standalone":
        if len(parts) > 1:
            raise ConfigError(
                'ALLOT_REDIS_URL names several nodes; that needs [redis] mode = "cluster"'
                " (ALLOT_REDIS_MODE=cluster)"
            )
        return
    for part in parts:
        split = urlsplit(part)
        if split.scheme not in ("redis", "rediss"):
            raise ConfigError(
                "ALLOT_REDIS_URL must be redis:// or rediss:// startup nodes in cluster mode"
                ' ([redis] mode = "cluster"), not unix://'
            )
        if split.port is None:
            raise ConfigError(
                "ALLOT_REDIS_URL must give each cluster startup node its port (host:port)"
            )
        if split.path not in ("", "/") or "db=" in split.query:
            raise ConfigError(
                "ALLOT_REDIS_URL must not name a database number in cluster mode"
                ' ([redis] mode = "cluster": a cluster has only database 0)'
            )


def _build(cls: type[T], section: str, table: dict[str, Any], path: Path | None, env: Any) -> T:
    declared = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - declared)
    if unknown:
        names = ", ".join(f"{section}.{k}" for k in unknown)
        raise ConfigError(
            f"unknown key(s) {names} in {path}; [{section}] takes {', '.join(sorted(declared))}"
        )
    return cls(**_resolve(cls, section, table, path, env))


def _resolve(
    cls: type[Any],
    section: str | None,
    table: dict[str, Any],
    path: Path | None,
    env: Mapping[str, str],
    *,
    only_env: bool = False,
) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        rule = _rule(f)
        if rule is None:
            continue  # a section, resolved on its own
        name = f"{section}.{f.name}" if section else f.name
        kind = hints[f.name]
        # The file's value is checked even where the environment overrides it: a typo there
        # would otherwise surface on the day the variable is taken away.
        if f.name in table:
            raw = table[f.name]
            values[f.name] = _checked(_from_toml(kind, raw), raw, kind, rule, f"{name} in {path}")
        if rule.env and env.get(rule.env):
            where = rule.env if only_env else f"{rule.env} ({name})"
            text = env[rule.env]
            values[f.name] = _checked(_from_env(kind, text), text, kind, rule, where, env=True)
    return values


def _checked(value: Any, raw: Any, kind: Any, rule: Rule, where: str, *, env: bool = False) -> Any:
    fault = _what(kind, rule, env=env) if value is _WRONG else _fault(value, rule)
    if fault is not None:
        shown = "" if rule.secret else f" (got {raw!r})"
        raise ConfigError(f"{where} must be {fault}{shown}")
    return value


def _rule(f: Field[Any]) -> Rule | None:
    rule: Rule | None = f.metadata.get("rule")
    if rule is None and not is_dataclass(f.default_factory):
        raise TypeError(f"setting {f.name} is not declared with key()")  # a programming error
    return rule


_WRONG: Any = object()  # the value is not of the declared type
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _base(kind: Any) -> Any:
    """``str | None`` is a str that may be unset (None only as a default: TOML has no null)."""
    if isinstance(kind, types.UnionType):
        (kind,) = (a for a in typing.get_args(kind) if a is not type(None))
    return kind


def _from_toml(kind: Any, value: Any) -> Any:
    kind = _base(kind)
    if kind is bool:
        return value if isinstance(value, bool) else _WRONG
    if isinstance(value, bool):
        return _WRONG  # TOML true is not 1
    if kind is int:
        return value if isinstance(value, int) else _WRONG
    if kind is float:
        return float(value) if isinstance(value, int | float) else _WRONG
    if typing.get_origin(kind) is Literal:
        return value if value in typing.get_args(kind) else _WRONG
    if kind is str:
        return value if isinstance(value, str) else _WRONG
    if typing.get_origin(kind) is tuple:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return tuple(value) if ok else _WRONG
    raise TypeError(f"no TOML reading for {kind!r}")  # a programming error


def _from_env(kind: Any, text: str) -> Any:
    kind = _base(kind)
    if kind is bool:
        word = text.strip().lower()
        return True if word in _TRUE else False if word in _FALSE else _WRONG
    if kind is int:
        return int(text) if re.fullmatch(r"[+-]?[0-9]+", text.strip()) else _WRONG
    if kind is float:
        try:
            return float(text)
        except ValueError:
            return _WRONG
    if typing.get_origin(kind) is Literal:
        return text if text in typing.get_args(kind) else _WRONG
    if kind is str:
        return text
    if typing.get_origin(kind) is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    raise TypeError(f"no environment reading for {kind!r}")  # a programming error


def _fault(value: Any, rule: Rule) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return _range("a finite number", rule)
    if isinstance(value, int | float) and not isinstance(value, bool):
        low_ok = rule.at_least is None or value >= rule.at_least
        high_ok = rule.at_most is None or value <= rule.at_most
        above_ok = rule.above is None or value > rule.above
        if not (low_ok and high_ok and above_ok):
            return _range("a whole number" if isinstance(value, int) else "a number", rule)
    return rule.check(value) if rule.check is not None else None


def _what(kind: Any, rule: Rule, *, env: bool) -> str:
    """What a value of this kind must be, as the message says it."""
    kind = _base(kind)
    if kind is bool:
        return "one of 1, true, yes, on, 0, false, no, off" if env else "true or false"
    if kind is int:
        return _range("a whole number", rule)
    if kind is float:
        return _range("a number", rule)
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        return "a comma-separated list" if env else "a list of strings"
    return "a string"


def _range(noun: str, rule: Rule) -> str:
    if rule.at_least is not None and rule.at_most is not None:
        return f"{noun} from {_num(rule.at_least)} to {_num(rule.at_most)}"
    if rule.at_least is not None:
        return f"{noun} >= {_num(rule.at_least)}"
    if rule.above is not None:
        return f"{noun} > {_num(rule.above)}"
    if rule.at_most is not None:
        return f"{noun} <= {_num(rule.at_most)}"
    return noun


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
