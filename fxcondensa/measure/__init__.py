"""What a model costs: per-layer reports, latency measurement, bytes on disk.
"""
