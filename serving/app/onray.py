"""`vtfuse serve --ray-address`: the API and a Triton per node on an existing Ray cluster; on stop only those go.

No Ray process is started: the command joins the cluster as a driver (run it on a node of the
cluster, usually the head), then

1. refuses at once, naming the address, a cluster that does not answer, one with no node offering
   the custom resource `vtfuse_triton`, or one that already runs an application named `vtfuse`;
2. starts a Triton on every node offering `vtfuse_triton` (serving.triton.pernode: an actor pinned
   to the node supervises it) and waits until they are ready;
3. deploys the app with Serve's proxy on every node that hosts replicas (`proxy_location:
   EveryNode`, serving.app.proxy's middleware in each), `triton_url: ray:vtfuse_triton` (each
   replica calls its node's Triton and fails over to the others) and `replicas_per_node` Ingress
   replicas per such node, which Serve places with Ray's SPREAD strategy;
4. keeps, every 2 s, one Triton per such node (a node that joins or rejoins gets one; a draining
   node's is no longer chosen by replicas elsewhere, and is stopped once no replica runs on that
   node, so that Ray can let the drained node go), scales the Ingress up to `replicas_per_node`
   per node when nodes join, and when a node with a Triton hosts no replica while another hosts
   two or more (after a node loss, the lost replicas were started on the survivors), spreads them
   again with a rolling restart (Serve starts each new replica before it stops an old one);
5. on SIGINT/SIGTERM drains the API as on one machine, deletes the application (and Serve itself
   when this command started it and nothing else runs on it), stops its Tritons and disconnects.
   The cluster and anything else on it keep running.

The front door is Serve's HTTP proxy on every node (`VTFUSE_FRONT=haproxy` is for the one-machine
stack and refused here). Nodes that share one machine need distinct ports for it: the head takes
`--api-port`, the others `--worker-api-port` (Ray's `RAY_SERVE_WORKER_PROXY_HTTP_PORT`).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from serving.app.raycluster import address_file, answers
from serving.paths import REPO_ROOT
from serving.procs import ParentSignalWatch, PortInUse, SignalRelay, check_ports_free
from serving.triton.directory import DISCOVERY_URL, RESOURCE
from serving.triton.pernode import NodeTritonSpec, TritonFleet

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 60.0
RECONCILE_EVERY_S = 2.0
SPREAD_EVERY_S = 5.0
SPREAD_COOLDOWN_S = 60.0
CLUSTER_LOST_AFTER_S = 30.0
SPREAD_ENV = "VTFUSE_SPREAD_EPOCH"  # changed to restart the Ingress replicas, which spreads them again


class ClusterError(SystemExit):
    """A cluster vtfuse cannot deploy onto; the message names the address and the fix."""


def resolve_address(address: str) -> str:
    """`host:port` of the cluster's GCS: `auto` reads Ray's current-cluster file; Ray Client addresses are refused."""
    address = address.strip()
    if address.startswith("ray://"):
        raise ClusterError(
            f"--ray-address {address}: Ray Client addresses are not supported; run `vtfuse serve` on a node of the "
            "cluster with the GCS address host:port (`ray status` on the head prints it)"
        )
    if address == "auto":
        path = address_file(dict(os.environ))
        try:
            return path.read_text().strip()
        except OSError:
            raise ClusterError(
                f"--ray-address auto: no Ray cluster runs on this machine ({path} is missing): pass host:port"
            ) from None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--ray-address {address}: expected host:port of the cluster's GCS (e.g. 10.0.0.5:6379)")
    return address


def join(address: str, timeout_s: float = JOIN_TIMEOUT_S) -> None:
    """`ray.init` to the cluster at `address`, or a ClusterError at once (nothing answers) or after `timeout_s`."""
    if not answers(address, timeout_s=3.0):
        raise ClusterError(
            f"no Ray cluster answers at {address} (nothing accepts connections there): start one "
            f"(`ray start --head --resources '{{\"{RESOURCE}\": 1}}'`) or pass its GCS address (`ray status` prints it)"
        )
    import ray
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    # As `ray start --head` does: with RAY_AUTH_MODE unset and this user's token at hand, send it (a head started
    # by the same user turned token authentication on by itself; one without it ignores the token).
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    result: dict[str, BaseException | None] = {}

    def init() -> None:
        try:
            ray.init(
                address=address,
                namespace="serve",
                log_to_driver=False,
                # The Triton actors import serving.*: the checkout's path on every node (same image or path).
                runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
            )
            result["error"] = None
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=init, name="ray-init", daemon=True)
    t.start()
    t.join(timeout_s)
    if "error" not in result:
        raise ClusterError(f"could not join the Ray cluster at {address} within {timeout_s:.0f} s: is it a Ray GCS?")
    err = result["error"]
    if err is not None:
        hint = ""
        if "auth" in str(err).lower() or "token" in str(err).lower():
            hint = " (the cluster uses token authentication: set RAY_AUTH_MODE=token and its token, RAY_AUTH_TOKEN)"
        raise ClusterError(f"could not join the Ray cluster at {address}: {err}{hint}")


def triton_nodes(address: str) -> dict[str, str]:
    """The nodes offering `vtfuse_triton` (id → address); ClusterError naming the address when there is none."""
    nodes = {node_id: ip for node_id, (ip, _) in TritonFleet.candidate_nodes().items()}
    if not nodes:
        raise ClusterError(
            f"the Ray cluster at {address} has no alive node offering the resource {RESOURCE}: start the nodes that "
            f"should run Triton with `ray start ... --resources '{{\"{RESOURCE}\": 1}}'`"
        )
    return nodes


def app_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """What the app's processes get from this shell: the checkout's path and every VTFUSE_* and OTEL_* variable.

    On one machine Ray's processes inherit `vtfuse serve`'s environment; on a cluster they do not,
    so these travel in the application's runtime_env.
    """
    env = dict(os.environ if env is None else env)
    out = {"PYTHONPATH": str(REPO_ROOT)}
    out.update({k: v for k, v in env.items() if k.startswith(("VTFUSE_", "OTEL_")) and k != "VTFUSE_FRONT"})
    return out


def controller_environment(config: dict[str, Any], ns: argparse.Namespace) -> dict[str, str]:
    """The Serve controller's environment, which its proxies inherit: our middleware, Ray's proxy, per-node ports."""
    from serving.app.cli import proxy_environment
    from serving.app.front import selected

    if selected() == "haproxy" and os.environ.get("VTFUSE_FRONT"):
        raise ClusterError(
            "VTFUSE_FRONT=haproxy is the one-machine front door; with --ray-address the front door is Ray Serve's "
            "proxy on every node: unset VTFUSE_FRONT (or set it to ray)"
        )
    saved = os.environ.get("VTFUSE_FRONT")
    os.environ["VTFUSE_FRONT"] = "ray"
    try:
        env = proxy_environment(config)  # middleware, in-flight cap, controller loop period; HAProxy off
    finally:
        if saved is None:
            os.environ.pop("VTFUSE_FRONT")
        else:
            os.environ["VTFUSE_FRONT"] = saved
    env["PYTHONPATH"] = str(REPO_ROOT)
    if ns.worker_api_port:
        env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(ns.worker_api_port)
    if ns.worker_grpc_port:
        env["RAY_SERVE_WORKER_PROXY_GRPC_PORT"] = str(ns.worker_grpc_port)
    return env


def _app(config: dict[str, Any]) -> dict[str, Any]:
    from serving.app.cli import APP_NAME

    return next((a for a in config["applications"] if a.get("name") == APP_NAME), config["applications"][0])


def ingress_of(config: dict[str, Any]) -> dict[str, Any]:
    """The Ingress entry of the app's `deployments:` (added when missing)."""
    deps = _app(config).setdefault("deployments", [])
    ingress = next((d for d in deps if d.get("name") == "Ingress"), None)
    if ingress is None:
        ingress = {"name": "Ingress"}
        deps.append(ingress)
    return ingress


