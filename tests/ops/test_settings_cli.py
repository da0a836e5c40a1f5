"""A setting an operator got wrong: every `scanonce` command reports it in one line naming the
setting and exits non-zero, never with a stack trace (docs/production.md, docs/configuration.md)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from broker.cli import app as cli

runner = CliRunner()
# Listeners that bind nothing a parallel test could hold; the command fails before binding anyway.
_SERVE = ["serve", "--port", "0", "--dimse-port", "0", "--mllp-port", "0"]


def _refused(result: Result) -> str:
    """The one line said, after checking the command failed cleanly (an uncaught exception is
    what prints a traceback outside the test runner)."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    said = result.output.strip()
    assert said and len(said.splitlines()) == 1, said
    return said


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SCANONCE_PORT", "abc"),
        ("SCANONCE_LOG_FORMAT", "xml"),
        ("SCANONCE_STORAGE_SYNC", "sometimes"),
        ("SCANONCE_AUTH_ENABLED", "perhaps"),
        ("SCANONCE_OUTBOUND_ALLOW_NETWORKS", "10.0.0.0/33"),
        ("SCANONCE_CDS_CLIENTS", "{not json"),
        # Out of range: a negative grace would let the reaper delete an ingest's object before
        # its row commits; a negative port or limit fails later, far from its cause.
        ("SCANONCE_REAP_GRACE_SECONDS", "-1"),
        ("SCANONCE_REAP_INTERVAL_SECONDS", "-60"),
        ("SCANONCE_SYNC_INTERVAL_SECONDS", "-1"),
        ("SCANONCE_JOB_RETENTION_DAYS", "-1"),
        ("SCANONCE_PORT", "-1"),
        ("SCANONCE_DIMSE_PORT", "70000"),
        ("SCANONCE_MLLP_PORT", "-2575"),
        ("SCANONCE_DIMSE_MAX_ASSOCIATIONS", "0"),
        ("SCANONCE_DIMSE_MAX_CONNECTIONS_PER_ADDRESS", "-1"),
        ("SCANONCE_QIDO_DEFAULT_LIMIT", "0"),
        ("SCANONCE_QIDO_MAX_LIMIT", "-1"),
        ("SCANONCE_INGEST_PROCESSES", "-2"),
        ("SCANONCE_MAX_PART_BYTES", "0"),
        ("SCANONCE_STOW_MAX_REQUEST_BYTES", "-1"),
        ("SCANONCE_STOW_MAX_PARTS", "0"),
        # Failed only once the DIMSE listener started (pynetdicom: a traceback after the banner).
        ("SCANONCE_AE_TITLE", "THIS_IS_WAY_TOO_LONG_AE"),
        ("SCANONCE_AE_TITLE", "   "),
        # Not an origin: every RetrieveURL and link the broker builds from it would be broken.
        ("SCANONCE_BASE_URL", "scanonce.example.org"),
        ("SCANONCE_BASE_URL", "ftp://scanonce.example.org"),
    ],
)
def test_a_malformed_setting_is_named_in_one_line(tmp_path: Path, variable: str, value: str) -> None:
    env = {"SCANONCE_DATA_DIR": str(tmp_path), variable: value}
    for args in (["db", "status"], ["jobs", "list"], ["worker"]):
        said = _refused(runner.invoke(cli, args, env=env))
        assert variable in said, said


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "foo://scanonce:secret@127.0.0.1/scanonce",  # no such database
        "mysql://scanonce:secret@127.0.0.1/scanonce",  # a database whose driver is not installed
    ],
)
def test_an_unusable_database_url_is_named_in_one_line(tmp_path: Path, url: str) -> None:
    env = {"SCANONCE_DATA_DIR": str(tmp_path), "SCANONCE_DATABASE_URL": url}
    for args in (["db", "status"], ["db", "upgrade"], ["jobs", "list"], _SERVE):
        said = _refused(runner.invoke(cli, args, env=env))
        assert "SCANONCE_DATABASE_URL" in said, said
        assert "secret" not in said  # the password is never shown


