"""Citizen IDs and phones: the contract's rules, masking and keyed hashing."""

from __future__ import annotations

import datetime as dt
import hmac
import unicodedata

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from stdnum.cn import ric

from allocator.identity import (
    Hasher,
    InvalidIdentity,
    canonical,
    mask_citizen_id,
    normalise_citizen_id,
    validate_phone,
)
from tests.helpers import citizen_id

WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def contract_check_char(first17: str) -> str:
    """The contract's own statement of ISO 7064 MOD 11-2, independent of python-stdnum."""
    return "10X98765432"[sum(int(c) * w for c, w in zip(first17, WEIGHTS, strict=True)) % 11]


@pytest.mark.parametrize("n", [0, 1, 7, 42, 999, 1234, 56789])
def test_stdnum_check_character_agrees_with_the_contract(n: int) -> None:
    """The library we rely on computes exactly the contract's check character."""
    number = citizen_id(n)
    assert number[17] == contract_check_char(number[:17])
    assert normalise_citizen_id(number) == number


def test_known_valid_id_with_x_is_accepted_in_lower_case_and_normalised() -> None:
    """Citizens type 'x'; the ID is the same person either way."""
    first17 = "11010519491231002"
    assert contract_check_char(first17) == "X"
    assert normalise_citizen_id(first17 + "x") == first17 + "X"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("11010519800101001", "18 characters"),
        ("1101051980010100171", "18 characters"),
        ("11010519800101001A", "18 characters"),
        ("11010519801301001?", "date of birth"),  # month 13
        ("11010519800230001?", "date of birth"),  # 30 February
    ],
)
def test_malformed_ids_are_refused_with_a_reason(value: str, why: str) -> None:
    """Each refusal says what is wrong in words a citizen can act on."""
    if value.endswith("?"):  # a correct check character, so that the date is what fails
        value = value[:17] + contract_check_char(value[:17])
    with pytest.raises(InvalidIdentity, match=why):
        normalise_citizen_id(value)


def test_wrong_check_character_is_refused() -> None:
    """One mistyped digit must be caught, not reserved under someone else's ID."""
    good = citizen_id(5)
    bad = good[:17] + ("0" if good[17] != "0" else "1")
    with pytest.raises(InvalidIdentity, match="check character"):
        normalise_citizen_id(bad)


def test_birth_date_in_the_future_is_refused() -> None:
    """A date of birth after today cannot be a resident's."""
    body = "110101" + "20991231" + "001"
    number = body + contract_check_char(body)
    with pytest.raises(InvalidIdentity, match="future"):
        normalise_citizen_id(number, today=dt.date(2026, 11, 28))


def test_region_codes_outside_stdnum_table_are_accepted() -> None:
    """The contract asks for a check character and a birth date, not a known county."""
    body = "990000" + "19800101" + "001"
    assert normalise_citizen_id(body + contract_check_char(body))


@pytest.mark.parametrize("good", ["13912345678", "19900000000"])
def test_phone_numbers_per_contract_are_accepted(good: str) -> None:
    """Mobile numbers 13x-19x."""
    assert validate_phone(good) == good


@pytest.mark.parametrize("bad", ["12912345678", "1391234567", "139123456789", "+8613912345678"])
def test_other_phone_numbers_are_refused(bad: str) -> None:
    """Anything not 1[3-9] plus nine digits."""
    with pytest.raises(InvalidIdentity):
        validate_phone(bad)


def test_mask_shows_first_six_and_last_four() -> None:
    """The masked form identifies a reservation at the counter without revealing the ID."""
    assert mask_citizen_id("11010519491231002X") == "110105********002X"


def test_hashes_are_keyed_and_distinct_per_kind() -> None:
    """Without the pepper a hash cannot be recomputed from the small space of IDs."""
    a, b = Hasher(b"one"), Hasher(b"two")
    n = citizen_id(1)
    assert a.citizen(n) != b.citizen(n)
    assert a.citizen(n) != a.phone(n)
    assert n not in a.citizen(n)
    assert len(a.citizen(n)) == 64


