"""fastserve serve --replicas N: engine replicas on Ray Serve behind an ingress that speaks the same API.

Layout: policy.py (pure routing policies) -> router.py (Ray Serve's RequestRouter extension point running
them) -> replica.py (the deployment: today's engine) -> remote.py (an engine look-alike for serve/api.py)
-> book.py (loads, routing counters, merged metrics) -> deploy.py (Ray start/join, serve.run, teardown).
Nothing heavy is imported here; `require_ray` turns a missing extra into a one-line user error.
"""

from __future__ import annotations

from fastserve_cli.core.errors import UserError

EXTRA_HINT = "pip install 'fastserve[ray]'"


def require_ray() -> None:
    """Ray Serve is an optional extra: say which one when it is missing."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise UserError(
            f"serve.replicas > 1 runs replicas on Ray Serve, which is not installed; install the extra: {EXTRA_HINT}"
        ) from None


def uses_cluster(cfg) -> bool:
    """One replica without autoscaling or a Ray address is today's single process, unchanged."""
    return cfg.replicas > 1 or cfg.autoscaling is not None or cfg.ray_address is not None


def serve_cluster(target, cfg) -> None:
    require_ray()
    from fastserve_cli.serve.cluster.deploy import run_cluster

    run_cluster(target, cfg)
