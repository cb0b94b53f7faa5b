"""The OpenAI-compatible HTTP server (`r1deploy serve`).

cli.py (flags, uvicorn) -> app.py (create_app: lifespan, routes) behind middleware.py (key, readiness,
body cap, in-flight count); completions.py and chat.py build SamplingParams and answers; generation.py
fans n out into engine requests and aborts them on disconnect; protocol.py holds the OpenAI schemas,
errors.py the error shape, reasoning.py the <think> split, logprobs.py the logprob shapes, sse.py the
event stream, metrics.py the Prometheus registry, state.py settings and lifecycle, draining.py SIGTERM.
"""
