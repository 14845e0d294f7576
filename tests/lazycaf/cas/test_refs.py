"""Tests for lazycaf.cas.refs: ref name validation and the default profile of a mounted ref."""

from __future__ import annotations

import pytest

from lazycaf.cas.refs import check_ref_name, profile_name_for, profile_ref
from lazycaf.core.digest import Digest
from lazycaf.core.errors import UsageError


@pytest.mark.parametrize(
    "name",
    [
        "trainer:latest",
        "profiles/x",
        "a.b-c_d@e+f",
        "team/trainer:v2",
        "a" * 200,  # the longest accepted
        "x/" * 99 + "yy",  # 200 characters with separators
    ],
)
def test_check_ref_name_accepts(name: str) -> None:
    assert check_ref_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/trainer",
        "trainer/",
        "a//b",
        "a..b",
        "a/../b",
        "..",
        "a b",
        " trainer",
        "trainer ",
        "a\tb",
        "a\nb",
        ".hidden",
        "-x",
        "a/.b",
        "a" * 201,
        "ü",
    ],
)
def test_check_ref_name_rejects(name: str) -> None:
    with pytest.raises(UsageError):
        check_ref_name(name)


def test_profile_ref_prefixes_and_validates() -> None:
    assert profile_ref("team/trainer") == "profiles/team/trainer"
    with pytest.raises(UsageError):
        profile_ref("bad name")


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("trainer:v1", "trainer"),
        ("team/trainer:v2", "team/trainer"),
        ("trainer", "trainer"),
        ("team/trainer", "team/trainer"),
        ("a:b/c", "a:b/c"),  # the colon is not in the last component: no tag to drop
        ("a:b/c:d", "a:b/c"),
        ("trainer:v1:rc1", "trainer:v1"),  # only the last tag goes
    ],
)
def test_profile_name_for(ref: str, expected: str) -> None:
    assert profile_name_for(ref) == expected


def test_profile_name_for_a_bare_digest_is_none() -> None:
    assert profile_name_for(Digest.of(b"manifest").hex) is None


def test_profile_name_for_a_name_too_long_for_a_profile_ref_is_none() -> None:
    name = "a" * 195  # a valid ref, but "profiles/" + name is 204 characters
    assert check_ref_name(name) == name
    assert profile_name_for(name) is None
