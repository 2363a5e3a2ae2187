"""Steering inside serving engines: per-request maps in vLLM (`vllm`, with `batch`)."""
