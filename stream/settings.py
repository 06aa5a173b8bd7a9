"""The one settings object: read from the environment (prefix ``SKETCHSTREAM_``) in this module
only, overridden by command-line flags, frozen once built.

>>> Settings(partitions=8).partitions
8
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ENV_PREFIX", "OnError", "SecurityProtocol", "Settings", "load_settings"]

ENV_PREFIX = "SKETCHSTREAM_"

#: What the worker does with an event whose processing raises: dead-letter it
#: (``processing_error``) and go on with its batch, or stop without committing (the batch is
#: read again after a restart). The same choices as :data:`sketchstream.stream.worker.OnError`
#: (not imported from there: reading settings must stay cheap, ``--help`` imports them).
OnError = Literal["dead_letter", "fail"]
Compression = Literal["none", "snappy", "lz4", "zstd", "gzip"]

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
    topic_recommend: str = Field(
        default="recommend",
        description="Top-k recommendation requests, keyed by user, partitioned as the events.",
    )
    topic_recommendations: str = Field(
        default="recommendations", description="Answers to recommendation requests, by user."
    )
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
        description="Threads of the worker's MLP (torch and BLAS); scale out with more workers.",
    )
    mlp_helper: bool = Field(
        default=True,
        description="Run each batch's MLP in a helper process, on another core, while the "
        "worker goes on with the next batch; its predictions are published when the scores are "
        "back. Off, or on one CPU: the worker scores on its own thread (one core per worker).",
    )
    max_event_bytes: int = Field(
        default=16384, ge=64, description="Larger events go to the dead-letter topic unparsed."
    )
    on_error: OnError = Field(
        default="dead_letter",
        description="An event whose processing raises: dead_letter (processing_error, the "
        "batch goes on) or fail (the worker stops, committing the batches before it, not that one; "
        "the batch is read again).",
    )
    recommend_on_event: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="Publish this many recommendations (top-k, 0: none) on the recommendations "
        "topic after events, unasked: per batch, one answer for each user with a scored event, "
        "from the state after the user's last one (the model must have a recommender).",
    )
    recommend_keep_seen: bool = Field(
        default=False,
        description="Recommendations published after events may include items the user has "
        "already interacted with (default: excluded, as a request's exclude_seen).",
    )
    standby_replicas: int = Field(
        default=1, ge=0, description="Standby copies of each state partition on other workers."
    )
    commit_interval: float = Field(
        default=1.0, gt=0, description="Seconds between commits of the processed offsets."
    )
    compression: Compression = Field(
        default="snappy",
        description="Compression of the record batches the worker writes (predictions, "
        "changelog, dead letters, answers). snappy: the JSON predictions about a fifth of "
        "their size, less broker CPU per event at no worker cost measured (README, "
        "Benchmarks); none: for consumers whose Kafka client has no snappy codec.",
    )
    fetch_max_wait: float = Field(
        default=0.1,
        gt=0,
        le=30.0,
        description="Seconds the broker may hold a fetch that finds nothing new. One fetch at a "
        "time goes to a broker, so a fetch of idle partitions (an empty recommend topic) held "
        "this long also holds the next events while the worker catches up (with faust's 1.5 s, "
        "a drain of 200,000 events sat ~0.8 s waiting on one such fetch).",
    )
    # --- group membership, health and stop (README "Failures" explains the choices) ---------
    group_instance_id: str | None = Field(
        default=None,
        min_length=1,
        description="Static group member id (KIP-345), one per worker (two workers under one id "
        "fence each other): restarted under it, a worker gets its partitions back at once. "
        "Unset: the app id, host name and a hash of the absolute state_dir and web_port (a "
        "member's web URL is part of its assignment: keep the port when you set this).",
    )
    session_timeout: float = Field(
        default=6.0,
        ge=1.0,
        description="Seconds without a heartbeat before the group gives a dead worker's "
        "partitions to the others (the broker's minimum, 6 by default, bounds it).",
    )
    heartbeat_interval: float = Field(
        default=1.5, gt=0, description="Seconds between heartbeats: at most a third of the above."
    )
    rebalance_timeout: float = Field(
        default=10.0,
        ge=1.0,
        description="Seconds the group waits for its members to rejoin during a rebalance.",
    )
    stall_timeout: float = Field(
        default=30.0,
        gt=0,
        description="/health says 503 when no batch has completed for this long while lag > 0.",
    )
    stop_timeout: float = Field(
        default=8.0,
        gt=0,
        description="Seconds a stop (SIGTERM) may take; then the worker exits 3 without "
        "committing (at-least-once: the rest is read again).",
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

    @model_validator(mode="after")
    def _heartbeat_within_session(self) -> Settings:
        if self.heartbeat_interval * 3 > self.session_timeout:
            raise ValueError(
                f"heartbeat_interval={self.heartbeat_interval} is more than a third of "
                f"session_timeout={self.session_timeout}: the group would take a live worker "
                f"for dead; lower SKETCHSTREAM_HEARTBEAT_INTERVAL or raise "
                f"SKETCHSTREAM_SESSION_TIMEOUT"
            )
        return self

    @property
    def member_id(self) -> str:
        """The static group member id: ``group_instance_id``, else one stable across restarts
        of this worker (same app id, host, state dir and web port) and unique per worker.

        The web port is part of it because faust's assignment carries each member's URL and a
        member rejoining under a static id gets its last assignment back unchanged: faust
        refuses one that names another URL (an assertion that kills the consumer's group
        coordination, so the worker would sit with no partitions). A restart on another port
        is a new member, then, and its old self's partitions move after ``session_timeout``.

        >>> Settings(app_id="a", state_dir="/s").member_id.startswith("a-")
        True
        """
        if self.group_instance_id:
            return self.group_instance_id
        import hashlib
        import socket

        worker = f"{self.state_dir.absolute()}\n{self.web_port}"
        where = hashlib.sha1(worker.encode()).hexdigest()[:10]
        return f"{self.app_id}-{socket.gethostname()}-{where}"

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
