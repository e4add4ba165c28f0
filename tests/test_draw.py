"""The lottery draw (allocator/draw.py), its independent verifier (allocator/verify_draw.py),
entry signatures (allocator/receipts.py) and the published test vectors (docs/lottery-vectors/)."""

from __future__ import annotations

import hashlib
import http.server
import json
import random
import shutil
import subprocess
import sys
import threading
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from allocator import draw as d
from allocator import verify_draw as v
from allocator.receipts import DrawKey, DrawKeyError, b64url, entry_statement, verify_entry
from service import cli
from tests import lottery_vectors as vectors

ROOT = Path(__file__).resolve().parent.parent
VERIFIER = ROOT / "allocator" / "verify_draw.py"
CASES = {c.name: c for c in vectors.CASES}


def vector_files(name: str) -> dict[str, bytes]:
    directory = vectors.VECTORS / name
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.suffix in (".csv", ".json")}


def mismatch(files: dict[str, bytes]) -> str:
    """The verifier's message for these files (fails the test if it accepts them)."""
    with pytest.raises(v.Mismatch) as caught:
        v.verify(files)
    return str(caught.value)


# -- the test vectors --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_committed_vectors_are_byte_equal_to_what_the_drawer_produces(name: str) -> None:
    """The vectors are the drawer's output, byte for byte (`python -m tests.lottery_vectors`)."""
    built = vectors.build(CASES[name])
    directory = vectors.VECTORS / name
    assert sorted(built) == sorted(p.name for p in directory.iterdir())
    for file, data in built.items():
        assert (directory / file).read_bytes() == data, file


def test_contract_text_alone_reproduces_the_tiny_vector() -> None:
    """A third implementation in a few lines from API.md's text, so the vectors are not only the
    drawer checking itself: receipt, commitment, seed, keys, ranking and rule 5."""
    here = vectors.VECTORS / "a-tiny"
    rec = json.loads((here / "draw.json").read_text("utf-8"))
    entries_csv, stock_csv = (here / "entries.csv").read_bytes(), (here / "stock.csv").read_bytes()
    sha = hashlib.sha256

    assert sha(b"allot-receipt-1\nvector-a\nentry-a1").hexdigest() == (
        "ea18e8d889aaf0f9d90c836ddf8728e7f1f6396ba0a3d8559f09b33cb1d13524"
    )
    assert sha(bytes.fromhex(rec["secret"])).hexdigest() == rec["commitment"]
    text = (
        f"allot-draw-1\nvector-a\n{rec['secret']}\n{rec['public_randomness']}\n"
        f"{sha(entries_csv).hexdigest()}\n{sha(stock_csv).hexdigest()}\n"
    )
    seed = sha(text.encode()).digest()
    assert seed.hex() == rec["seed"]
    assert seed.hex() == "40e47c294604e891021a460a77dc8a4cb11b29f29c07fc7719f58f6365bd869a"

    # entries.csv: receipt first, weight last, accept_district before it; the site is field 2
    rows = [line.split(",") for line in entries_csv.decode().splitlines()[1:]]
    entry = {r[0]: (r[1], r[-2] == "1", int(r[-1])) for r in rows}
    key = {
        r: min(sha(seed + bytes.fromhex(r) + bytes([j])).digest() for j in range(w))
        for r, (_site, _accept, w) in entry.items()
    }
    ranking = sorted(entry, key=lambda r: (key[r], r))
    assert key[ranking[0]].hex() == (
        "0743a5b4a19e678fc93b9fbca75b7df7c8d6f074b3d72c547fd4e978d2693135"
    )
    left = {"t-1": 2, "t-2": 4, "t-3": 4, "y-1": 3}  # stock.csv
    tianhe = ["t-1", "t-2", "t-3"]
    got = {}
    for r in ranking:
        site, accept, _w = entry[r]
        if left[site] < 2 and accept and site in tianhe:
            site = max(tianhe, key=lambda s: (left[s], -tianhe.index(s)))
        if left[site] >= 2:
            left[site] -= 2
            got[r] = site
    expected = "".join(f"{n},{r},{got.get(r, '')}\n" for n, r in enumerate(ranking, 1))
    assert (here / "results.csv").read_text("utf-8") == "rank,receipt,site_id\n" + expected


