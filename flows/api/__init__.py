"""The HTTP API and dashboard (`refresh api`): FastAPI over the control schema."""
