"""Reproducible benchmarks of batchrun against a bare aiohttp loop and SDK recipes."""
