"""The playground page at `/`: served by the API app, self-contained (nothing external), errors still JSON."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
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


class _Ids(HTMLParser):
    """Every element's id and attributes, in page order."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))


def test_caption_panel_streams_from_v1_caption(client):
    parser = _Ids()
    parser.feed(client.get("/").text)
    by_id = {a["id"]: (tag, a) for tag, a in parser.elements if a.get("id")}
    ids = [a["id"] for _, a in parser.elements if a.get("id")]
    assert len(ids) == len(set(ids)), "ids are unique"
    assert by_id["caption-panel"][0] == "section" and by_id["caption-prompt"][1]["type"] == "text"
    assert by_id["caption"][0] == by_id["caption-stop"][0] == "button"
    assert "disabled" in by_id["caption-stop"][1], "Stop is enabled only while a caption streams"
    assert by_id["caption-status"][1]["role"] == "status" and by_id["caption-error"][1]["role"] == "alert"
    assert "hidden" in by_id["caption-error"][1] and by_id["caption-text"][1]["aria-live"] == "polite"
    assert "caption-meta" in by_id

    js = (STATIC_DIR / "app.js").read_text()
    assert set(re.findall(r'\$\("([\w-]+)"\)', js)) <= set(ids), "app.js uses only elements the page has"
    assert 'post("/v1/caption"' in js and "stream: true" in js and ".getReader()" in js
    assert 'headers["X-API-Key"] = key' in js, "the API key setting applies to every call, the stream's too"
    # The image sits beside every other card, over as many grid rows.
    cards = sum("card" in (a.get("class") or "").split() for _, a in parser.elements)
    span = re.search(r"#image-panel \{ grid-row: span (\d+);", (STATIC_DIR / "style.css").read_text())
    assert span and int(span.group(1)) == cards - 1


SSE_CHECK = """
const src = require("fs").readFileSync(process.argv[1], "utf8");
const fn = /async function\\* sseEvents[\\s\\S]*?\\n}\\n/.exec(src)[0];
const sseEvents = eval("(" + fn.replace("async function* sseEvents", "async function* ") + ")");
const text = ': ping\\r\\n\\r\\ndata: {"index":0,"token_id":5,"delta":"a é"}\\r\\n\\r\\n'
  + 'data: {"delta":" x",\\ndata: "caption":"a é x"}\\n\\n';
const bytes = new TextEncoder().encode(text);
(async () => {
  const out = {};
  for (const size of [1, 2, 5, 1000]) {  // the body cut anywhere, even inside a character
    const body = new ReadableStream({ start(c) {
      for (let i = 0; i < bytes.length; i += size) c.enqueue(bytes.slice(i, i + size));
      c.close();
    } });
    const events = [];
    for await (const ev of sseEvents(new Response(body))) events.push(ev);
    out[size] = events;
  }
  let cancelled = false;  // leaving early cancels the body: the connection closes
  const open = new ReadableStream({
    start(c) { c.enqueue(new TextEncoder().encode('data: {"index":0}\\n\\n')); },
    cancel() { cancelled = true; },
  });
  for await (const ev of sseEvents(new Response(open))) break;
  await new Promise(r => setTimeout(r, 10));
  out.cancelled = cancelled;
  console.log(JSON.stringify(out));
})();
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="no Node.js to run the page's script")
def test_the_page_script_parses_and_reads_event_streams():
    js = str(STATIC_DIR / "app.js")
    assert subprocess.run(["node", "--check", js], capture_output=True, timeout=30).returncode == 0
    run = subprocess.run(["node", "-e", SSE_CHECK, js], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    events = [{"index": 0, "token_id": 5, "delta": "a é"}, {"delta": " x", "caption": "a é x"}]
    assert all(out[size] == events for size in ("1", "2", "5", "1000")), out
    assert out["cancelled"] is True
