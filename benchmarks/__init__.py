"""Benchmarks for vllm-sink: models, text streams and streaming perplexity."""
