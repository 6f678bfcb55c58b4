"""Config: defaults, DISTFORK_* variables with their types, overrides on top."""

from __future__ import annotations

import dataclasses

import pytest

from distfork import config
from distfork.config import Config


def test_defaults_without_variables() -> None:
    assert Config.from_env({}) == Config()


def test_variables_are_read_with_their_field_types() -> None:
    cfg = Config.from_env(
        {
            "DISTFORK_HEARTBEAT_S": "0.25",
            "DISTFORK_LIVENESS": "7",
            "DISTFORK_MAX_RETRIES": "0",
            "DISTFORK_OOB_THRESHOLD_BYTES": "4096",
            "DISTFORK_PREFETCH_S": "1e-3",
            "DISTFORK_UNRELATED": "ignored",
            "HEARTBEAT_S": "99",  # no prefix: not ours
        }
    )
    assert cfg.heartbeat_s == 0.25 and type(cfg.heartbeat_s) is float
    assert cfg.liveness == 7 and type(cfg.liveness) is int
    assert cfg.max_retries == 0
    assert cfg.oob_threshold_bytes == 4096
    assert cfg.prefetch_s == 0.001
    assert cfg.peer_timeout_s == pytest.approx(0.25 * 7)
    assert cfg.slots == Config().slots  # untouched fields keep their defaults


def test_every_field_has_a_distfork_variable() -> None:
    env = {}
    expected = dataclasses.asdict(Config())
    for i, field in enumerate(dataclasses.fields(Config)):
        if type(field.default) not in (int, float):
            continue
        value = field.default + (i + 1)  # a different value for each numeric field
        env["DISTFORK_" + field.name.upper()] = str(value)
        expected[field.name] = value
    assert len(env) >= 10
    assert dataclasses.asdict(Config.from_env(env)) == expected


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("DISTFORK_HEARTBEAT_S", "fast"),
        ("DISTFORK_LIVENESS", "2.5"),  # an int field
        ("DISTFORK_MAX_RETRIES", ""),
        ("DISTFORK_SLOTS", "two"),
    ],
)
def test_a_bad_value_raises_value_error_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ValueError) as info:
        Config.from_env({name: raw})
    assert f"{name}={raw!r}" in str(info.value)


def test_overrides_win_over_variables_and_defaults() -> None:
    cfg = Config.from_env({"DISTFORK_HEARTBEAT_S": "0.5", "DISTFORK_LIVENESS": "9"}, heartbeat_s=0.1, slots=3)
    assert cfg.heartbeat_s == 0.1
    assert cfg.slots == 3
    assert cfg.liveness == 9


def test_a_bad_variable_is_an_error_even_with_overrides_of_other_fields() -> None:
    with pytest.raises(ValueError, match="DISTFORK_LIVENESS"):
        Config.from_env({"DISTFORK_LIVENESS": "x"}, heartbeat_s=0.1)


def test_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTFORK_HEARTBEAT_S", "0.125")
    monkeypatch.setenv("DISTFORK_WINDOW", "17")
    assert Config.from_env().heartbeat_s == 0.125
    cfg = config.load(window=5)
    assert cfg.heartbeat_s == 0.125
    assert cfg.window == 5


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().heartbeat_s = 2.0  # type: ignore[misc]
