"""Checks for applying or reverting patches on a directory that may already hold others (checkpoint or ONNX).

`Stack` holds the directory's ledger and one command's patches. `check` passes a fresh base (or, for a
revert, the patch's own result) by the whole-tensor fingerprint, else by the touched-element rule
(patch.overlap); a refusal names the patch file, the tensor and the patches that conflict.
`ledger_after` gives the ledger to write with the new weights.
"""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import InputError
from .ledger import Entry, Ledger, check_weights, describe, entry_for, overlapping_entries, read_ledger
from .model import Patch, TensorPatch
from .overlap import APPLIES, DONE, content_sha256, intersects, touched_state


class Stack:
    """One apply (or revert) command's patches against directory `root` and its ledger."""

    def __init__(self, root: str | os.PathLike, patches: list[Patch], sources: list | None = None, *,
                 revert: bool = False):
        self.root, self.patches, self.revert = Path(root), list(patches), revert
        sources = list(sources) if sources is not None else [None] * len(self.patches)
        if len(sources) != len(self.patches):
            raise ValueError("sources: one path (or None) per patch")
        self.ledger = read_ledger(self.root)
        self.sources = sources
        self.contents = [content_sha256(p) for p in self.patches]
        self.labels = [f"patch {i + 1}" + (f" ({Path(s).name})" if s else "") for i, s in enumerate(sources)]
        self.positions = [self.ledger.find(c) for c in self.contents]  # in the ledger, or None
        self._seen: set[str] = set()
        self._check_ledger()

    def _check_ledger(self) -> None:
        contents = self.contents
        for i, (label, pos) in enumerate(zip(self.labels, self.positions)):
            if contents.index(contents[i]) != i:
                raise InputError(f"{label} is the same patch as {self.labels[contents.index(contents[i])]}; "
                                 "give each patch once")
            if not self.revert and pos is not None:
                raise InputError(f"{label} is already applied to {self.root} (ledger entry {pos + 1}, applied at "
                                 f"{self.ledger.entries[pos].applied_at}); refusing to apply it twice")
            if self.revert and pos is None and self.ledger.entries:
                raise InputError(f"{label} was never applied to {self.root}: it is not among the "
                                 f"{len(self.ledger.entries)} patches its ledger lists (roselora-export log {self.root})")

    def order(self) -> list[int]:
        """Indices of the patches in the order they are applied (reverted: last given first)."""
        idx = list(range(len(self.patches)))
        return idx[::-1] if self.revert else idx

    def check(self, k: int, tp: TensorPatch, whole_sha: str, gathered: np.ndarray) -> None:
        """Refuse (InputError) unless patch k can be applied (reverted) on a tensor whose whole sha256 is
        whole_sha and whose bits at tp.flat_index are `gathered`; a tensor's first check also consults the ledger."""
        if tp.name not in self._seen:
            self._seen.add(tp.name)
            check_weights(self.ledger, self.root, tp.name, whole_sha)
        want, other = (tp.patched_sha256, tp.base_sha256) if self.revert else (tp.base_sha256, tp.patched_sha256)
        if whole_sha == want:
            return
        state = DONE if whole_sha == other else touched_state(tp, gathered, revert=self.revert)
        if state == APPLIES:
            return
        label = self.labels[k]
        if state == DONE:
            raise InputError(f"{label}: {tp.name}: the patch is "
                             + ("not applied here; refusing to revert it" if self.revert
                                else "already applied here; refusing to apply it twice"))
        conflicts = self._conflicts(k, tp)
        if self.revert:
            raise InputError(
                f"{label}: {tp.name}: cannot revert it: "
                + (f"later patch(es) {conflicts} changed the same elements; revert them first "
                   "(overlapping patches come out last-applied first)" if conflicts else
                   "fingerprint mismatch: its elements hold neither its result nor its base (the weights changed "
                   "outside roselora-export, or this is not the directory it was applied to)"))
        raise InputError(
            f"{label}: {tp.name}: fingerprint mismatch: the elements it changes do not hold its base bits; "
            + (f"it overlaps {conflicts}, applied before it, and was not built on top of it" if conflicts else
               "wrong base model, or other patches changed these elements since it was built"))

    def _conflicts(self, k: int, tp: TensorPatch) -> str:
        """The patches that changed tp's elements since patch k's base: this command's (exactly) and the ledger's."""
        name, names = tp.name, []
        done = self.order()[: self.order().index(k)]
        names += [self.labels[j] for j in done if name in self.patches[j].tensors
                  and intersects(self.patches[j].tensors[name].flat_index, tp.flat_index)]
        if self.revert:
            pos = self.positions[k]
            reverted = {self.positions[j] for j in done}
            later = [e for i, e in enumerate(self.ledger.entries) if pos is not None and i > pos and i not in reverted]
        else:
            later = list(self.ledger.entries)
        names += [describe(overlapping_entries(later, self.patches[k], name))] if later else []
        return ", ".join(n for n in names if n)

    def ledger_after(self, final_sha: dict[str, str]) -> Ledger:
        """The ledger once the command is done; final_sha: whole-tensor sha256 of every touched tensor."""
        if self.revert:
            gone = {p for p in self.positions if p is not None}
            entries = [e for i, e in enumerate(self.ledger.entries) if i not in gone]
        else:
            entries = self.ledger.entries + self.entries
        return Ledger(entries=entries, weights={**self.ledger.weights, **final_sha} if entries else {})

    @cached_property
    def entries(self) -> list[Entry]:
        """Ledger entries of this command's patches (a patch built in memory is encoded once, for its sha256)."""
        return [entry_for(p, s) for p, s in zip(self.patches, self.sources)]
