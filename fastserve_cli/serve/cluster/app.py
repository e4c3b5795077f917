"""The same cluster as a Ray Serve application, for `serve run` / `serve deploy` and KubeRay's RayService.

`fastserve serve --replicas N` runs the ingress in its own process (uvicorn, one hop). On Kubernetes the
RayService operator owns the processes and deploys applications by import path, so here the ingress is a
Serve deployment too (behind Ray's HTTP proxy) wrapping the very same app: serve/api.py's routes over a
RemoteEngine whose handle uses our request router. Arguments are the `serve:` recipe keys plus `target`:

    serve run fastserve_cli.serve.cluster.app:build_app target=/models/tiny replicas=2 router=prefix
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from fastserve_cli.serve.cluster.deploy import deployment_options, replica_args
from fastserve_cli.serve.cluster.replica import EngineReplica


@serve.ingress()
class ClusterIngress:
    """serve/api.py's app over the engine replicas (the app is built after __init__, per Ray Serve)."""

    def __init__(self, engine, target: dict[str, Any], cfg: dict[str, Any], app_name: str) -> None:
        from pathlib import Path

        from fastserve_cli.core.recipe import ServeConfig
        from fastserve_cli.serve import ServeTarget
        from fastserve_cli.serve.api import ServerState
        from fastserve_cli.serve.cluster.book import book_for
        from fastserve_cli.serve.cluster.deploy import build_loaded

        config = ServeConfig.model_validate(cfg)
        serve_target = ServeTarget(Path(target["model_dir"]), target["backend"], target["name"])
        api_key = config.api_key or os.environ.get("FASTSERVE_API_KEY") or None
        book = book_for(app_name, config.router)
        self.state = ServerState(
            config.model_name or serve_target.name,
            api_key,
            lambda: build_loaded(engine, serve_target, book, config.ray_transport),
            config.shutdown_timeout_s,
        )

    def __serve_build_asgi_app__(self):
        from fastserve_cli.serve.api import create_app

        return create_app(self.state)


def build_app(args: dict[str, Any]):
    """Ray Serve application builder: `target` (a model directory every node can read) + serve keys."""
    from fastserve_cli.serve import resolve_target, serve_config

    args = dict(args)
    target = resolve_target(args.pop("target"), args.pop("backend", None), None)
    app_name = args.pop("app_name", "fastserve")
    cfg = serve_config(None, [], {k: _parse(v) for k, v in args.items()})
    engine = serve.deployment(EngineReplica).options(**deployment_options(cfg, app_name))
    target_dict, cfg_dict = replica_args(target, cfg)
    ingress = serve.deployment(ClusterIngress).options(name="ingress", ray_actor_options={"num_cpus": 0.5})
    return ingress.bind(engine.bind(target_dict, cfg_dict), target_dict, cfg_dict, app_name)


def _parse(value: Any) -> Any:
    """`serve run` passes key=value strings; YAML gives numbers, booleans and mappings their types."""
    import yaml

    return yaml.safe_load(value) if isinstance(value, str) else value
