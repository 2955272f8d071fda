"""A small admin client for a running server, standard library only: push, list and revert patches.

    from roselora_export.serve.client import Admin
    admin = Admin("http://127.0.0.1:8000", token)
    entry = admin.push("edit.patch.safetensors")      # sends edit.patch.safetensors.sig along, if present
    admin.revert(entry["id"])

Each call returns the decoded JSON body; a refusal raises `AdminError` carrying the HTTP status and
the server's message. Completions go through any OpenAI client (`base_url=URL + "/v1"`).
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path


class AdminError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


def multipart(parts: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of multipart/form-data with one file part per (filename, bytes)."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, (filename, data) in parts.items():
        chunks += [f"--{boundary}\r\n".encode(),
                   f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode(),
                   b"Content-Type: application/octet-stream\r\n\r\n", data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


class Admin:
    def __init__(self, url: str, token: str | None, timeout: float = 60.0) -> None:
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token is not None else {}
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace")
            raise AdminError(err.code, message) from None

    def push_bytes(self, data: bytes, signature: bytes | None, filename: str = "patch.safetensors") -> dict:
        parts = {"patch": (filename, data)}
        if signature is not None:
            parts["signature"] = (filename + ".sig", signature)
        return self.request("POST", "/v1/patches", *multipart(parts))

    def push(self, patch: str | os.PathLike, signature: str | os.PathLike | None = None) -> dict:
        """Upload a patch file and its signature (default: PATCH.sig beside it, sent when it exists)."""
        patch = Path(patch)
        sig = Path(signature) if signature is not None else patch.with_name(patch.name + ".sig")
        return self.push_bytes(patch.read_bytes(), sig.read_bytes() if sig.is_file() else None, patch.name)

    def revert(self, patch_id: str) -> dict:
        return self.request("DELETE", f"/v1/patches/{patch_id}")

    def list(self) -> list[dict]:
        return self.request("GET", "/v1/patches")["data"]