def _blocked_run(
    args: list[str], cwd: Path, source: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a copy of verify_draw.py (or ``source``) alone, allot's packages impossible to import."""
    (cwd / "verify_draw.py").write_text(VERIFIER.read_text("utf-8") if source is None else source)
    blocker = (
        "import runpy, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('allocator', 'service', 'tests', 'loadtest'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = ['verify_draw.py', *sys.argv[1:]]\n"
        "runpy.run_path('verify_draw.py', run_name='__main__')\n"
    )
    return subprocess.run(
        [sys.executable, "-I", "-c", blocker, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_verifier_alone_accepts_every_vector_without_the_drawing_code(
    name: str, tmp_path: Path
) -> None:
    """The verifier is a file of its own: copied elsewhere, with allocator unimportable, it still
    replays every vector and checks a citizen's signature."""
    receipts = json.loads((vectors.VECTORS / name / "receipts.json").read_text("utf-8"))
    mine = receipts["entries"][0]
    done = _blocked_run(
        ["--dir", str(vectors.VECTORS / name), "--receipt", mine["receipt"],
         "--signature", mine["signature"], "--public-key", receipts["public_key"]],
        tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "replays exactly" in done.stdout
    assert "valid, made by the draw key" in done.stdout


def test_the_blocked_run_would_catch_a_verifier_that_uses_the_drawer(tmp_path: Path) -> None:
    """The check above can fail: allocator.draw is importable here (editable install), but not
    under the blocker, so a verifier that borrowed the drawer's code would not run."""
    future = "from __future__ import annotations\n"
    source = VERIFIER.read_text("utf-8").replace(future, future + "import allocator.draw\n")
    assert "import allocator.draw" in source
    done = _blocked_run(["--dir", str(vectors.VECTORS / "a-tiny")], tmp_path, source)
    assert done.returncode != 0
    assert "blocked: allocator" in done.stderr


def test_allot_verify_draw_subcommand_checks_a_vector(capsys: pytest.CaptureFixture[str]) -> None:
    """`allot verify-draw --dir` is the same verifier, 0 on a good draw."""
    assert cli.main(["verify-draw", "--dir", str(vectors.VECTORS / "b-passes")]) == 0
    out = capsys.readouterr().out
    assert "pass-2.csv: 2 drawn" in out


def test_allot_verify_draw_subcommand_exits_1_on_a_tampered_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tampered results.csv fails the command with the file and line named."""
    shutil.copytree(vectors.VECTORS / "a-tiny", tmp_path / "a", dirs_exist_ok=True)
    results = tmp_path / "a" / "results.csv"
    lines = results.read_text("utf-8").splitlines(keepends=True)
    lines[5] = lines[5].replace(",\n", ",y-1\n")  # rank 5 was not drawn
    results.write_text("".join(lines), "utf-8")
    assert cli.main(["verify-draw", "--dir", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "results.csv line 6" in err
    assert "MISMATCH" in err


# -- tampering, one thing at a time ------------------------------------------------------------


def redigest(files: dict[str, bytes], **changes: Any) -> dict[str, bytes]:
    """The files with draw.json's members replaced, as a dishonest operator would publish."""
    rec = json.loads(files["draw.json"])
    rec.update(changes)
    return {**files, "draw.json": json.dumps(rec).encode()}


def reseeded(files: dict[str, bytes], entries: bytes | None = None) -> dict[str, bytes]:
    """entries.csv replaced, and its digest and the seed recomputed to match."""
    out = dict(files)
    if entries is not None:
        out["entries.csv"] = entries
    rec = json.loads(files["draw.json"])
    rec["entries_digest"] = hashlib.sha256(out["entries.csv"]).hexdigest()
    text = (
        f"allot-draw-1\n{rec['round_id']}\n{rec['secret']}\n{rec['public_randomness']}\n"
        f"{rec['entries_digest']}\n{rec['stock_digest']}\n"
    )
    rec["seed"] = hashlib.sha256(text.encode()).hexdigest()
    out["draw.json"] = json.dumps(rec).encode()
    return out


def test_every_vector_verifies_in_process() -> None:
    """The baseline for the tampering tests below."""
    for name in CASES:
        assert v.verify(vector_files(name)).round_id == CASES[name].round_id


def test_a_changed_result_line_is_named_even_with_a_matching_digest() -> None:
    """An operator who edits results.csv and its digest is caught at the edited line."""
    files = vector_files("a-tiny")
    text = files["results.csv"].decode().replace(",t-3\n", ",t-2\n")
    files = redigest(
        {**files, "results.csv": text.encode()},
        results_digest=hashlib.sha256(text.encode()).hexdigest(),
    )
    assert mismatch(files).startswith("results.csv line 5: ")


def test_results_without_the_final_lf_are_refused_at_the_last_line() -> None:
    files = vector_files("c-empty-site")
    files["results.csv"] = files["results.csv"][:-1]
    assert mismatch(files).startswith("results.csv line 11: ")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t.replace("rank,", "Rank,"), "results.csv line 1: is 'Rank,receipt,site_id'"),
        (lambda t: t + "9,x,\n", "results.csv line 10: a line the replay does not give"),
        (lambda t: t[: t.rindex("8,")], "results.csv line 9: missing; the replay gives '8,"),
        (lambda t: t.replace(",t-2\n", ",t-2\r\n", 1), "results.csv line 4: is '3,"),
    ],
)
def test_results_that_differ_from_the_replay_are_named_by_line(change: Any, expected: str) -> None:
    files = vector_files("a-tiny")
    files["results.csv"] = change(files["results.csv"].decode()).encode()
    assert mismatch(files).startswith(expected)


def test_a_tampered_entries_file_is_refused_by_its_digest() -> None:
    files = vector_files("a-tiny")
    files["entries.csv"] = files["entries.csv"].replace(b",1,4\n", b",1,3\n", 1)
    assert mismatch(files) == "entries.csv: its SHA-256 is not the record's entries_digest"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t.replace("\n", "\r\n"), "entries.csv line 1: header is"),
        (lambda t: t.replace(",t-1,", ',"t-1",', 1), "entries.csv line 2: field 't-1' is quoted"),
        (lambda t: t.replace('"Tianhe, East"', "Tianhe East"), "entries.csv line 2: district"),
        (lambda t: t.replace(",1,4\n", ",1,5\n"), "entries.csv line 2: weight '5' is not 1-4"),
        (lambda t: t.replace(",1,4\n", ",2,4\n"), "entries.csv line 2: accept_district '2'"),
        (lambda t: t.replace(",1,4\n", ",1,04\n"), "entries.csv line 2: weight '04'"),
        (lambda t: t.replace(",t-1,", ",t-9,", 1), "entries.csv line 2: site 't-9' is not in"),
        (lambda t: t.replace("1438382c", "1438382C"), "entries.csv line 2: receipt '1438382C"),
        (lambda t: t.rstrip("\n"), "entries.csv line 9: the last line does not end with LF"),
        (lambda t: t.replace('""Old', '"Old'), "entries.csv line 5: text after a closing quote"),
        (lambda t: t + t.splitlines(keepends=True)[-1], "entries.csv line 10: receipt fc91"),
        (lambda t: t.replace("\n", "\n\n", 1), "entries.csv line 2: 1 fields, expected 5"),
        (lambda t: t.replace("Old Town", "Old To\u0301wn"), "entries.csv line 5: text is not in"),
    ],
)
def test_malformed_entries_are_refused_at_their_line_even_with_matching_digests(
    change: Any, expected: str
) -> None:
    """Format rules hold on their own: a digest that matches a malformed file is no excuse."""
    files = vector_files("a-tiny")
    bad = change(files["entries.csv"].decode()).encode()
    assert bad != files["entries.csv"]
    assert mismatch(reseeded(files, bad)).startswith(expected)


