"""LTFS tape backend: a tier made of cartridges, each a file system mounted by LTFS.

Each cartridge is written sequentially, one pack file after another, in the list
order of the tier's cartridges: when a pack does not fit on the current one, the
next loaded cartridge with room takes it. A cartridge is recognised by a label
file pacs-vault writes at its root (an empty LTFS mount point is labelled on first
use); a mount point that is absent, empty but not mounted, or labelled for another
cartridge counts as not loaded, and anything that needs it raises
CartridgeOffline naming the cartridge to load.

Reads of many packs go in on-tape order: by cartridge, then by the
`user.ltfs.startblock` extended attribute LTFS gives every file, else by write
order. Layout on a cartridge: `PACS-VAULT-CARTRIDGE` (label), `packs/<name>`,
`packs/.<name>.tmp` while a pack is being written.
"""

from __future__ import annotations

import builtins
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from appliance.errors import BlobMissing, CartridgeOffline, OutOfSpace
from appliance.fsutil import atomic_file, fsync_dir

LABEL_FILE = "PACS-VAULT-CARTRIDGE"
_LABEL_HEADER = "pacs-vault cartridge v1"
_STARTBLOCK = "user.ltfs.startblock"


def label_text(label: str) -> str:
    return f"{_LABEL_HEADER}\nlabel: {label}\n"


class Cartridge:
    def __init__(self, label: str, path: Path, capacity: int):
        self.label, self.path, self.capacity = label, Path(path), capacity
        self.packs = self.path / "packs"

    def loaded(self) -> bool:
        """True when this cartridge is mounted at its path (labelling a fresh, empty LTFS mount)."""
        label_file = self.path / LABEL_FILE
        try:
            return label_file.read_text("utf-8") == label_text(self.label)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        if self.path.is_dir() and os.path.ismount(self.path) and not os.listdir(self.path):
            tmp = self.path / f".{LABEL_FILE}.tmp"
            tmp.write_text(label_text(self.label), "utf-8")
            os.replace(tmp, label_file)
            fsync_dir(self.path)
            return True
        return False

    def used(self) -> int:
        try:
            return sum(entry.stat().st_size for entry in os.scandir(self.packs) if not entry.name.startswith("."))
        except FileNotFoundError:
            return 0

    def free(self) -> int:
        room = self.capacity - self.used()
        try:
            room = min(room, shutil.disk_usage(self.path).free)
        except OSError:
            return 0
        return room


class LtfsBackend:
    def __init__(self, name: str, cartridges: builtins.list[Cartridge]):
        self.name = name
        self.cartridges = cartridges

    def _loaded(self) -> builtins.list[Cartridge]:
        return [c for c in self.cartridges if c.loaded()]

    def _find(self, name: str) -> tuple[Cartridge, Path]:
        _check_name(name)
        for cartridge in self._loaded():
            path = cartridge.packs / name
            if path.exists():
                return cartridge, path
        offline = [c.label for c in self.cartridges if not c.loaded()]
        if offline:
            raise CartridgeOffline(f"pack {name} of tier {self.name} is on none of the loaded cartridges; "
                                   f"load one of: {', '.join(offline)}", offline[0])
        raise BlobMissing(f"pack {name} is missing from tier {self.name}")

    def put(self, name: str, src: BinaryIO) -> None:
        _check_name(name)
        start = src.tell()
        size = src.seek(0, os.SEEK_END) - start
        src.seek(start)
        cartridge = self._cartridge_for(size)
        cartridge.packs.mkdir(exist_ok=True)
        with atomic_file(cartridge.packs / f".{name}.tmp", cartridge.packs / name) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    def _cartridge_for(self, size: int) -> Cartridge:
        offline = []
        for cartridge in self.cartridges:
            if not cartridge.loaded():
                offline.append(cartridge.label)
            elif cartridge.free() >= size:
                return cartridge
        if offline:
            raise CartridgeOffline(f"no loaded cartridge of tier {self.name} has room for {size / 1e6:,.0f} MB; "
                                   f"load {offline[0]}", offline[0])
        raise OutOfSpace(f"every cartridge of tier {self.name} is full: add cartridges to the tier")

    def open(self, name: str) -> BinaryIO:
        return open(self._find(name)[1], "rb")

    def size(self, name: str) -> int:
        return self._find(name)[1].stat().st_size

    def delete(self, name: str) -> None:
        _check_name(name)
        loaded = self._loaded()
        for cartridge in loaded:  # the remains of a writer killed mid-pack go too
            (cartridge.packs / f".{name}.tmp").unlink(missing_ok=True)
        for cartridge in loaded:
            path = cartridge.packs / name
            if path.exists():
                path.unlink()
                fsync_dir(cartridge.packs)
                return
        offline = [c.label for c in self.cartridges if c not in loaded]
        if offline:  # it may be on one of them: deleting it there needs the cartridge
            raise CartridgeOffline(f"pack {name} is on none of the loaded cartridges of tier {self.name}; "
                                   f"load one of: {', '.join(offline)}", offline[0])

    def list(self) -> Iterator[str]:
        for cartridge in self._loaded():
            if cartridge.packs.is_dir():
                for entry in sorted(os.listdir(cartridge.packs)):
                    if not entry.startswith("."):
                        yield entry

    def read_order(self, names: Iterable[str]) -> builtins.list[str]:
        loaded = self._loaded()

        def position(name: str) -> tuple:
            for number, cartridge in enumerate(loaded):
                path = cartridge.packs / name
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                try:
                    return (number, 0, int(os.getxattr(path, _STARTBLOCK)), name)
                except (OSError, ValueError):
                    return (number, 1, stat.st_mtime_ns, name)
            return (len(loaded), 0, 0, name)

        return sorted(names, key=position)

    def check(self) -> None:
        if not self._loaded():
            labels = [c.label for c in self.cartridges]
            raise CartridgeOffline(f"no cartridge of tier {self.name} is loaded; load one of: {', '.join(labels)}",
                                   labels[0])

    def locate(self, name: str) -> str:
        for cartridge in self._loaded():
            if (cartridge.packs / name).exists():
                return cartridge.label
        return ""


def _check_name(name: str) -> None:
    if not name or not all(c in "0123456789abcdef" for c in name):
        raise ValueError(f"invalid object name {name!r}")
