"""ASGI entry point for process managers (`uvicorn server.asgi:app --workers N`, gunicorn)."""

from server import logs
from server.app import create_app
from server.config import environment_settings

settings = environment_settings()
logs.configure(settings.log_level)
app = create_app(settings)