@given(st.text(max_size=40), st.binary(max_size=100))
@example("13900000000", b"k" * 65)  # a key longer than the block: hashed first
def test_hashes_are_the_one_shot_hmac_of_purpose_and_value(value: str, pepper: bytes) -> None:
    """The pre-keyed HMAC copies give exactly HMAC-SHA256(pepper, "<purpose>:" + value): every
    hash already stored (holders, cooldowns, the ledger) stays valid."""
    h = Hasher(pepper)
    raw = value.encode()
    assert h.citizen(value) == hmac.digest(pepper, b"citizen:" + raw, "sha256").hex()
    assert h.phone(value) == hmac.digest(pepper, b"phone:" + raw, "sha256").hex()
    assert h.client(value) == hmac.digest(pepper, b"client:" + raw, "sha256").hex()[:32]


# -- one canonical form, whatever digits were typed ------------------------------------------


def _digit_renderings() -> tuple[dict[str, list[str]], dict[int, list[str]]]:
    """Every non-ASCII character that NFKC maps to an ASCII digit or X/x (fullwidth, math bold,
    double-struck, sans-serif, monospace, superscript, circled ...), and every decimal digit that
    NFKC leaves non-ASCII (Arabic-Indic, Devanagari, Bengali ... 58 scripts), by its value."""
    same: dict[str, list[str]] = {c: [] for c in "0123456789Xx"}
    foreign: dict[int, list[str]] = {d: [] for d in range(10)}
    for cp in range(0x80, 0x110000):
        ch = chr(cp)
        folded = unicodedata.normalize("NFKC", ch)
        if folded in same:
            same[folded].append(ch)
        elif unicodedata.category(ch) == "Nd" and not folded.isascii():
            foreign[unicodedata.decimal(ch)].append(ch)
    return same, foreign


SAME, FOREIGN = _digit_renderings()
DIGIT = st.sampled_from("0123456789")
SPACE = st.sampled_from(["", " ", "\u3000", "\t", "\u00a0", "\n"])  # U+3000: ideographic
TODAY = dt.date(2026, 1, 1)


def test_the_digit_tables_cover_the_sets_citizens_type() -> None:
    """The generators below are only as good as these tables: check they hold what they claim."""
    assert "\uff13" in SAME["3"]  # fullwidth 3, a Chinese keyboard
    assert "\U0001d7d1" in SAME["3"]  # mathematical bold 3
    assert "\U0001d7db" in SAME["3"]  # mathematical double-struck 3
    assert "\U0001d7e5" in SAME["3"]  # mathematical sans-serif 3
    assert "\uff38" in SAME["X"]
    assert "\u0663" in FOREIGN[3]  # Arabic-Indic
    assert "\u0969" in FOREIGN[3]  # Devanagari
    assert "\u09e9" in FOREIGN[3]  # Bengali
    assert all(len(FOREIGN[d]) >= 50 for d in range(10))


@st.composite
def canonical_ids(draw: st.DrawFn) -> str:
    """A valid canonical ID: any region, a birth date from 1900 to 2020, any sequence."""
    region = "".join(draw(st.lists(DIGIT, min_size=6, max_size=6)))
    born = draw(st.dates(dt.date(1900, 1, 1), dt.date(2020, 12, 31)))
    seq = "".join(draw(st.lists(DIGIT, min_size=3, max_size=3)))
    body = f"{region}{born:%Y%m%d}{seq}"
    return body + ric.calc_check_digit(body + "0")


@st.composite
def phones(draw: st.DrawFn) -> str:
    rest = "".join(draw(st.lists(DIGIT, min_size=9, max_size=9)))
    return "1" + draw(st.sampled_from("3456789")) + rest


@st.composite
def renderings(draw: st.DrawFn, number: str) -> str:
    """The same number with each character in any form that NFKC maps back to it (digit by digit,
    so digit sets are mixed), a lower-case x for X, and any space around it."""
    chars = []
    for c in number:
        options = [c, *SAME[c]] if c != "X" else ["X", "x", *SAME["X"], *SAME["x"]]
        chars.append(draw(st.sampled_from(options)))
    return draw(SPACE) + "".join(chars) + draw(SPACE)


@st.composite
def with_a_foreign_digit(draw: st.DrawFn, number: str) -> str:
    """A rendering in which at least one digit is typed in a script that NFKC keeps non-ASCII."""
    shown = list(draw(renderings(number)).strip())
    digits = [i for i, c in enumerate(number) if c in "0123456789"]
    for i in draw(st.lists(st.sampled_from(digits), min_size=1, unique=True)):
        shown[i] = draw(st.sampled_from(FOREIGN[int(number[i])]))
    return "".join(shown)


