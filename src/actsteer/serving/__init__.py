"""`actsteer serve`: the OpenAI API with per-request steering.

app (HTTP routes, streams, errors) → protocol (request bodies and their checks) and batcher
(the engine thread: continuous batching with per-row λ) → batch (the decode batch and its KV
cache), decoding (sampling, text and stop strings) and invariance (a row's result independent of
its batch-mates).
"""