def test_unsorted_entries_are_refused_even_with_matching_digests() -> None:
    files = vector_files("a-tiny")
    lines = files["entries.csv"].decode().splitlines(keepends=True)
    lines[1], lines[2] = lines[2], lines[1]
    message = mismatch(reseeded(files, "".join(lines).encode()))
    assert message.startswith("entries.csv line 3: receipt 1438")
    assert "out of receipt order" in message


def test_a_weight_above_1_is_refused_in_a_round_without_loss_weighting() -> None:
    """Without loss_weighting every entry has one chance; an extra chance is caught."""
    files = vector_files("c-empty-site")
    bad = files["entries.csv"].replace(b",1\n", b",2\n", 1)
    assert mismatch(reseeded(files, bad)).startswith(
        "entries.csv line 2: weight above 1 in a round without loss_weighting"
    )


def test_a_quoted_line_break_is_one_record_and_checked_as_such() -> None:
    """c-empty-site's district 'Haizhu<LF>Riverside' spans two physical lines per record."""
    files = vector_files("c-empty-site")
    assert files["stock.csv"].count(b"\n") == 1 + 5 + 2  # header, 5 sites, 2 inner line breaks
    bad = files["stock.csv"].replace(b'c-2,"Haizhu\nRiverside"', b'c-2,"Haizhu\nRiverside', 1)
    assert mismatch({**files, "stock.csv": bad}).startswith("stock.csv line 4: ")


@pytest.mark.parametrize(
    ("member", "value", "expected"),
    [
        ("secret", "00" * 32, "draw.json: SHA-256(secret) is not the commitment"),
        ("commitment", "ab", "draw.json: commitment 'ab' is not 64 lowercase hex"),
        ("seed", "00" * 32, "draw.json: seed is not SHA-256 of the seed text"),
        ("public_randomness", "another value", "draw.json: seed is not SHA-256"),
        ("public_randomness", "bad\nvalue", "draw.json: public_randomness is not 1-256"),
        ("status", "registering", "draw.json: status is 'registering': nothing published"),
        ("algorithm", "allot-draw-2", "draw.json: algorithm is 'allot-draw-2'"),
        ("entries", 9, "draw.json: entries is 9; entries.csv has 8"),
        ("results_digest", "00" * 32, "draw.json: results_digest is not the SHA-256"),
        ("stock_digest", "00" * 32, "stock.csv: its SHA-256 is not the record's stock_digest"),
    ],
)
def test_a_wrong_record_member_is_named(member: str, value: object, expected: str) -> None:
    assert mismatch(redigest(vector_files("a-tiny"), **{member: value})).startswith(expected)


