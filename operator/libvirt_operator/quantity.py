"""Kubernetes quantities read exactly as the API server reads them.

The CRD's rules call CEL's `isQuantity` and `quantity()`, which call apimachinery's
`resource.ParseQuantity`; this is a port of that function's grammar and arithmetic, quirks
included (`Mi` alone is zero, `e-10` alone and `Pi` alone are not quantities, an exponent wraps
to 32 bits, a non-zero value rounds away from zero to a nano unit, a binary one is capped at
2^63-1). `kubernetes.utils.parse_quantity` is not used: it admits what the API server refuses
(`1K`, `1e3k`, `Infinity`, `1_000`, surrounding spaces).
"""

from __future__ import annotations

import decimal
import re
from decimal import Decimal

_SHAPE = re.compile(r"(?P<sign>[+-]?)(?P<integer>[0-9]*+)(?:\.(?P<fraction>[0-9]*+))?+"
                    r"(?P<suffix>[eEinumkKMGTP]*+[+-]?+[0-9]*+)")
_DECIMAL_SUFFIXES = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY_SUFFIXES = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_EXPONENT = re.compile(r"[eE](?P<exponent>[+-]?[0-9]+)")
_INT64_MAX = 2**63 - 1
_NANO = Decimal("1e-9")


def parse(text: str) -> Decimal | None:
    """The quantity's exact value, or None where the API server answers that it is no quantity."""
    shape = _SHAPE.fullmatch(text)
    if not text or shape is None:
        return None
    scale = _scale(shape["suffix"])
    if scale is None:
        return None
    base, exponent = scale
    integer, fraction = shape["integer"], shape["fraction"] or ""
    if not integer + fraction and _needs_digits(base, exponent):
        return None
    with decimal.localcontext() as context:
        context.prec = len(text) + 40
        context.Emax, context.Emin = decimal.MAX_EMAX, decimal.MIN_EMIN
        value = Decimal(f"{shape['sign']}0{integer}.{fraction}0") * (Decimal(base) ** exponent)
        if value != 0 and value.as_tuple().exponent < -9:  # type: ignore[operator]
            value = value.quantize(_NANO, rounding=decimal.ROUND_UP)
        if base == 2 and value > _INT64_MAX:
            value = Decimal(_INT64_MAX)
    return value


def _scale(suffix: str) -> tuple[int, int] | None:
    """(base, exponent) of a suffix, None for one the API server does not know."""
    if suffix in _DECIMAL_SUFFIXES:
        return 10, _DECIMAL_SUFFIXES[suffix]
    if suffix in _BINARY_SUFFIXES:
        return 2, _BINARY_SUFFIXES[suffix]
    written = _EXPONENT.fullmatch(suffix)
    if written is None or not -2**63 <= int(written["exponent"]) <= _INT64_MAX:
        return None
    return 10, (int(written["exponent"]) + 2**31) % 2**32 - 2**31  # Go's int32() of the parsed int64


def _needs_digits(base: int, exponent: int) -> bool:
    """Whether ParseQuantity takes its slow path for a number without digits (read as zero on the fast path);
    the slow path reads it with inf.Dec, which wants a digit: a binary suffix beyond the fast path's
    precision estimate (from Pi on), or a scale below nano."""
    if base == 2:
        return 15 - 1 - int(exponent * 3 / 10) - 1 < 0
    return exponent < -9
