"""Phase checkpoints in OUT/checkpoints, so a run cut off part-way (a restart, a closed laptop) goes on with
``--resume`` from its last save instead of from nothing: the DalleBart's phases save every few hundred steps
(the plain phase alone is an hour on a slow day), the VQGAN's at their end.

Each file holds the tree and the settings that made it: the chain of every phase up to it, from the scenes and
seed on. A checkpoint of other settings is refused by name, never silently continued with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flax import serialization


class Checkpoints:
    """Save and load one tree per phase under ``folder``."""

    def __init__(self, folder: Path, resuming: bool):
        """``resuming`` False: a fresh run, which reads no save and writes over those it finds."""
        self.folder, self.resuming = folder, resuming

    def path(self, phase: str) -> Path:
        return self.folder / f"{phase}.msgpack"

    def save(self, phase: str, settings: str, tree: Any) -> None:
        """Written beside, then renamed over the last save, so a run killed mid-write keeps the one before."""
        self.folder.mkdir(parents=True, exist_ok=True)
        written = self.path(phase).with_suffix(".partial")
        written.write_bytes(serialization.msgpack_serialize(
            {"settings": settings, "tree": serialization.to_state_dict(tree)}))
        os.replace(written, self.path(phase))

    def load(self, phase: str, settings: str, template: Any = None) -> Any | None:
        """The phase's saved tree, in ``template``'s structure (None: as the nested dicts of arrays it was saved
        as, all a VQGAN's parameters are), or None where it has none (or the run is fresh); a ValueError naming
        both settings where the save was made with others."""
        path = self.path(phase)
        if not self.resuming or not path.exists():
            return None
        saved = serialization.msgpack_restore(path.read_bytes())
        if saved["settings"] != settings:
            raise ValueError(f"{path} was saved by other settings, so --resume cannot go on from it:\n"
                             f"  saved: {saved['settings']}\n  now:   {settings}\n"
                             "Run with the saved settings, or start in a new --out.")
        return saved["tree"] if template is None else serialization.from_state_dict(template, saved["tree"])
