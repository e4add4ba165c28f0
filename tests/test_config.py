"""Configuration: config/default.toml and the code's defaults say the same; env overrides."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from allocator import config
from allocator.config import (
    ConfigError,
    GateSettings,
    LedgerSettings,
    QueueSettings,
    ServiceSettings,
    Settings,
    load_settings,
)

ROOT = Path(__file__).resolve().parent.parent


def test_default_toml_matches_the_code_defaults() -> None:
    """The image may run without config/; it must then behave exactly as documented."""
    assert load_settings(ROOT / "config" / "default.toml", environ={}) == Settings()


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    """Operators set secrets and addresses in the environment, never in the file."""
    s = load_settings(
        ROOT / "config" / "default.toml",
        environ={
            "ALLOT_REDIS_URL": "redis://r:1/2",
            "ALLOT_DATABASE_URL": "postgresql://p/q",
            "ALLOT_ADMIN_TOKEN": "t",
            "ALLOT_ID_PEPPER": "pep",
            "ALLOT_PORT": "9000",
        },
    )
    assert (s.redis_url, s.database_url, s.admin_token, s.service.port) == (
        "redis://r:1/2",
        "postgresql://p/q",
        "t",
        9000,
    )
    assert s.pepper_bytes == b"pep"


def test_no_pepper_outside_development_mode_refuses() -> None:
    """Without a pepper, hashed IDs would be guessable; serve must refuse to start."""
    with pytest.raises(ConfigError, match="ALLOT_ID_PEPPER"):
        _ = Settings().pepper_bytes
    assert Settings(dev_mode=True).pepper_bytes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[gate]\nglobal_rte = 1\n", "unknown key"),
        ("[gates]\n", "unknown section"),
        ("[gate]\ntrusted_proxies = ['not-an-ip']\n", "does not appear to be"),
        ("[gate\n", "not valid TOML"),
    ],
)
def test_a_broken_config_file_is_refused_with_its_reason(
    tmp_path: Path, text: str, message: str
) -> None:
    """A typo in the worst-day config must stop the start, naming the key, not be ignored."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises((ConfigError, ValueError), match=message):
        load_settings(path, environ={})


# -- every value is checked against its declaration ----------------------------------------


