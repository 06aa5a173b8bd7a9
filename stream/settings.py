"""The one settings object: read from the environment (prefix ``SKETCHSTREAM_``) in this module
only, overridden by command-line flags, frozen once built.

>>> Settings(partitions=8).partitions
8
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ENV_PREFIX", "SecurityProtocol", "Settings", "load_settings"]

ENV_PREFIX = "SKETCHSTREAM_"

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"]


def _default_home() -> Path:
    return Path.home() / ".sketchstream"


class Settings(BaseSettings):
    """Everything an operator can configure. Each field reads ``SKETCHSTREAM_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # --- Kafka -------------------------------------------------------------------------------
    kafka: str | None = Field(
        default=None,
        description="Bootstrap servers (host:port,…); unset: the local broker, started on demand.",
    )
    kafka_port: int = Field(default=9092, ge=1, le=65535, description="Port of the local broker.")
    kafka_controller_port: int = Field(
        default=9093, ge=1, le=65535, description="Controller port of the local broker (KRaft)."
    )
    home: Path = Field(
        default_factory=_default_home,
        description="Per-user home: the local broker's jars, data and logs live under it.",
    )
    # --- topics ------------------------------------------------------------------------------
    topic_events: str = Field(default="events", description="Interaction events, keyed by user.")
    topic_predictions: str = Field(default="predictions", description="Engagement predictions.")
    topic_dlq: str = Field(default="events.dlq", description="Dead letters, with the reason.")
    topic_models: str = Field(
        default="sketchstream.models", description="Compacted topic of published model versions."
    )
    partitions: int = Field(default=4, ge=1, le=1024, description="Partitions per data topic.")
    replication_factor: int = Field(default=1, ge=1, description="Replication factor of topics.")
    # --- storage -----------------------------------------------------------------------------
    state_dir: Path = Field(
        default=Path("var/state"), description="RocksDB tables of the worker (per partition)."
    )
    artifact_dir: Path = Field(
        default=Path("var/artifacts"), description="Codebook and model artifacts."
    )
    data_dir: Path = Field(default=Path("data"), description="Converted data sets.")
    # --- worker ------------------------------------------------------------------------------
    app_id: str = Field(
        default="sketchstream",
        min_length=1,
        description="Worker application id: the consumer group and the prefix of its changelogs.",
    )
    web_port: int = Field(default=6066, ge=1, le=65535, description="Worker /health and /metrics.")
    batch_size: int = Field(
        default=2048,
        ge=1,
        description="Most events per worker batch: what one fetch brought, up to this many.",
    )
    torch_threads: int = Field(
        default=1,
        ge=1,
        description="Threads of the worker's MLP. One: scale out with more workers instead.",
    )
    # --- security, passed through to the Kafka clients ---------------------------------------
    security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT",
        description="Kafka security protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.",
    )
    sasl_mechanism: SaslMechanism | None = Field(
        default=None, description="SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, ...)."
    )
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: str | None = Field(
        default=None, repr=False, description="SASL password (never logged)."
    )
    ssl_cafile: Path | None = Field(default=None, description="CA bundle that signs the brokers.")
    ssl_certfile: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    ssl_keyfile: Path | None = Field(default=None, description="Client private key (mutual TLS).")

    @field_validator("kafka")
    @classmethod
    def _strip_empty(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @property
    def uses_local_broker(self) -> bool:
        """True when no bootstrap servers are configured and the local broker serves."""
        return self.kafka is None

    @property
    def bootstrap_servers(self) -> str:
        """The servers clients connect to: the configured ones, or the local broker's."""
        return self.kafka or f"127.0.0.1:{self.kafka_port}"

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka clients: servers plus the security pass-through."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        if self.security_protocol in ("SSL", "SASL_SSL"):
            import ssl

            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
                purpose=ssl.Purpose.SERVER_AUTH,
            )
        return kwargs


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with flag values (those not None) taking precedence."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
