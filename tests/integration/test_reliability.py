"""Faults and overload on a stack of its own, in its production configuration, started with `make serve`.

One stack for the module (it is killed and finally drained, so never the shared fixtures):
`make serve` with Triton's restricted APIs, TLS on Triton's gRPC endpoint and an API key,
on free ports. The tests run in file order: the configuration, a burst of 400, a Ray
replica killed, tritonserver killed mid-load, SIGTERM drain, then a search of every log
for the secrets. The drills are loadtests/chaos.py's (RELIABILITY.md reports their figures).
"""

from __future__ import annotations

import datetime
import glob
import ipaddress
import json
import secrets
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from loadtests import chaos
from serving.triton.launcher import TritonSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

API_KEY = "vtk-" + secrets.token_hex(12)
ADMIN_KEY = "adm-" + secrets.token_hex(12)
WRONG_KEY = "wrong-" + secrets.token_hex(12)
RESULTS: dict[str, dict] = {}


def self_signed(dirname: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost and its key, PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = dirname / "triton.crt", dirname / "triton.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[chaos.ServeStack]:
    tls_dir = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(tls_dir)
    st = chaos.ServeStack(
        tag="reliability",
        via_make=True,
        env={
            "RESTRICT_APIS": "1",
            "TRITON_ADMIN_KEY": ADMIN_KEY,
            "TRITON_GRPC_TLS_CERT": str(cert),
            "TRITON_GRPC_TLS_KEY": str(key),
            "VTFUSE_API_KEYS": json.dumps([API_KEY]),
            "DRAIN_TIMEOUT": "30",
        },
        start_timeout_s=300,
    )
    st.cert = cert  # type: ignore[attr-defined]
    try:
        st.start()
        yield st
    finally:
        st.stop()
        if RESULTS:
            out = chaos.LOG_DIR / "reliability-results.json"
            out.write_text(json.dumps(RESULTS, indent=2) + "\n")
        st.cleanup()


def _post(url: str, key: str | None) -> httpx.Response:
    body = chaos.vqa_bodies(1, seed=3)[0]
    headers = {"content-type": "application/json", **({"X-API-Key": key} if key else {})}
    return httpx.post(url + "/v1/vqa", content=body, headers=headers, timeout=60)


def _json_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == code


def test_production_configuration(stack):
    """API key on the API, restricted model control and TLS on Triton: each refuses what it should."""
    _json_error(_post(stack.url, None), 401, "unauthorized")
    _json_error(_post(stack.url, WRONG_KEY), 401, "unauthorized")
    ok = _post(stack.url, API_KEY)
    assert ok.status_code == 200 and ok.json()["answers"][0]["answer"]
    assert httpx.get(stack.url + "/readyz", timeout=10).status_code == 200  # probes need no key

    # Triton's model-control API needs the admin header; inference and health do not.
    index = f"http://127.0.0.1:{stack.triton_http_port}/v2/repository/index"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(index, data=b"{}", method="POST"), timeout=10)
    assert refused.value.code in (401, 403)
    req = urllib.request.Request(index, data=b"{}", method="POST", headers={"vtfuse-admin": ADMIN_KEY})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert {m["name"] for m in json.loads(r.read())} >= {"image_encoder", "text_encoder", "fusion", "vqa"}
    unload = f"http://127.0.0.1:{stack.triton_http_port}/v2/repository/models/fusion/unload"
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(urllib.request.Request(unload, data=b"{}", method="POST"), timeout=10)

    # Triton's gRPC endpoint speaks TLS only: a plaintext client gets nowhere, a verifying one works.
    target = f"127.0.0.1:{stack.triton_grpc_port}"
    with pytest.raises(InferenceServerException):
        grpcclient.InferenceServerClient(target).is_server_ready(client_timeout=10)
    tls = grpcclient.InferenceServerClient(target, ssl=True, root_certificates=str(stack.cert))
    assert tls.is_server_ready(client_timeout=10)


