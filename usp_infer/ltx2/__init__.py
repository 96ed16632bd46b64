"""LTX-2 / LTX-2.3: Gemma-3 text, video and audio from one transformer. model.py (the transformer), pipeline.py
(components, loop, decode), request.py (torch-free folder checks and flags -> request), tiny.py (the tiny-model
writer), bench.py (its benchmark workload)."""
