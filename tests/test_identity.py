"""Citizen IDs and phones: the contract's rules, masking and keyed hashing."""

from __future__ import annotations

import datetime as dt

import pytest

from allocator.identity import (
    Hasher,
    InvalidIdentity,
    mask_citizen_id,
    normalise_citizen_id,
    validate_phone,
)
from tests.conftest import citizen_id

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