@given(data=st.data(), number=canonical_ids())
def test_any_rendering_that_nfkc_maps_to_ascii_is_the_same_canonical_id(
    data: st.DataObject, number: str
) -> None:
    """Fullwidth or mathematical digits, mixed digit by digit, are the same person: one hash."""
    got = normalise_citizen_id(data.draw(renderings(number)), today=TODAY)
    assert got == number
    assert Hasher(b"p").citizen(got) == Hasher(b"p").citizen(number)
    assert mask_citizen_id(got) == mask_citizen_id(number)
    assert mask_citizen_id(got).isascii()


@given(data=st.data(), number=canonical_ids())
def test_an_id_with_a_digit_that_stays_non_ascii_is_refused(
    data: st.DataObject, number: str
) -> None:
    """Arabic-Indic, Devanagari, Bengali ... digits would be a second identity: refused."""
    with pytest.raises(InvalidIdentity, match="digits 0-9"):
        normalise_citizen_id(data.draw(with_a_foreign_digit(number)), today=TODAY)


@given(data=st.data(), a=canonical_ids(), b=canonical_ids())
def test_distinct_canonical_ids_never_share_a_canonical_form_or_a_hash(
    data: st.DataObject, a: str, b: str
) -> None:
    """Canonicalising must not merge two people: whatever each typed, they stay two."""
    assume(a != b)
    ca = normalise_citizen_id(data.draw(renderings(a)), today=TODAY)
    cb = normalise_citizen_id(data.draw(renderings(b)), today=TODAY)
    assert ca != cb
    assert Hasher(b"p").citizen(ca) != Hasher(b"p").citizen(cb)


@given(data=st.data(), number=phones())
def test_any_rendering_of_a_phone_is_the_same_canonical_phone(
    data: st.DataObject, number: str
) -> None:
    """The phone is canonicalised the same way as the ID, and hashed only in canonical form."""
    assert validate_phone(data.draw(renderings(number))) == number


@given(data=st.data(), number=phones())
def test_a_phone_with_a_digit_that_stays_non_ascii_is_refused(
    data: st.DataObject, number: str
) -> None:
    """'1[3-9]' and nine digits means ASCII digits after NFKC, not any script's digits."""
    with pytest.raises(InvalidIdentity, match="digits 0-9"):
        validate_phone(data.draw(with_a_foreign_digit(number)))


@given(st.text())
def test_any_text_is_refused_cleanly_or_yields_an_ascii_canonical_id(value: str) -> None:
    """No input makes the check raise anything but InvalidIdentity (a 422, never a 503), and
    what it accepts is canonical: ASCII, and unchanged by canonicalising again."""
    try:
        got = normalise_citizen_id(value)
    except InvalidIdentity:
        return
    assert got.isascii()
    assert len(got) == 18
    assert canonical(got) == got
    assert normalise_citizen_id(got) == got


@given(st.text())
def test_any_text_is_refused_cleanly_or_yields_an_ascii_canonical_phone(value: str) -> None:
    """Same for phones."""
    try:
        got = validate_phone(value)
    except InvalidIdentity:
        return
    assert got.isascii()
    assert validate_phone(got) == got


@pytest.mark.parametrize(
    "digits",
    [
        pytest.param(
            "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669", id="arabic-indic"
        ),
        pytest.param(
            "\u0966\u0967\u0968\u0969\u096a\u096b\u096c\u096d\u096e\u096f", id="devanagari"
        ),
        pytest.param("\u09e6\u09e7\u09e8\u09e9\u09ea\u09eb\u09ec\u09ed\u09ee\u09ef", id="bengali"),
    ],
)
def test_ids_and_phones_wholly_in_another_script_are_refused(digits: str) -> None:
    """The cases that gave one citizen six 201s: each digit set is refused outright."""
    table = str.maketrans("0123456789", digits)
    with pytest.raises(InvalidIdentity):
        normalise_citizen_id(citizen_id(7).translate(table))
    with pytest.raises(InvalidIdentity):
        validate_phone("13912345678".translate(table))
