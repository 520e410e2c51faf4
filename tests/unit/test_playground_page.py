"""The playground page at `/`: served by the API app, self-contained (nothing external), errors still JSON."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from serving.app.http_api import STATIC_DIR, create_api
from serving.app.metrics import ApiMetrics
from serving.model.checkpoint import REPO_ROOT
from tests.unit.app_fakes import make_args, make_checkpoint, make_pipeline

PAGE_FILES = ("index.html", "app.js", "style.css")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    args = make_args(make_checkpoint(tmp_path_factory.mktemp("ckpt")))
    pipeline, _ = make_pipeline(args)

    async def collect() -> str:
        return ""

    return TestClient(create_api(pipeline, args, ApiMetrics(), collect), raise_server_exceptions=False)


def assert_json_error(r, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_root_serves_the_page_with_a_strict_content_security_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js">' in r.text and "/static/style.css" in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-request-id"]
    assert client.head("/").status_code == 200


@pytest.mark.parametrize(
    ("name", "ctype"), [("app.js", "javascript"), ("style.css", "text/css"), ("index.html", "text/html")]
)
def test_static_files_are_served(client, name, ctype):
    r = client.get(f"/static/{name}")
    assert r.status_code == 200 and ctype in r.headers["content-type"]
    assert r.content == (STATIC_DIR / name).read_bytes()


def test_errors_around_the_page_keep_the_json_contract(client):
    assert_json_error(client.get("/static/missing.js"), 404, "not_found")
    assert_json_error(client.get("/static/../http_api.py"), 404, "not_found")
    assert_json_error(client.get("/static/%2e%2e/http_api.py"), 404, "not_found")
    assert_json_error(client.get("/nope"), 404, "not_found")
    assert_json_error(client.post("/", json={}), 405, "method_not_allowed")
    assert_json_error(client.post("/static/app.js", json={}), 405, "method_not_allowed")


def test_the_page_is_not_in_the_openapi_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)


def test_page_loads_nothing_from_elsewhere():
    """Offline use: no absolute URLs in src/href/url()/fetch/import, no CDN fonts or scripts."""
    for name in PAGE_FILES:
        text = (STATIC_DIR / name).read_text()
        refs = re.findall(r"""(?:src|href|action)\s*=\s*["']([^"']+)""", text)
        refs += re.findall(r"""url\(\s*["']?([^"')]+)""", text)
        refs += re.findall(r"""(?:fetch|import)\(\s*["'`]([^"'`]+)""", text)
        external = [u for u in refs if re.match(r"^(?:[a-z][a-z0-9+.-]*:)?//", u, re.I)]
        assert not external, f"{name} loads {external}"
        assert "@import" not in text


def test_page_files_ship_as_package_data():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    line = re.search(r'^"serving\.app"\s*=\s*\[(.*)\]$', pyproject, re.M)
    assert line, "pyproject.toml [tool.setuptools.package-data] lacks serving.app"
    patterns = re.findall(r'"([^"]+)"', line.group(1))
    for name in PAGE_FILES:
        assert any(Path("static", name).match(p) for p in patterns), name
