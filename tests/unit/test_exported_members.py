"""The public surface of ``distfork``: ``__all__`` and the exception tree (as httpx tests it)."""

from __future__ import annotations

import inspect

import pytest

import distfork
from distfork import errors


def test_all_is_sorted_and_unique() -> None:
    assert distfork.__all__ == sorted(distfork.__all__)
    assert len(set(distfork.__all__)) == len(distfork.__all__)


def test_every_name_in_all_exists() -> None:
    missing = [name for name in distfork.__all__ if not hasattr(distfork, name)]
    assert missing == []


def test_every_public_function_and_class_of_distfork_is_in_all() -> None:
    exported = set(distfork.__all__)
    public = {
        name
        for name, member in vars(distfork).items()
        if not name.startswith("_")
        and (inspect.isfunction(member) or inspect.isclass(member))
        and (member.__module__ == "distfork" or member.__module__.startswith("distfork."))
    }
    assert public, "found no public members: the check would be vacuous"
    assert sorted(public - exported) == []


def test_the_documented_entry_points_are_exported() -> None:
    for name in ("fork", "wait", "init", "options", "shutdown", "Future", "collect_all", "wait_all", "share", "Shared",
                 "trace", "Trace", "progress", "SlurmCluster"):
        assert name in distfork.__all__


def _error_classes() -> list[type[BaseException]]:
    return [
        member
        for _, member in inspect.getmembers(errors, inspect.isclass)
        if issubclass(member, BaseException) and member.__module__ == errors.__name__
    ]


def test_errors_all_lists_every_error_class_and_distfork_exports_them() -> None:
    names = sorted(cls.__name__ for cls in _error_classes())
    assert sorted(errors.__all__) == names
    assert errors.__all__ == sorted(errors.__all__)
    for name in names:
        assert getattr(distfork, name) is getattr(errors, name)


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_every_error_derives_from_distfork_error_except_remote_traceback(cls: type[BaseException]) -> None:
    if cls is errors.RemoteTraceback:
        assert not issubclass(cls, errors.DistforkError)
        assert issubclass(cls, Exception)
    else:
        assert issubclass(cls, errors.DistforkError)


def test_remote_traceback_prints_its_text() -> None:
    tb = errors.RemoteTraceback("Traceback in worker w (host h, pid 1):\n  boom")
    assert str(tb) == tb.tb == "Traceback in worker w (host h, pid 1):\n  boom"
