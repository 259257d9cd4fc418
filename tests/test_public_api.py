from __future__ import annotations

import types

import keel
import keel.errors


def test_all_lists_exactly_the_public_names() -> None:
    # Submodules become attributes of the package once anything imports them; they are not exports.
    public = {
        name
        for name, value in vars(keel).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType) and name != "annotations"
    }
    assert set(keel.__all__) - {"__version__"} == public


def test_every_error_is_a_keel_error_with_a_docstring() -> None:
    for name in dir(keel.errors):
        obj = getattr(keel.errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, keel.KeelError), name
            assert obj.__doc__, name


def test_version_is_a_string() -> None:
    assert isinstance(keel.__version__, str) and keel.__version__.count(".") == 2
