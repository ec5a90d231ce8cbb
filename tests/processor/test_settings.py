"""Settings: every missing S3 variable named at once, prefixes normalised, secrets never shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from processor.errors import SettingsError
from processor.settings import load_s3_settings, load_worker_settings, normalise_prefix

S3_REQUIRED = (
    "COMFYS3_S3_REGION",
    "COMFYS3_S3_ACCESS_KEY",
    "COMFYS3_S3_SECRET_KEY",
    "COMFYS3_S3_BUCKET_NAME",
    "COMFYS3_S3_ENDPOINT_URL",
)
SECRET = "s3cr3t-VALUE-that-must-never-leak"
ACCESS_KEY = "AKIA-ACCESS-KEY-VALUE"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start each test with no COMFYS3_* variable, whatever the developer's shell exports."""
    for name in list(os.environ):
        if name.startswith("COMFYS3_"):
            monkeypatch.delenv(name)


def set_complete_s3(monkeypatch: pytest.MonkeyPatch, **overrides: str) -> None:
    values = {
        "COMFYS3_S3_REGION": "us-east-1",
        "COMFYS3_S3_ACCESS_KEY": ACCESS_KEY,
        "COMFYS3_S3_SECRET_KEY": SECRET,
        "COMFYS3_S3_BUCKET_NAME": "jobs",
        "COMFYS3_S3_ENDPOINT_URL": "http://127.0.0.1:9000/",
        **overrides,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_no_s3_variables_names_all_five_in_one_message() -> None:
    with pytest.raises(SettingsError) as caught:
        load_s3_settings()
    message = str(caught.value)
    for name in S3_REQUIRED:
        assert name in message
    # One line lists them all, so a single fix round is enough.
    missing_lines = [line for line in message.splitlines() if "missing" in line]
    assert len(missing_lines) == 1
    assert all(name in missing_lines[0] for name in S3_REQUIRED)


@pytest.mark.parametrize(
    "present",
    [
        ("COMFYS3_S3_REGION",),
        ("COMFYS3_S3_REGION", "COMFYS3_S3_BUCKET_NAME"),
        ("COMFYS3_S3_ACCESS_KEY", "COMFYS3_S3_SECRET_KEY", "COMFYS3_S3_ENDPOINT_URL"),
        S3_REQUIRED[:-1],
    ],
)
def test_partial_s3_variables_name_only_the_missing(
    monkeypatch: pytest.MonkeyPatch, present: tuple[str, ...]
) -> None:
    values = {
        "COMFYS3_S3_REGION": "eu-west-1",
        "COMFYS3_S3_ACCESS_KEY": ACCESS_KEY,
        "COMFYS3_S3_SECRET_KEY": SECRET,
        "COMFYS3_S3_BUCKET_NAME": "jobs",
        "COMFYS3_S3_ENDPOINT_URL": "https://s3.example.com",
    }
    for name in present:
        monkeypatch.setenv(name, values[name])
    with pytest.raises(SettingsError) as caught:
        load_s3_settings()
    message = str(caught.value)
    for name in S3_REQUIRED:
        assert (name in message) == (name not in present), name
    assert SECRET not in message


def test_empty_variable_counts_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compose file passing through an unset host variable yields ``NAME=``."""
    set_complete_s3(monkeypatch, COMFYS3_S3_BUCKET_NAME="")
    with pytest.raises(SettingsError, match="COMFYS3_S3_BUCKET_NAME"):
        load_s3_settings()


def test_complete_settings_have_defaults_and_clean_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_complete_s3(monkeypatch)
    settings = load_s3_settings()
    assert settings.input_dir == "input"
    assert settings.output_dir == "output"
    assert settings.endpoint_url == "http://127.0.0.1:9000"
    assert settings.bucket_name == "jobs"
    assert settings.secret_key.get_secret_value() == SECRET
    assert settings.access_key.get_secret_value() == ACCESS_KEY


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a//b/", "a/b"),
        ("jobs/in", "jobs/in"),
        ("  /x/  ", "x"),
        ("a///b///c", "a/b/c"),
    ],
)
def test_prefixes_are_normalised(monkeypatch: pytest.MonkeyPatch, raw: str, expected: str) -> None:
    assert normalise_prefix(raw) == expected
    set_complete_s3(monkeypatch, COMFYS3_S3_INPUT_DIR=raw, COMFYS3_S3_OUTPUT_DIR=raw)
    settings = load_s3_settings()
    assert settings.input_dir == expected
    assert settings.output_dir == expected


def test_bucket_root_prefix_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    set_complete_s3(monkeypatch, COMFYS3_S3_OUTPUT_DIR="//")
    with pytest.raises(SettingsError) as caught:
        load_s3_settings()
    assert "COMFYS3_S3_OUTPUT_DIR" in str(caught.value)
    assert "bucket root" in str(caught.value)


def test_secrets_never_in_repr_or_str(monkeypatch: pytest.MonkeyPatch) -> None:
    set_complete_s3(monkeypatch)
    settings = load_s3_settings()
    for text in (repr(settings), str(settings), str(settings.model_dump())):
        assert SECRET not in text
        assert ACCESS_KEY not in text


def test_secrets_never_in_error_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    set_complete_s3(
        monkeypatch, COMFYS3_S3_ENDPOINT_URL="ftp://bad.example", COMFYS3_S3_RETRY_ATTEMPTS="0"
    )
    monkeypatch.delenv("COMFYS3_S3_REGION")
    with pytest.raises(SettingsError) as caught:
        load_s3_settings()
    error = caught.value
    message = str(error)
    assert "COMFYS3_S3_ENDPOINT_URL" in message
    assert "http://" in message
    assert "COMFYS3_S3_RETRY_ATTEMPTS" in message
    assert "COMFYS3_S3_REGION" in message
    for text in (message, repr(error)):
        assert SECRET not in text
        assert ACCESS_KEY not in text
    # Raised "from None": no pydantic error (which may hold input values) rides along.
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_worker_settings_need_no_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_worker_settings()
    assert settings.jobs.max_manifest_bytes == 1_048_576
    assert settings.jobs.allow_raw_workflows is False
    assert settings.jobs.workflows_dir is None


def test_worker_settings_read_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COMFYS3_MAX_MANIFEST_BYTES", "2048")
    monkeypatch.setenv("COMFYS3_ALLOW_RAW_WORKFLOWS", "true")
    monkeypatch.setenv("COMFYS3_WORKFLOWS_DIR", str(tmp_path))
    settings = load_worker_settings()
    assert settings.jobs.max_manifest_bytes == 2048
    assert settings.jobs.allow_raw_workflows is True
    assert settings.jobs.workflows_dir == tmp_path


def test_bad_worker_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFYS3_MAX_MANIFEST_BYTES", "12")
    monkeypatch.setenv("COMFYS3_JOB_TIMEOUT", "soon")
    with pytest.raises(SettingsError) as caught:
        load_worker_settings()
    message = str(caught.value)
    assert "COMFYS3_MAX_MANIFEST_BYTES" in message
    assert "1024" in message
    assert "COMFYS3_JOB_TIMEOUT" in message
