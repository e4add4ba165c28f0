"""What ships: the Lua scripts and migrations inside the wheel, and each script loads in Redis."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
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


def lua_header(text: str) -> str:
    """The comment block a script opens with: its contract. It ends at the first other line."""
    lines = text.splitlines(keepends=True)
    end = next((i for i, line in enumerate(lines) if not line.startswith("--")), len(lines))
    return "".join(lines[:end])


def documents(header: str, array: str, index: int) -> bool:
    """KEYS[3] is documented by ``KEYS[3]``, ``KEYS[2..7]`` or ``KEYS[8..]`` in the header."""
    for low, dots, high in re.findall(rf"{array}\[(\d+)(\.\.)?(\d*)\]", header):
        top = int(high) if high else (index if dots else int(low))
        if int(low) <= index <= top:
            return True
    return False


def header_faults(text: str) -> list[str]:
    header = lua_header(text)
    body = text[len(header) :]
    faults = [f"no {word}" for word in ("KEYS[1]", "ARGV[1]", "returns") if word not in header]
    for array, index in sorted(set(re.findall(r"(KEYS|ARGV)\[(\d+)\]", body))):
        if not documents(header, array, int(index)):
            faults.append(f"{array}[{index}] undocumented")
    if "redis.error_reply" in body and "-- errors" not in header:
        faults.append("error replies undocumented")
    if "redis.call('TIME')" not in body:
        faults.append("time not from Redis TIME")  # never the client's clock (STYLE.md)
    elif "Redis TIME" not in header:
        faults.append("header does not say times come from Redis TIME")
    return faults


def test_every_script_documents_its_keys_args_and_returns() -> None:
    """The header block is the script's contract; a newcomer reads it before the body."""
    assert {name: header_faults(script_source(name)) for name in SCRIPT_NAMES} == {
        name: [] for name in SCRIPT_NAMES
    }


@pytest.mark.parametrize(
    ("broken", "fault"),
    [
        (lambda t: t.replace("-- KEYS[1]", "-- the round", 1), "no KEYS[1]"),
        (lambda t: t.replace("-- returns", "-- answers", 1), "no returns"),
        (lambda t: t.replace("-- KEYS[4]", "-- KEYS[x]", 1), "KEYS[4] undocumented"),
        (lambda t: t.replace("-- errors", "-- faults", 1), "error replies undocumented"),
        (lambda t: t.replace("from Redis TIME", "from the clock", 1), "header does not say"),
        (lambda t: t.replace("redis.call('TIME')", "{ARGV[4], 0}", 1), "time not from Redis"),
        (lambda t: t.replace("'XADD', KEYS[5]", "'XADD', KEYS[7]", 1), "KEYS[7] undocumented"),
        (lambda t: t.replace("--\n", "\n", 1), "no KEYS[1]"),  # a blank line ends the header
    ],
)
def test_the_header_check_finds_a_broken_header(broken: Any, fault: str) -> None:
    """The check above can fail: each way of breaking load_batch.lua's contract is caught."""
    faults = header_faults(broken(script_source("load_batch")))
    assert any(f.startswith(fault) for f in faults), faults


# -- the service and its image stay clear of the load test -----------------------------------

LOADTEST_ONLY = ("loadtest", "locust", "matplotlib", "gevent")
REPORT_LOADTEST_MODULES = """
import sys
print(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:])))
"""


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOT_")}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_service_modules_import_nothing_of_the_load_test() -> None:
    """locust monkey-patches the process for gevent; it must never be loaded into a worker."""
    done = run_python("import service.cli, service.app" + REPORT_LOADTEST_MODULES, *LOADTEST_ONLY)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["serve", "--help"], ["migrate", "--help"], ["--help"]])
def test_the_allot_command_imports_the_load_test_only_for_allot_loadtest(argv: list[str]) -> None:
    """Parsing `allot serve ...` (the image's command) builds no load-test options either."""
    run = (
        "import contextlib, sys\nfrom service.cli import main\n"
        f"with contextlib.suppress(SystemExit):\n    main({argv!r})\n"
    )
    done = run_python(run + REPORT_LOADTEST_MODULES, *LOADTEST_ONLY)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    loadtest = run_python(
        run.replace(repr(argv), repr(["loadtest", "--help"])) + REPORT_LOADTEST_MODULES, "loadtest"
    )
    assert loadtest.stdout.strip().splitlines()[-1] == "['loadtest']"  # the probe can see it


@pytest.mark.parametrize("missing", [["locust"], ["matplotlib"], ["locust", "matplotlib"]])
def test_loadtest_without_its_extra_says_what_to_install_and_exits_2(missing: list[str]) -> None:
    """Without locust the gate used to run a crowd of nobody and blame the service for it."""
    hide = "".join(f"sys.modules[{name!r}] = None\n" for name in missing)  # as if not installed
    done = run_python(
        f"import sys\n{hide}from service.cli import main\n"
        "raise SystemExit(main(['loadtest', '--target', 'http://127.0.0.1:1']))"
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # one line, and nothing was started
    assert "pip install 'allot[loadtest]'" in done.stderr
    for name in missing:
        assert name in done.stderr
    assert done.stdout == ""


def test_the_image_installs_the_base_package_only() -> None:
    """The production image has no locust, matplotlib or test tools: only `allot` itself."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "allot[" not in dockerfile  # no extra, in any stage
    installs = [
        line.strip()
        for line in dockerfile.replace("\\\n", " ").splitlines()
        if "pip install" in line
    ]
    assert installs, "the Dockerfile installs nothing?"
    for line in installs:
        assert line.split("pip install", 1)[1].split("&&")[0].split()[-1] == "allot", line
    for name in ("locust", "matplotlib", "gevent", "pytest", "playwright"):
        assert name not in dockerfile, name
