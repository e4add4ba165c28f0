"""Configuration: config/default.toml and the code's defaults say the same; env overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from allocator.config import ConfigError, Settings, load_settings

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
