"""The HTTP layer: the app, its routes and handlers, and the server adapters.

The app (:func:`create_app`) is independent of the server interface; :mod:`.server` runs it on
granian (RSGI) or uvicorn (ASGI).
"""

from .app import App, create_app
from .state import ServedModel

__all__ = ["App", "ServedModel", "create_app"]
