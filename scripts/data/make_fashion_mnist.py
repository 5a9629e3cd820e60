#!/usr/bin/env python3
"""Builds diffii's shipped Fashion-MNIST subset (and, on request, the pretraining folder).

Fashion-MNIST (Xiao, Rasul, Vollgraf 2017, arXiv:1708.07747; MIT licence, (c) 2017 Zalando SE,
https://github.com/zalandoresearch/fashion-mnist): 70 000 real 28x28 greyscale product photos in
10 classes. The four original idx files come from Debian's package, unpacked without installing:

    apt-get download dataset-fashion-mnist
    dpkg -x dataset-fashion-mnist_*.deb pkg
    python3 scripts/data/make_fashion_mnist.py \\
        --package-root pkg/usr/share/datasets/fashion-mnist [--pretrain-dir DIR]

Split rule (disjoint by index by construction; the script asserts that, and that no two splits
share a pixel-identical image):
- pool: per class c, the indices of the official training split with label c are shuffled with
  random.Random(f"diffii-fashion-pool-{c}") and the first 500 are kept, in that order (diffii
  draws its few-shot training and validation images from the pool at run time);
- test: per class, the first 200 images of the official test split, in file order;
- pretraining: every other official training image (5 500 per class, 55 000 in all); not in the
  subset file, written as DIR/<class>/<training index:05d>.png with --pretrain-dir.

A string seed goes through Python's version-2 seeding (its UTF-8 bytes and their SHA-512, the
default since 3.2) and Random.shuffle draws with getrandbits, so the selection does not depend on
the Python version: the output was checked byte-identical on 3.6, 3.11 and 3.13, and the
selection identical on every release from 3.6 to 3.13.

The subset file is a safetensors file written by hand: an 8-byte little-endian header length, a
JSON header with sorted keys padded with spaces to a multiple of 8, then the tensors' bytes in
key order. Tensors: pool_images U8 [5000,28,28], pool_labels U8 [5000], pool_index U32 [5000]
(index in the official training file), test_images U8 [2000,28,28], test_labels U8 [2000],
test_index U32 [2000] (index in the official test file); rows ordered by class, then by the
selection order above. The output is byte-reproducible: the same inputs give the same bytes.

Standard library only.
"""
import argparse
import gzip
import json
import os
import random
import shutil
import struct
import zlib

CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
SIDE = 28
POOL_PER_CLASS = 500
TEST_PER_CLASS = 200
SOURCE = "Debian package dataset-fashion-mnist 0.0~git20200523.55506a9-1"
LICENCE = "MIT, (c) 2017 Zalando SE, https://github.com/zalandoresearch/fashion-mnist"
SPLIT_RULE = (
    "pool: per class c, the official training indices with label c shuffled with Python's "
    "random.Random(f'diffii-fashion-pool-{c}'), first 500 kept; test: per class, the first 200 "
    "official test images in file order; every other training image is the generator's "
    "pretraining set and is not included."
)


def read_gz(path):
    with gzip.open(path, "rb") as f:
        return f.read()


def read_images(path):
    b = read_gz(path)
    magic, n, rows, cols = struct.unpack(">IIII", b[:16])
    assert magic == 2051, f"{path}: not an idx3 image file (magic {magic})"
    assert (rows, cols) == (SIDE, SIDE), f"{path}: images are {rows}x{cols}, expected 28x28"
    assert len(b) == 16 + n * SIDE * SIDE, f"{path}: truncated"
    return [b[16 + i * SIDE * SIDE:16 + (i + 1) * SIDE * SIDE] for i in range(n)]


def read_labels(path):
    b = read_gz(path)
    magic, n = struct.unpack(">II", b[:8])
    assert magic == 2049, f"{path}: not an idx1 label file (magic {magic})"
    labels = list(b[8:])
    assert len(labels) == n and all(l < len(CLASSES) for l in labels), f"{path}: bad labels"
    return labels


def load(root, prefix):
    images = read_images(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_labels(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))
    assert len(images) == len(labels), f"{prefix}: {len(images)} images, {len(labels)} labels"
    return images, labels


