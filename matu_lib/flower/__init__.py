"""Flower (flwr >= 1.20 Message API) integration: the project's MaTU/FedAvg rounds as a ServerApp + ClientApp.

- ``run_flower(cfg, method, out)``: the whole run on Flower's simulation engine, same results as
  ``federation.run`` (see ``docs/flower.md``);
- ``client_app.app`` / ``server_app.app``: the apps for ``flwr run`` and SuperLink/SuperNode deployments;
- ``MaTUStrategy`` / ``FedAvgStrategy``: Flower strategies calling the project's own aggregation.
"""

from .simulation import FlowerRunResult, run_flower
from .strategy import FedAvgStrategy, MaTUStrategy, make_strategy

__all__ = ["FedAvgStrategy", "FlowerRunResult", "MaTUStrategy", "make_strategy", "run_flower"]
