"""A pre-decoded, memory-mapped uint8 store of a split (images RGB [H,W,3] and labels [H,W]).

    python -m data_loader.pack ROOT [--out DIR] [--splits train val] [--nproc N] [--verify]

Layout: DIR/<split>/{index.json, images.u8, labels.u8}. index.json records, per sample, the
source files (relative to ROOT) with their size and mtime_ns, the array shapes and offsets, and
a CRC32 of the image and of the label bytes. The loader (PackReader) refuses a stale pack (a
source file added, removed or changed in size/mtime) and a corrupted one (data file of the wrong
size; a CRC mismatch, checked every time a sample is read: ~1.6 ms per 2048x1024 image).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import zlib

import numpy as np

from .cityscapes import SPLITS, CityscapesIndex, DatasetError, check_label_values
from .decode import read_image_rgb, read_label
from .progress import Progress

PACK_VERSION = 1


class PackError(DatasetError):
    """The pack is stale, corrupted or missing; its message says which and how to rebuild it."""


def _stat(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _decode_pair(pair):
    image_path, label_path = pair
    image = read_image_rgb(image_path)
    label = read_label(label_path)
    if image.shape[:2] != label.shape:
        raise DatasetError(f"{label_path}: size {label.shape[::-1]} differs from its image {image_path} {image.shape[1::-1]}")
    check_label_values(label, label_path)
    return image, label


def write_pack(root: str, split: str, out_dir: str, nproc: int = 1, stream=None) -> str:
    """Decode `split` of the dataset at `root` into out_dir/split; returns that folder."""
    root = os.path.abspath(root)
    index = CityscapesIndex(root, split, check_sizes=False)
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, split)
    tmp = tempfile.mkdtemp(prefix=f".{split}.tmp-", dir=out_dir)
    progress = Progress(len(index), f"pack {split}", stream)
    pool = multiprocessing.get_context("spawn").Pool(nproc) if nproc > 1 else None
    try:
        decoded = pool.imap(_decode_pair, index.samples, chunksize=2) if pool else map(_decode_pair, index.samples)
        samples, image_offset, label_offset = [], 0, 0
        with open(os.path.join(tmp, "images.u8"), "wb") as fi, open(os.path.join(tmp, "labels.u8"), "wb") as fl:
            for key, (image_path, label_path), (image, label) in zip(index.keys, index.samples, decoded):
                fi.write(image.data)
                fl.write(label.data)
                samples.append({
                    "key": key,
                    "image": os.path.relpath(image_path, root), "image_stat": _stat(image_path),
                    "label": os.path.relpath(label_path, root), "label_stat": _stat(label_path),
                    "height": label.shape[0], "width": label.shape[1],
                    "image_offset": image_offset, "label_offset": label_offset,
                    "image_crc32": zlib.crc32(image), "label_crc32": zlib.crc32(label),
                })
                image_offset += image.nbytes
                label_offset += label.nbytes
                progress.update()
        meta = {"version": PACK_VERSION, "root": root, "split": split, "channel_order": "RGB",
                "images_bytes": image_offset, "labels_bytes": label_offset, "samples": samples}
        with open(os.path.join(tmp, "index.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class PackReader:
    """Reads one split of a pack; the data files are memory-mapped on first use (per process)."""

    def __init__(self, pack_dir: str, split: str, root: str | None = None, check_stale: bool = True):
        self.dir = os.path.join(pack_dir, split)
        index_path = os.path.join(self.dir, "index.json")
        rebuild = f"rebuild it with `python -m data_loader.pack ROOT --out {pack_dir} --splits {split}`"
        try:
            with open(index_path, encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise PackError(f"{index_path}: no pack for split {split!r}; {rebuild}") from None
        except ValueError as e:
            raise PackError(f"{index_path}: corrupted pack index ({e}); {rebuild}") from None
        if meta.get("version") != PACK_VERSION or meta.get("split") != split:
            raise PackError(f"{index_path}: pack version/split {meta.get('version')}/{meta.get('split')} "
                            f"is not {PACK_VERSION}/{split}; {rebuild}")
        self.root = os.path.abspath(root) if root is not None else meta["root"]
        self.samples = meta["samples"]
        self.rebuild_hint = rebuild
        for name, expected in (("images.u8", meta["images_bytes"]), ("labels.u8", meta["labels_bytes"])):
            path = os.path.join(self.dir, name)
            size = os.path.getsize(path) if os.path.exists(path) else None
            if size != expected:
                raise PackError(f"{path}: corrupted pack: data file has {size} bytes, index says {expected}; {rebuild}")
        if check_stale:
            self._check_stale(split)
        self._images = self._labels = None
        self._owner_pid = None

    def _check_stale(self, split: str) -> None:
        current = CityscapesIndex(self.root, split, check_sizes=False)
        packed_keys = [s["key"] for s in self.samples]
        if current.keys != packed_keys:
            added = sorted(set(current.keys) - set(packed_keys))
            removed = sorted(set(packed_keys) - set(current.keys))
            raise PackError(f"{self.dir}: stale pack: the split's files changed since packing "
                            f"(added {added[:3]}, removed {removed[:3]}); {self.rebuild_hint}")
        for s in self.samples:
            for kind in ("image", "label"):
                path = os.path.join(self.root, s[kind])
                if _stat(path) != s[f"{kind}_stat"]:
                    raise PackError(f"{self.dir}: stale pack: {path} changed since packing "
                                    f"(size/mtime {_stat(path)} != {s[f'{kind}_stat']}); {self.rebuild_hint}")

    def __len__(self) -> int:
        return len(self.samples)

    def shape(self, i: int) -> tuple[int, int]:
        return self.samples[i]["height"], self.samples[i]["width"]

    def _open(self) -> None:
        if self._owner_pid != os.getpid():  # a fresh mapping per process (fork-safe)
            self._images = np.memmap(os.path.join(self.dir, "images.u8"), np.uint8, "r")
            self._labels = np.memmap(os.path.join(self.dir, "labels.u8"), np.uint8, "r")
            self._owner_pid = os.getpid()

    def _array(self, i: int, kind: str, verify: bool) -> np.ndarray:
        self._open()
        s = self.samples[i]
        h, w = s["height"], s["width"]
        data, shape = (self._images, (h, w, 3)) if kind == "image" else (self._labels, (h, w))
        start = s[f"{kind}_offset"]
        arr = np.asarray(data[start: start + int(np.prod(shape))]).reshape(shape)
        if verify and zlib.crc32(arr) != s[f"{kind}_crc32"]:
            raise PackError(f"{self.dir}: corrupted pack: checksum mismatch for the {kind} of "
                            f"{os.path.join(self.root, s[kind])}; {self.rebuild_hint}")
        return arr

    def load_label(self, i: int, verify: bool = True) -> np.ndarray:
        return self._array(i, "label", verify)

    def load_image(self, i: int, label_shape=None, rows: int | None = None, verify: bool = True) -> np.ndarray:
        """The whole RGB image as a read-only view (only the pages a crop touches are read)."""
        return self._array(i, "image", verify)

    def load(self, i: int, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(image RGB [H,W,3], label [H,W]) as read-only views of the mapping; CRC-checked if verify."""
        return self._array(i, "image", verify), self._array(i, "label", verify)

    def paths(self, i: int) -> tuple[str, str]:
        s = self.samples[i]
        return os.path.join(self.root, s["image"]), os.path.join(self.root, s["label"])


def verify_pack(pack_dir: str, split: str, root: str | None = None, stream=None) -> int:
    reader = PackReader(pack_dir, split, root)
    progress = Progress(len(reader), f"verify {split}", stream)
    for i in range(len(reader)):
        reader.load(i, verify=True)
        progress.update()
    progress.close()
    return len(reader)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_loader.pack", description=__doc__.split("\n")[0])
    p.add_argument("root", help="Cityscapes root")
    p.add_argument("--out", default=None, help="pack folder (default: ROOT/pack)")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=SPLITS)
    p.add_argument("--nproc", type=int, default=1, help="decode processes")
    p.add_argument("--verify", action="store_true", help="check an existing pack (staleness and every checksum)")
    a = p.parse_args(argv)
    out = a.out or os.path.join(a.root, "pack")
    try:
        for split in a.splits:
            if a.verify:
                n = verify_pack(out, split, a.root)
                print(f"{os.path.join(out, split)}: {n} samples OK")
            else:
                path = write_pack(a.root, split, out, a.nproc)
                print(f"wrote {path}")
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