def render_cluster_config(ns: argparse.Namespace, n_nodes: int) -> dict[str, Any]:
    """The Serve config for the cluster: Serve's proxy on every node, per-node Tritons, replicas per node."""
    from serving.app.cli import load_serve_config, render_serve_config

    cfg = render_serve_config(load_serve_config(Path(ns.config)), ns, DISCOVERY_URL)
    cfg["proxy_location"] = "EveryNode"
    app = _app(cfg)
    app["args"]["triton_catalog"] = False  # the repository is on every node: nothing to learn from Triton
    runtime_env = dict(app.get("runtime_env") or {})
    runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **app_environment()}
    app["runtime_env"] = runtime_env
    ingress = ingress_of(cfg)
    if "autoscaling_config" not in ingress:
        ingress["num_replicas"] = max(1, ns.replicas_per_node * n_nodes)
    # A restart that spreads the replicas again starts all the new ones before it stops old ones: no capacity dip,
    # and Ray's SPREAD strategy places them together.
    ingress.setdefault("max_surge_percent", 100)
    return cfg


def set_replicas(config: dict[str, Any], n: int) -> bool:
    """Raise the Ingress to `n` replicas (never lower); True when it changed."""
    ingress = ingress_of(config)
    if "autoscaling_config" in ingress or int(ingress.get("num_replicas") or 1) >= n:
        return False
    ingress["num_replicas"] = n
    return True


