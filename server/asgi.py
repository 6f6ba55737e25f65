"""ASGI entry point for process managers (`uvicorn server.asgi:app --workers N`, gunicorn)."""

from server import logs
from server.app import create_app
from server.config import Settings, unknown_lines

if unknown := unknown_lines():
    raise SystemExit("\n".join(f"error: {line}" for line in unknown))
settings = Settings()
logs.configure(settings.log_level)
app = create_app(settings)
