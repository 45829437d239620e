"""mosel inside an existing ASGI service (Starlette)."""
