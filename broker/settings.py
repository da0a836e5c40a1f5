"""Configuration from SCANONCE_* environment variables, with embedded defaults.

The embedded default needs nothing but a data directory: the index is a SQLite file and
the objects a local folder under it. Production points the same settings at PostgreSQL
and S3.
"""

from __future__ import annotations

import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from broker.errors import InvalidSetting, Unavailable

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


class SmartEhr(BaseModel):
    """One EHR registered for SMART App Launch (see `Settings.smart_ehrs`)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silent default

    client_id: str = Field(
        default="scanonce", description="The broker's client_id at the EHR's authorization server."
    )
    client_secret: str | None = Field(
        default=None, description="Set for a confidential client (PKCE either way)."
    )
    facility: str | None = Field(
        default=None,
        description="The facility of the EHR's users (their session's facility); unset: default_facility.",
    )
    role: Literal["clinician", "radiologist"] = Field(
        default="clinician",
        description="The ScanOnce role of every user launched from this EHR (never one its tokens assert).",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCANONCE_", extra="ignore")

    data_dir: Path = Field(default=Path("./data"), description="Where the embedded default keeps its files.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite under data_dir."
    )
    migrate_on_start: bool | None = Field(
        default=None,
        description=(
            "Upgrade the database schema when a node starts. Default: on for SQLite (one process owns "
            "it), off for PostgreSQL, where `scanonce db upgrade` (a migration Job) runs it once and a "
            "node on an older schema refuses to start, naming that command."
        ),
    )
    readyz_requires_store: bool = Field(
        default=True,
        description=(
            "`/readyz` answers 503 (not ready) while the object store is unreachable, as it does while "
            "the database is. Set false on several nodes sharing one bucket (infra/ does): a store "
            "fault is then reported as 200 `degraded`, nodes stay in the balancer and keep answering "
            "the queries the index answers alone, while storing and retrieving answer 503."
        ),
    )
    db_start_wait_seconds: float | None = Field(
        default=None,
        gt=0,
        description=(
            "How long a starting node (`scanonce serve`, `scanonce worker`, `uvicorn --factory "
            "broker.app:app_from_env`) waits for a database that refuses connections before it gives "
            "up in one line naming this setting (exit 1; the factory exits 3). Unset: it waits until "
            "the database answers."
        ),
    )
    db_connect_timeout_seconds: float = Field(
        default=10,
        gt=0,
        description=(
            "Seconds a new PostgreSQL connection may take before it fails; a node that cannot connect "
            "at start says so, naming SCANONCE_DATABASE_URL, and retries."
        ),
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description=(
            "`json`: one JSON object per log line (time, level, logger, message, request_id), for log "
            "collectors; `text`: plain lines. Neither carries patient data."
        ),
    )
    storage_url: str | None = Field(
        default=None, description="file:///path or s3://bucket?endpoint_url=...; default: data_dir/objects."
    )
    storage_sync: Literal["fsync", "syncfs"] = Field(
        default="fsync",
        description=(
            "How a local object folder makes a group of C-STOREs (or a STOW-RS batch) durable before "
            "it is indexed. `fsync`: each object and each directory that gained one, on a small "
            "thread pool. `syncfs`: Linux syncfs(2) of the folder's whole filesystem twice per group "
            "(bytes, then names), fewer thread hand-offs, but it also writes back every other "
            "program's pending writes on that filesystem, so a busy shared disk slows each group. "
            "Falls back to `fsync` where syncfs is missing. A `?sync=` on a file:// storage URL wins."
        ),
    )
    host: str = Field(
        default="127.0.0.1",
        description="HTTP (and DIMSE, MLLP) bind address; beyond loopback only with auth on.",
    )
    port: int = Field(default=8042, ge=0, le=65535, description="HTTP port of `scanonce serve`.")
    base_url: str | None = Field(
        default=None, description="Public origin used in RetrieveURL; default: request's."
    )
    dimse_port: int = Field(
        default=11112, ge=0, le=65535, description="DIMSE port of `scanonce serve` (0: off)."
    )
    mllp_port: int = Field(
        default=2575,
        ge=0,
        le=65535,
        description="HL7 v2 MLLP port of the ADT identity feed (IHE ITI-8) under `scanonce serve` (0: off).",
    )
    mllp_processing_ids: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["P"],
        description=(
            "The HL7 processing IDs (MSH-11, table 0103: P production, T training, D debugging) the "
            "ADT feed applies, comma separated; a message with another is refused (AR, or CR in "
            "enhanced mode; ERR code 202, 101 when MSH-11 is empty) and changes nothing. Default P: "
            "a test or training system's messages never reach a production index; a staging broker "
            "fed by a test system sets `T` (or `P,T`)."
        ),
    )
    ae_title: str = Field(
        default="SCANONCE",
        description="This node's AE title; associations calling another AE title are rejected.",
    )
    dimse_request_timeout: float = Field(
        default=20,
        gt=0,
        description=(
            "Seconds a DIMSE peer has from connecting to send its whole A-ASSOCIATE-RQ, and to finish "
            "any PDU once it has begun; a stalled or trickling peer is disconnected."
        ),
    )
    dimse_max_connections_per_address: int = Field(
        default=16,
        ge=0,
        description="DIMSE connections one IP address may hold open at once; more are closed (0: no cap).",
    )
    dimse_max_associations: int = Field(
        default=32,
        ge=1,
        description="Associations the DIMSE SCP serves at once; more are rejected (transient).",
    )
    dimse_receivers: int = Field(
        default=0,
        ge=0,
        description=(
            "Extra DIMSE receiver processes `scanonce serve` starts on the DIMSE port beside its own "
            "listener (SO_REUSEPORT; the kernel spreads connections over them); each receives, hashes "
            "and parses C-STOREs itself, and one that dies is restarted. On PostgreSQL each receiver "
            "also indexes them; on SQLite (one writer) it hands them to the serving process's ingest "
            "writer and answers once that has committed them. 0: the serving process alone."
        ),
    )
    ingest_group_wait_ms: float = Field(
        default=4.0,
        ge=0,
        le=100,
        description=(
            "How long the ingest writer waits, at most, for instances still being received on other "
            "associations to join the group it commits (one transaction and one fsync for all); like "
            "PostgreSQL's commit_delay. 0: commit whatever is waiting at once. A lone association "
            "never waits."
        ),
    )
    dimse_fast_store: bool = Field(
        default=True,
        description=(
            "Receive each C-STORE-RQ whose command set is plain (the usual case) in the connection's "
            "reading thread, straight into its spool file, instead of through pynetdicom's message "
            "objects and a hand-over to another thread: the same checks, handlers, statuses and "
            "response, less CPU per instance. Anything unusual goes through pynetdicom either way. "
            "false: every message through pynetdicom."
        ),
    )
    dimse_open_mode: bool = Field(
        default=True,
        description=(
            "Accept associations from any calling AE title (as the default facility). Only while the "
            "DIMSE listener binds loopback: `scanonce serve` refuses to start with it on any other "
            "address; set it false and register each facility's calling AE titles with their "
            "networks (`scanonce facility update F --calling-ae TITLE@CIDR`)."
        ),
    )
    dimse_tls_cert_file: Path | None = Field(
        default=None,
        description=(
            "PEM certificate (chain) of the DIMSE listener: set with dimse_tls_key_file, the listener "
            "speaks DICOM TLS (PS3.15 B.1) only; unset, plain TCP."
        ),
    )
    dimse_tls_key_file: Path | None = Field(
        default=None, description="PEM private key of dimse_tls_cert_file."
    )
    dimse_tls_ca_file: Path | None = Field(
        default=None,
        description=(
            "PEM CA certificates that sign the peers' client certificates: set, a DIMSE peer must "
            "present a valid certificate from one of them (mutual TLS); it also verifies the "
            "archives the broker calls over TLS as an SCU."
        ),
    )
    dimse_tls_outbound: bool = Field(
        default=False,
        description=(
            "Call facility archives over DICOM TLS as an SCU (C-FIND/C-MOVE/C-GET/C-STORE), with "
            "dimse_tls_cert_file/key_file as the client certificate and dimse_tls_ca_file to verify."
        ),
    )
    outbound_allow_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description=(
            "Networks (CIDR, comma separated) the broker may connect to on a caller's behalf: facility "
            "archives (DICOMweb and DIMSE), an EHR's FHIR server named in a CDS Hooks request, token "
            "issuers' JWKS. Checked when a target is registered and on the resolved address at "
            "every connection (DNS rebinding). Default: loopback only."
        ),
    )
    default_facility: str = Field(
        default="local", description="The facility this broker's own archive is (created on first start)."
    )
    break_glass_max_minutes: int = Field(
        default=60,
        ge=1,
        le=24 * 60,
        description="The longest a break-the-glass (emergency read) grant may last, in minutes.",
    )
    default_issuer: str = Field(
        default="LOCAL", description="The issuer of Patient IDs of the default facility."
    )
    sync_interval_seconds: float = Field(
        default=3600, ge=0, description="How often facilities are re-indexed by `scanonce serve` (0: never)."
    )
    job_retention_days: float = Field(
        default=30,
        ge=0,
        description=(
            "Days finished jobs are kept (0: forever); the newest of each kind and subject is always kept."
        ),
    )
    job_lease_seconds: float = Field(
        default=60,
        gt=0,
        description=(
            "How long a worker's claim on a job lasts past its last heartbeat; the worker renews it 4 "
            "times per lease, a job run in the foreground by a CLI command every 5 s (so keep it at 15 s "
            "or more). A killed worker's job is taken over by another after this."
        ),
    )
    job_max_attempts: int = Field(
        default=5,
        ge=1,
        description=(
            "Claims a job gets before it fails for good: transient failures (database, object store "
            "or facility unreachable) and workers killed mid-job each use one."
        ),
    )
    job_retry_backoff_seconds: float = Field(
        default=30,
        ge=0,
        description=(
            "Wait before retrying a job after a transient failure; doubled on each attempt (capped at 64x)."
        ),
    )
    qido_default_limit: int = Field(
        default=100, ge=1, description="QIDO-RS results per page when `limit` is not given."
    )
    qido_max_limit: int = Field(default=1000, ge=1, description="Largest QIDO-RS `limit` accepted.")
    ingest_processes: int = Field(
        default=0,
        ge=-1,
        description=(
            "Worker processes that parse received instances (0: parse in-process; -1: one per core "
            "beside the serving process, what `scanonce serve` uses unless this is set)."
        ),
    )
    max_part_bytes: int = Field(
        default=4 * 1024**3,
        ge=1,
        description="Largest single part (instance) of a STOW-RS request, in bytes.",
    )
    reap_grace_seconds: float = Field(
        default=3600,
        ge=0,
        description=(
            "Age after which crash residue is removed: spool files, and stored objects no index row "
            "names (younger ones may belong to an ingest still under way)."
        ),
    )
    reap_interval_seconds: float = Field(
        default=6 * 3600,
        ge=0,
        description="How often `scanonce serve` looks for crash residue after start-up (0: only then).",
    )
    stow_max_request_bytes: int = Field(
        default=4 * 1024**3,
        ge=1,
        description="Largest STOW-RS request body in bytes; a larger one is refused whole (413).",
    )
    stow_max_parts: int = Field(
        default=10_000,
        ge=1,
        description="Most parts in one STOW-RS request; a request with more is refused whole (413).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Origins whose browser pages (a viewer served elsewhere) may call the HTTP API, comma "
            "separated; `*` for any. Empty (the default): no CORS headers at all."
        ),
    )

    viewer_dir: Path | None = Field(
        default=None,
        description=(
            "Where `scanonce web install` puts the browser assets the broker serves (the OHIF viewer, "
            "Swagger UI); default: .cache/web in the source tree."
        ),
    )

    auth_enabled: bool = Field(
        default=True,
        description=(
            "Require a bearer token (or a signed-in page session) on every HTTP interface but the "
            "exempt ones (/healthz, /readyz, CDS Hooks discovery, FHIR metadata, discovery documents). "
            "Off is for loopback-only development and benchmarks: `scanonce serve` refuses to bind "
            "beyond loopback with it off, the uvicorn factory unless auth_off_accepted."
        ),
    )
    auth_off_accepted: bool = Field(
        default=False,
        description=(
            "The operator's word that the HTTP server binds loopback only, for authentication off "
            "under `uvicorn --factory broker.app:app_from_env`: uvicorn binds with its own --host, "
            "which the factory cannot see, so with auth off it refuses to start unless this is true. "
            "`scanonce serve` checks its own address and ignores this."
        ),
    )
    audit_enabled: bool = Field(
        default=True,
        description=(
            "Record every access to patient data in the hash-chained audit trail (scanonce audit "
            "verify); a request whose event cannot be recorded gets 503. Off only to measure what "
            "auditing costs (bench/audit.py)."
        ),
    )
    auth_signing_key_file: Path | None = Field(
        default=None,
        description=(
            "The embedded issuer's ES256 private key (JWK JSON); generated on first start when "
            "missing. Default: data_dir/auth-signing-key.json."
        ),
    )
    auth_issuer: str = Field(
        default="scanonce",
        description="The `iss` of tokens the broker mints itself (`scanonce token create`, page sessions).",
    )
    auth_audience: str = Field(
        default="scanonce",
        description="The `aud` every accepted token must carry (the broker's own and external issuers').",
    )
    auth_trusted_issuers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "External OpenID Connect issuers whose tokens are accepted, comma separated; their keys "
            "are found through `<issuer>/.well-known/openid-configuration` (jwks_uri) and cached."
        ),
    )
    auth_algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["ES256", "ES384", "RS256", "RS384"],  # CDS Hooks names ES384, RS384
        description="Signing algorithms accepted on tokens, comma separated (never `none`, never HMAC).",
    )
    auth_role_claim: str = Field(
        default="role",
        description="The claim of an external issuer's token that names the caller's ScanOnce role.",
    )
    auth_facility_claim: str = Field(
        default="facility",
        description="The claim of a token that names the caller's facility (facility scope).",
    )

    auth_oidc_issuer: str | None = Field(
        default=None,
        description=(
            "The OpenID Connect provider the pages sign in with (authorization code flow with PKCE); "
            "its ID tokens must carry the role claim. Unset: only the loopback development sign-in."
        ),
    )
    auth_oidc_client_id: str = Field(
        default="scanonce", description="The broker's client_id at the sign-in provider."
    )
    auth_oidc_client_secret: str | None = Field(
        default=None,
        description="The client secret at the sign-in provider, for a confidential client (PKCE either way).",
    )
    auth_oidc_scopes: str = Field(
        default="openid scanonce",
        description="Scopes asked of the sign-in provider (space separated; must yield the role claim).",
    )
    cds_clients: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "CDS Hooks clients (EHRs) whose signed JWTs are accepted on the CDS services, as JSON "
            '{"<iss>": "<its JWKS URL>"}; the JWT\'s `aud` must be the service URL and a `jti` is '
            "accepted once."
        ),
    )
    smart_ehrs: dict[str, SmartEhr] = Field(
        default_factory=dict,
        description=(
            "EHRs that may launch the pages (SMART App Launch, EHR launch), as JSON "
            '{"<the EHR\'s FHIR base URL, the launch `iss`>": {"client_id": "scanonce", '
            '"client_secret": null, "facility": "<facility id>", "role": "clinician"}}. A launch naming '
            "any other `iss` is refused; "
            "the broker calls the EHR only within outbound_allow_networks."
        ),
    )

    @field_validator(
        "auth_trusted_issuers",
        "auth_algorithms",
        "outbound_allow_networks",
        "mllp_processing_ids",
        mode="before",
    )
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        # From the environment: "https://a.example, https://b.example" rather than a JSON list.
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("mllp_processing_ids")
    @classmethod
    def _check_processing_ids(cls, value: list[str]) -> list[str]:
        ids = [v.strip().upper() for v in value]
        if not ids or any(v not in ("P", "T", "D") for v in ids):
            raise ValueError("processing IDs are P, T or D (HL7 table 0103), comma separated, at least one")
        return sorted(set(ids))

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        # PS3.5 AE: 1-16 characters of the default repertoire, no backslash, not only spaces.
        title = value.strip()
        if not 1 <= len(title) <= 16 or "\\" in title or not all(" " <= c <= "~" for c in title):
            raise ValueError("an AE title is 1 to 16 printable ASCII characters, without a backslash")
        return title

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(
                "the public origin is an http:// or https:// URL, e.g. https://scanonce.example.org"
            )
        return value

    @field_validator("outbound_allow_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        return [str(ipaddress.ip_network(v, strict=False)) for v in value]

    def ensure_data_dir(self) -> Path:
        """The data folder, created if missing; `InvalidSetting` naming it when it cannot be made
        or written (the index, spool and signing key live there), before anything else fails on it."""
        where = f"SCANONCE_DATA_DIR (or --data-dir) {self.data_dir.resolve()}"
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidSetting(f"{where}: cannot create this folder ({exc.strerror})") from None
        if not os.access(self.data_dir, os.W_OK | os.X_OK):
            raise InvalidSetting(f"{where}: the broker's user cannot write in this folder") from None
        return self.data_dir

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.sqlite3').resolve()}"

    def resolved_migrate_on_start(self) -> bool:
        if self.migrate_on_start is not None:
            return self.migrate_on_start
        return self.resolved_database_url().startswith("sqlite")

    def resolved_storage_url(self) -> str:
        if self.storage_url:
            return self.storage_url
        return (self.data_dir / "objects").resolve().as_uri()

    def resolved_signing_key_file(self) -> Path:
        return (self.auth_signing_key_file or self.data_dir / "auth-signing-key.json").resolve()

    def resolved_viewer_dir(self) -> Path:
        # Beside the clone the broker runs from (outside git: .gitignore has /.cache/).
        return (self.viewer_dir or _SOURCE_ROOT / ".cache" / "web").resolve()


def env_name(field: str) -> str:
    return f"SCANONCE_{field.upper()}"


def _named(field: str, given: dict[str, Any]) -> str:
    """What the operator set: a command-line option given wins over the variable."""
    return f"--{field.replace('_', '-')}" if field in given else env_name(field)


def load(**values: Any) -> Settings:
    """The settings from the environment (with `values`, the command line's options, on top), or
    `InvalidSetting` naming each setting that is wrong and why, in one line. The value itself is
    left out: it may be a secret (a client secret in SCANONCE_SMART_EHRS, a password in a URL)."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        said = [
            f"{_named(str(error['loc'][0]), values)}: {error['msg']}" if error.get("loc") else error["msg"]
            for error in exc.errors()
        ]
        raise InvalidSetting("; ".join(said)) from None
    except SettingsError as exc:  # a JSON setting that is not JSON
        named = re.search(r'field "(\w+)"', str(exc))
        field = env_name(named.group(1)) if named else "a SCANONCE_* setting"
        raise InvalidSetting(f"{field}: not valid JSON") from None


def unreachable_store(url: str, why: str) -> Unavailable:
    """The object store of SCANONCE_STORAGE_URL `url` did not answer or refused: one report for
    start-up and for the commands that meet it later (`scanonce verify`). The URL's query (an
    endpoint, never credentials) is left out to keep the line short."""
    shown = url.split("?", 1)[0]
    return Unavailable(
        f"cannot reach the object store {shown} (SCANONCE_STORAGE_URL): {why}; check that "
        "setting, the endpoint and the credentials (AWS_* variables)"
    )


@lru_cache
def get_settings() -> Settings:
    return load()
