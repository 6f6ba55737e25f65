"""ASGI entry point for process managers (`uvicorn server.asgi:app --workers N`, gunicorn)."""

from server import logs
from server.app import create_app
from server.config import Settings, unknown_variables

if unknown := unknown_variables():
    raise SystemExit(f"REASONREC_* variables no setting reads: {', '.join(unknown)}")
settings = Settings()
logs.configure(settings.log_level)
app = create_app(settings)
