"""Just enough DER to find elements in OCSP structures and to write new ones.

cryptography parses and builds OCSP messages, but not every part staple needs: the exact bytes
of a ResponderID, the unused-bits octet of a signature BIT STRING, the ``certs`` field to trim
from a response, the CertIDs of a multi-certificate request. This module reads and writes the
tag-length-value frame around such parts and nothing inside it: no ASN.1 types, no schema.

An :class:`Element` is four offsets into the buffer it was read from - where its header starts,
where its contents start and end - so slicing the buffer gives back the exact bytes, and
editing a structure means copying the untouched parts and re-encoding the enclosing lengths
with :func:`encode_tlv`.

What is read: low tag numbers (0-30) in one octet, definite lengths in short form or in long
form of one to four octets. Anything else - a high tag number, the indefinite length ``0x80``,
more than four length octets, an element that runs past its container or the buffer - raises
:class:`ValueError` with the offset and the reason; malformed input never raises IndexError.
Long-form lengths are not required to be minimal (``81 05`` reads as 5): the callers either
read bytes cryptography has already parsed as strict DER, or are test tools that tolerate what
a client sends.

Pure: the standard library only, no I/O.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "BIT_STRING",
    "ENUMERATED",
    "GENERALIZED_TIME",
    "OBJECT_IDENTIFIER",
    "OCTET_STRING",
    "SEQUENCE",
    "Element",
    "children",
    "encode_tlv",
    "expect_tags",
    "explicit",
    "read_element",
    "read_whole",
]

# Universal tags, as their first octet (SEQUENCE with the constructed bit set).
BIT_STRING = 0x03
OCTET_STRING = 0x04
OBJECT_IDENTIFIER = 0x06
ENUMERATED = 0x0A
GENERALIZED_TIME = 0x18
SEQUENCE = 0x30

_MAX_LENGTH_OCTETS = 4


def explicit(number: int) -> int:
    """The tag octet of ``[number] EXPLICIT`` (context-specific, constructed): 0xA0 for [0]."""
    if not 0 <= number < 0x1F:
        raise ValueError(f"context tag number {number} needs the high-tag-number form")
    return 0xA0 | number


class Element(NamedTuple):
    """One DER element of a buffer, as offsets into it: the header (tag and length octets)
    spans ``[start, body)``, the contents ``[body, end)``."""

    tag: int
    start: int
    body: int
    end: int

    @property
    def header_length(self) -> int:
        """How many octets the tag and length take."""
        return self.body - self.start

    @property
    def length(self) -> int:
        """How many octets the contents take."""
        return self.end - self.body


def read_element(data: bytes, pos: int = 0, limit: int | None = None) -> Element:
    """The element whose header starts at ``data[pos]`` and which must end by ``limit``
    (default: the end of ``data``).

    Raises ValueError if the header is truncated or unsupported (high tag number, indefinite
    length, more than four length octets), if the element runs past ``limit``, or if
    ``pos``/``limit`` do not lie within ``data``.
    """
    size = len(data)
    if limit is None:
        limit = size
    elif not 0 <= limit <= size:
        raise ValueError(f"limit {limit} lies outside the {size}-byte buffer")
    if not 0 <= pos <= limit:
        raise ValueError(f"offset {pos} lies outside [0, {limit}]")
    if pos + 2 > limit:
        raise ValueError(f"truncated element at offset {pos}")
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise ValueError(f"high tag number at offset {pos}")
    body = pos + 2
    if first & 0x80:
        n = first & 0x7F
        if n == 0:
            raise ValueError(f"indefinite length at offset {pos}")
        if n > _MAX_LENGTH_OCTETS:
            raise ValueError(f"{n} length octets at offset {pos} (at most 4)")
        if body + n > limit:
            raise ValueError(f"truncated length at offset {pos}")
        length = int.from_bytes(data[body : body + n], "big")
        body += n
    else:
        length = first
    end = body + length
    if end > limit:
        raise ValueError(f"element at offset {pos} overruns its container ({end} > {limit})")
    return Element(tag, pos, body, end)


def read_whole(data: bytes, tag: int, start: int = 0, end: int | None = None) -> Element:
    """The single element that fills ``data[start:end]`` exactly (default: all of ``data``),
    which must have ``tag``. Raises ValueError otherwise."""
    if end is None:
        end = len(data)
    element = read_element(data, start, end)
    if element.tag != tag or element.end != end:
        raise ValueError(
            f"expected one element tagged {tag:#04x} spanning [{start}, {end}), found "
            f"{element.tag:#04x} spanning [{start}, {element.end})"
        )
    return element


def children(data: bytes, parent: Element) -> list[Element]:
    """The elements that make up ``parent``'s contents, in order; each must end within it."""
    out: list[Element] = []
    pos, end = parent.body, parent.end
    while pos < end:
        child = read_element(data, pos, end)
        out.append(child)
        pos = child.end
    return out


def expect_tags(elements: list[Element], *tags: int) -> list[Element]:
    """``elements`` itself, if there are exactly as many as ``tags`` and they carry those tags
    in that order; ValueError naming both lists otherwise. Unpack the result::

        status, body = expect_tags(children(data, outer), ENUMERATED, explicit(0))
    """
    if [e.tag for e in elements] != list(tags):
        found = ", ".join(f"{e.tag:#04x}" for e in elements) or "nothing"
        wanted = ", ".join(f"{t:#04x}" for t in tags) or "nothing"
        raise ValueError(f"expected tags {wanted}, found {found}")
    return elements


def encode_tlv(tag: int, contents: bytes) -> bytes:
    """One element: the ``tag`` octet, the length of ``contents`` in its shortest DER form,
    then ``contents``. ValueError for a tag that is not one low-tag-number octet, or contents
    longer than four length octets can say (what :func:`read_element` reads back)."""
    if not 0 <= tag <= 0xFF or tag & 0x1F == 0x1F:
        raise ValueError(f"tag {tag:#x} is not a single low-tag-number octet")
    n = len(contents)
    if n < 0x80:
        return bytes((tag, n)) + contents
    octets = (n.bit_length() + 7) // 8
    if octets > _MAX_LENGTH_OCTETS:
        raise ValueError(f"{n} bytes of contents need more than 4 length octets")
    return bytes((tag, 0x80 | octets)) + n.to_bytes(octets, "big") + contents
