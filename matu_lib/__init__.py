"""MaTU workbook library: task vectors, modulators, aggregation and a federated runner.

The MaTU paper's body is not available; this library follows its abstract and EMR-Merging
(see README, "What is reconstructed").
"""

__version__ = "0.1.0"
