"""Flower (flwr >= 1.20 Message API) integration: every iterative method's rounds as a ServerApp + ClientApp.

- ``run_flower(cfg, method, out)``: the whole run on Flower's simulation engine, same results as
  ``federation.run`` (see ``docs/flower.md``);
- ``client_app.app`` / ``server_app.app``: the apps for ``flwr run`` and SuperLink/SuperNode deployments;
- ``MethodStrategy``: one Flower strategy driving any iterative method's server half (``methods.ServerHalf``).
"""

from .simulation import FlowerRunResult, run_flower
from .strategy import FLOWER_METHODS, MethodStrategy, make_strategy

__all__ = ["FLOWER_METHODS", "FlowerRunResult", "MethodStrategy", "make_strategy", "run_flower"]
