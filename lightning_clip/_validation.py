"""The argument checks of every public constructor of the package, in one place (pure Python, no Lightning).

Each check takes the argument's name and value and returns the value normalised to a plain Python type, or raises
with a message of the form ``Invalid <name>: <value!r>; expected ...`` (the ``lightning-clip`` command prints such
messages as one line):

* ``TypeError`` for a value of the wrong kind: a ``bool`` where a number goes (``alpha=True``), a string where a
  number or a flag goes (``lr="0.1"``, ``fused="no"``), a number where a flag goes (``foreach=1``);
* ``ValueError`` for a value of the right kind out of its range (``beta=1.0``, ``lr=inf``, an unknown choice).

Numbers from numpy (``np.float32(0.1)``, ``np.int64(3)``, the values of ``np.linspace`` sweeps) are accepted and
converted to ``float`` / ``int``, and numpy booleans to ``bool``: what is stored (and written to checkpoints) is
plain Python.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "check_choice",
    "check_flag",
    "check_int",
    "check_kernel_choice",
    "check_real",
    "check_str",
    "check_strings",
]


def _invalid(name: str, value: Any, expected: str) -> str:
    return f"Invalid {name}: {value!r}; expected {expected}"


def _is_bool(value: Any) -> bool:
    """``bool`` or ``numpy.bool_`` (recognised by type name: numpy is not imported here)."""
    return isinstance(value, bool) or (type(value).__name__ in ("bool_", "bool") and type(value).__module__ == "numpy")


def _describe_range(
    low: float | None, high: float | None, low_open: bool, high_open: bool, finite: bool, integer: bool
) -> str:
    what = "an integer" if integer else ("a finite number" if finite else "a number")
    if low is not None and high is not None:
        return f"{what} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{what} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{what} {'<' if high_open else '<='} {high:g}"
    return what


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    optional: bool = False,
) -> float | None:
    """A real number in a range, as a plain ``float`` (``None`` passes when ``optional``).

    Args:
        name: the argument's name, for the message.
        value: what the caller gave: ``int``, ``float`` or a numpy number (not a ``bool``, a string or a tensor).
        low: lower bound (excluded when ``low_open``).
        high: upper bound (excluded when ``high_open``).
        finite: refuse ``inf``; ``nan`` is always refused.
        optional: let ``None`` through.

    Raises:
        TypeError: for a ``bool``, a string or anything that is not a real number.
        ValueError: for ``nan``, an infinity when ``finite``, or a value out of the range.
    """
    expected = _describe_range(low, high, low_open, high_open, finite, integer=False)
    if optional:
        expected = f"None or {expected}"
    if value is None and optional:
        return None
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(_invalid(name, value, expected))
    number = float(value)
    if math.isnan(number) or (finite and math.isinf(number)):
        raise ValueError(_invalid(name, value, expected))
    if low is not None and (number < low or (low_open and number == low)):
        raise ValueError(_invalid(name, value, expected))
    if high is not None and (number > high or (high_open and number == high)):
        raise ValueError(_invalid(name, value, expected))
    return number


def check_int(name: str, value: Any, *, low: int | None = None, optional: bool = False) -> int | None:
    """An integer ``>= low``, as a plain ``int`` (``None`` passes when ``optional``).

    Raises:
        TypeError: for a ``bool``, a float (``3.0`` included), a string or anything that is not an integer.
        ValueError: for a value below ``low``.
    """
    expected = _describe_range(low, None, False, False, True, integer=True)
    if optional:
        expected = f"None or {expected}"
    if value is None and optional:
        return None
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(_invalid(name, value, expected))
    number = int(value)
    if low is not None and number < low:
        raise ValueError(_invalid(name, value, expected))
    return number


def check_flag(name: str, value: Any, *, optional: bool = False) -> bool | None:
    """A flag: ``True``/``False`` (or a numpy bool), as a plain ``bool``; ``None`` passes when ``optional``.

    Raises:
        TypeError: for anything else: ``"no"``, ``0``, ``1``.
    """
    if value is None and optional:
        return None
    if not _is_bool(value):
        raise TypeError(_invalid(name, value, "None, True or False" if optional else "True or False"))
    return bool(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices`` (strings).

    Raises:
        TypeError: for a value that is not a string.
        ValueError: for a string that is not one of ``choices``.
    """
    expected = f"one of {tuple(choices)}"
    if not isinstance(value, str):
        raise TypeError(_invalid(name, value, expected))
    if value not in choices:
        raise ValueError(_invalid(name, value, expected))
    return str(value)


def check_str(name: str, value: Any) -> str:
    """A non-empty string.

    Raises:
        TypeError: for a value that is not a string.
        ValueError: for the empty string.
    """
    if not isinstance(value, str):
        raise TypeError(_invalid(name, value, "a non-empty string"))
    if not value:
        raise ValueError(_invalid(name, value, "a non-empty string"))
    return str(value)


def check_strings(name: str, value: Any) -> tuple[str, ...]:
    """A sequence of strings (not a single string, which would be read character by character), as a tuple.

    Raises:
        TypeError: for a string, a non-iterable, or an item that is not a string.
    """
    expected = "a sequence of strings, such as ('bias',)"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(_invalid(name, value, expected))
    items = tuple(value)
    if not all(isinstance(item, str) for item in items):
        raise TypeError(_invalid(name, value, expected))
    return items


def check_kernel_choice(foreach: Any, fused: Any) -> tuple[bool | None, bool]:
    """``foreach`` (``None``/bool) and ``fused`` (bool), which cannot both be ``True``.

    Raises:
        TypeError: for a non-bool flag.
        ValueError: for ``fused=True`` with ``foreach=True`` (the fused kernel replaces the multi-tensor one).
    """
    foreach_ = check_flag("foreach", foreach, optional=True)
    fused_ = check_flag("fused", fused)
    if fused_ and foreach_:
        raise ValueError(
            _invalid(
                "fused", fused, "fused=False with foreach=True: fused=True and foreach=True are mutually exclusive"
            )
        )
    return foreach_, bool(fused_)
