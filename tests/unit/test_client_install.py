"""`pip install 'vtfuse[client]'` is the client alone: its dependencies, and it runs with the server's packages absent.

Installing into a fresh venv needs the network; instead the declared dependency set is
checked, and the client and the `vtfuse` CLI run in a subprocess where importing any
server or export package fails, as it would in a client-only environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serving.paths import REPO_ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

SERVER_ONLY = ("ray", "nvidia-pytriton", "torch", "onnxruntime", "tritonclient", "fastapi", "uvicorn", "numpy")
# Import names of everything the client must not need.
BLOCKED = (
    "ray",
    "pytriton",
    "torch",
    "onnxruntime",
    "onnx",
    "tritonclient",
    "transformers",
    "fastapi",
    "starlette",
    "uvicorn",
    "numpy",
    "PIL",
    "pydantic",
    "tokenizers",
    "safetensors",
    "prometheus_client",
    "yaml",
    "tensorrt",
)


def _name(requirement: str) -> str:
    for sep in "<>=[;! ":
        requirement = requirement.split(sep, 1)[0]
    return requirement.strip().lower()


def test_the_client_extra_pulls_no_server_package():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    client = {_name(r) for r in project["dependencies"] + extras["client"]}
    assert client == {"httpx", "grpcio", "protobuf"}
    assert not client & set(SERVER_ONLY)
    server = {_name(r) for r in extras["server"]}
    assert {"ray", "nvidia-pytriton", "onnxruntime", "tritonclient", "fastapi", "uvicorn", "pyyaml"} <= server
    assert {"torch", "onnx", "onnxscript", "transformers"} <= {_name(r) for r in extras["export"]}
    assert extras["gpu"] == ["tensorrt>=10,<11"]
    assert "'.[server,export,dev]'" in (REPO_ROOT / "Makefile").read_text(), "make install keeps everything"


@pytest.fixture
def models_api() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = json.dumps({"default": "tiny", "models": []}).encode()
            self.send_response(200 if self.headers.get("x-api-key") == "k1" else 401)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 - a streamed /v1/caption
            self.rfile.read(int(self.headers["content-length"]))
            result = {"model": "tiny", "caption": "a red circle", "token_ids": [1, 2, 3], "finish_reason": "stop"}
            result |= {"usage": {"prompt_tokens": 1, "generated_tokens": 2}, "request_id": "r"}
            events = [{"index": 0, "token_id": 2, "delta": "a red"}, {"delta": " circle", **result}]
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events))

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


SCRIPT = """
import importlib.abc, json, sys, tempfile

BLOCKED = set(json.loads(sys.argv[1]))


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: a client-only install)", name=name)
        return None


sys.meta_path.insert(0, Block())

import serving.client
from serving.cli import main

serving.client.VtfuseClient("http://x").close()
serving.client.VtfuseGrpcClient("127.0.0.1:1").close()
for argv in (["--version"], ["--help"], ["ask", "--help"], ["caption", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
assert main(["models", "--url", sys.argv[2], "--api-key", "k1"]) == 0
with tempfile.NamedTemporaryFile(suffix=".png") as img:
    assert main(["caption", img.name, "--stream", "--url", sys.argv[2]]) == 0
assert main(["serve"]) == 3
loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
assert not loaded, loaded
"""


def test_client_and_cli_run_without_the_server_packages(models_api):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(BLOCKED), models_api],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("vtfuse 0.1.0\n")
    assert "ask" in out.stdout and "serve" in out.stdout, "every command is listed"
    assert '"default": "tiny"' in out.stdout, "`vtfuse models` called the API"
    assert "\na red circle\n" in out.stdout, "`vtfuse caption --stream` read the event stream"
    assert "vtfuse serve: needs the `server` extra" in out.stderr and "pip install 'vtfuse[server]'" in out.stderr


def test_the_cli_command_table_names_what_each_module_registers():
    import argparse
    import importlib

    from serving.cli import COMMANDS

    for module, (names, _extra) in COMMANDS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        assert tuple(sub.choices) == names, module