def _descendant_rss_mb(pid: int) -> float:
    total = 0
    for p in [psutil.Process(pid), *chaos.descendants(pid)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def test_burst_of_400_is_answered_quickly_with_json(stack):
    """Far more requests at once than capacity: each one answered (200/429/503/504, JSON errors), none hangs."""
    rss0 = _descendant_rss_mb(stack.pid)
    res = chaos.drill_burst(stack.url, 400, api_key=API_KEY)
    rss1 = _descendant_rss_mb(stack.pid)
    res["rss_mb_before_after"] = [round(rss0), round(rss1)]
    RESULTS["burst"] = res
    assert res["requests"] == 400 and sum(res["statuses"].values()) == 400, res
    assert res["dropped"] == 0 and res["refused_connections"] == 0, res
    assert res["unexpected_statuses"] == 0 and res["non_json_errors"] == 0, res
    assert res["missing_retry_after"] == 0, res
    assert res["last_answer_s"] < 60, res
    assert res["statuses"].get("200", 0) >= 32, "admitted requests must still be served"
    assert res["statuses"].get("429", 0) > 0, "the excess must be refused at admission"
    assert rss1 - rss0 < 1024, f"memory grew by {rss1 - rss0:.0f} MB under the burst"


def test_killed_ray_replica_is_replaced_and_its_calls_retried(stack):
    res = chaos.drill_replica_kill(stack.url, stack.pid, clients=16, api_key=API_KEY)
    RESULTS["replica_kill"] = res
    assert res["replicas"] == 2, res
    assert res["dropped"] == 0 and res["non_json_errors"] == 0 and res["unexpected_statuses"] == 0, res
    assert set(res["statuses"]) <= {"200", "503"}, res
    assert res["replaced_s"] is not None and res["replaced_s"] < 90, res
    assert res["ok_after_recovery"] > 0, res


def test_triton_killed_mid_load_is_restarted_and_the_api_recovers(stack):
    """24 clients; kill -9 tritonserver; only 200 and JSON 503/504, a new tritonserver under make serve, < 90 s."""
    old = chaos.find_tritonserver(stack.pid)
    assert old is not None
    stubs = [p.pid for p in old.children(recursive=True)]
    prefix = TritonSettings(grpc_port=stack.triton_grpc_port).shm_prefix
    shm_before = set(glob.glob(f"/dev/shm/{prefix}*"))
    assert stubs and shm_before, "the Python-backend stubs and their shared memory should be there"

    res = chaos.drill_triton_kill(stack.url, stack.pid, clients=24, sig=signal.SIGKILL, api_key=API_KEY)
    RESULTS["triton_kill"] = res
    assert res["dropped"] == 0 and res["refused_connections"] == 0, res
    assert res["non_json_errors"] == 0 and res["unexpected_statuses"] == 0, res
    assert set(res["statuses"]) <= {"200", "503", "504"} and res["statuses"].get("503"), res
    assert res["missing_retry_after"] == 0, res
    assert res["new_pid"] and res["new_pid"] != res["old_pid"], res
    assert stack.pid in res["new_parent_chain"] or any(
        p.pid == res["new_pid"] for p in chaos.descendants(stack.pid)
    ), "the new tritonserver must be a descendant of make serve"
    assert res["readyz_back_s"] is not None and res["recovered_s"] is not None and res["recovered_s"] < 90, res
    assert res["ok_after_recovery"] > 0, res
    # The dead server's stubs and shared-memory regions are gone.
    assert not [pid for pid in stubs if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not shm_before & set(glob.glob(f"/dev/shm/{prefix}*")), "stale shared memory left behind"


def test_sigterm_to_make_serve_drains_then_everything_exits(stack):
    res = chaos.drill_drain(stack, clients=16, api_key=API_KEY)
    RESULTS["drain"] = res
    assert res["in_flight_at_sigterm"] > 0, res
    assert res["in_flight_ok"] == res["in_flight_at_sigterm"], f"requests in flight at SIGTERM were lost: {res}"
    assert res["dropped"] == 0 and res["non_json_errors"] == 0 and res["unexpected_statuses"] == 0, res
    assert set(res["after_sigterm"]) <= {"200", "503", "refused"}, res
    assert res["all_exited_s"] is not None and res["all_exited_s"] < 90, res
    assert res["leftover_processes"] == [] and not res["triton_alive_after"], res


def test_no_secret_in_any_log(stack):
    """The API key, Triton's admin key and a wrong key a caller sent appear in no log of the run."""
    assert stack.process is not None and stack.process.poll() is not None, "runs after the drain"
    files = [stack.log_path, chaos.LOG_DIR / "reliability-tritonserver.log"]
    files += [p for p in Path(stack.ray_tmp).rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err", "")]
    searched = 0
    for f in files:
        try:
            text = Path(f).read_bytes()
        except OSError:
            continue
        searched += 1
        for secret in (API_KEY, ADMIN_KEY, WRONG_KEY):
            assert secret.encode() not in text, f"a secret is in {f}"
    assert searched >= 5, files