def test_a_data_folder_that_cannot_be_made_is_named_in_one_line(tmp_path: Path) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    env = {"SCANONCE_DATA_DIR": str(taken / "data")}
    for args in (["db", "status"], ["jobs", "list"], ["worker"], ["verify"], _SERVE):
        said = _refused(runner.invoke(cli, args, env=env))
        assert "SCANONCE_DATA_DIR" in said and str(taken / "data") in said, said


@pytest.mark.parametrize(
    "url",
    [
        "ftp://archive.example/objects",
        "s3://?endpoint_url=http://127.0.0.1:1",  # no bucket
        "s3://b?endpoint_url=http://127.0.0.1:1&read_timeout=soon",
        # A name S3 refuses: botocore's message spans lines, the operator's must not.
        "s3://Not_A_Bucket!?endpoint_url=http://127.0.0.1:1&create_bucket=true",
    ],
)
def test_an_unusable_storage_url_is_named_in_one_line(tmp_path: Path, url: str) -> None:
    env = {"SCANONCE_DATA_DIR": str(tmp_path), "SCANONCE_STORAGE_URL": url}
    said = _refused(runner.invoke(cli, ["jobs", "list"], env=env))
    assert "SCANONCE_STORAGE_URL" in said, said


def test_an_object_folder_that_cannot_be_made_is_named_without_talk_of_credentials(tmp_path: Path) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    env = {"SCANONCE_DATA_DIR": str(tmp_path / "data"), "SCANONCE_STORAGE_URL": (taken / "objects").as_uri()}
    said = _refused(runner.invoke(cli, ["jobs", "list"], env=env))
    assert "SCANONCE_STORAGE_URL" in said and str(taken / "objects") in said, said
    assert "AWS" not in said and "credentials" not in said, said  # a folder has none


def _jwk(kind: str) -> str:
    from joserfc.jwk import ECKey, RSAKey

    if kind == "ec-public":
        return json.dumps(ECKey.generate_key("P-256").as_dict(private=False))
    if kind == "ec-p384":
        return json.dumps(ECKey.generate_key("P-384").as_dict(private=True))
    return json.dumps(RSAKey.generate_key(2048).as_dict(private=True))


# A public key alone, or a private key of another curve or type, imports as readily as the right
# one: each is refused at start, not at the first token it cannot sign.
_KEYS = {"ec-public": "only a public key", "ec-p384": "curve P-384", "rsa": "an RSA key"}


@pytest.mark.parametrize("content", ["not json", '{"kty": "EC"}', None, *_KEYS])
def test_an_unusable_signing_key_file_is_named_in_one_line(tmp_path: Path, content: str | None) -> None:
    reason = _KEYS.get(content or "")
    if reason is not None:
        content = _jwk(content or "")
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    key = tmp_path / "key.json"
    if content is None:
        key = taken / "key.json"  # cannot be created
    else:
        key.write_text(content)
    env = {"SCANONCE_DATA_DIR": str(tmp_path / "data"), "SCANONCE_AUTH_SIGNING_KEY_FILE": str(key)}
    for args in (["token", "create", "--role", "auditor", "--subject", "prometheus"], _SERVE):
        said = _refused(runner.invoke(cli, args, env=env))
        assert "SCANONCE_AUTH_SIGNING_KEY_FILE" in said and str(key) in said, said
        if reason is not None:  # says what is wrong with the key, not only that it is unusable
            assert reason in said, said
    if content is not None:
        assert key.read_text() == content  # an operator's file is never replaced


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dimse_tls_files_that_cannot_be_loaded_are_named_in_one_line(tmp_path: Path) -> None:
    missing = {
        "SCANONCE_DATA_DIR": str(tmp_path / "data"),
        "SCANONCE_DIMSE_TLS_CERT_FILE": str(tmp_path / "nope.pem"),
        "SCANONCE_DIMSE_TLS_KEY_FILE": str(tmp_path / "nope.key"),
    }
    serve = ["serve", "--port", "0", "--dimse-port", str(_free_port()), "--mllp-port", "0"]
    said = _refused(runner.invoke(cli, serve, env=missing))
    assert "SCANONCE_DIMSE_TLS_CERT_FILE" in said and "nope.pem" in said, said
    # Half a pair: the listener cannot speak TLS.
    half = {k: v for k, v in missing.items() if k != "SCANONCE_DIMSE_TLS_KEY_FILE"}
    said = _refused(runner.invoke(cli, serve, env=half))
    assert "SCANONCE_DIMSE_TLS_KEY_FILE" in said, said
    # The SCU's context (outbound TLS) is built by every command that builds the state.
    outbound = {**missing, "SCANONCE_DIMSE_TLS_OUTBOUND": "true"}
    said = _refused(runner.invoke(cli, ["jobs", "list"], env=outbound))
    assert "SCANONCE_DIMSE_TLS_CERT_FILE" in said and "nope.pem" in said, said