@pytest.mark.parametrize(
    ("text", "named", "must_be"),
    [
        ('[queue]\nmax_depth = "ten"\n', "queue.max_depth", "a whole number >= 1"),
        ("[queue]\nmax_depth = 1.5\n", "queue.max_depth", "a whole number"),
        ("[queue]\nmax_depth = true\n", "queue.max_depth", "a whole number"),
        ("[queue]\nmax_wait_ms = 0\n", "queue.max_wait_ms", ">= 1"),
        ("[gate]\nclient_rate = -1\n", "gate.client_rate", "a number > 0"),
        ("[gate]\nglobal_rate = inf\n", "gate.global_rate", "a finite number"),
        ("[gate]\ncitizen_burst = 0\n", "gate.citizen_burst", ">= 1"),
        ('[gate]\ntrusted_proxies = "127.0.0.1/32"\n', "gate.trusted_proxies", "a list"),
        ('[service]\nport = "8080"\n', "service.port", "a whole number from 1 to 65535"),
        ("[service]\nport = 70000\n", "service.port", "from 1 to 65535"),
        ("[service]\nworkers = 0\n", "service.workers", "from 1 to 256"),
        ('[service]\nhost = ""\n', "service.host", "a host name"),
        ('[service]\nredis_prefix = "a{b}"\n', "service.redis_prefix", "without spaces or braces"),
        ("[ledger]\nbatch_size = -5\n", "ledger.batch_size", ">= 1"),
        ("[queue]\nmax_dpth = 1\n", "queue.max_dpth", "[queue] takes max_depth, max_wait_ms"),
        ("service = 5\n", "service", "a table"),
        ('redis_url = "redis://x"\n', "redis_url", "ALLOT_* variables"),
    ],
)
def test_a_wrong_value_in_the_file_names_its_key_and_what_it_must_be(
    tmp_path: Path, text: str, named: str, must_be: str
) -> None:
    """An operator fixing the worst-day config at 3 a.m. needs the key and the rule, in a line."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    message = str(caught.value)
    assert named in message
    assert must_be in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("environ", "must_be"),
    [
        ({"ALLOT_PORT": "80a"}, "ALLOT_PORT (service.port) must be a whole number from 1 to"),
        ({"ALLOT_PORT": "8.5"}, "ALLOT_PORT (service.port) must be a whole number"),
        ({"ALLOT_PORT": "0"}, "ALLOT_PORT (service.port) must be a whole number from 1 to"),
        ({"ALLOT_REDIS_PREFIX": "a b"}, "ALLOT_REDIS_PREFIX (service.redis_prefix) must be"),
        ({"ALLOT_REDIS_URL": "127.0.0.1:6379"}, "ALLOT_REDIS_URL must be a redis://"),
        ({"ALLOT_REDIS_URL": "redis://"}, "ALLOT_REDIS_URL must be a redis://"),
        ({"ALLOT_DATABASE_URL": "postgres//db"}, "ALLOT_DATABASE_URL must be a postgresql://"),
        ({"ALLOT_DATABASE_URL": "postgresql://h:port/db"}, "with a numeric port"),
        ({"ALLOT_DEV": "maybe"}, "ALLOT_DEV must be one of 1, true"),
    ],
)
def test_a_wrong_value_in_the_environment_names_its_variable(
    environ: dict[str, str], must_be: str
) -> None:
    """The environment is checked as strictly as the file, and named as the operator typed it."""
    with pytest.raises(ConfigError, match=re.escape(must_be)) as caught:
        load_settings(ROOT / "config" / "default.toml", environ=environ)
    assert "\n" not in str(caught.value)


def test_a_malformed_url_is_refused_without_repeating_its_password() -> None:
    """Startup errors land in shared logs; a database password must not land there with them."""
    with pytest.raises(ConfigError, match="ALLOT_DATABASE_URL") as caught:
        load_settings(environ={"ALLOT_DATABASE_URL": "postgresql://u:hunter2@db:x/allot"})
    assert "hunter2" not in str(caught.value)


def test_the_file_is_checked_even_where_the_environment_overrides_it(tmp_path: Path) -> None:
    """A typo hidden under ALLOT_PORT would surface on the day the variable is removed."""
    path = tmp_path / "c.toml"
    path.write_text('[service]\nport = "eighty"\n')
    with pytest.raises(ConfigError, match=r"service\.port in"):
        load_settings(path, environ={"ALLOT_PORT": "9000"})


def test_good_values_are_read_in_their_declared_types(tmp_path: Path) -> None:
    """Whole numbers where a rate is a number; the usual spellings of yes and no; lists."""
    path = tmp_path / "c.toml"
    path.write_text('[gate]\nclient_rate = 4\ntrusted_proxies = ["10.0.0.0/8"]\n')
    s = load_settings(path, environ={"ALLOT_DEV": "yes", "ALLOT_PORT": "9000"})
    assert s.gate.client_rate == 4.0
    assert isinstance(s.gate.client_rate, float)
    assert s.gate.trusted_proxies == ("10.0.0.0/8",)
    assert (s.dev_mode, s.service.port) == (True, 9000)
    assert load_settings(path, environ={"ALLOT_DEV": "0"}).dev_mode is False
    assert load_settings(path, environ={"ALLOT_PORT": ""}).service.port == 8080  # empty: unset


def test_every_setting_is_declared_with_its_rule() -> None:
    """The declarations are the one table of keys: a field added without key() is refused."""

    @dataclasses.dataclass(frozen=True)
    class Undeclared:
        plain: int = 1

    with pytest.raises(TypeError, match="not declared with key"):
        config._resolve(Undeclared, "x", {}, None, {})
    for section in (Settings, ServiceSettings, GateSettings, QueueSettings, LedgerSettings):
        config._resolve(section, "x", {}, None, {})  # every field of ours passes


# -- every command refuses to start on a bad value, exit 2 ---------------------------------

ALLOT = str(Path(sys.executable).with_name("allot"))


def run_allot(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`allot ...` with a database and Redis no command could reach: a command that got past the
    configuration check would fail differently (or wait on them, until the timeout)."""
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ALLOT_")},
        "ALLOT_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
        "ALLOT_REDIS_URL": "redis://127.0.0.1:1/0",
        "ALLOT_DEV": "1",
        **env,
    }
    return subprocess.run(
        [ALLOT, *args], env=environ, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("command", [["migrate"], ["serve"], ["reconcile"], ["demo"]])
def test_a_command_with_a_bad_file_value_exits_2_naming_the_key(
    tmp_path: Path, command: list[str]
) -> None:
    """`max_depth = "ten"` stops the start at once, with one line, before any store is touched."""
    path = tmp_path / "bad.toml"
    path.write_text('[queue]\nmax_depth = "ten"\n')
    done = run_allot(*command, env={"ALLOT_CONFIG": str(path)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # one line
    assert "queue.max_depth" in done.stderr
    assert "a whole number >= 1" in done.stderr


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ALLOT_PORT": "eighty"}, "ALLOT_PORT"),
        ({"ALLOT_REDIS_URL": "localhost"}, "ALLOT_REDIS_URL"),
    ],
)
def test_serve_with_a_bad_environment_value_exits_2_naming_the_variable(
    env: dict[str, str], named: str
) -> None:
    """A deployment's typo in the environment is as fatal, and as clearly named, as the file's."""
    done = run_allot("serve", env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert named in done.stderr


@dataclasses.dataclass(frozen=True, slots=True)
class _RedisLike:
    """The shape of the coming [redis] table, to show a one-of key is one declaration line."""

    mode: Literal["standalone", "cluster"] = config.key("standalone", env="ALLOT_TRY_MODE")
    wait_replicas: int = config.key(0, env="ALLOT_TRY_REPLICAS", at_least=0)


def test_a_one_of_key_accepts_its_choices_only() -> None:
    """`mode = "clustre"` must stop the start like any other wrong value."""
    assert config._build(_RedisLike, "redis", {"mode": "cluster"}, None, {}) == _RedisLike(
        "cluster"
    )
    assert config._build(_RedisLike, "redis", {}, None, {"ALLOT_TRY_REPLICAS": "2"}) == (
        _RedisLike("standalone", 2)
    )
    with pytest.raises(ConfigError, match=r"redis\.mode in x must be one of 'standalone', 'clu"):
        config._build(_RedisLike, "redis", {"mode": "clustre"}, Path("x"), {})
    with pytest.raises(ConfigError, match=r"ALLOT_TRY_MODE \(redis\.mode\) must be one of"):
        config._build(_RedisLike, "redis", {}, None, {"ALLOT_TRY_MODE": "sentinel"})
