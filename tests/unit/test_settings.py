from __future__ import annotations

from pathlib import Path

import pytest

from farm.errors import ConfigError
from farm.settings import Settings


def test_defaults_when_nothing_is_set() -> None:
    s = Settings.load(env={})
    assert s.broker_url is None and s.embedded
    assert s.home == Path.home() / ".farm"
    assert s.effective_broker_url == f"redis+socket://{s.home / 'run' / 'broker.sock'}"
    assert s.effective_store_url == (s.home / "store").resolve().as_uri()
    assert s.models_path == s.home / "models"


def test_environment_overrides_defaults_and_flags_override_environment(tmp_path: Path) -> None:
    env = {"FARM_HOME": str(tmp_path), "FARM_DEVICE": "cuda:1", "FARM_MAX_STEPS": "40",
           "FARM_BROKER_URL": "redis://h:6379/0", "FARM_HEARTBEAT_TTL": "30"}
    s = Settings.load(env=env)
    assert (s.home, s.device, s.max_steps, s.heartbeat_ttl) == (tmp_path, "cuda:1", 40, 30.0)
    assert not s.embedded and s.effective_broker_url == "redis://h:6379/0"
    flagged = Settings.load(env=env, device="cpu", max_steps=None)
    assert flagged.device == "cpu"          # a flag wins over the environment
    assert flagged.max_steps == 40          # a flag that was not given (None) changes nothing


def test_empty_environment_variable_means_unset(tmp_path: Path) -> None:
    s = Settings.load(env={"FARM_HOME": str(tmp_path), "FARM_BROKER_URL": ""})
    assert s.embedded


def test_bad_numbers_in_the_environment_name_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"FARM_MAX_STEPS must be an integer, got 'many'"):
        Settings.load(env={"FARM_MAX_STEPS": "many"})
    with pytest.raises(ConfigError, match="FARM_HEARTBEAT_TTL must be a number"):
        Settings.load(env={"FARM_HEARTBEAT_TTL": "soon"})


def test_inconsistent_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="heartbeat_ttl must be above heartbeat_interval"):
        Settings.load(env={"FARM_HEARTBEAT_TTL": "2", "FARM_HEARTBEAT_INTERVAL": "5"})
    with pytest.raises(ConfigError, match="max_steps must be positive"):
        Settings.load(env={}, max_steps=0)
    with pytest.raises(ConfigError, match="unknown setting"):
        Settings.load(env={}, colour="blue")


def test_a_long_home_moves_the_socket_somewhere_short(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 120)
    s = Settings.load(env={"FARM_HOME": str(deep)})
    assert len(str(s.broker_socket)) < 100
    assert s.broker_socket == Settings.load(env={"FARM_HOME": str(deep)}).broker_socket


def test_visibility_timeout_must_stay_above_the_longest_stage() -> None:
    from farm.limits import longest_stage, stage_seconds

    assert stage_seconds(30, 512, 512) == 150.0            # the floor (30 + 2 x 30 = 90)
    assert stage_seconds(30, 1024, 1024) == 30 + 2 * 30 * 4  # 1024² is four 512² units
    assert stage_seconds(150, 2048, 2048) == 30 + 2 * 150 * 16
    longest = longest_stage(150, 2048 * 2048, 8)
    assert Settings.load(env={}).visibility_timeout >= 1.25 * longest
    with pytest.raises(ConfigError, match=r"FARM_VISIBILITY_TIMEOUT must be at least 1.25 x "
                                          r"the longest stage's hard limit \(38430 s"):
        Settings.load(env={"FARM_VISIBILITY_TIMEOUT": "3600"})
    # lower caps make a shorter timeout safe
    small = {"FARM_VISIBILITY_TIMEOUT": "3600", "FARM_MAX_PIXELS": str(1024 * 1024),
             "FARM_MAX_IMAGES_PER_JOB": "1"}
    assert Settings.load(env=small).visibility_timeout == 3600


def test_stop_grace_defaults_to_kubernetes_and_must_be_positive() -> None:
    assert Settings.load(env={}).stop_grace == 30.0
    assert Settings.load(env={"FARM_STOP_GRACE": "25"}).stop_grace == 25.0
    assert Settings.load(env={"FARM_STOP_GRACE": "25"}, stop_grace=600.0).stop_grace == 600.0
    for bad in ("0", "-5", "nan"):
        with pytest.raises(ConfigError, match=r"^stop_grace must be positive seconds, got "):
            Settings.load(env={"FARM_STOP_GRACE": bad})
    with pytest.raises(ConfigError, match="FARM_STOP_GRACE must be a number, got 'soon'"):
        Settings.load(env={"FARM_STOP_GRACE": "soon"})
