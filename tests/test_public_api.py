from __future__ import annotations

import ast
import dataclasses
import enum
import importlib
import inspect
import sys
import types
import typing
from typing import TYPE_CHECKING

import pytest

import keel
import keel.errors
from keel.demo import DemoError
from keel.records import DELIVERY_PREFIX, parse_target
from keel.testing import WorkflowTester

if TYPE_CHECKING:
    from collections.abc import Iterator

    from keel.backends.base import TurnRecordRow


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


# --- Public read types (issue 10, item 7) ----------------------------------------------------------------------


def _type_checking_names(module: types.ModuleType) -> dict[str, object]:
    """The names ``module`` imports under ``if TYPE_CHECKING:``, imported for real, to resolve its annotations."""
    tree = ast.parse(inspect.getsource(module))
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom) and stmt.module:
                    source = importlib.import_module(stmt.module)
                    names.update({a.asname or a.name: getattr(source, a.name) for a in stmt.names})
    return names


def _hints(obj: object, module: types.ModuleType) -> dict[str, object]:
    namespace = {**_type_checking_names(module), **vars(module)}
    return typing.get_type_hints(obj, globalns=namespace, localns=namespace)


def _types_in(hint: object) -> Iterator[type]:
    if isinstance(hint, type) and not typing.get_args(hint):
        yield hint
    for arg in typing.get_args(hint):
        yield from _types_in(arg)
    origin = typing.get_origin(hint)
    if isinstance(origin, type):
        yield origin


def _backend_types_reachable_from(cls: type) -> list[str]:
    """Every keel.backends type a caller of ``cls``'s public methods and properties can be handed or must pass."""
    found: list[str] = []
    seen: set[type] = set()

    def visit(hint: object, where: str) -> None:
        for kind in _types_in(hint):
            if kind.__module__.startswith("keel.backends"):
                found.append(f"{where}: {kind.__module__}.{kind.__qualname__}")
            elif kind.__module__.startswith("keel") and dataclasses.is_dataclass(kind) and kind not in seen:
                seen.add(kind)  # a returned record: its fields cross the API too
                for field, field_hint in _hints(kind, sys.modules[kind.__module__]).items():
                    visit(field_hint, f"{where} -> {kind.__name__}.{field}")

    module = sys.modules[cls.__module__]
    for name, member in vars(cls).items():
        if name.startswith("_") and name not in ("__init__", "__aenter__"):
            continue
        function = member.fget if isinstance(member, property) else member
        if callable(function):
            for param, hint in _hints(function, module).items():
                visit(hint, f"{cls.__name__}.{name}({param})")
    return found


@pytest.mark.parametrize("cls", [keel.Client, keel.App, WorkflowTester], ids=lambda c: c.__name__)
def test_no_backend_row_type_crosses_the_public_api(cls: type) -> None:
    assert _backend_types_reachable_from(cls) == []


def test_the_check_sees_a_backend_type_where_there_is_one() -> None:
    class Leaky:
        def turns(self) -> list[TurnRecordRow]:
            raise NotImplementedError

    Leaky.__module__ = __name__
    assert _backend_types_reachable_from(Leaky) == [
        "Leaky.turns(return): keel.backends.base.TurnRecordRow",
    ]


def test_read_types_are_exported_and_their_outcomes_are_lower_case() -> None:
    assert {o.value for o in keel.TurnOutcome} == {"committed", "retry", "failed"}
    assert all(o.value == o.name == str(o) for o in keel.TurnOutcome)
    assert issubclass(keel.TurnOutcome, enum.StrEnum) and issubclass(keel.MessageStatus, enum.StrEnum)
    assert {f.name for f in dataclasses.fields(keel.TurnRecord)} >= {"instance", "outcome", "version_read"}
    assert {f.name for f in dataclasses.fields(keel.DeadLetter)} >= {"instance", "message_id", "error", "attempts"}
    assert typing.get_args(keel.Target) == (keel.WorkflowInstance, keel.HandlerDelivery)


# --- What a claim runs, typed (item 6) -------------------------------------------------------------------------


def test_a_delivery_is_parsed_and_formatted_in_one_place() -> None:
    delivery = keel.HandlerDelivery("notify", "e1")
    assert (delivery.workflow, delivery.workflow_id) == ("on/notify", "e1")
    assert parse_target(delivery.workflow, delivery.workflow_id) == delivery
    assert parse_target("loan", "42") == keel.WorkflowInstance("loan", "42")
    assert (str(delivery), str(keel.WorkflowInstance("loan", "42"))) == ("handler notify on event e1", "loan/42")
    assert DELIVERY_PREFIX == "on/"  # the engines' encoding, which the typed value maps to


# --- Errors (item 8) -------------------------------------------------------------------------------------------


def _keel_errors() -> list[type[keel.KeelError]]:
    found = [obj for obj in vars(keel.errors).values() if isinstance(obj, type) and issubclass(obj, keel.KeelError)]
    return [*found, DemoError]


def test_every_error_declares_its_own_code() -> None:
    errors = _keel_errors()
    assert len(errors) > 25
    undeclared = [cls.__name__ for cls in errors if "code" not in vars(cls)]
    assert undeclared == []
    codes = [cls.code for cls in errors]
    assert len(set(codes)) == len(codes), "two errors share a code"
    assert set(codes) == set(keel.ErrorCode)
    assert keel.WaitTimeoutError("loan/42", "m1", 1.0).code == "wait_timeout"
    assert keel.NonRetryable("no").code == "non_retryable"
    assert keel.TurnTimeoutError("the turn of loan/42", 1.0).code == "turn_timeout"
    assert "IdempotencyConflictError" in keel.__all__
    conflict = keel.IdempotencyConflictError("req-1", "m1", app="loans", workflow="loan", workflow_id="42")
    assert (conflict.code, conflict.instance, conflict.first_id) == ("idempotency_conflict", "loan/42", "m1")
    assert isinstance(conflict, ValueError)  # bad input, like a payload that does not validate


def test_lookup_errors_share_one_parent() -> None:
    lookups = [keel.UnknownWorkflowError, keel.MessageNotFoundError, keel.InstanceNotFoundError, keel.NotPausedError]
    for cls in lookups:
        assert issubclass(cls, keel.NotFoundError) and issubclass(cls, LookupError), cls
    assert {cls for cls in _keel_errors() if issubclass(cls, keel.NotFoundError)} == {keel.NotFoundError, *lookups}