def bump_spread_epoch(config: dict[str, Any]) -> int:
    """Change the Ingress replicas' environment (a rolling restart that places them again); the new epoch."""
    opts = ingress_of(config).setdefault("ray_actor_options", {})
    renv = opts.setdefault("runtime_env", {})
    env_vars = renv.setdefault("env_vars", {})
    epoch = int(env_vars.get(SPREAD_ENV, "0")) + 1
    env_vars[SPREAD_ENV] = str(epoch)
    return epoch


def uneven(replicas_by_node: Counter[str], triton_nodes: set[str]) -> bool:
    """A ready Triton node hosts no Ingress replica while another node hosts two or more."""
    empty = [n for n in triton_nodes if replicas_by_node.get(n, 0) == 0]
    return bool(empty) and any(c >= 2 for c in replicas_by_node.values())


def all_replicas(client: Any, deployment: str | None = None) -> list[dict[str, Any]]:
    """The app's replicas (of one deployment, or all) as Serve's controller lists them."""
    from serving.app.cli import APP_NAME

    details = client.get_serve_details()
    deps = ((details.get("applications") or {}).get(APP_NAME) or {}).get("deployments") or {}
    return [r for name, d in deps.items() if deployment in (None, name) for r in (d.get("replicas") or [])]


def ingress_replicas(client: Any) -> tuple[Counter[str], bool]:
    """RUNNING Ingress replicas per node id, and whether every replica of the Ingress is RUNNING."""
    replicas = all_replicas(client, "Ingress")
    running = Counter(str(r.get("node_id")) for r in replicas if str(r.get("state")).endswith("RUNNING"))
    return running, bool(replicas) and sum(running.values()) == len(replicas)


def _head_node_id() -> str | None:
    import ray

    for n in ray.nodes():
        if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {}):
            return str(n["NodeID"])
    return None


def _serve_running() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def node_spec(ns: argparse.Namespace) -> NodeTritonSpec:
    """Each node's Triton settings from the flags (ports are preferences; see serving.triton.pernode)."""
    from serving.app.cli import triton_settings

    # The admin key travels with the settings: the actor runs on a node whose environment may lack it.
    settings = triton_settings(ns, restricted_value=os.environ.get("TRITON_ADMIN_KEY", ""))
    return NodeTritonSpec(settings, str(Path(ns.triton_log).resolve().parent))


