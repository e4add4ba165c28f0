"""Typed, frozen settings built once from TOML and the environment, then passed down."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_CONFIG_PATH = Path("config/default.toml")


@dataclass(frozen=True, slots=True)
class GateSettings:
    global_rate: float = 20000
    global_burst: int = 40000
    client_rate: float = 10
    client_burst: int = 20
    citizen_rate: float = 1
    citizen_burst: int = 3
    trusted_proxies: tuple[str, ...] = ("127.0.0.1/32", "::1/128")

    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.trusted_proxies)


@dataclass(frozen=True, slots=True)
class QueueSettings:
    max_depth: int = 10000
    max_wait_ms: int = 2000


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    batch_size: int = 500
    claim_idle_ms: int = 10000
    max_attempts: int = 5


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    redis_prefix: str = "allot"
    redis_timeout_ms: int = 800
    ops_host: str = "127.0.0.1"
    ops_port: int = 9180
    header_timeout_ms: int = 10000
    body_timeout_ms: int = 10000
    connections_per_address: int = 64
    auth_failures_per_minute: int = 10


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/allot"
    admin_token: str | None = None
    id_pepper: str | None = None
    dev_mode: bool = False
    service: ServiceSettings = field(default_factory=ServiceSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)

    @property
    def pepper_bytes(self) -> bytes:
        """The HMAC key for citizen IDs and phones; a fixed one only in development mode."""
        if self.id_pepper:
            return self.id_pepper.encode()
        if self.dev_mode:
            return b"allot-development-pepper-not-for-production"
        raise ConfigError("ALLOT_ID_PEPPER is not set (set ALLOT_DEV=1 for a development pepper)")


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


def _section(cls: type[T], data: Mapping[str, Any], name: str) -> T:
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown key(s) in [{name}]: {', '.join(sorted(unknown))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (ALLOT_CONFIG, else config/default.toml if present), then ALLOT_*."""
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
    unknown = set(data) - {"service", "gate", "queue", "ledger"}
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown))}")
    try:
        service = _section(ServiceSettings, data.get("service", {}), "service")
        settings = Settings(
            service=service,
            gate=_section(GateSettings, data.get("gate", {}), "gate"),
            queue=_section(QueueSettings, data.get("queue", {}), "queue"),
            ledger=_section(LedgerSettings, data.get("ledger", {}), "ledger"),
        )
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc
    overrides: dict[str, Any] = {}
    for key, attr in (
        ("ALLOT_REDIS_URL", "redis_url"),
        ("ALLOT_DATABASE_URL", "database_url"),
        ("ALLOT_ADMIN_TOKEN", "admin_token"),
        ("ALLOT_ID_PEPPER", "id_pepper"),
    ):
        if env.get(key):
            overrides[attr] = env[key]
    overrides["dev_mode"] = env.get("ALLOT_DEV", "") in {"1", "true", "yes"}
    svc: dict[str, Any] = {}
    if env.get("ALLOT_PORT"):
        try:
            svc["port"] = int(env["ALLOT_PORT"])
        except ValueError as exc:
            raise ConfigError(f"ALLOT_PORT={env['ALLOT_PORT']!r} is not a port number") from exc
    if env.get("ALLOT_OPS_PORT"):
        try:
            svc["ops_port"] = int(env["ALLOT_OPS_PORT"])
        except ValueError as exc:
            raise ConfigError(
                f"ALLOT_OPS_PORT={env['ALLOT_OPS_PORT']!r} is not a port number"
            ) from exc
    if env.get("ALLOT_OPS_HOST"):
        svc["ops_host"] = env["ALLOT_OPS_HOST"]
    if env.get("ALLOT_REDIS_PREFIX"):
        svc["redis_prefix"] = env["ALLOT_REDIS_PREFIX"]
    if svc:
        overrides["service"] = replace(service, **svc)
    settings = replace(settings, **overrides)
    settings.gate.trusted_networks()  # fail at startup, not on the first request
    return settings
