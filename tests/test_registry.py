"""The shared name -> factory registry used by divergences, tasks and strategies."""

from __future__ import annotations

import pytest

from mirrorlab.registry import Registry, UnknownNameError


def test_register_get_and_names() -> None:
    reg: Registry[tuple] = Registry("widget")

    @reg.register("pair")
    def pair(a: int, b: int = 2) -> tuple:
        return (a, b)

    reg.register("single", lambda a: (a,))
    assert reg.names() == ["pair", "single"]
    assert "pair" in reg and "nope" not in reg
    assert reg.get("pair", a=1) == (1, 2)
    assert reg.get("single", a=5) == (5,)


def test_unknown_name_lists_allowed() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("one", lambda: 1)
    with pytest.raises(UnknownNameError, match=r"unknown widget 'two'; allowed: one"):
        reg.get("two")


def test_bad_keyword_names_family_and_entry() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("one", lambda: 1)
    with pytest.raises(TypeError, match="widget 'one'"):
        reg.get("one", colour="red")


def test_duplicate_registration_needs_overwrite() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("one", lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("one", lambda: 2)
    reg.register("one", lambda: 3, overwrite=True)
    assert reg.get("one") == 3
