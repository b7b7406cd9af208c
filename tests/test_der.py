"""staple.der: elements read back as written, and malformed input raises ValueError only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from staple.der import (
    BIT_STRING,
    OCTET_STRING,
    SEQUENCE,
    Element,
    children,
    encode_tlv,
    expect_tags,
    explicit,
    read_element,
    read_whole,
)

SETTINGS = settings(max_examples=300, deadline=None, database=None)

low_tags = st.integers(0, 0xFF).filter(lambda t: t & 0x1F != 0x1F)


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, "0400"),
        (1, "0401"),
        (127, "047f"),
        (128, "048180"),
        (255, "0481ff"),
        (256, "04820100"),
        (65535, "0482ffff"),
        (65536, "0483010000"),
    ],
)
def test_lengths_take_their_shortest_form(size: int, header: str) -> None:
    contents = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    encoded = encode_tlv(OCTET_STRING, contents)
    assert encoded == bytes.fromhex(header) + contents
    element = read_element(encoded)
    assert element == Element(OCTET_STRING, 0, len(header) // 2, len(encoded))
    assert element.header_length == len(header) // 2
    assert element.length == size
    assert encoded[element.body : element.end] == contents
    assert read_whole(encoded, OCTET_STRING) == element


@SETTINGS
@given(tag=low_tags, contents=st.binary(max_size=70_000), prefix=st.binary(max_size=8))
def test_encode_then_read_round_trips(tag: int, contents: bytes, prefix: bytes) -> None:
    data = prefix + encode_tlv(tag, contents)
    element = read_element(data, len(prefix))
    assert (element.tag, element.start, element.end) == (tag, len(prefix), len(data))
    assert data[element.body : element.end] == contents
    assert encode_tlv(element.tag, data[element.body : element.end]) == data[element.start :]


@SETTINGS
@given(items=st.lists(st.tuples(low_tags, st.binary(max_size=300)), max_size=8))
def test_children_are_read_back_in_order(items: list[tuple[int, bytes]]) -> None:
    parts = [encode_tlv(tag, contents) for tag, contents in items]
    data = encode_tlv(SEQUENCE, b"".join(parts))
    found = children(data, read_whole(data, SEQUENCE))
    assert [e.tag for e in found] == [tag for tag, _ in items]
    assert [data[e.start : e.end] for e in found] == parts
    assert [data[e.body : e.end] for e in found] == [contents for _, contents in items]
    assert expect_tags(found, *[tag for tag, _ in items]) is found


def test_children_of_a_nested_structure() -> None:
    inner = encode_tlv(SEQUENCE, encode_tlv(OCTET_STRING, b"x" * 200))
    data = encode_tlv(explicit(0), inner) + b"trailing"
    outer = read_element(data, 0, len(data) - 8)
    (sequence,) = expect_tags(children(data, outer), SEQUENCE)
    (octets,) = expect_tags(children(data, sequence), OCTET_STRING)
    assert data[octets.body : octets.end] == b"x" * 200


def test_a_part_of_a_buffer_is_read_within_its_bounds() -> None:
    data = b"\xff\xff" + encode_tlv(BIT_STRING, b"\x00\x01") + b"\xff"
    element = read_whole(data, BIT_STRING, 2, 6)
    assert element == Element(BIT_STRING, 2, 4, 6)


def test_long_form_lengths_need_not_be_minimal() -> None:
    # Accepted, as the readers staple.der replaced accepted them: every caller reads either
    # bytes cryptography parsed as strict DER, or what a client sent to a test responder.
    assert read_element(b"\x04\x81\x01x") == Element(OCTET_STRING, 0, 3, 4)
    assert read_element(b"\x04\x82\x00\x01x") == Element(OCTET_STRING, 0, 4, 5)


def test_explicit_tags() -> None:
    assert [explicit(n) for n in (0, 1, 2, 30)] == [0xA0, 0xA1, 0xA2, 0xBE]
    for bad in (-1, 31):
        with pytest.raises(ValueError, match="high-tag-number"):
            explicit(bad)


# -- malformed input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated element at offset 0"),
        (b"\x30", "truncated element at offset 0"),
        (b"\x30\x81", "truncated length at offset 0"),
        (b"\x30\x82\x01", "truncated length at offset 0"),
        (b"\x30\x05\x00", "overruns its container"),
        (b"\x30\x81\x80" + bytes(127), "overruns its container"),
        (b"\x30\x84\xff\xff\xff\xff", "overruns its container"),
        (b"\x30\x80\x00\x00", "indefinite length at offset 0"),
        (b"\x30\x85\x00\x00\x00\x00\x01\x00", "5 length octets"),
        (b"\x1f\x01\x00", "high tag number at offset 0"),
        (b"\xbf\x81\x00\x00", "high tag number at offset 0"),
    ],
    ids=[
        "empty",
        "tag only",
        "long form, no length octets",
        "long form, length cut",
        "short length beyond the buffer",
        "long length beyond the buffer",
        "4-octet length beyond the buffer",
        "indefinite length",
        "five length octets",
        "high tag number",
        "high tag number, constructed",
    ],
)
def test_malformed_headers_raise_value_error(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_element(data)


def test_offsets_outside_the_buffer_raise_value_error() -> None:
    data = encode_tlv(OCTET_STRING, b"abc")
    with pytest.raises(ValueError, match="outside"):
        read_element(data, -1)
    with pytest.raises(ValueError, match="outside"):
        read_element(data, len(data) + 1)
    with pytest.raises(ValueError, match="outside the 5-byte buffer"):
        read_element(data, 0, len(data) + 1)
    with pytest.raises(ValueError, match="truncated"):
        read_element(data, len(data))
    with pytest.raises(ValueError, match="overruns its container"):
        read_element(data, 0, len(data) - 1)  # a limit inside the buffer binds too


def test_a_child_overrunning_its_parent_raises_value_error() -> None:
    # The SEQUENCE says 3 bytes; the OCTET STRING inside claims 5 (the buffer has them).
    data = b"\x30\x03\x04\x05abcde"
    parent = read_element(data)
    with pytest.raises(ValueError, match="overruns its container"):
        children(data, parent)


def test_read_whole_refuses_a_wrong_tag_or_trailing_bytes() -> None:
    data = encode_tlv(SEQUENCE, b"")
    with pytest.raises(ValueError, match="expected one element tagged 0x04"):
        read_whole(data, OCTET_STRING)
    with pytest.raises(ValueError, match=r"spanning \[0, 3\), found 0x30 spanning \[0, 2\)"):
        read_whole(data + b"\x00", SEQUENCE)


def test_expect_tags_names_what_it_found() -> None:
    data = encode_tlv(SEQUENCE, encode_tlv(OCTET_STRING, b"") + encode_tlv(BIT_STRING, b"\x00"))
    found = children(data, read_element(data))
    with pytest.raises(ValueError, match="expected tags 0x04, found 0x04, 0x03"):
        expect_tags(found, OCTET_STRING)
    with pytest.raises(ValueError, match="expected tags nothing, found 0x04, 0x03"):
        expect_tags(found)
    with pytest.raises(ValueError, match="expected tags 0x30, found nothing"):
        expect_tags([], SEQUENCE)


def test_encode_refuses_what_read_cannot_read_back() -> None:
    with pytest.raises(ValueError, match="not a single low-tag-number octet"):
        encode_tlv(0x1F, b"")
    with pytest.raises(ValueError, match="not a single low-tag-number octet"):
        encode_tlv(0x100, b"")


@SETTINGS
@given(data=st.binary(max_size=64), pos=st.integers(-2, 70), limit=st.integers(-2, 70) | st.none())
def test_any_bytes_give_an_element_within_bounds_or_value_error(
    data: bytes, pos: int, limit: int | None
) -> None:
    try:
        element = read_element(data, pos, limit)
    except ValueError:
        return
    bound = len(data) if limit is None else limit
    assert 0 <= element.start == pos < element.body <= element.end <= bound <= len(data)
    assert element.tag == data[pos]
    try:
        for child in children(data, element):
            assert element.body <= child.start < child.end <= element.end
    except ValueError:
        pass


@SETTINGS
@given(contents=st.binary(min_size=1, max_size=400), cut=st.integers(1, 400))
def test_every_truncation_raises_value_error(contents: bytes, cut: int) -> None:
    data = encode_tlv(SEQUENCE, encode_tlv(OCTET_STRING, contents))
    cut = min(cut, len(data))
    with pytest.raises(ValueError, match=r"truncated|overruns"):
        read_whole(data[:-cut], SEQUENCE)


def test_der_imports_the_standard_library_only() -> None:
    """Part of the pure core: no asyncio, no aiohttp, no cryptography."""
    import staple.der

    tree = ast.parse(Path(staple.der.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "staple.der imports nothing from staple"
            imported.add((node.module or "").split(".")[0])
    assert imported <= set(sys.stdlib_module_names)
    assert not imported & {"asyncio", "socket", "ssl"}
