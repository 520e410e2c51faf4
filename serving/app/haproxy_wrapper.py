"""Ray's HAProxy, started on a configuration rewritten for this API (`VTFUSE_FRONT=haproxy`).

Ray Serve renders HAProxy's configuration inside its own actor and runs the binary that
`RAY_SERVE_HAPROXY_BINARY_PATH` names as `BINARY -db -f CONFIG [-dR] [-sf PID... [-x SOCKET]]`,
after writing CONFIG each time (first start and every reload). serving.app.front points that
variable at a small launcher that runs this file as

    python -S -E haproxy_wrapper.py REAL_HAPROXY ERRORS_DIR -- ARGS...

It rewrites each `-f` CONFIG in place (`rewrite`), then `exec`s REAL_HAPROXY with ARGS
unchanged: the process Ray started and tracks is HAProxy itself, and its command line still
holds CONFIG. That matters: Ray recognises its HAProxy processes by CONFIG being one of their
arguments (`HAProxyApi._is_our_haproxy`, which picks the draining workers a reload signals
again, and counts the live ones), so the rewritten text goes back to CONFIG's own path rather
than to a sibling file. Ray's text is kept beside it as CONFIG.ray; Ray never reads CONFIG back.
The write takes the lock file Ray writes CONFIG under (CONFIG.lock).

The rewrite:

- `option splice-request` goes: a spliced body passes kernel to kernel and HAProxy keeps no
  copy, so a call whose replica died after the body went out could not be sent again;
- `option http-buffer-request` in the HTTP frontend: HAProxy reads the whole request (up to
  `tune.bufsize`) before it picks a replica, so the request is still in its buffer when the
  replica dies and `retry-on` (serving.app.front.RETRY_ON) can replay it on another one;
- the `errorfile` lines (Ray's one plain-text 500 for 502/503/504) become this API's JSON
  error files in ERRORS_DIR (serving.app.front.write_error_files) for every error HAProxy
  makes itself: 400, 408, 500, 502, 503, 504 (a request its HTTP/1 parser rejects still gets
  the parser's built-in HTML 400: errorfiles do not reach it);
- the plain-text 404 of `default_backend` (no application route yet: Serve starting or
  redeploying) becomes the JSON 503 Ray's proxy gives then (serving.app.proxy.proxy_error);
- the caller's `x-request-id` is echoed on HAProxy's own answers, as the API does on its own;
- every request is stamped with the time HAProxy received it (RECEIVED_AT_HEADER, ms since
  the epoch, replacing any the caller sent): a draining replica still admits a request
  HAProxy had before the drain began (serving.app.pipeline.Admission).

Stdlib only, and run with `-S`: it starts once per HAProxy start and reload.
"""

from __future__ import annotations

import fcntl
import os
import sys

MARK = "# vtfuse: rewritten by serving/app/haproxy_wrapper.py; Ray's own text is in this file's .ray sibling"
ERROR_CODES = (400, 408, 500, 502, 503, 504)
NO_ROUTE_BODY = "no-route.json"  # body of the 503 for a path no application serves (yet)
RECEIVED_AT_HEADER = "x-vtfuse-received-at"  # when the front door received the request, ms since the epoch


def error_file(errors_dir: str, code: int) -> str:
    """Path of the errorfile (a whole HTTP response) HAProxy sends for its own `code`."""
    return os.path.join(errors_dir, f"{code}.http")


def rewrite(text: str, errors_dir: str) -> str:
    """Ray's HAProxy configuration → the one HAProxy runs (idempotent: a rewritten text comes back as it is)."""
    if text.startswith(MARK):
        return text
    out = [MARK]
    section = ""
    for line in text.splitlines():
        stripped = line.strip()
        if line[:1] not in ("", " ", "\t", "#"):
            section = stripped  # a section starts at column 0: `defaults`, `frontend NAME`, `backend NAME`
        words = stripped.split()
        if words[:2] == ["option", "splice-request"]:
            continue
        if words[:1] == ["errorfile"]:
            continue  # Ray's plain-text 500; ours are set at the top of `defaults`
        if section == "backend default_backend" and words[:4] == ["http-request", "return", "status", "404"]:
            line = (
                "    http-request return status 503 content-type application/json"
                f" file {os.path.join(errors_dir, NO_ROUTE_BODY)} hdr Retry-After 2"
            )
        out.append(line)
        if stripped == "defaults":
            out += [f"    errorfile {code} {error_file(errors_dir, code)}" for code in ERROR_CODES]
        elif stripped == "frontend http_frontend":
            out += [
                "    option http-buffer-request",
                f"    http-request set-header {RECEIVED_AT_HEADER} %[date(0,ms)]",
                "    http-request set-var(txn.vtfuse_rid) req.hdr(x-request-id) if { req.hdr(x-request-id) -m found }",
                "    http-after-response set-header x-request-id %[var(txn.vtfuse_rid)]"
                " if { var(txn.vtfuse_rid) -m found } !{ res.hdr(x-request-id) -m found }",
            ]
    return "\n".join(out) + "\n"


def missing_anchors(text: str) -> list[str]:
    """Lines of Ray's configuration the rewrite hooks onto that `text` lacks (a Ray upgrade changed the template)."""
    lines = {line.strip() for line in text.splitlines()}
    return [a for a in ("defaults", "frontend http_frontend", "option splice-request") if a not in lines]


def config_paths(args: list[str]) -> list[str]:
    """The configuration files HAProxy's command line names (`-f PATH`, and every argument after `--`)."""
    paths = []
    for i, arg in enumerate(args):
        if arg == "-f" and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg == "--":
            paths += args[i + 1 :]
            break
    return paths


def rewrite_file(path: str, errors_dir: str) -> None:
    """Rewrite the configuration at `path` in place, under the lock Ray writes it under; Ray's text to `path`.ray."""
    if not os.path.isfile(path):
        return  # a folder of files or a missing one: HAProxy says what is wrong
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            with open(path) as f:
                text = f.read()
            if text.startswith(MARK):
                return
            for anchor in missing_anchors(text):
                print(f"haproxy_wrapper: {path} has no {anchor!r} line: Ray's template changed?", file=sys.stderr)
            with open(path + ".ray", "w") as f:
                f.write(text)
            tmp = path + ".vtfuse-tmp"
            with open(tmp, "w") as f:
                f.write(rewrite(text, errors_dir))
            os.replace(tmp, path)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def main(argv: list[str]) -> None:
    """`REAL_HAPROXY ERRORS_DIR -- ARGS...`: rewrite the configuration, then become REAL_HAPROXY ARGS."""
    if len(argv) < 3 or argv[2] != "--":
        sys.exit("usage: haproxy_wrapper.py REAL_HAPROXY ERRORS_DIR -- HAPROXY_ARGS...")
    real, errors_dir, args = argv[0], argv[1], argv[3:]
    for path in config_paths(args):
        try:
            rewrite_file(path, errors_dir)
        except OSError as e:  # HAProxy still starts, on Ray's text: serving beats refusing to
            print(f"haproxy_wrapper: could not rewrite {path}: {e}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(real, [real, *args])


if __name__ == "__main__":
    main(sys.argv[1:])
