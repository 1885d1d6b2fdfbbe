"""Settings: typed sections read once from TWINSTREAM_* variables, unknown names refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from twinstream.common.config import NOT_SETTINGS, Settings, SettingsError, TtlRule, env_fields, environment, markdown

REPO = Path(__file__).resolve().parents[3]


def test_defaults_need_no_environment() -> None:
    settings = Settings.from_env("indexing", {})
    assert settings.service == "indexing"
    assert settings.kafka.bootstrap == ("127.0.0.1:9092",)
    assert settings.consumer_group == "twinstream-indexing"
    assert settings.encoder.backend == "triton"
    assert settings.encoder.model_dirs == (Path("var/models/twinstream_text/1"),)
    assert settings.topics.all() == ["items.raw", "items.accepted", "items.embedded",
                                     "items.decisions", "items.dlq"]
    assert settings.retention.ttl_for("t", "c") == 0
    assert settings.server.instance_id  # the host name


def test_each_type_is_parsed_from_its_variable() -> None:
    settings = Settings.from_env("embedding", {
        "TWINSTREAM_KAFKA_BOOTSTRAP": "k1:9092, k2:9093",
        "TWINSTREAM_BATCH_SIZE": "8",
        "TWINSTREAM_LOOP_STALL_S": "2.5",
        "TWINSTREAM_LOG_LEVEL": "debug",
        "TWINSTREAM_ENCODER_BACKEND": "inprocess",
        "TWINSTREAM_MODEL_DIR": "/m/text/2,/m/image/1",
        "TWINSTREAM_DATA_DIR": "/data",
        "TWINSTREAM_CONSUMER_GROUP": "reembed",
        "TWINSTREAM_TOPIC_RAW": "tenant-a.raw",
    })
    assert settings.kafka.bootstrap == ("k1:9092", "k2:9093")
    assert settings.loop.batch_size == 8
    assert settings.loop.stall_s == 2.5
    assert settings.server.log_level == "DEBUG"
    assert settings.encoder.backend == "inprocess"
    assert settings.encoder.model_dirs == (Path("/m/text/2"), Path("/m/image/1"))
    assert settings.server.data_dir == Path("/data")
    assert settings.consumer_group == "reembed"
    assert settings.topics.raw == "tenant-a.raw"


@pytest.mark.parametrize(("name", "value", "reason"), [
    ("TWINSTREAM_BATCH_SIZE", "many", "valid integer"),
    ("TWINSTREAM_BATCH_SIZE", "0", "greater than 0"),
    ("TWINSTREAM_LOOP_STALL_S", "soon", "valid number"),
    ("TWINSTREAM_ENCODER_BACKEND", "onnx", "'triton' or 'inprocess'"),
    ("TWINSTREAM_LOG_LEVEL", "loud", "'INFO'"),
    ("TWINSTREAM_GRPC_PORT", "70000", "less than or equal to 65535"),
    ("TWINSTREAM_KAFKA_BOOTSTRAP", "kafka", "is not host:port"),
    ("TWINSTREAM_MODEL_DIR", " , ", "at least 1"),
    ("TWINSTREAM_COLLECTION_TTLS", "acme=60", "is not tenant/collection=seconds"),
    ("TWINSTREAM_TOPIC_DLQ", "items dead", "not a Kafka topic name"),
])
def test_a_bad_value_names_its_variable(name: str, value: str, reason: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env("ingestion", {name: value})
    assert f"{name}={value!r}" in str(caught.value)
    assert reason in str(caught.value)


def test_two_roles_on_one_topic_are_refused() -> None:
    with pytest.raises(SettingsError, match="topic names must differ"):
        Settings.from_env("ingestion", {"TWINSTREAM_TOPIC_DLQ": "items.raw"})


def test_an_unknown_variable_is_refused_with_the_closest_name() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env("matching", {"TWINSTREAM_KAFKA_BOOTSTARP": "k:9092",
                                       "TWINSTREAM_WHATEVER": "1"})
    message = str(caught.value)
    assert "TWINSTREAM_KAFKA_BOOTSTARP: unknown setting (did you mean TWINSTREAM_KAFKA_BOOTSTRAP?)" in message
    assert "TWINSTREAM_WHATEVER: unknown setting" in message


def test_other_programs_variables_are_not_settings_and_pass() -> None:
    environ = {name: "x" for name in NOT_SETTINGS} | {"PATH": "/bin", "TWINSTREAMX": "1"}
    assert Settings.from_env("indexing", environ) == Settings(service="indexing")


def test_the_secret_is_not_shown() -> None:
    settings = Settings.from_env("matching", {"TWINSTREAM_MILVUS_TOKEN": "root:hunter2"})
    assert settings.milvus.token.get_secret_value() == "root:hunter2"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings)
    assert "hunter2" not in settings.model_dump_json()


def test_ttl_rules_are_value_objects_most_specific_first() -> None:
    retention = Settings.from_env("indexing", {
        "TWINSTREAM_TTL_SECONDS": "100",
        "TWINSTREAM_COLLECTION_TTLS": "*/ephemeral=3, acme/*=50, acme/ephemeral=7"}).retention
    assert retention.ttl_rules() == [
        TtlRule(tenant="acme", collection="ephemeral", seconds=7),
        TtlRule(tenant="acme", collection="*", seconds=50),
        TtlRule(tenant="*", collection="ephemeral", seconds=3),
        TtlRule(tenant="*", collection="*", seconds=100)]
    assert retention.ttl_for("acme", "ephemeral") == 7
    assert retention.ttl_for("acme", "kept") == 50
    assert retention.ttl_for("other", "ephemeral") == 3
    assert retention.ttl_for("other", "kept") == 100


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.kafka.consumer_group = "other"


def test_replace_validates_and_keeps_the_rest() -> None:
    settings = Settings.from_env("embedding", {"TWINSTREAM_BATCH_SIZE": "8"})
    changed = settings.replace(kafka={"consumer_group": "g"})
    assert (changed.consumer_group, changed.loop.batch_size) == ("g", 8)
    assert settings.consumer_group == "twinstream-embedding"
    with pytest.raises(SettingsError, match="TWINSTREAM_BATCH_SIZE"):
        settings.replace(loop={"batch_size": -1})


def test_every_field_has_one_variable_and_environment_round_trips() -> None:
    settings = Settings.from_env("indexing", {
        "TWINSTREAM_KAFKA_BOOTSTRAP": "a:1,b:2", "TWINSTREAM_MILVUS_TOKEN": "t",
        "TWINSTREAM_COLLECTION_TTLS": "acme/x=5", "TWINSTREAM_MODEL_DIR": "/a,/b"})
    sections = {name: dict(getattr(settings, name)) for name in {s for s, _ in env_fields().values()}}
    env = environment(**sections)
    assert set(env) == set(env_fields())
    assert Settings.from_env("indexing", env) == settings


def test_environment_refuses_a_field_that_does_not_exist() -> None:
    with pytest.raises(KeyError, match=r"kafka\.bootstarp"):
        environment(kafka={"bootstarp": "a:1"})


def test_settings_reference_is_up_to_date() -> None:
    committed = (REPO / "docs" / "settings.md").read_text()
    assert committed == markdown(), (
        "docs/settings.md is stale: run `python -m twinstream.common.config --markdown > docs/settings.md`")
    for name in env_fields():
        assert f"`{name}`" in committed
