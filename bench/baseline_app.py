"""The yardstick: a bare FastAPI POST endpoint with a pydantic body.

DESIGN.md §9 states the broker's throughput target as a fraction of what this
app does on the same machine with the same uvicorn worker count, measured in the
same run, so machine speed cancels out of the ratio. The body model has the
shape of a disclosure request so parsing and validation cost the same.
Serve with ``uvicorn bench.baseline_app:app``.
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field


class Ask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject_ref: str = Field(min_length=1, max_length=128)
    category: str = Field(min_length=1, max_length=32)
    purpose: str = Field(min_length=1, max_length=64)
    fields: list[str] | None = Field(default=None, max_length=100)


class Answer(BaseModel):
    subject_ref: str
    category: str
    fields: list[str]


app = FastAPI()


@app.post("/v1/disclosures")
async def disclose(body: Ask) -> Answer:
    return Answer(subject_ref=body.subject_ref, category=body.category, fields=body.fields or [])


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
