"""Read (image, caption, audio) triplets from a JSONL or CSV manifest or from a folder of same-named files.

A JSONL line or CSV row has the keys `image`, `caption`, `audio`; paths are absolute or relative to the
manifest's folder (the MeLBench / Extended-MusicCaps shape). A folder pairs `NAME.png|jpg|jpeg|webp`,
`NAME.txt` (the caption) and `NAME.wav|flac|ogg|mp3`. A bad row is skipped and reported with its place
(`data.jsonl line 4`), never fatal: one broken file should not stop a run over thousands.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
KEYS = ("image", "caption", "audio")


@dataclass(frozen=True)
class Triplet:
    image: Path
    caption: str
    audio: Path
    where: str  # "data.jsonl line 3" or the folder file stem: names the row in every message


@dataclass(frozen=True)
class BadRow:
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Triplets:
    """The usable rows and the skipped ones, in manifest order."""

    rows: list[Triplet] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)

    def skip(self, where: str, reason: str) -> None:
        self.bad.append(BadRow(where, reason))

    def reject(self, row: Triplet, reason: str) -> None:
        """Move a row whose files turned out unusable on decoding from `rows` to `bad`."""
        self.rows.remove(row)
        self.skip(row.where, reason)

    def summary(self) -> str:
        lines = [f"{len(self.rows)} usable rows, {len(self.bad)} skipped"]
        return "\n".join(lines + [f"  skipped {bad}" for bad in self.bad])


def read_triplets(source: str | os.PathLike) -> Triplets:
    """All triplets of a manifest file (.jsonl, .csv) or a folder; raises FileNotFoundError if none exists."""
    source = Path(source)
    if source.is_dir():
        return _read_folder(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such manifest or folder")
    if source.suffix.lower() == ".csv":
        return _read_csv(source)
    return _read_jsonl(source)


def _read_jsonl(path: Path) -> Triplets:
    found = Triplets()
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                found.skip(where, f"not JSON ({exc.msg})")
                continue
            if not isinstance(record, dict):
                found.skip(where, "not a JSON object")
                continue
            _add_record(found, record, path.parent, where)
    return found


def _read_csv(path: Path) -> Triplets:
    found = Triplets()
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(KEYS) - set(reader.fieldnames or ())
        if missing:
            found.skip(f"{path.name} line 1", f"header lacks columns {sorted(missing)}")
            return found
        start = reader.line_num
        for record in reader:
            _add_record(found, record, path.parent, f"{path.name} line {start + 1}")
            start = reader.line_num  # a quoted caption may span lines: the next row starts after this one
    return found


def _read_folder(folder: Path) -> Triplets:
    found = Triplets()
    for caption_file in sorted(folder.glob("*.txt")):
        stem, where = caption_file.stem, f"{folder.name}/{caption_file.stem}"
        image = next((p for s in IMAGE_SUFFIXES if (p := folder / f"{stem}{s}").is_file()), None)
        audio = next((p for s in AUDIO_SUFFIXES if (p := folder / f"{stem}{s}").is_file()), None)
        record = {"image": image, "caption": caption_file.read_text(encoding="utf-8").strip(), "audio": audio}
        if image is None or audio is None:
            kinds = [kind for kind in ("image", "audio") if record[kind] is None]
            found.skip(where, f"no {' or '.join(kinds)} file named {stem}.*")
            continue
        _add_record(found, record, folder, where)
    return found


def _add_record(found: Triplets, record: dict, base: Path, where: str) -> None:
    missing = [key for key in KEYS if not record.get(key)]
    if missing:
        found.skip(where, f"missing {', '.join(missing)}")
        return
    caption = record["caption"]
    if not isinstance(caption, str) or not caption.strip():
        found.skip(where, "caption must be a non-empty string")
        return
    paths = {key: base / Path(record[key]).expanduser() for key in ("image", "audio")}
    for key, path in paths.items():
        if not path.is_file():
            found.skip(where, f"{key} file {path} not found")
            return
    found.rows.append(Triplet(paths["image"], caption.strip(), paths["audio"], where))
