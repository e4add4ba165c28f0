"""What ships: the Lua scripts and migrations inside the wheel, and each script loads in Redis."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

from redis.asyncio import Redis

from allocator import db
from allocator.scripts import SCRIPT_NAMES, Scripts, script_source

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_every_lua_script_and_migration(wheel: Path) -> None:
    """A wheel without lua/ would install fine and fail on the first reservation."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in SCRIPT_NAMES:
        assert f"lua/{name}.lua" in names
    for version, _ in db.migrations():
        assert f"allocator/migrations/{version}.sql" in names
    assert "service/cli.py" in names


def test_every_lua_file_is_a_named_script() -> None:
    """A new .lua file must be wired into Scripts, or it is dead code."""
    on_disk = {p.stem for p in (ROOT / "lua").glob("*.lua")}
    assert on_disk == set(SCRIPT_NAMES)


async def test_every_script_from_the_installed_package_loads_in_redis(
    wheel: Path, redis: Redis
) -> None:
    """Each script compiles in the real Redis, from the wheel and from the installed package."""
    archive = zipfile.ZipFile(wheel)
    for name in SCRIPT_NAMES:
        from_wheel = archive.read(f"lua/{name}.lua").decode()
        assert from_wheel == script_source(name)
        sha = await redis.script_load(from_wheel)
        assert sha == hashlib.sha1(from_wheel.encode()).hexdigest()  # noqa: S324 - Redis's own id
    scripts = Scripts.register(redis)
    assert {getattr(scripts, n).sha for n in SCRIPT_NAMES} == {
        hashlib.sha1(script_source(n).encode()).hexdigest()  # noqa: S324
        for n in SCRIPT_NAMES
    }


def test_every_script_documents_its_keys_args_and_returns() -> None:
    """The header block is the script's contract; a newcomer reads it before the body."""
    for name in SCRIPT_NAMES:
        text = script_source(name)
        header = text.split("\n\n", 1)[0] + text
        assert "KEYS[1]" in header
        assert "ARGV[1]" in header
        assert "returns" in header
        assert "redis.call('TIME')" in text or name == "load_batch"
