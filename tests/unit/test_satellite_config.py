"""Core settings: where the DSN comes from, failover URLs, and that the password never shows."""

from __future__ import annotations

import pytest

from poller.errors import ConfigError
from satellite.config import CoreSettings, load_core_settings

SECRET = "s3cr3t-p@ss/word"
DSN = "amqp://core:s3cr3t-p%40ss%2Fword@rabbit-a:5672/%2F,amqp://core:s3cr3t-p%40ss%2Fword@rabbit-b/prod"


def test_dsn_is_read_from_the_environment() -> None:
    settings = load_core_settings(environ={"US_AMQP_DSN": DSN})
    assert [url.host for url in settings.urls] == ["rabbit-a", "rabbit-b"]
    assert settings.username == "core"


def test_dsn_argument_wins_over_the_environment() -> None:
    settings = load_core_settings("amqp://u:p@other:5673/v", environ={"US_AMQP_DSN": DSN})
    assert [(url.host, url.port, url.vhost) for url in settings.urls] == [("other", 5673, "v")]


def test_missing_dsn_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^US_AMQP_DSN: is required"):
        load_core_settings(environ={})


def test_invalid_dsn_is_reported_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as info:
        load_core_settings(f"http://u:{SECRET}@host/", environ={})
    assert str(info.value).startswith("--dsn: URL 1 must start with amqp://")
    assert SECRET not in str(info.value)


def test_mixed_schemes_are_refused() -> None:
    with pytest.raises(ConfigError, match="mixes amqp:// and amqps://"):
        load_core_settings("amqp://a/,amqps://b/", environ={})


def test_timeouts_are_bounded() -> None:
    with pytest.raises(ConfigError, match="--connect-timeout"):
        load_core_settings(DSN, connect_timeout=0, environ={})
    settings = load_core_settings(DSN, connect_timeout=3, operation_timeout=2, environ={})
    assert (settings.connect_timeout, settings.connect_retry_timeout) == (3, 3)
    assert settings.operation_timeout == 2
    long = load_core_settings(DSN, connect_timeout=60, environ={})
    assert (long.connect_timeout, long.connect_retry_timeout) == (10, 60)


def test_password_is_masked_in_every_rendering() -> None:
    settings = CoreSettings.from_dsn(DSN)
    assert SECRET not in repr(settings)
    assert SECRET not in settings.masked_dsn
    assert settings.masked_dsn.startswith("amqp://core:***@rabbit-a:5672/%2F,")


def test_kombu_urls_quote_user_password_and_vhost() -> None:
    settings = CoreSettings.from_dsn("amqp://us%3Aer:p%40ss@h:5672/a%2Fb,amqp://u:p@[::1]/")
    assert settings.kombu_urls() == [
        "amqp://us%3Aer:p%40ss@h:5672/a%2Fb",
        "amqp://u:p@[::1]:5672/%2F",
    ]
    assert settings.ssl_context() is None


def test_amqps_gets_a_verifying_tls_context() -> None:
    context = CoreSettings.from_dsn("amqps://u:p@h/").ssl_context()
    assert context is not None
    assert context.check_hostname
