"""LTX-Video 0.9.x: T5 text, video only. model.py (the transformer), pipeline.py (components, loop, decode),
request.py (torch-free folder checks and flags -> request), tiny.py (the tiny-model writer), bench.py (its
benchmark workload)."""