class ClusterStack:
    """What this command put on the cluster, and the loop that keeps it so (`run_on_cluster` drives it)."""

    def __init__(self, ns: argparse.Namespace, address: str) -> None:
        self.ns = ns
        self.address = address
        self.fleet = TritonFleet(node_spec(ns))
        self.config: dict[str, Any] = {}
        self.client: Any = None
        self.started_serve = False
        self.deployed = False
        self.uneven_since: float | None = None
        self.last_spread = float("-inf")
        self.lost_since: float | None = None

    def deploy(self, n_nodes: int) -> None:
        """Start Serve (when none runs) with our proxies' environment, deploy the app, wait until it runs."""
        from ray.serve._private.api import serve_start
        from ray.serve.schema import ServeDeploySchema

        from serving.app.cli import _wait_running

        self.config = render_cluster_config(self.ns, n_nodes)
        if self.ns.triton_tls_cert:
            args = _app(self.config)["args"]
            args["triton_tls"] = True
            args["triton_tls_root_cert"] = str(Path(self.ns.triton_tls_ca or self.ns.triton_tls_cert).resolve())
        schema = ServeDeploySchema.model_validate(self.config)
        self.started_serve = not _serve_running()
        if not self.started_serve:
            log.warning("Serve already runs on this cluster: its HTTP/gRPC options and proxies are kept as they are")
        self.client = serve_start(
            http_options=schema.http_options.model_dump(),
            grpc_options=schema.grpc_options.model_dump(),
            proxy_location=schema.proxy_location,
            global_logging_config=schema.logging_config,
            global_tracing_config=schema.tracing_config,
            controller_options={"runtime_env": {"env_vars": controller_environment(self.config, self.ns)}},
        )
        self.client.deploy_apps(schema, _blocking=False)
        self.deployed = True
        _wait_running(timeout=300)

    def redeploy(self) -> None:
        """Apply `self.config` (replica count or spread epoch changed)."""
        from ray.serve.schema import ServeDeploySchema

        self.client.deploy_apps(ServeDeploySchema.model_validate(self.config), _blocking=False)

    def tick(self, now: float) -> str | None:
        """One round of housekeeping; a reason to stop, or None."""
        try:
            self.fleet.reconcile()
            self.lost_since = None
        except Exception as e:
            self.lost_since = self.lost_since or now
            log.warning("the Ray cluster does not answer (%s)", str(e).splitlines()[0][:200])
            if now - self.lost_since > CLUSTER_LOST_AFTER_S:
                return f"the Ray cluster at {self.address} has not answered for {CLUSTER_LOST_AFTER_S:.0f} s"
            return None
        if self.fleet.draining and self.client is not None:  # a drained node's Triton goes once its replicas have
            try:
                hosting = {str(r["node_id"]) for r in all_replicas(self.client)}
                for node_id in self.fleet.draining - hosting:
                    self.fleet.retire(node_id)
            except Exception as e:
                log.debug("Serve details not available: %s", e)
        ready = {e.node_id for e in self.fleet.ready()}
        if set_replicas(self.config, self.ns.replicas_per_node * len(ready)):
            log.info("more nodes with a Triton (%d): Ingress replicas raised to %d", len(ready),
                     ingress_of(self.config)["num_replicas"])
            self.redeploy()
        return None

    def spread(self, now: float) -> None:
        """Restart the Ingress replicas when they stay unevenly placed (see the module doc)."""
        try:
            by_node, all_running = ingress_replicas(self.client)
        except Exception as e:
            log.debug("Serve details not available: %s", e)
            return
        ready = {e.node_id for e in self.fleet.ready()} - self.fleet.draining
        if not (all_running and uneven(by_node, ready)):
            self.uneven_since = None
            return
        self.uneven_since = self.uneven_since or now
        if now - self.uneven_since < SPREAD_EVERY_S or now - self.last_spread < SPREAD_COOLDOWN_S:
            return
        epoch = bump_spread_epoch(self.config)
        log.warning("Ingress replicas per node %s leave a node with a Triton without one: restarting them to "
                    "spread them again (epoch %d)", dict(by_node), epoch)
        self.redeploy()
        self.last_spread, self.uneven_since = now, None

    def remove(self) -> None:
        """Delete the app (and Serve when we started it and it serves nothing else), stop the Tritons, disconnect."""
        import ray
        from ray import serve

        from serving.app.cli import APP_NAME, RAY_DISCONNECT_S, SERVE_SHUTDOWN_S, _bounded

        t0 = time.monotonic()
        if self.deployed:
            def delete() -> None:
                others = [a for a in serve.status().applications if a != APP_NAME]
                if self.started_serve and not others:
                    serve.shutdown()
                else:
                    serve.delete(APP_NAME)

            _bounded(delete, SERVE_SHUTDOWN_S + 20, "removing the application")
        t1 = time.monotonic()
        _bounded(lambda: self.fleet.stop(self.ns.exit_timeout + 10), self.ns.exit_timeout + 20, "stopping Tritons")
        t2 = time.monotonic()
        _bounded(ray.shutdown, RAY_DISCONNECT_S, "ray.shutdown")
        log.info("removed from %s: the application %.1f s, Tritons %.1f s; the cluster keeps running",
                 self.address, t1 - t0, t2 - t1)

    def describe(self) -> str:
        """The lines printed once the app runs: front doors, Tritons."""
        from serving.app.cli import APP_NAME

        ns = self.ns
        head = _head_node_id()
        lines = [f"vtfuse on the Ray cluster at {self.address} (application {APP_NAME})"]
        try:
            by_node, _ = ingress_replicas(self.client)
        except Exception:
            by_node = Counter()
        import ray

        ips = {n["NodeID"]: n.get("NodeManagerAddress", "") for n in ray.nodes() if n.get("Alive")}
        for node_id in sorted(set(by_node) | ({head} if head else set())):
            port = ns.api_port if node_id == head or not ns.worker_api_port else ns.worker_api_port
            host = ns.api_host if ns.api_host not in ("0.0.0.0", "::") else ips.get(node_id, "?")
            if node_id != head and ns.api_host in ("127.0.0.1", "localhost"):
                host = "127.0.0.1 on that node"
            role = "head" if node_id == head else "node"
            lines.append(f"vtfuse API  http://{host}:{port}  ({role} {ips.get(node_id, '?')}, "
                         f"{by_node.get(node_id, 0)} Ingress replicas)")
        for e in self.fleet.endpoints():
            lines.append(f"Triton      node {e.node_ip or '?'}: {e.state}  gRPC {e.grpc or '-'}  log {e.log or '-'}"
                         + (f"  ({e.failure})" if e.failure else ""))
        lines.append("Ctrl-C removes the application and its Tritons; the cluster keeps running. "
                     "GET /v1/cluster lists nodes, replicas and Tritons.")
        return "\n".join(lines)


