"""The SQS and dispatch settings: only required where used, every missing variable named,
defaults that follow the S3 settings; and RunPod's Retry-After read either way it is sent."""

from __future__ import annotations

import email.utils
import time

import pytest

from processor.errors import SettingsError
from processor.settings import load_dispatch_settings, load_sqs_settings
from triggers.events.runpod_api import _retry_after

VARIABLES = (
    "COMFYS3_SQS_QUEUE_URL",
    "COMFYS3_SQS_ENDPOINT_URL",
    "COMFYS3_SQS_REGION",
    "COMFYS3_RUNPOD_ENDPOINT_ID",
    "COMFYS3_RUNPOD_API_URL",
    "RUNPOD_API_KEY",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def test_missing_variables_are_named_in_one_message(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as sqs:
        load_sqs_settings()
    assert str(sqs.value) == "SQS settings: missing environment variable(s): COMFYS3_SQS_QUEUE_URL"
    monkeypatch.setenv("COMFYS3_RUNPOD_ENDPOINT_ID", "")  # empty counts as missing
    with pytest.raises(SettingsError) as dispatch:
        load_dispatch_settings()
    assert str(dispatch.value) == (
        "dispatch settings: missing environment variable(s): "
        "COMFYS3_RUNPOD_ENDPOINT_ID, RUNPOD_API_KEY"
    )


def test_the_endpoint_defaults_to_the_queue_urls_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "COMFYS3_SQS_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/111122223333/jobs/"
    )
    settings = load_sqs_settings()
    assert settings.queue_url == "https://sqs.eu-west-1.amazonaws.com/111122223333/jobs"
    assert settings.resolved_endpoint() == "https://sqs.eu-west-1.amazonaws.com"
    assert settings.region is None  # the S3 region is used
    monkeypatch.setenv("COMFYS3_SQS_ENDPOINT_URL", "http://127.0.0.1:9324")
    assert load_sqs_settings().resolved_endpoint() == "http://127.0.0.1:9324"


def test_bad_values_are_explained_without_echoing_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COMFYS3_SQS_QUEUE_URL", "sqs/jobs")
    with pytest.raises(SettingsError, match="COMFYS3_SQS_QUEUE_URL: must be an http"):
        load_sqs_settings()
    monkeypatch.setenv("RUNPOD_API_KEY", "secret-value-123")
    monkeypatch.setenv("COMFYS3_RUNPOD_ENDPOINT_ID", "abc/../x")
    with pytest.raises(SettingsError) as raised:
        load_dispatch_settings()
    assert "COMFYS3_RUNPOD_ENDPOINT_ID: must be the endpoint id" in str(raised.value)
    assert "secret-value-123" not in str(raised.value)
    monkeypatch.setenv("COMFYS3_RUNPOD_ENDPOINT_ID", "abc123")
    settings = load_dispatch_settings()
    assert settings.runpod_api_url == "https://api.runpod.ai"
    assert "secret-value-123" not in repr(settings)


def test_retry_after_as_seconds_or_a_date_and_capped() -> None:
    assert _retry_after("2") == 2.0
    assert _retry_after("0.5") == 0.5
    assert _retry_after("86400") == 60.0
    assert _retry_after("-3") == 0.0
    later = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= (_retry_after(later) or 0) <= 10
    assert _retry_after("soon") is None
    assert _retry_after("nan") is None
    assert _retry_after(None) is None
