"""Kubernetes resource quantities ("10Gi", "1.5G", "500M") as exact numbers."""

from __future__ import annotations

import math
import re
from fractions import Fraction

_SUFFIXES: dict[str, int] = {
    "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


def parse_quantity(text: str | int) -> Fraction:
    """The exact value of a byte quantity; ValueError naming the text if malformed."""
    if isinstance(text, int):
        return Fraction(text)
    match = _QUANTITY.match(text.strip())
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {text!r} (expected e.g. 512Mi, 10Gi)")
    number, suffix = match.groups()
    return Fraction(number) * _SUFFIXES[suffix or ""]


def quantity_bytes(text: str | int) -> int:
    """Whole bytes of a quantity (rounded up, as Kubernetes rounds storage requests)."""
    return math.ceil(parse_quantity(text))


def format_mebibytes(num_bytes: int) -> str:
    """Bytes rounded up to whole MiB, as a quantity string ("1127Mi")."""
    return f"{math.ceil(num_bytes / 2**20)}Mi"