def test_an_option_out_of_range_is_named_as_the_option_given(tmp_path: Path) -> None:
    said = _refused(
        runner.invoke(
            cli,
            ["serve", "--port", "70000", "--dimse-port", "0", "--mllp-port", "0"],
            env={"SCANONCE_DATA_DIR": str(tmp_path)},
        )
    )
    assert "--port" in said, said


_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("workers", [1, 2])
def test_the_uvicorn_factory_names_a_bad_setting_in_one_line(tmp_path: Path, workers: int) -> None:
    """`uvicorn --factory broker.app:app_from_env` (docs/production.md, for several workers) says a
    wrong setting as `scanonce serve` does: one line on stderr, no traceback. Under --workers the
    supervisor stops at the first worker's refusal instead of restarting workers that fail alike."""
    env = {
        **os.environ,
        "PYTHONPATH": str(_ROOT),
        "SCANONCE_DATA_DIR": str(tmp_path / "data"),
        "SCANONCE_LOG_FORMAT": "xml",
    }
    factory = [sys.executable, "-m", "uvicorn", "--factory", "broker.app:app_from_env"]
    run = subprocess.run(
        [*factory, "--host", "127.0.0.1", "--port", "0", "--workers", str(workers)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in run.stderr, run.stderr
    said = [line for line in run.stderr.splitlines() if "SCANONCE_LOG_FORMAT" in line]
    serve_said = _refused(
        runner.invoke(cli, _SERVE, env={k: env[k] for k in ("SCANONCE_DATA_DIR", "SCANONCE_LOG_FORMAT")})
    )
    assert said and set(said) == {serve_said}, run.stderr  # (once per worker that started)
    if workers == 1:
        assert run.returncode == 3, run.stderr
    else:
        # uvicorn's supervisor of several workers exits 0 whatever its workers did, and the broker
        # cannot change that from a worker (docs/production.md says why). Pinned, so that a uvicorn
        # that says "not started" in its status too is noticed and that page corrected.
        assert run.returncode == 0, run.stderr
        assert "failed to start, stopping the parent process" in run.stderr, run.stderr


def _factory_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(_ROOT),
        "SCANONCE_DATA_DIR": str(tmp_path / "data"),
        "SCANONCE_INGEST_PROCESSES": "0",
        **settings,
    }


def _factory(
    env: dict[str, str], cwd: Path, *, port: int = 0, workers: int = 1, extra: tuple[str, ...] = ()
) -> subprocess.Popen[str]:
    """`uvicorn --factory broker.app:app_from_env` as docs/production.md starts it, on loopback."""
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "--factory", "broker.app:app_from_env"),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)),
            *extra,
        ],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its parse workers and uvicorn's own are stopped with it
    )


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate(timeout=30)


def _factory_refused(env: dict[str, str], cwd: Path) -> tuple[str, str]:
    """The one line the factory said before exiting 3 (uvicorn's "failed to start"), checked as
    `_refused` checks a command's, and all it wrote on stderr: a factory that serves instead
    fails the test."""
    proc = _factory(env, cwd)
    try:
        _out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        _out, err = _stop(proc)
        pytest.fail(f"the factory served a configuration `scanonce serve` refuses:\n{err}")
    assert "Traceback" not in err, err
    assert proc.returncode == 3, (proc.returncode, err)
    # uvicorn's own log lines start with their level; ours are bare, the refusal last.
    said = [line for line in err.splitlines() if not line.startswith(("INFO:", "ERROR:", "WARNING:"))]
    assert said, err
    return said[-1], err


