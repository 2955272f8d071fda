"""The server's patch stack: signed uploads checked, then applied or reverted on the live model.

`PatchStore.add(data, signature, filename)` checks the signature (before a byte of the patch is parsed),
the file, then `PatchRuntime.apply` against the live bits. Each refusal is a `Refused` carrying the HTTP
status, and leaves the model as it was: 400 a corrupt file; 403 a missing or bad signature; 404 no such
id; 409 a patch that does not fit the live model, or a revert blocked by a later overlapping patch.
Uploads live in a private temporary directory only while checked; nothing is written beside the model.
"""
from __future__ import annotations

import hashlib
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..patch.model import Patch
from ..runtime import PatchHandle, PatchRuntime

LOADED_CACHE_BYTES = 256 << 20  # applied patches kept loaded by sha256, so re-applying one reuses its staging


class Refused(InputError):
    """A patch request the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Applied:
    """One patch in the live stack, as GET /v1/patches lists it."""

    handle: PatchHandle
    sha256: str
    filename: str
    signed_by: str | None  # the trusted key's file name, or None where no key is required
    applied_at: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        return str(self.handle.id)

    def to_dict(self) -> dict:
        return {"id": self.id, "sha256": self.sha256, "nnz": self.handle.nnz, "provenance": self.handle.provenance,
                "filename": self.filename, "tensors": len(self.handle.names), "signed_by": self.signed_by,
                "applied_at": int(self.applied_at)}


class PatchStore:
    """Applies and reverts uploaded patches on one runtime; thread-safe (one change at a time)."""

    def __init__(self, runtime: PatchRuntime, trusted_keys: list[Path] | None = None) -> None:
        self.runtime = runtime
        self.trusted_keys = list(trusted_keys or [])
        self._lock = threading.Lock()
        self._applied: list[Applied] = []
        self._loaded: OrderedDict[str, Patch] = OrderedDict()  # sha256 -> loaded patch, most recent last

    def list(self) -> list[dict]:
        with self._lock:
            return [a.to_dict() for a in self._applied]

    def add_file(self, path: str | Path, signature: str | Path | None = None) -> dict:
        """Apply a patch file from disk (its signature beside it as PATH.sig, or `signature`)."""
        from ..signing import signature_path

        path = Path(path)
        if not path.is_file():
            raise InputError(f"--patch {path}: no such file")
        sig = Path(signature) if signature is not None else signature_path(path)
        return self.add(path.read_bytes(), sig.read_bytes() if sig.is_file() else None, path.name)

    def add(self, data: bytes, signature: bytes | None, filename: str = "patch.safetensors") -> dict:
        """Check and apply one uploaded patch; the listing entry of the applied patch. Raises Refused."""
        filename = Path(filename or "").name  # a bare name: never a path of the client's choosing
        filename = filename if filename not in ("", ".", "..") else "patch.safetensors"
        digest = hashlib.sha256(data).hexdigest()
        with self._lock, tempfile.TemporaryDirectory(prefix="roselora-serve-") as tmp:
            path = Path(tmp) / filename
            path.write_bytes(data)
            signed_by = self._verify(path, signature, Path(tmp))
            for a in self._applied:
                if a.sha256 == digest:
                    raise Refused(409, f"{filename}: this patch is already applied (id {a.id})")
            patch = self._loaded.pop(digest, None)
            if patch is None:
                from ..patch.io import load_patch

                try:
                    patch = load_patch(path)
                except InputError as err:
                    raise Refused(400, str(err).replace(f"{tmp}/", "")) from None
            try:
                handle = self.runtime.apply(patch)
            except InputError as err:
                raise Refused(409, f"{filename}: {err}") from None
            handle.source = filename
            applied = Applied(handle, digest, filename, signed_by)
            self._applied.append(applied)
            self._keep(digest, patch)
            return applied.to_dict()

    def remove(self, patch_id: str) -> dict:
        """Revert the applied patch with this id; its listing entry. Raises Refused (404, 409)."""
        with self._lock:
            applied = next((a for a in self._applied if a.id == patch_id), None)
            if applied is None:
                raise Refused(404, f"no applied patch has id {patch_id!r}")
            blocker = self.runtime.blocking(applied.handle)
            if blocker is not None:
                raise Refused(409, f"patch {applied.id} cannot be reverted while patch {blocker.id}, applied later, "
                                   f"overlaps it; revert {blocker.id} first")
            try:
                self.runtime.revert(applied.handle)
            except InputError as err:
                raise Refused(409, str(err)) from None
            self._applied.remove(applied)
            return applied.to_dict()

    def _verify(self, path: Path, signature: bytes | None, tmp: Path) -> str | None:
        if not self.trusted_keys:
            return None
        from ..signing import SignatureError, verify_patch

        if not signature:
            raise Refused(403, f"{path.name}: unsigned; this server takes only patches signed by a trusted key "
                               f"(send the signature as the multipart part 'signature')")
        sig = tmp / "signature.sig"
        sig.write_bytes(signature)
        try:
            return verify_patch(path, self.trusted_keys, sig).name
        except SignatureError as err:
            raise Refused(403, str(err)) from None

    def _keep(self, digest: str, patch: Patch) -> None:
        """Keep a loaded patch for a re-apply of the same bytes (reusing its staging), within LOADED_CACHE_BYTES."""
        self._loaded[digest] = patch
        size = {d: sum(tp.flat_index.nbytes + tp.xor_bits.nbytes for tp in p.tensors.values())
                for d, p in self._loaded.items()}
        while self._loaded and sum(size[d] for d in self._loaded) > LOADED_CACHE_BYTES:
            self._loaded.popitem(last=False)
