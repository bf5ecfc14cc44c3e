"""`flashport serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine.

app.py (routes, run_server), protocol.py (request models, response shapes), bridge.py (the engine
thread and its asyncio front), metrics.py (Prometheus), errors.py (OpenAI error objects).
"""
