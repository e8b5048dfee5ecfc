"""Small real image-text datasets for tests/test_image_text_data.py and tests/test_clip_training.py: tar shards in
img2dataset's layout and a CSV, with deliberately broken samples, plus a tokenizer learned from their captions."""
import csv
import functools
import io
import os

import numpy as np
from PIL import Image

import data

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "pink", "grey"]
ANIMALS = ["cat", "dog", "bird", "horse", "fish", "cow", "sheep", "fox"]


def caption(i):
    return f"a {COLOURS[i % 8]} {ANIMALS[(i // 8) % 8]} number {i}"


@functools.lru_cache(maxsize=None)
def image_bytes(i, fmt="JPEG", size=(48, 40)):
    """A distinct smooth-ish picture per i (random blobs, upsampled) encoded as `fmt`."""
    rng = np.random.default_rng(i)
    small = (rng.random((5, 6, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(small).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_shard(path, members):
    """members: (name, bytes) in order, written as a plain ustar archive (what tarfile writes for short names,
    without its per-member overhead: the mixing test writes 60,000 members)."""
    with open(path, "wb") as f:
        for name, payload in members:
            f.write(ustar_header(name, len(payload)) + payload + b"\0" * (-len(payload) % 512))
        f.write(b"\0" * 1024)  # end-of-archive marker


def ustar_header(name, size):
    fields = [name.encode().ljust(100, b"\0"), b"0000644\0", b"0000000\0", b"0000000\0", b"%011o\0" % size,
              b"00000000000\0", b" " * 8, b"0", b"\0" * 100, b"ustar\x0000", b"\0" * 32, b"\0" * 32,
              b"0000000\0", b"0000000\0", b"\0" * 155]
    header = b"".join(fields).ljust(512, b"\0")
    checksum = b"%06o\0 " % sum(header)  # computed with the checksum field as 8 spaces
    return header[:148] + checksum + header[156:]


def good(i, fmt="JPEG", size=(48, 40)):
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    key = f"{i:09d}"
    return [(f"{key}.{ext}", image_bytes(i, fmt, size)), (f"{key}.txt", caption(i).encode()),
            (f"{key}.json", b'{"key": "%s"}' % key.encode())]


def broken_shards(root):
    """4 shards of 3 good samples each (12 in all, ids 0..11) plus: shard 0 starts with an undecodable image,
    shard 1 with an image without a caption, shard 3 ends with a truncated member. Returns (pattern, good ids)."""
    os.makedirs(root, exist_ok=True)
    shards = [[], [], [], []]
    shards[0] += [("000000100.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("000000100.txt", b"a broken picture")]
    shards[1] += [("000000101.jpg", image_bytes(101))]  # no .txt
    for i in range(12):
        shards[i // 3] += good(i, "PNG" if i == 7 else "JPEG")
    for n, members in enumerate(shards):
        write_shard(os.path.join(root, f"{n:05d}.tar"), members)
    # shard 3: append a sample, then cut the file in the middle of its image
    path = os.path.join(root, "00003.tar")
    write_shard(path, shards[3] + good(102))
    with open(path, "rb") as f:
        raw = f.read()
    cut = raw.index(image_bytes(102)) + 20
    with open(path, "wb") as f:
        f.write(raw[:cut])
    return os.path.join(root, "{00000..00003}.tar"), set(range(12))


def plain_shards(root, n_shards, per_shard, start=0, image_size=(48, 40), stats=False):
    """Shards of good samples with ids start, start + 1, ... (per_shard in each); stats: write img2dataset's
    {shard}_stats.json beside each."""
    os.makedirs(root, exist_ok=True)
    for n in range(n_shards):
        ids = range(start + n * per_shard, start + (n + 1) * per_shard)
        members = [m for i in ids for m in good(i, size=image_size)]
        write_shard(os.path.join(root, f"{n:05d}.tar"), members)
        if stats:
            with open(os.path.join(root, f"{n:05d}_stats.json"), "w") as f:
                f.write('{"successes": %d}' % per_shard)
    return os.path.join(root, "{%05d..%05d}.tar" % (0, n_shards - 1))


def write_csv(root, n_good, extra_bad=True, sep=","):
    """n_good rows with images (ids 0..n_good-1), plus a row without a caption and a row with a corrupt image."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = []
    for i in range(n_good):
        name = f"images/{i}.jpg"
        with open(os.path.join(root, name), "wb") as f:
            f.write(image_bytes(i))
        rows.append({"filepath": name, "title": caption(i)})
    if extra_bad:
        with open(os.path.join(root, "images/corrupt.jpg"), "wb") as f:
            f.write(image_bytes(999)[:60])  # truncated JPEG
        with open(os.path.join(root, "images/nocap.jpg"), "wb") as f:
            f.write(image_bytes(998))
        rows.insert(2, {"filepath": "images/corrupt.jpg", "title": "a corrupt picture"})
        rows.insert(5, {"filepath": "images/nocap.jpg", "title": ""})
    path = os.path.join(root, "pairs.tsv" if sep == "\t" else "pairs.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filepath", "title"], delimiter=sep)
        w.writeheader()
        w.writerows(rows)
    return path


def learned_tokenizer(root, n=200):
    path = os.path.join(root, "merges.txt.gz")
    if not os.path.exists(path):
        data.learn_bpe([caption(i) for i in range(n)] + ["a broken picture", "a corrupt picture"], path, 60)
    return path, data.Tokenizer(path)


def ids_of(batch, tokenizer):
    """The caption ids in a batch, read back from its tokens."""
    out = []
    for row in batch["tokens"]:
        text = tokenizer.decode([t for t in row.tolist() if t not in (0, tokenizer.sot_token, tokenizer.eot_token)])
        out.append(int(text.split("number")[1].replace(" ", "")))
    return out


def csv_run_args(tmp_path):
    """train_clip.py's arguments for a tiny model on a 16-row CSV (one process, no workers)."""
    path = write_csv(tmp_path / "csv", n_good=16, extra_bad=False)
    merges, _ = learned_tokenizer(tmp_path)
    return ["--model", "tiny", "--data", path, "--merges", merges, "--lr", "2e-3", "--warmup-steps", "1",
            "--seed", "0", "--workers", "0"]
