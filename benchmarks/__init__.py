"""Benchmarks: what dwcp costs, measured side by side with its reference in the same run."""
