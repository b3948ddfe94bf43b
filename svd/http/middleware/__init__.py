"""The ASGI middleware around every request, outermost first as service.py adds it."""
