"""The spec's JSON read field by field, each value checked as the CRD checks it, every error naming its field.

`SpecObject` is one JSON object of the spec; quantities (memory, disk sizes) are read exactly as the
API server reads them (`quantity.py`) within the CRD's length and pattern.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from libvirt_operator import quantity

MAX_QUANTITY = 2**60
"""1Ei: the most a quantity given on the command line may be."""
MAX_QUANTITY_LENGTH = 32
POSITIVE_QUANTITY = re.compile(r"^[+]?([0-9]*[1-9][0-9]*([.][0-9]*)?|[0-9]*[.][0-9]*[1-9][0-9]*)([KMGTPE]i|[numkMGTPE]|[eE][+-]?0*[0-9]{1,2})?$")
"""The CRD's pattern of memory and disk sizes written as strings: positive, and an exponent of at most two digits,
so a size stays a small number. The API server parses `1e2147483648` for a minute (apimachinery rounds it to a
nano unit through 10^(2^31)): the CRD's memory rule matches this before it calls isQuantity."""
_XML_UNSAFE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MISSING = object()


class SpecError(ValueError):
    """A spec the operator cannot apply; `field` is a path like `spec.disks[1].image.path`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def quantity_value(value: Any, field: str) -> Decimal:
    """A Kubernetes quantity (`512Mi`, `1.5Gi`, `2G`, `1e9`, `1000m`, `1048576`) exactly as the API server reads
    it; a negative one is refused."""
    amount: Decimal | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        amount = Decimal(value)
    elif isinstance(value, str):
        amount = quantity.parse(value)
    if amount is None:
        raise SpecError(field, f"{value!r} is not a quantity; write e.g. 512Mi, 1.5Gi, 2G or a number of bytes")
    if amount < 0:
        raise SpecError(field, f"{value!r} is negative; give a size such as 512Mi")
    return amount


def parse_quantity(value: Any, field: str) -> int:
    """A quantity of at most 1Ei as whole bytes, rounded up."""
    amount = quantity_value(value, field)
    if amount > MAX_QUANTITY:
        raise SpecError(field, f"{value!r} is over 1Ei; give a size such as 512Mi")
    return math.ceil(amount)


def size_field(obj: SpecObject, key: str) -> Decimal:
    """A size field of the spec: a string as the CRD's maxLength and pattern allow."""
    value = obj.raw(key)
    if isinstance(value, str) and len(value) > MAX_QUANTITY_LENGTH:
        raise SpecError(obj.at(key), f"{value!r} is longer than {MAX_QUANTITY_LENGTH} characters")
    if isinstance(value, str) and quantity.parse(value) is not None and not POSITIVE_QUANTITY.match(value):
        raise SpecError(obj.at(key), f"{value!r} is not a positive size such as 512Mi, 10Gi or 1e10 "
                        "(an exponent has at most two digits)")
    return quantity_value(value, obj.at(key))


class SpecObject:
    """One JSON object of the spec at `path`, read field by field with errors naming the field."""

    def __init__(self, data: Any, path: str, allowed: Sequence[str]) -> None:
        if not isinstance(data, Mapping):
            raise SpecError(path, f"must be an object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise SpecError(f"{path}.{unknown[0]}", f"unknown field; allowed here: {', '.join(allowed)}")
        self.data = data
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        value = self.data.get(key)
        if value is None:
            if default is _MISSING:
                raise SpecError(self.at(key), "is required")
            return default
        return value

    def string(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        if not isinstance(value, str) or not value:
            raise SpecError(self.at(key), f"must be a non-empty string, got {value!r}")
        if _XML_UNSAFE.search(value):
            raise SpecError(self.at(key), "contains control characters; only tab, newline and printable text are allowed")
        return value

    def file_path(self, key: str, default: Any = _MISSING) -> Any:
        """An absolute file path on the node, on one line."""
        value = self.string(key, default)
        if value is not default and (not value.startswith("/") or len(value) < 2 or _CONTROL.search(value)):
            raise SpecError(self.at(key), f"{value!r} must be an absolute path (starting with /) without "
                            "tabs, newlines or other control characters")
        return value

    def object_name(self, key: str) -> str:
        """The name of a libvirt object (a pool, a volume): no '/', no control characters."""
        value = self.string(key)
        if "/" in value or _CONTROL.search(value) or value in (".", ".."):
            raise SpecError(self.at(key), f"{value!r} must be a libvirt name: not . or .., no '/', tabs, newlines "
                            "or other control characters")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise SpecError(self.at(key), f"must be true or false, got {value!r}")
        return value

    def integer(self, key: str, default: Any = _MISSING, minimum: int = 0) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise SpecError(self.at(key), f"must be a whole number of at least {minimum}, got {value!r}")
        return value

    def choice(self, key: str, allowed: Sequence[str], default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is not default and value not in allowed:
            raise SpecError(self.at(key), f"{value!r} is not one of {', '.join(allowed)}")
        return value

    def child(self, key: str, allowed: Sequence[str]) -> SpecObject:
        return SpecObject(self.raw(key, {}), self.at(key), allowed)

    def labels(self, key: str) -> tuple[tuple[str, str], ...]:
        """A map of label keys to values (as a nodeSelector), sorted."""
        value = self.raw(key, {})
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise SpecError(self.at(key), f"must map label keys to string values, got {value!r}")
        return tuple(sorted(value.items()))

    def items(self, key: str) -> list[Any]:
        value = self.raw(key, [])
        if not isinstance(value, list):
            raise SpecError(self.at(key), f"must be a list, got {type(value).__name__}")
        return value

    def exactly_one(self, keys: Sequence[str]) -> str:
        present = [key for key in keys if key in self.data]
        if len(present) != 1:
            found = f"found {', '.join(present)}" if present else "found none"
            raise SpecError(self.path, f"needs exactly one of {', '.join(keys)}; {found}")
        return present[0]
