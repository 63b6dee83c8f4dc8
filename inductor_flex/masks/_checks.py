"""Argument checks shared by the mask constructors."""


def non_negative_int(function: str, name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{function}: {name} must be a non-negative int, got {value!r}")
    return value


def positive_int(function: str, name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{function}: {name} must be a positive int, got {value!r}")
    return value
