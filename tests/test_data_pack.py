"""The pre-decoded pack: round trip, same batches as from PNG, stale and corrupted packs refused."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_loader.cityscapes import CityscapesIndex
from data_loader.decode import read_image_rgb, read_label
from data_loader.loader import build_train_loader, build_val_loader
from data_loader.pack import PackError, PackReader, write_pack
from data_loader.synthetic import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTS = dict(batch_size=2, crop=(32, 64), scale=(128, 64))


@pytest.fixture()
def dataset(tmp_path):
    root = generate(str(tmp_path / "cs"), num_train=5, num_val=2, size=(128, 64), seed=8)
    pack = str(tmp_path / "pack")
    with open(os.devnull, "w") as quiet:
        write_pack(root, "train", pack, stream=quiet)
    return root, pack


def test_pack_round_trip_equals_png_decoding(dataset):
    root, pack = dataset
    reader = PackReader(pack, "train", root)
    index = CityscapesIndex(root, "train")
    assert len(reader) == len(index) == 5
    for i, (image_path, label_path) in enumerate(index):
        image, label = reader.load(i)
        np.testing.assert_array_equal(image, read_image_rgb(image_path))
        np.testing.assert_array_equal(label, read_label(label_path))
        assert reader.paths(i) == (image_path, label_path)


def test_loader_from_pack_gives_the_batches_of_the_png_loader(dataset):
    root, pack = dataset
    with build_train_loader(root, workers=0, seed=4, **OPTS) as png, \
            build_train_loader(root, workers=2, seed=4, pack=pack, **OPTS) as packed:
        for _, a, b in zip(range(5), png, packed):
            assert a.meta["index"] == b.meta["index"]
            assert torch.equal(a.image, b.image) and torch.equal(a.label, b.label)


def test_pack_cli_writes_and_verifies(tmp_path):
    root = generate(str(tmp_path / "cs"), num_train=2, num_val=1, size=(64, 32), seed=1)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = lambda *a: subprocess.run([sys.executable, "-m", "data_loader.pack", root, *a], cwd=REPO, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    result = run("--nproc", "2")
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(os.path.join(root, "pack", "val", "index.json"))
    result = run("--verify")
    assert result.returncode == 0 and "train: 2 samples OK" in result.stdout and "val: 1 samples OK" in result.stdout
    with build_val_loader(root, workers=0, pack=os.path.join(root, "pack")) as loader:
        assert len(list(loader)) == 1


def test_changed_source_file_makes_the_pack_stale(dataset):
    root, pack = dataset
    label_path = CityscapesIndex(root, "train")[3][1]
    stat = os.stat(label_path)
    os.utime(label_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(PackError, match="stale pack: " + label_path + " changed since packing"):
        PackReader(pack, "train", root)
    with pytest.raises(PackError, match="stale"):
        build_train_loader(root, workers=0, pack=pack, **OPTS)


def test_added_sample_makes_the_pack_stale(dataset):
    root, pack = dataset
    image_path, label_path = CityscapesIndex(root, "train")[0]
    shutil.copy(image_path, image_path.replace("_000019_", "_000020_"))
    shutil.copy(label_path, label_path.replace("_000019_", "_000020_"))
    with pytest.raises(PackError, match=r"stale pack: the split's files changed since packing \(added"):
        PackReader(pack, "train", root)


def test_corrupted_bytes_fail_the_checksum_naming_the_sample(dataset):
    root, pack = dataset
    reader = PackReader(pack, "train", root)
    sample = reader.samples[2]
    with open(os.path.join(pack, "train", "images.u8"), "r+b") as f:
        f.seek(sample["image_offset"] + 100)
        byte = f.read(1)
        f.seek(sample["image_offset"] + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    reader = PackReader(pack, "train", root)
    reader.load(1)
    with pytest.raises(PackError, match="checksum mismatch for the image of " + reader.paths(2)[0]):
        reader.load(2)
    with pytest.raises(PackError, match="corrupted pack"):
        with build_train_loader(root, workers=1, seed=0, pack=pack, batch_size=5, crop=(32, 64), scale=(128, 64)) as loader:
            next(iter(loader))


def test_truncated_data_file_is_refused_at_open(dataset):
    root, pack = dataset
    path = os.path.join(pack, "train", "labels.u8")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1)
    with pytest.raises(PackError, match="labels.u8: corrupted pack: data file has"):
        PackReader(pack, "train", root)
    with pytest.raises(PackError, match="no pack for split 'val'"):
        PackReader(pack, "val", root)