def frozen_only(name: str) -> dict[str, bytes]:
    """A vector as published at the freeze: the list, the stock and the secret, nothing drawn."""
    files = {k: val for k, val in vector_files(name).items() if k in ("entries.csv", "stock.csv")}
    rec = json.loads(vector_files(name)["draw.json"])
    rec.update(status="frozen", public_randomness=None, seed=None, drawn_at=None)
    rec.update(results_digest=None, passes=[])
    for site in rec["sites"]:
        site["winners"] = None
    files["draw.json"] = json.dumps(rec).encode()
    files["round.json"] = vector_files(name)["round.json"]
    return files


def test_a_frozen_round_is_checked_as_far_as_it_goes(tmp_path: Path) -> None:
    """At the freeze anyone can check the list and stock against the record and the secret
    against the commitment, and keep the files; the answer says the draw is still to come."""
    files = frozen_only("c-empty-site")
    assert v.verify(files).stage == "frozen"
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    code, out, _err = _citizen(str(tmp_path), "--receipt", v.verify(files).receipts[0])
    assert code == 0
    assert "frozen, NOT drawn yet" in out
    assert "the draw has not run yet" in out
    bad = files["entries.csv"].replace(b",c-5,Liwan,1,1\n", b",c-5,Liwan,0,1\n", 1)
    assert bad != files["entries.csv"]
    assert mismatch({**files, "entries.csv": bad}).startswith("entries.csv: its SHA-256")


def test_wrong_per_site_counts_in_the_record_are_named() -> None:
    files = vector_files("a-tiny")
    sites = json.loads(files["draw.json"])["sites"]
    sites[1]["winners"] = 1
    assert mismatch(redigest(files, sites=sites)).startswith("draw.json: sites[1] is ")


def test_a_record_member_missing_is_named() -> None:
    files = vector_files("a-tiny")
    rec = json.loads(files["draw.json"])
    del rec["drawn_at"]
    files["draw.json"] = json.dumps(rec).encode()
    assert mismatch(files) == "draw.json: member 'drawn_at' is missing"


def test_the_round_must_be_the_draws_and_give_per_person() -> None:
    files = vector_files("a-tiny")
    rnd = json.loads(files["round.json"])
    assert mismatch({**files, "round.json": json.dumps({**rnd, "per_person": 0}).encode()}) == (
        "round.json: per_person 0 is not a whole number >= 1"
    )
    other = {**rnd, "round_id": "vector-b"}
    assert mismatch({**files, "round.json": json.dumps(other).encode()}).startswith("round.json")
    # per_person 1 instead of 2 changes who is drawn: the replay disagrees with results.csv
    one = {**rnd, "per_person": 1}
    assert mismatch({**files, "round.json": json.dumps(one).encode()}).startswith("results.csv")
    with pytest.raises(v.Mismatch, match="round_id is 'vector-a', not the round asked for"):
        v.verify(files, "vector-b")


def test_a_tampered_pass_is_named_and_so_is_a_wrong_release() -> None:
    files = vector_files("b-passes")
    bad = files["pass-2.csv"].replace(b",b-n2\n", b",b-n1\n", 1)
    assert mismatch({**files, "pass-2.csv": bad}).startswith("pass-2.csv line 2: ")
    passes = json.loads(files["draw.json"])["passes"]
    passes[0]["released"] = [{"site_id": "b-n1", "units": 1}]
    assert mismatch(redigest(files, passes=passes)).startswith("pass-1.csv line 2: ")
    passes[0]["released"] = [{"site_id": "nowhere", "units": 1}]
    assert mismatch(redigest(files, passes=passes)).startswith("draw.json passes[0]: released")
    del files["pass-1.csv"]
    assert mismatch(files) == "pass-1.csv: missing"


def test_every_single_byte_change_of_the_tiny_vectors_files_is_refused() -> None:
    """Exhaustive over a-tiny's CSV files: each byte changed (XOR 1) makes the verifier say no."""
    files = vector_files("a-tiny")
    for name in ("entries.csv", "stock.csv", "results.csv"):
        data = files[name]
        for i in range(len(data)):
            bad = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
            with pytest.raises(v.Mismatch) as caught:
                v.verify({**files, name: bad})
            assert caught.value.file in (name, "draw.json"), (name, i)


# -- the property: accept what the drawer makes, refuse any one-byte change --------------------

DISTRICTS = ["North", "Tianhe, East", '越秀 "Old"', "Hai\nzhu", "", "a\r\nb", "e\u0301"]
PRINTABLE = st.characters(codec="utf-8", exclude_categories=("C", "Z")) | st.just(" ")
UNBOUND = ("public_randomness_source", "frozen_at", "drawn_at")


