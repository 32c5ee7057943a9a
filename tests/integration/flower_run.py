"""The `flwr run` harness lives in scripts/flower_run.py (benchmarks use it too); re-exported here."""

from scripts.flower_run import ROOT, FlowerRun, flwr_run, read_metrics, run_config_arg

__all__ = ["ROOT", "FlowerRun", "flwr_run", "read_metrics", "run_config_arg"]
