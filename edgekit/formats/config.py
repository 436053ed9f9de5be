"""The JSON config an ONNX or Core ML artifact carries beside its model: one reader for every format."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import InputError


@dataclass(frozen=True)
class ConfigSchema:
    """One config file: its name, and the ``format`` tag and versions each model kind may carry."""

    file: str
    formats: dict[str, str]  # kind -> "format" value ("decoder" -> "edgekit-onnx-decoder")
    versions: dict[str, tuple[int, ...]]  # kind -> versions this edgekit reads

    def path(self, model_file: Path) -> Path:
        return Path(model_file).parent / self.file

    def kind_of(self, config: dict[str, Any]) -> str | None:
        tag = config.get("format")
        return next((k for k, f in self.formats.items() if f == tag), None)

    def peek_kind(self, model_file: Path) -> str:
        """The kind the config beside ``model_file`` declares; "decoder" when it is absent or unreadable
        (opening the decoder then reports what is wrong with it in one line)."""
        try:
            return self.kind_of(json.loads(self.path(model_file).read_text())) or "decoder"
        except (OSError, ValueError, RecursionError, AttributeError):
            return "decoder"

    def read(self, model_file: Path, kind: str) -> dict[str, Any]:
        """The validated config of a ``kind`` artifact; one :class:`InputError` line when it is not one."""
        path = self.path(model_file)
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise InputError(f"{path} is missing or unreadable ({type(exc).__name__})",
                             "re-export the artifact with `edgekit convert`") from None
        if not isinstance(config, dict):
            raise InputError(f"{path} is not a JSON object", "re-export the artifact with `edgekit convert`")
        # decoder configs of version 1 carried no "format" tag
        tag = config.get("format", self.formats[kind] if kind == "decoder" else None)
        version = config.get("version", 1)
        if tag != self.formats[kind] or not isinstance(version, int) or version not in self.versions[kind]:
            raise InputError(f"{path} describes a {tag} version {version}, not an edgekit {kind} this version reads "
                             f"({self.formats[kind]} {', '.join(map(str, self.versions[kind]))})",
                             "re-export the artifact with this edgekit")
        return config

    def write(self, out_dir: Path, config: dict[str, Any], kind: str) -> Path:
        body = {"format": self.formats[kind], "version": max(self.versions[kind]), "kind": kind, **config}
        path = Path(out_dir) / self.file
        path.write_text(json.dumps(body, indent=1))
        return path
