"""`make bench`: throughput, latency and model-swap benchmarks of StreamML's services, with profiles."""
