"""Start or join Ray, deploy the engine replicas with our request router, serve the ingress, tear down.

The ingress is this process: uvicorn serving serve/api.py's app over a `RemoteEngine`, which calls the
replicas through a `DeploymentHandle` (Ray Serve's own HTTP proxy is disabled: one hop less, and the
OpenAI protocol layer stays the single-process server's).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from fastserve_cli.core.errors import UserError
from fastserve_cli.serve.cluster.replica import LOAD_ERROR_MARK, EngineReplica

log = logging.getLogger("fastserve.cluster")
DEPLOYMENT = "engine"
# By import path, not the class: Ray pickles a class object by value, and the router must share this
# process's module (its Book) with the ingress.
ROUTER_PATH = "fastserve_cli.serve.cluster.router:FastServeRouter"
STATS_PERIOD_S = 0.5
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # libgomp's idle-thread settings
# Ray starts its workers at nice 15 by default; replicas are the server, not background work.
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}  # how often the Serve controller polls each replica's load for the router


def replica_threads(cfg) -> int:
    """Intra-op threads per replica: --threads when given, else its CPU share (at least 1)."""
    return cfg.num_threads or max(1, int(cfg.replica_cpus))


def deployment_options(cfg, app_name: str) -> dict[str, Any]:
    """serve.deployment options from the serve config (pure: unit-tested without Ray)."""
    from ray.serve.config import RequestRouterConfig

    actor: dict[str, Any] = {"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus}
    omp = omp_env()
    if omp:  # Ray workers inherit the raylet's environment, not ours: pass the OpenMP wait policy on
        actor["runtime_env"] = {"env_vars": omp}
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": actor,
        # Our engine queues and answers 429 itself; Ray must not cap concurrency below that.
        "max_ongoing_requests": cfg.max_queue + 4 * cfg.max_batch_size,
        "request_router_config": RequestRouterConfig(
            request_router_class=ROUTER_PATH,
            request_router_kwargs={"policy": cfg.router, "app": app_name},
            request_routing_stats_period_s=STATS_PERIOD_S,
            request_routing_stats_timeout_s=5.0,
        ),
        "max_constructor_retry_count": 1,  # a replica that cannot load the model fails the start-up, once
        "health_check_period_s": 2.0,
        "logging_config": {"enable_access_log": False, "log_level": "WARNING"},  # no log line per call
        "graceful_shutdown_timeout_s": cfg.shutdown_timeout_s,
    }
    if cfg.autoscaling is not None:
        a = cfg.autoscaling
        if a.max_replicas < max(a.min_replicas, 1):
            raise UserError("serve.autoscaling.max_replicas must be >= min_replicas and >= 1")
        options["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "initial_replicas": min(max(cfg.replicas, a.min_replicas), a.max_replicas),
            "target_ongoing_requests": a.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = cfg.replicas
    return options


def omp_env() -> dict[str, str]:
    """The OpenMP wait settings of this process (e.g. OMP_WAIT_POLICY=PASSIVE on a shared machine, see
    docs/perf.md), for replicas to run their engines the way the single process would."""
    return {name: os.environ[name] for name in WAIT_VARIABLES if name in os.environ}


def replica_args(target, cfg) -> tuple[dict, dict]:
    cfg_dict = cfg.model_dump(mode="json")
    cfg_dict.update(num_threads=replica_threads(cfg), replicas=1, autoscaling=None, ray_address=None)
    target_dict = {
        "model_dir": str(target.model_dir),
        "backend": target.backend,
        "name": target.name,
        "run_dir": str(target.run_dir) if target.run_dir else None,
    }
    return target_dict, cfg_dict


def start_ray(cfg) -> bool:
    """Join `cfg.ray_address` or start a local instance; True when we started it (so we stop it)."""
    import ray

    if cfg.ray_address:
        try:
            ray.init(address=cfg.ray_address, include_dashboard=False, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise UserError(
                f"--ray-address {cfg.ray_address}: cannot join the Ray cluster ({err}); start one "
                "with `ray start --head` or leave --ray-address unset for a local instance"
            ) from None
        return False
    wanted = cfg.replicas * cfg.replica_cpus + 1
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(wanted + 0.999)),
        include_dashboard=False,
        logging_level=logging.WARNING,
        _system_config=LOCAL_SYSTEM_CONFIG,
    )
    return True


def deploy(target, cfg, app_name: str):
    """serve.run the replicas; returns the handle. A replica that cannot load the model -> one-line error."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    replica = serve.deployment(EngineReplica).options(**deployment_options(cfg, app_name))
    target_dict, cfg_dict = replica_args(target, cfg)
    try:
        return serve.run(replica.bind(target_dict, cfg_dict), name=app_name, route_prefix=None)
    except Exception as err:  # the replica's traceback is in the deployment status; keep our one line
        text = f"{err}\n{_deployment_message(app_name)}"
        for line in text.splitlines():
            if LOAD_ERROR_MARK in line:
                msg = line[line.index(LOAD_ERROR_MARK) + len(LOAD_ERROR_MARK) :]
                raise UserError(msg.strip()) from None
        first = next((ln for ln in text.splitlines() if ln.strip()), type(err).__name__)
        raise UserError(f"serve: deploying {cfg.replicas} replicas failed: {first}") from None


def _deployment_message(app_name: str) -> str:
    from ray import serve

    try:
        return serve.status().applications[app_name].deployments[DEPLOYMENT].message
    except Exception:
        return ""


def build_loaded(handle, target, book, transport: str = "grpc"):
    """What api.py's endpoints need, with a RemoteEngine in place of the local engine."""
    from fastserve_cli.core.tokenizer import load_tokenizer
    from fastserve_cli.serve.api import Loaded
    from fastserve_cli.serve.cluster.remote import RemoteEngine

    info = handle.info.remote().result(timeout_s=60)
    engine = RemoteEngine(handle, book, transport=transport)
    engine.vocab_size, engine.eos_token_ids = info["vocab_size"], info["eos_token_ids"]
    return Loaded(
        engine, load_tokenizer(target.model_dir), info["max_context"], info["kv_bytes_per_token"], info["kv_budget"]
    )


def teardown(app_name: str, started_ray: bool) -> None:
    """Delete our application (replicas drain their engines), and stop Ray if we started it."""
    import ray
    from ray import serve

    try:
        if started_ray:
            serve.shutdown()
        else:
            serve.delete(app_name)
    finally:
        ray.shutdown()


def run_cluster(target, cfg) -> None:
    """Deploy, serve the ingress until SIGTERM/SIGINT, then drain and tear down."""

    from fastserve_cli.serve import check_config, http_server
    from fastserve_cli.serve.api import ServerState
    from fastserve_cli.serve.cluster.book import book_for

    check_config(cfg)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app_name = f"fastserve-{cfg.model_name or target.name}-{cfg.port}"
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM while deploying still tears down
    started_ray = start_ray(cfg)
    try:
        handle = deploy(target, cfg, app_name)
        loaded = build_loaded(handle, target, book_for(app_name, cfg.router), cfg.ray_transport)
        signal.signal(signal.SIGTERM, previous)
        log.info(
            "%d replicas of %s up (router %s); ingress on %s:%d",
            cfg.replicas,
            target.name,
            cfg.router,
            cfg.host,
            cfg.port,
        )
        api_key = cfg.api_key or os.environ.get("FASTSERVE_API_KEY") or None
        state = ServerState(cfg.model_name or target.name, api_key, lambda: loaded, cfg.shutdown_timeout_s)
        http_server(state, cfg).run()
    finally:
        teardown(app_name, started_ray)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