@st.composite
def rounds(draw: st.DrawFn) -> dict[str, Any]:
    n_sites = draw(st.integers(1, 5))
    districts = draw(
        st.lists(
            st.sampled_from(DISTRICTS) | st.text(max_size=4), min_size=n_sites, max_size=n_sites
        )
    )
    stock = [(f"s{i}", districts[i], draw(st.integers(0, 8))) for i in range(n_sites)]
    weighting = draw(st.booleans())
    entries = [
        (f"e{n}", f"s{draw(st.integers(0, n_sites - 1))}", draw(st.booleans()),
         draw(st.integers(1, 4)) if weighting else 1)
        for n in range(draw(st.integers(0, 25)))
    ]  # fmt: skip
    releases = draw(
        st.lists(
            st.dictionaries(st.sampled_from([s[0] for s in stock]), st.integers(0, 4)),
            max_size=2,
        )
    )
    return {
        "round_id": draw(st.from_regex(r"[a-z0-9_-]{1,12}", fullmatch=True)),
        "per_person": draw(st.integers(1, 3)),
        "loss_weighting": weighting,
        "secret": draw(st.binary(min_size=32, max_size=32)),
        "randomness": draw(st.text(PRINTABLE, min_size=1, max_size=12)),
        "stock": stock,
        "entries": entries,
        "releases": releases,
    }


def publish(
    spec: dict[str, Any],
    per_person: int | None = None,
    secret: bytes | None = None,
    randomness: str | None = None,
    releases: list[dict[str, int]] | None = None,
    round_id: str | None = None,
) -> tuple[dict[str, bytes], dict[str, Any], dict[str, Any]]:
    """The drawer's files, record and Round for this round (optionally with other inputs)."""
    rid = spec["round_id"] if round_id is None else round_id
    stock = [d.StockLine(*s) for s in spec["stock"]]
    frozen = d.freeze(
        [
            d.EntryLine(d.entry_receipt(spec["round_id"], eid), site, dict(
                (s.site_id, s.district) for s in stock)[site], accept, w)
            for eid, site, accept, w in spec["entries"]
        ],
        stock,
    )  # fmt: skip
    drawn = d.draw(
        rid,
        spec["per_person"] if per_person is None else per_person,
        spec["secret"] if secret is None else secret,
        spec["randomness"] if randomness is None else randomness,
        frozen,
    )
    passes: list[d.Pass] = []
    for released in spec["releases"] if releases is None else releases:
        passes.append(d.next_pass(drawn, passes, released))
    rec = d.record(
        drawn,
        passes,
        public_randomness_source="a public value",
        frozen_at=vectors.FROZEN_AT,
        drawn_at=vectors.DRAWN_AT,
        pass_times=[vectors.DRAWN_AT] * len(passes),
    )
    rnd = {
        "round_id": rid,
        "title": "property",
        "per_person": drawn.per_person,
        "mode": "lottery",
        "loss_weighting": spec["loss_weighting"],
        "draw": {"commitment": drawn.commitment},
    }
    files = d.files(drawn, passes)
    files["draw.json"] = vectors._json(rec)
    files["round.json"] = vectors._json(rnd)
    return files, rec, rnd


def bound(rec: dict[str, Any]) -> dict[str, Any]:
    """The record without what no hash binds (times, the source's name), releases normalised."""
    out = {k: val for k, val in rec.items() if k not in UNBOUND}
    if isinstance(out.get("passes"), list):
        out["passes"] = [
            {
                "pass": p.get("pass"),
                "digest": p.get("digest"),
                "released": released_units(p.get("released")),
            }
            if isinstance(p, dict)
            else p
            for p in out["passes"]
        ]
    return out


def released_units(items: Any) -> Any:
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        return items
    total: dict[str, int] = {}
    for item in items:
        site, units = item.get("site_id"), item.get("units")
        if not isinstance(site, str) or type(units) is not int:
            return items
        total[site] = total.get(site, 0) + units
    return {s: u for s, u in sorted(total.items()) if u}


def another_valid_publication(spec: dict[str, Any], files: dict[str, bytes]) -> bool:
    """Whether changed JSON files still describe a draw exactly as the drawer would publish it
    from the inputs they now state (per_person, secret, randomness, releases): then nothing can
    tell the change, e.g. a space for a tab, another drawn_at, or released units nobody wanted."""
    try:
        rec = json.loads(files["draw.json"].decode())
        rnd = json.loads(files["round.json"].decode())
    except ValueError:
        return False
    if not isinstance(rec, dict) or not isinstance(rnd, dict):
        return False
    if not set(v.RECORD_MEMBERS) <= set(rec) or rnd.get("round_id") != rec["round_id"]:
        return False
    weighting = rnd.get("loss_weighting")
    if rnd.get("mode", "lottery") != "lottery" or type(weighting) not in (bool, type(None)):
        return False
    if weighting is False and any(w != 1 for *_e, w in spec["entries"]):
        return False
    draw_ = rnd.get("draw")
    if isinstance(draw_, dict) and draw_.get("commitment", rec["commitment"]) != rec["commitment"]:
        return False
    per_person, secret, randomness = rnd.get("per_person"), rec["secret"], rec["public_randomness"]
    if type(per_person) is not int or not isinstance(secret, str) or not v.HEX64.fullmatch(secret):
        return False
    if not isinstance(randomness, str) or not unicodedata.is_normalized("NFC", randomness):
        return False
    if not isinstance(rec["passes"], list):
        return False
    releases: list[Any] = [released_units(p.get("released")) if isinstance(p, dict) else None
                           for p in rec["passes"]]  # fmt: skip
    if not all(isinstance(r, dict) for r in releases):
        return False
    try:
        again, rec_again, _rnd = publish(
            spec, per_person, bytes.fromhex(secret), randomness, releases, rec["round_id"]
        )
    except d.DrawInputError:
        return False
    csvs = {k: val for k, val in files.items() if k.endswith(".csv")}
    return bound(rec_again) == bound(rec) and csvs == {
        k: val for k, val in again.items() if k.endswith(".csv")
    }


