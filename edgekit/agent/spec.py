"""The job a host sends (``POST /v1/jobs``), validated whole before anything runs. It names stored blobs
and artifacts by digest and chooses among fixed options: no field is code, a path or a command."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Digest = Field(pattern=r"^[0-9a-f]{64}$")


class Backend(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_gpu_layers: int | None = Field(None, ge=-1, le=100_000)  # llama.cpp offload (-1: every layer)
    execution_provider: str | None = Field(None, pattern=r"^[A-Za-z]{1,40}ExecutionProvider$")


class QualityInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    blob: str = Digest  # an .npz: evaluation windows + the reference's top-k statistics (no pickles)


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    artifact: str = Field(pattern=r"^[0-9a-f]{32}$")
    measure: list[Literal["speed", "quality", "machine"]] = Field(default_factory=lambda: ["speed"], min_length=1, max_length=3)
    text_blob: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # UTF-8 prompt text for speed (default: shipped text)
    quality: QualityInputs | None = None
    threads: int | None = Field(None, ge=1, le=1024)
    n_ctx: int | None = Field(None, ge=64, le=1 << 20)
    prompt_tokens: int = Field(128, ge=1, le=1 << 16)
    prefill_tokens: int = Field(512, ge=1, le=1 << 16)
    decode_tokens: int = Field(64, ge=2, le=1 << 14)
    reps: int = Field(5, ge=1, le=100)
    load_reps: int = Field(3, ge=1, le=20)
    long_context: int = Field(0, ge=0, le=1 << 20)
    backend: Backend = Field(default_factory=Backend)
    timeout_s: float = Field(1800, gt=0, le=24 * 3600)
    max_memory_bytes: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self):
        if "quality" in self.measure and self.quality is None:
            raise ValueError("measure includes 'quality' but no quality inputs were given")
        if len(set(self.measure)) != len(self.measure):
            raise ValueError("measure lists an item twice")
        return self
