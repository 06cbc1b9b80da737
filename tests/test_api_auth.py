"""Bearer-token auth: operator and reader roles, token generation by ``serve``."""

from __future__ import annotations

import os
import stat

import pytest
from click.testing import CliRunner
from test_api_support import (
    OP,
    OP_TOKEN,
    READER,
    READER_TOKEN,
    TestClient,
    instant_job,
    make_settings,
)

from sitiancal.api.app import create_app
from sitiancal.api.auth import Role, TokenAuth, Unauthorized
from sitiancal.service import server
from sitiancal.service.server import TOKEN_FILE, TokenFileError, ensure_operator_token
from sitiancal.service.settings import Settings

WRITES = [
    ("post", "/v1/datasets", {"camera": "MST3", "source": None}),
    ("post", "/v1/jobs", {"camera": "MST3", "dataset": "x"}),
    ("delete", "/v1/jobs/abc", None),
    ("post", "/v1/products/abc/certify", {"valid_from": "2026-03-14T00:00:00Z"}),
    ("post", "/v1/products/abc/retract", {"reason": "bad"}),
    ("post", "/v1/datasets/abc/frames", None),
]
READS = ["/v1/datasets", "/v1/jobs", "/v1/products", "/v1/cameras"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    settings = make_settings(tmp, reader_tokens=[READER_TOKEN])
    with TestClient(create_app(settings, job_function=instant_job, use_dask=False)) as c:
        yield c


def _send(client, method, path, body, headers):
    if body is None:
        return getattr(client, method)(path, headers=headers)
    return client.request(method.upper(), path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), WRITES)
def test_write_endpoints_refuse_missing_invalid_and_reader_tokens(client, method, path, body):
    r = _send(client, method, path, body, {})
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert "operator" in r.json()["detail"]
    r = _send(client, method, path, body, {"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["detail"] == "invalid bearer token"
    r = _send(client, method, path, body, READER)
    assert r.status_code == 403
    assert "reader token" in r.json()["detail"]


def test_auth_is_checked_before_the_body_is_parsed(client):
    r = client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    r = client.post("/v1/jobs", content=b"{not json",
                    headers={"Content-Type": "application/json", **OP})
    assert r.status_code == 422
    assert "not valid JSON" in r.json()["detail"]


@pytest.mark.parametrize("path", READS)
def test_reads_need_a_token_when_reader_tokens_exist(client, path):
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get(path, headers={"Authorization": "Basic abc"}).status_code == 401
    assert client.get(path, headers=READER).status_code == 200
    assert client.get(path, headers=OP).status_code == 200


def test_operator_token_writes(client):
    r = client.post("/v1/datasets", json={"camera": "MST3", "source": None}, headers=OP)
    assert r.status_code == 201, r.text
    entries = client.app.state.sitiancal.catalog.audit_log(entity="dataset",
                                                           entity_id=r.json()["id"])
    actor = entries[0].actor
    assert actor.startswith("operator token:") and OP_TOKEN not in actor


def test_health_and_metrics_are_open(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_reads_are_open_without_reader_tokens(tmp_path):
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings, job_function=instant_job, use_dask=False)) as c:
        assert c.get("/v1/cameras").status_code == 200
        assert c.get("/v1/cameras", headers={"Authorization": "Bearer junk"}).status_code == 401
        assert c.post("/v1/datasets", json={"camera": "A", "source": None}).status_code == 401


def test_writes_are_impossible_without_any_operator_token(tmp_path):
    settings = make_settings(tmp_path, operator_tokens=[])
    with TestClient(create_app(settings, job_function=instant_job, use_dask=False)) as c:
        r = c.post("/v1/datasets", json={"camera": "A", "source": None})
        assert r.status_code == 403
        assert "no operator token is configured" in r.json()["detail"]


def test_token_auth_roles_and_names():
    auth = TokenAuth(["o1", "o2"], ["r1"])
    assert auth.identify("Bearer o2").role is Role.OPERATOR
    assert auth.identify("bearer r1").role is Role.READER
    assert auth.identify(None).role is None
    with pytest.raises(Unauthorized):
        auth.identify("Bearer o")  # a prefix of a token is not a token
    with pytest.raises(Unauthorized):
        auth.identify("Bearer o1x")
    with pytest.raises(Unauthorized):
        auth.identify("Bearer ")
    assert auth.identify("Bearer o1").name != auth.identify("Bearer o2").name
    assert "o1" not in auth.identify("Bearer o1").name


def test_serve_generates_an_owner_only_token_and_reuses_it(tmp_path):
    settings = Settings(data_dir=tmp_path / "d")
    with_token, path = ensure_operator_token(settings)
    assert path == (tmp_path / "d" / TOKEN_FILE).resolve()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    token = with_token.operator_tokens[0]
    assert len(token) >= 40 and path.read_text().strip() == token
    again, _ = ensure_operator_token(settings)
    assert again.operator_tokens == [token]
    configured = Settings(data_dir=tmp_path / "e", operator_tokens=["mine"])
    assert ensure_operator_token(configured) == (configured, None)
    assert not (tmp_path / "e" / TOKEN_FILE).exists()
    os.chmod(path, 0o644)
    with pytest.raises(TokenFileError, match="accessible by other users"):
        ensure_operator_token(settings)


def test_serve_prints_where_the_token_is_not_the_token(tmp_path, monkeypatch):
    seen = {}

    def fake_run(app, **kwargs):
        seen["app"], seen["kwargs"] = app, kwargs

    monkeypatch.setattr("uvicorn.run", fake_run)
    monkeypatch.delenv("SITIANCAL_OPERATOR_TOKENS", raising=False)
    result = CliRunner().invoke(server.serve, ["--data-dir", str(tmp_path / "d"),
                                               "--port", "8123"])
    assert result.exit_code == 0, result.output
    token = (tmp_path / "d" / TOKEN_FILE).read_text().strip()
    assert str((tmp_path / "d" / TOKEN_FILE).resolve()) in result.output
    assert token not in result.output
    assert seen["kwargs"] == {"host": "127.0.0.1", "port": 8123, "log_level": "info",
                              "access_log": True, **server.uvicorn_options()}
    assert seen["app"].state.auth.operator_tokens == (token,)