@given(spec=rounds())
@settings(max_examples=60)
def test_the_verifier_accepts_whatever_the_drawer_publishes(spec: dict[str, Any]) -> None:
    """Two implementations from one contract agree on random rounds, passes included."""
    files, rec, _rnd = publish(spec)
    replay = v.verify(files)
    assert replay.drawn == sum(1 for line in files["results.csv"].split(b"\n")[1:-1]
                               if not line.endswith(b","))  # fmt: skip
    assert len(replay.passes) == len(rec["passes"])


@given(spec=rounds(), data=st.data())
@settings(max_examples=200)
def test_the_verifier_refuses_any_one_byte_change_of_any_file(
    spec: dict[str, Any], data: st.DataObject
) -> None:
    """Change one byte of one published file (to a different byte): the verifier says no, unless
    the change is one no check could see (JSON whitespace, a time, unused released units)."""
    files, _rec, _rnd = publish(spec)
    name = data.draw(st.sampled_from(sorted(files)), label="file")
    at = data.draw(st.integers(0, len(files[name]) - 1), label="byte")
    old = files[name][at]
    new = data.draw(st.integers(0, 255).filter(lambda b: b != old), label="new byte")
    changed = {**files, name: files[name][:at] + bytes([new]) + files[name][at + 1 :]}
    assert changed[name] != files[name]
    if name.endswith(".json"):
        assume(not another_valid_publication(spec, changed))
    with pytest.raises(v.Mismatch) as caught:
        v.verify(changed)
    assert caught.value.file.split(" ")[0] in changed


# -- the drawer's own refusals -----------------------------------------------------------------


def _frozen(weight: int = 1) -> d.FrozenList:
    return d.freeze([d.EntryLine("ab" * 32, "s1", "D", True, weight)], [d.StockLine("s1", "D", 2)])


@pytest.mark.parametrize(
    ("entries", "stock", "message"),
    [
        ([d.EntryLine("ab" * 32, "s2", "D", True, 1)], [d.StockLine("s1", "D", 2)], "not in the"),
        ([d.EntryLine("ab" * 32, "s1", "E", True, 1)], [d.StockLine("s1", "D", 2)], "district"),
        ([d.EntryLine("AB" * 32, "s1", "D", True, 1)], [d.StockLine("s1", "D", 2)], "lowercase"),
        ([d.EntryLine("ab" * 32, "s1", "D", True, 5)], [d.StockLine("s1", "D", 2)], "weight"),
        ([d.EntryLine("ab" * 32, "s1", "D", True, 1)] * 2, [d.StockLine("s1", "D", 2)], "twice"),
        ([], [d.StockLine("S1", "D", 2)], "site_id"),
        ([], [d.StockLine("s1", "D", -1)], "units"),
        ([], [d.StockLine("s1", "D", 1), d.StockLine("s1", "E", 1)], "twice"),
    ],
)
def test_freeze_refuses_inputs_that_break_the_contract(
    entries: list[d.EntryLine], stock: list[d.StockLine], message: str
) -> None:
    with pytest.raises(d.DrawInputError, match=message):
        d.freeze(entries, stock)


@pytest.mark.parametrize("value", ["", "x" * 257, "line\nbreak", "tab\there", "nul\x00"])
def test_malformed_public_randomness_is_refused(value: str) -> None:
    """The draw endpoint answers 422 with this message; nothing is drawn."""
    with pytest.raises(d.DrawInputError, match="public_randomness"):
        d.draw("r", 1, bytes(32), value, _frozen())


def test_public_randomness_is_hashed_in_nfc() -> None:
    """Two spellings of the same text give the same seed (and the record shows the NFC one)."""
    one = d.draw("r", 1, bytes(32), "cafe\u0301", _frozen())
    other = d.draw("r", 1, bytes(32), "caf\u00e9", _frozen())
    assert one.seed == other.seed
    assert one.public_randomness == "caf\u00e9"


