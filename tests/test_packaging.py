"""What ships: the Lua scripts and migrations inside the wheel, and each script loads in Redis."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

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


def test_every_script_documents_its_keys_args_and_returns() -> None:
    """The header block is the script's contract; a newcomer reads it before the body."""
    for name in SCRIPT_NAMES:
        text = script_source(name)
        header = text.split("\n\n", 1)[0] + text
        assert "KEYS[1]" in header
        assert "ARGV[1]" in header
        assert "returns" in header
        assert "redis.call('TIME')" in text or name == "load_batch"


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