def _last_line(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.output.strip().splitlines()[-1]


def test_the_uvicorn_factory_refuses_dimse_tls_files_serve_refuses(tmp_path: Path) -> None:
    """A node's configuration is refused alike however it is started: the factory serves HTTP only,
    but an environment it accepts is one `scanonce serve` (the node's DIMSE listener) accepts."""
    tls = {
        "SCANONCE_DIMSE_TLS_CERT_FILE": str(tmp_path / "nope.pem"),
        "SCANONCE_DIMSE_TLS_KEY_FILE": str(tmp_path / "nope.key"),
    }
    env = _factory_env(tmp_path, **tls)
    said, _err = _factory_refused(env, tmp_path)
    assert "SCANONCE_DIMSE_TLS_CERT_FILE" in said and "nope.pem" in said, said
    serve = ["serve", "--port", "0", "--dimse-port", str(_free_port()), "--mllp-port", "0"]
    assert said == _refused(
        runner.invoke(cli, serve, env={"SCANONCE_DATA_DIR": env["SCANONCE_DATA_DIR"], **tls})
    )


def test_the_uvicorn_factory_refuses_auth_off_where_it_cannot_see_the_address(tmp_path: Path) -> None:
    """uvicorn binds the HTTP socket with its own --host, which the factory cannot see (here it is
    even loopback): authentication off is refused unless the operator says uvicorn binds loopback
    only (SCANONCE_AUTH_OFF_ACCEPTED; the good start is below)."""
    said, _err = _factory_refused(_factory_env(tmp_path, SCANONCE_AUTH_ENABLED="false"), tmp_path)
    assert said.startswith("Refusing to serve: "), said
    assert "SCANONCE_AUTH_ENABLED=true" in said and "SCANONCE_AUTH_OFF_ACCEPTED=true" in said, said
    assert not (tmp_path / "data" / "index.sqlite3").exists()  # refused before anything was created


def test_the_uvicorn_factory_waits_for_its_database_as_serve_does(tmp_path: Path) -> None:
    """A database that refuses connections at start is waited for (the log says so each try), not
    a refusal at the first try; with SCANONCE_DB_START_WAIT_SECONDS the wait ends in the same one
    line `scanonce serve` prints then."""
    closed = {
        "SCANONCE_DATABASE_URL": f"postgresql+psycopg://scanonce:secret@127.0.0.1:{_free_port()}/nothing",
        "SCANONCE_DB_CONNECT_TIMEOUT_SECONDS": "2",
        "SCANONCE_DB_START_WAIT_SECONDS": "2",
    }
    env = _factory_env(tmp_path, **closed)
    said, err = _factory_refused(env, tmp_path)
    assert "retrying in" in err, err  # it waited
    assert said.startswith("Database unreachable: ") and "SCANONCE_DB_START_WAIT_SECONDS" in said, said
    assert "secret" not in err
    served = runner.invoke(cli, _SERVE, env={"SCANONCE_DATA_DIR": env["SCANONCE_DATA_DIR"], **closed})
    assert said == _last_line(served)
    # The job worker, the third long-running process of a node, gives up alike.
    worked = runner.invoke(cli, ["worker"], env={"SCANONCE_DATA_DIR": env["SCANONCE_DATA_DIR"], **closed})
    assert worked.exit_code == 1 and said == _last_line(worked), worked.output


def _until_ready(proc: subprocess.Popen[str], port: int) -> None:
    """Until the factory's node answers /readyz 200 (it fails the test if it exits first)."""
    deadline = time.monotonic() + 120
    ready = None
    while ready is None and proc.poll() is None and time.monotonic() < deadline:
        try:
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        except httpx.TransportError:
            time.sleep(0.2)
    assert ready is not None and ready.status_code == 200, proc.poll()


@pytest.mark.parametrize(
    "settings",
    [{}, {"SCANONCE_AUTH_ENABLED": "false", "SCANONCE_AUTH_OFF_ACCEPTED": "true"}],
    ids=["auth-on", "auth-off-accepted"],
)
def test_the_uvicorn_factory_serves_a_good_configuration(tmp_path: Path, settings: dict[str, str]) -> None:
    port = _free_port()
    proc = _factory(_factory_env(tmp_path, **settings), tmp_path, port=port)
    try:
        _until_ready(proc, port)
        # Authentication as configured: a token is asked for unless it was switched off.
        studies = httpx.get(f"http://127.0.0.1:{port}/dicom-web/studies", timeout=10)
        assert studies.status_code == (401 if not settings else 204), studies.text
    finally:
        _out, err = _stop(proc)
    assert "Traceback" not in err, err


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_uvicorn_factory_logs_as_serve_does_without_query_strings(tmp_path: Path, fmt: str) -> None:
    """Under the factory uvicorn sets logging up before the app exists: the access log must
    still lose its query strings (they carry patient identifiers), and SCANONCE_LOG_FORMAT=json
    must apply to every line."""
    port = _free_port()
    env = _factory_env(tmp_path, SCANONCE_LOG_FORMAT=fmt)
    proc = _factory(env, tmp_path, port=port)
    try:
        _until_ready(proc, port)
        asked = httpx.get(f"http://127.0.0.1:{port}/dicom-web/studies?PatientID=PAT-SECRET-7731", timeout=10)
        assert asked.status_code == 401
        time.sleep(0.5)  # the access line is written after the response
    finally:
        out, err = _stop(proc)
    said = out + err
    assert "PAT-SECRET-7731" not in said, said
    access = [line for line in said.splitlines() if "/dicom-web/studies" in line]
    assert access and all("/dicom-web/studies?\u2026" in line for line in access), said
    if fmt == "json":
        records = [json.loads(line) for line in said.splitlines() if line.startswith("{")]
        assert any("/dicom-web/studies" in r["message"] for r in records), said
        assert not [line for line in said.splitlines() if line.startswith("INFO:")], said


def test_the_uvicorn_factory_keeps_an_operators_log_config(tmp_path: Path) -> None:
    """An operator's `--log-config` (their handlers, format and file) stays in charge, JSON
    format setting or not; only the access log's query strings are still redacted."""
    log_file = tmp_path / "broker.log"
    handler = {"class": "logging.FileHandler", "filename": str(log_file), "formatter": "ops"}
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"ops": {"format": "OPS|%(levelname)s|%(name)s|%(message)s"}},
        "handlers": {"file": handler},
        "root": {"handlers": ["file"], "level": "INFO"},
        "loggers": {
            "uvicorn": {"handlers": ["file"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": ["file"], "level": "INFO", "propagate": False},
        },
    }
    config_file = tmp_path / "logging.json"
    config_file.write_text(json.dumps(config))
    port = _free_port()
    env = _factory_env(tmp_path, SCANONCE_LOG_FORMAT="json")
    proc = _factory(env, tmp_path, port=port, extra=("--log-config", str(config_file)))
    try:
        _until_ready(proc, port)
        asked = httpx.get(f"http://127.0.0.1:{port}/dicom-web/studies?PatientID=PAT-SECRET-7731", timeout=10)
        assert asked.status_code == 401
        time.sleep(0.5)  # the access line is written after the response
    finally:
        out, err = _stop(proc)
    written = log_file.read_text()
    assert "PAT-SECRET-7731" not in written + out + err
    lines = written.splitlines()
    assert any(
        line.startswith("OPS|INFO|uvicorn.access|") and "/dicom-web/studies?\u2026" in line for line in lines
    ), written
    # The broker's own lines go where the operator's root handler sends them, in their format.
    assert any(line.startswith("OPS|INFO|scanonce|") for line in lines), written
    assert not [line for line in (out + err).splitlines() if line.startswith("{")], out + err