def test_draw_refuses_a_bad_secret_round_or_per_person() -> None:
    with pytest.raises(d.DrawInputError, match="32 bytes"):
        d.draw("r", 1, bytes(31), "v", _frozen())
    with pytest.raises(d.DrawInputError, match="round_id"):
        d.draw("R", 1, bytes(32), "v", _frozen())
    with pytest.raises(d.DrawInputError, match="per_person"):
        d.draw("r", 0, bytes(32), "v", _frozen())


def test_a_pass_refuses_released_units_at_an_unknown_site() -> None:
    drawn = d.draw("r", 1, bytes(32), "v", _frozen())
    with pytest.raises(d.DrawInputError, match="not a site"):
        d.next_pass(drawn, [], {"s9": 1})


def test_the_fallback_heap_agrees_with_a_plain_scan_on_a_long_district() -> None:
    """Many sites in one district and many fallbacks: the drawer's lazy heap picks what a scan
    over the district picks (the verifier's way), ties to the smallest site_id."""
    stock = [d.StockLine(f"s{i:02d}", "D", (i * 7) % 5 + 1) for i in range(40)]
    entries = [
        d.EntryLine(d.entry_receipt("r", f"e{n}"), "s00", "D", True, 1 + n % 4) for n in range(200)
    ]
    frozen = d.freeze(entries, stock)
    drawn = d.draw("r", 1, bytes(32), "v", frozen)
    left = {s.site_id: s.units for s in stock}
    expected = []
    for _placed in drawn.winners():
        best = max(sorted(left), key=lambda s: (left[s], -int(s[1:])))
        assert left[best] >= 1
        site = "s00" if left["s00"] >= 1 else best
        expected.append(site)
        left[site] -= 1
    assert [p.site_id for p in drawn.winners()] == expected
    assert sum(1 for _ in drawn.winners()) == sum(s.units for s in stock)


# -- receipts and signatures -------------------------------------------------------------------


def test_a_signed_entry_verifies_and_a_changed_one_does_not() -> None:
    """The citizen's proof of entry: valid for exactly what was signed, by exactly this key."""
    key = DrawKey.generate()
    receipt = d.entry_receipt("r1", "some-entry")
    signature = key.sign_entry("r1", receipt, "s1", True)
    assert verify_entry(key.public_key(), signature, "r1", receipt, "s1", True)
    assert not verify_entry(key.public_key(), signature, "r1", receipt, "s1", False)
    assert not verify_entry(key.public_key(), signature, "r1", receipt, "s2", True)
    assert not verify_entry(key.public_key(), signature, "r2", receipt, "s1", True)
    other = DrawKey.generate()
    assert not verify_entry(other.public_key(), signature, "r1", receipt, "s1", True)
    raw = bytearray(__import__("base64").urlsafe_b64decode(signature + "=="))
    raw[10] ^= 1
    assert not verify_entry(key.public_key(), b64url(bytes(raw)), "r1", receipt, "s1", True)
    assert not verify_entry(key.public_key(), "not base64!", "r1", receipt, "s1", True)
    assert not verify_entry("short", signature, "r1", receipt, "s1", True)


def test_the_draw_key_round_trips_through_allot_draw_key_text() -> None:
    """ALLOT_DRAW_KEY is base64url of the raw 32-byte seed, padded or not."""
    key = DrawKey.generate()
    text = key.private_text()
    assert len(text) == 43
    assert "=" not in text
    assert DrawKey.from_text(text).public_key() == key.public_key()
    assert DrawKey.from_text(text + "=").public_key() == key.public_key()
    assert len(key.public_key()) == 43
    for bad in ("", "abc", b64url(bytes(31)), b64url(bytes(33)), "a+b/" * 11):
        with pytest.raises(DrawKeyError):
            DrawKey.from_text(bad)


def test_the_signature_vector_matches_rfc8032_ed25519() -> None:
    """The test key's signatures in receipts.json are deterministic Ed25519 (RFC 8032)."""
    receipts = json.loads((vectors.VECTORS / "a-tiny" / "receipts.json").read_text("utf-8"))
    key = DrawKey.from_text(receipts["test_private_key"])
    assert key.public_key() == receipts["public_key"]
    for entry in receipts["entries"]:
        lines = entry["statement"].split("\n")
        assert lines[0] == "allot-entry-1"
        assert lines[2] == entry["receipt"]
        assert key.sign_entry(lines[1], lines[2], lines[3], lines[4] == "1") == entry["signature"]
    # RFC 8032 section 7.1, TEST 1: the library is plain Ed25519
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    rfc = DrawKey.from_text(b64url(seed))
    assert rfc.public_key() == b64url(
        bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    )


def test_entry_signatures_are_openssls_byte_for_byte() -> None:
    """sign_entry signs with libsodium (PyNaCl, the faster); its signatures are the ones
    cryptography's OpenSSL Ed25519 makes over the same statement, and they verify."""
    rng = random.Random(8032)
    for n in range(50):
        key = DrawKey.from_text(b64url(rng.randbytes(32)))
        receipt = d.entry_receipt(f"r{n}", f"e{rng.getrandbits(64):x}")
        site, accept = f"s{rng.randrange(1000)}", rng.random() < 0.5
        signature = key.sign_entry(f"r{n}", receipt, site, accept)
        statement = entry_statement(f"r{n}", receipt, site, accept)
        assert signature == b64url(key.private.sign(statement))
        assert verify_entry(key.public_key(), signature, f"r{n}", receipt, site, accept)