def split(train_labels, test_labels):
    """(pool, test, pretrain): per class, lists of indices into the official files."""
    pool, test, pretrain = [], [], []
    for c in range(len(CLASSES)):
        members = [i for i, l in enumerate(train_labels) if l == c]
        random.Random(f"diffii-fashion-pool-{c}").shuffle(members)
        pool.append(members[:POOL_PER_CLASS])
        pretrain.append(sorted(members[POOL_PER_CLASS:]))
        test.append([i for i, l in enumerate(test_labels) if l == c][:TEST_PER_CLASS])
        assert len(pool[c]) == POOL_PER_CLASS and len(test[c]) == TEST_PER_CLASS
    flat = lambda per_class: [i for ids in per_class for i in ids]
    pool_set, pretrain_set = set(flat(pool)), set(flat(pretrain))
    # Pool and pretraining come from the same (training) file: they must not share an index
    # and together must cover it exactly once; test indices refer to the other file.
    assert len(pool_set) == len(flat(pool)) and not pool_set & pretrain_set
    assert len(pool_set) + len(pretrain_set) == len(train_labels) == len(flat(pool)) + len(flat(pretrain))
    assert len(set(flat(test))) == len(flat(test))
    return pool, test, pretrain


def assert_no_shared_pixels(train_images, test_images, pool, test, pretrain):
    """Index-disjoint is not enough if the files held copies of one photo under two indices."""
    sets = [
        {train_images[i] for ids in pool for i in ids},
        {test_images[i] for ids in test for i in ids},
        {train_images[i] for ids in pretrain for i in ids},
    ]
    for a, b, what in ((0, 1, "pool and test"), (0, 2, "pool and pretraining"), (1, 2, "test and pretraining")):
        assert not sets[a] & sets[b], f"{what} share {len(sets[a] & sets[b])} pixel-identical image(s)"


def safetensors_bytes(tensors, metadata):
    """tensors: {name: (dtype, shape, bytes)}; keys sorted, header padded to 8 bytes."""
    header, offset = {"__metadata__": metadata}, 0
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    body = b"".join(tensors[name][2] for name in sorted(tensors))
    return struct.pack("<Q", len(text)) + text + body


def subset_bytes(train, test_set, pool, test):
    def part(images, labels, per_class):
        ids = [i for ids in per_class for i in ids]
        return (
            b"".join(images[i] for i in ids),
            bytes(labels[i] for i in ids),
            struct.pack(f"<{len(ids)}I", *ids),
            len(ids),
        )

    tensors = {}
    for name, (images, labels), per_class in (("pool", train, pool), ("test", test_set, test)):
        px, lab, idx, n = part(images, labels, per_class)
        tensors[f"{name}_images"] = ("U8", [n, SIDE, SIDE], px)
        tensors[f"{name}_labels"] = ("U8", [n], lab)
        tensors[f"{name}_index"] = ("U32", [n], idx)
    metadata = {
        "classes": json.dumps(CLASSES),
        "source": SOURCE,
        "licence": LICENCE,
        "split_rule": SPLIT_RULE,
    }
    return safetensors_bytes(tensors, metadata)


def png_bytes(pixels):
    """Greyscale 8-bit PNG (colour type 0), filter 0 on every row, no ancillary chunks."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + pixels[y * SIDE:(y + 1) * SIDE] for y in range(SIDE))
    ihdr = struct.pack(">IIBBBBB", SIDE, SIDE, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def write_pretrain(out, images, pretrain):
    # Built beside the target and renamed when complete, so a killed run never leaves a
    # folder that looks finished.
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for c, ids in enumerate(pretrain):
        folder = os.path.join(tmp, CLASSES[c])
        os.makedirs(folder)
        for i in ids:
            with open(os.path.join(folder, f"{i:05d}.png"), "wb") as f:
                f.write(png_bytes(images[i]))
    os.rename(tmp, out)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    default_subset = os.path.join(here, "..", "..", "data", "fashion-mnist", "subset.safetensors")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--package-root", required=True,
                    help="folder holding the four *-idx?-ubyte.gz files")
    ap.add_argument("--subset", default=os.path.normpath(default_subset),
                    help="output safetensors file (default: data/fashion-mnist/subset.safetensors)")
    ap.add_argument("--pretrain-dir", help="also write the pretraining images as <dir>/<class>/<index>.png")
    a = ap.parse_args()
    if a.pretrain_dir and os.path.exists(a.pretrain_dir):
        ap.error(f"{a.pretrain_dir} already exists: delete it to rebuild the pretraining folder")

    train = load(a.package_root, "train")
    test_set = load(a.package_root, "t10k")
    pool, test, pretrain = split(train[1], test_set[1])
    assert_no_shared_pixels(train[0], test_set[0], pool, test, pretrain)

    data = subset_bytes(train, test_set, pool, test)
    os.makedirs(os.path.dirname(os.path.abspath(a.subset)), exist_ok=True)
    tmp = a.subset + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, a.subset)
    print(f"wrote {a.subset} ({len(data)} bytes)")

    if a.pretrain_dir:
        write_pretrain(a.pretrain_dir, train[0], pretrain)
        print(f"wrote {sum(map(len, pretrain))} pretraining images to {a.pretrain_dir}")


if __name__ == "__main__":
    main()
