"""Evaluation: fidelity and distribution metrics, the run report and the evaluation command."""
