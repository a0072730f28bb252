"""JSON responses serialised by orjson (installed with Prefect): rows go out as they come from
psycopg (datetimes, UUIDs, Decimals) without FastAPI's generic encoder, which dominated the
latency of the list endpoints."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
from fastapi.responses import JSONResponse


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class FastJSONResponse(JSONResponse):
    @staticmethod
    def dumps(content: Any) -> bytes:
        return orjson.dumps(content, default=_default, option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC)

    def render(self, content: Any) -> bytes:
        return self.dumps(content)