def _citizen(name: str, *extra: str) -> tuple[int, str, str]:
    """Run the verifier's citizen check on a vector; (exit code, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = v.main(["--dir", str(vectors.VECTORS / name), *extra])  # a name or a path
    return code, out.getvalue(), err.getvalue()


def test_a_citizen_finds_their_line_rank_and_result_and_checks_the_signature() -> None:
    receipts = json.loads((vectors.VECTORS / "b-passes" / "receipts.json").read_text("utf-8"))
    by_id = {e["entry_id"]: e for e in receipts["entries"]}
    mine = next(e for e in receipts["entries"] if e["receipt"].startswith("108ed591"))
    code, out, _err = _citizen(
        "b-passes", "--entry-id", next(k for k, e in by_id.items() if e is mine),
        "--signature", mine["signature"], "--public-key", receipts["public_key"],
    )  # fmt: skip
    assert code == 0
    assert "rank 7 of 12 (results.csv line 8)" in out
    assert "drawn at site b-s1 (pass 1, pass-1.csv)" in out
    assert "signature over (site b-s1, accept_district 1): valid" in out


def test_a_wrong_signature_or_an_unlisted_receipt_fails_the_citizen_check() -> None:
    receipts = json.loads((vectors.VECTORS / "a-tiny" / "receipts.json").read_text("utf-8"))
    first, second = receipts["entries"][:2]
    code, _out, err = _citizen(
        "a-tiny", "--receipt", first["receipt"], "--signature", second["signature"],
        "--public-key", receipts["public_key"],
    )  # fmt: skip
    assert code == 1
    assert "NOT valid for this key" in err
    # a signed entry missing from the list: the signature still proves it was accepted
    code, _out, err = _citizen(
        "a-tiny", "--receipt", "ab" * 32, "--signature", first["signature"],
        "--public-key", receipts["public_key"], "--site-id", "t-1", "--accept-district", "1",
    )  # fmt: skip
    assert code == 1
    assert "NOT in entries.csv" in err
    assert "NOT valid" in err
    stranger = d.entry_receipt("vector-a", "unlisted")
    key = DrawKey.from_text(receipts["test_private_key"])
    signed = key.sign_entry("vector-a", stranger, "t-1", True)
    code, _out, err = _citizen(
        "a-tiny", "--receipt", stranger, "--signature", signed,
        "--public-key", receipts["public_key"], "--site-id", "t-1", "--accept-district", "1",
    )  # fmt: skip
    assert code == 1
    assert "missing from the frozen list" in err


# -- from a service, over HTTP -----------------------------------------------------------------


@pytest.fixture
def published() -> Iterator[str]:
    """The b-passes vector served at the contract's paths by a tiny HTTP server."""
    here = vectors.VECTORS / "b-passes"
    routes = {
        "/api/v1/rounds/vector-b": here / "round.json",
        "/api/v1/rounds/vector-b/draw": here / "draw.json",
        **{f"/api/v1/rounds/vector-b/draw/{p.name}": p for p in here.glob("*.csv")},
    }
    receipts = json.loads((here / "receipts.json").read_text("utf-8"))
    key = json.dumps({"public_key": receipts["public_key"]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = routes.get(self.path)
            body = key if self.path == "/api/v1/draw-key" else path.read_bytes() if path else None
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_verify_draw_fetches_the_files_from_a_base_url(published: str, tmp_path: Path) -> None:
    """--url BASE --round R: the same replay over HTTP, the draw key fetched, files saved."""
    receipts = json.loads((vectors.VECTORS / "b-passes" / "receipts.json").read_text("utf-8"))
    mine = receipts["entries"][3]
    code = v.main(["--url", published, "--round", "vector-b", "--save", str(tmp_path),
                   "--receipt", mine["receipt"], "--signature", mine["signature"]])  # fmt: skip
    assert code == 0
    assert (tmp_path / "pass-2.csv").read_bytes() == (
        vectors.VECTORS / "b-passes" / "pass-2.csv"
    ).read_bytes()
    assert v.main(["--url", published, "--round", "nope"]) == 1


def test_verify_draw_with_url_needs_a_round(capsys: pytest.CaptureFixture[str]) -> None:
    assert v.main(["--url", "http://127.0.0.1:9"]) == 1
    assert "--round: needed with --url" in capsys.readouterr().err


def test_vectors_readme_is_listed_per_case() -> None:
    """docs/lottery-vectors/README.md names every case, for whoever checks another program."""
    index = (vectors.VECTORS / "README.md").read_text("utf-8")
    for name in CASES:
        assert f"`{name}`" in index
