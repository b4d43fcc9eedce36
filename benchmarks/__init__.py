"""`make bench`: how many milliseconds per part, and how many parts per second, on this machine.

Backend latency/throughput per batch size, per-stage timings, HTTP latency under load, and a report
(JSON + Markdown + PNG plot) in `benchmarks/results/`.
"""