def run_on_cluster(ns: argparse.Namespace) -> int:
    """`vtfuse serve --ray-address`: deploy, keep, drain and remove (module doc); the exit code."""
    from serving.app.cli import STOP_STACKS_AFTER_S, StopSignals, drain, stop_with_parent

    signals = StopSignals(stacks_after_s=ns.drain_timeout + STOP_STACKS_AFTER_S + ns.exit_timeout)
    stop, force = signals.stop, signals.force
    relay = SignalRelay(signals)
    relay.install()
    watch = ParentSignalWatch(signals)
    if ns.stop_with_parent:
        stop_with_parent()
        watch.start()
    if ns.otlp_endpoint:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = ns.otlp_endpoint
    stack: ClusterStack | None = None
    try:
        address = resolve_address(ns.ray_address)
        join(address)
        relay.install()  # ray.init installs its own handlers: ours win
        nodes = triton_nodes(address)
        if _serve_running():
            from ray import serve

            from serving.app.cli import APP_NAME

            if APP_NAME in serve.status().applications:
                raise ClusterError(
                    f"the Ray cluster at {address} already runs a Serve application named {APP_NAME}: remove it "
                    f"first (`serve shutdown -a http://<head>:8265`, or serve.delete('{APP_NAME}') from Python)"
                )
        else:
            import ray

            if ray.get_runtime_context().get_node_id() == _head_node_id():  # Serve's proxy binds them on the head
                check_ports_free({"API HTTP, API_PORT": ns.api_port, "API gRPC, GRPC_PORT": ns.grpc_port},
                                 ns.api_host if ns.api_host not in ("0.0.0.0", "::") else "127.0.0.1")
        stack = ClusterStack(ns, address)
        log.info("starting a Triton on each of %d nodes offering %s", len(nodes), RESOURCE)
        ready = stack.fleet.wait_ready(timeout_s=300)
        if stop.is_set():
            return 0
        if not ready:
            reasons = "; ".join(why for why, _ in stack.fleet.refused.values()) or "none became ready in 300 s"
            raise ClusterError(f"no Triton could start on the Ray cluster at {address}: {reasons}")
        stack.deploy(len(ready))
        print(stack.describe(), flush=True)
        code, last_tick, last_spread = 0, 0.0, 0.0
        while not stop.wait(0.5):
            now = time.monotonic()
            if now - last_tick >= RECONCILE_EVERY_S:
                last_tick = now
                reason = stack.tick(now)
                if reason:
                    log.error("stopping: %s", reason)
                    code = 1
                    break
            if now - last_spread >= SPREAD_EVERY_S:
                last_spread = now
                stack.spread(now)
        if not force.is_set() and not code:
            log.info("stopping: draining the API (at most %.0f s; a second signal skips it)", ns.drain_timeout)
            drain(stack.client, stack.config, ns.drain_timeout, force)
        return code
    except PortInUse as e:
        print(f"vtfuse serve: not started: {e}", file=sys.stderr, flush=True)
        return 2
    except ClusterError as e:
        print(f"vtfuse serve: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        watch.cancel()
        if stack is not None:
            stack.remove()
        else:
            try:
                import ray

                if ray.is_initialized():
                    ray.shutdown()
            except Exception:
                log.debug("disconnecting from Ray failed", exc_info=True)
        faulthandler.cancel_dump_traceback_later()
