"""Serving: an OpenAI-compatible chat-completions API and a web chat page (FastAPI + uvicorn)."""
from .app import ApiError, ServerLimits, create_app
from .server import BackgroundServer, serve_forever

__all__ = ["ApiError", "BackgroundServer", "ServerLimits", "create_app", "serve_forever"]
