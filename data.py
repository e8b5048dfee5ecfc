"""
Data for PI-CLIP: everything between files on disk and the tensors the model eats.

- the CLIP byte-level BPE tokenizer (`Tokenizer`) and `learn_bpe` to learn a merges file from captions;
- image transforms (CLIP normalisation, eval / train augmentations, paper section 3.4);
- datasets: NIGHTS triplets (stage 1) and image-caption pairs (stage 2).

The CPU demo's synthetic world, which writes data in these formats, lives in synthetic_world.py.

Only the runtime dependencies (torch, torchvision, numpy, pillow, tqdm) and the standard library are imported.
"""

import csv
import gzip
import hashlib
import heapq
import html
import html.entities
import io
import itertools
import json
import os
import random
import re
import tarfile
import unicodedata
import warnings
from collections import Counter, defaultdict
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_modes_mapping

# --- Tokenizer (CLIP BPE) ---
# Reads one file: a BPE merges file (OpenAI's bpe_simple_vocab_16e6.txt.gz as shipped in open_clip, or one that
# learn_bpe wrote from a caption list).
# A from-scratch re-implementation of OpenAI CLIP's SimpleTokenizer (as shipped in open_clip), without the
# `regex` and `ftfy` packages. On the merges file of OpenAI / open_clip it gives the same token ids as
# open_clip.tokenize; tests/test_tokenizer.py checks that. Residual differences, all exotic:
#   1. ftfy's mojibake repair (fix_encoding: "cafÃ©" -> "café") is not reproduced; every other step of
#      ftfy.fix_text that CLIP relies on is (see _fix_text).
#   2. Unicode letter/number classes come from Python's own Unicode database (14.0 for Python 3.11), while
#      the `regex` package ships a newer one; characters assigned after that version are classed differently.
#   3. Literal special-token strings inside a caption are plain text here. open_clip turns the text
#      "<start_of_text>" / "<end_of_text>" into the special ids, which would let a caption inject an EOT.

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
OPENAI_NUM_MERGES = 49152 - 256 - 2  # OpenAI reads only this many merges: 512 bytes + 48894 + 2 specials = 49408


@lru_cache()
def bytes_to_unicode():
    """Map each of the 256 byte values to a printable unicode character, so BPE works on strings with no
    whitespace/control characters. Printable latin-1 bytes map to themselves, the other 68 to chr(256 + n).
    The order of this dict is the order of the first 256 vocabulary entries."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


# ftfy.fix_text, minus mojibake repair. ftfy applies these steps in a loop until the text stops changing,
# line by line; HTML entities are decoded only until a line containing '<' is seen (it may be real HTML).
_HTML_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI_RE = re.compile(r"\033\[((?:\d|;)*)([a-zA-Z])")  # terminal colour codes
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


@lru_cache()
def _ftfy_tables():
    # entities: the html5 names that end in ';', plus upper-cased copies of lower-case names ("&EACUTE;")
    entities = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            entities["&" + name] = char
            upper = "&" + name.upper()
            if name == name.lower() and html.unescape(upper) == upper:
                entities[upper] = char.upper()
    # single-character fixes, composed in ftfy's order: C1 controls read as windows-1252, latin ligatures
    # split, half/full-width forms to normal width, curly quotes straightened, unicode line breaks to '\n'
    c1 = {}
    for b in range(0x80, 0xA0):
        try:
            c1[b] = bytes([b]).decode("cp1252")
        except UnicodeDecodeError:  # undefined in cp1252: ftfy's "sloppy" codec keeps the latin-1 char
            pass
    ligatures = {ord(c): unicodedata.normalize("NFKC", c) for c in "ĲĳŉǄǅǆǇǈǉǊǋǌǱǲǳﬀﬁﬂﬃﬄﬆ"}
    ligatures[ord("ﬅ")] = "ſt"  # NFKC would give "st"; ftfy keeps the long s
    width = {0x3000: " "}  # ideographic space
    for i in range(0xFF01, 0xFFF0):
        if unicodedata.normalize("NFKC", chr(i)) != chr(i):
            width[i] = unicodedata.normalize("NFKC", chr(i))
    quotes = {c: "'" for c in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)}
    quotes.update({c: '"' for c in range(0x201C, 0x2020)})
    breaks = {ord("\r"): "\n", 0x2028: "\n", 0x2029: "\n"}
    steps = [c1, ligatures, width, quotes, breaks]
    char_fixes = {}
    for cp in set().union(*steps):
        out = chr(cp)
        for step in steps:
            out = out.translate(step)
        char_fixes[cp] = out
    # control characters ftfy deletes (tab, newline, form feed and carriage return survive)
    controls = [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                *range(0xFFF9, 0xFFFD)]
    return entities, char_fixes, dict.fromkeys(controls)


def _unescape_entity(m):
    entities = _ftfy_tables()[0]
    s = m.group(0)
    if s in entities:
        return entities[s]
    if s.startswith("&#"):
        out = html.unescape(s)
        return s if ";" in out else out  # only accept a reference that was decoded whole
    return s


def _fix_segment(text, unescape):
    _, char_fixes, controls = _ftfy_tables()
    while True:
        before = text
        if unescape:
            text = _HTML_ENTITY_RE.sub(_unescape_entity, text)
        text = text.replace("\r\n", "\n").translate(char_fixes)
        if _SURROGATE_RE.search(text):
            pair = lambda m: chr(0x10000 + (ord(m[0][0]) - 0xD800) * 0x400 + ord(m[0][1]) - 0xDC00)
            text = _SURROGATE_RE.sub("\ufffd", _SURROGATE_PAIR_RE.sub(pair, text))
        text = _ANSI_RE.sub("", text).translate(controls)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def _fix_text(text):
    out, unescape = [], True
    lines = text.split("\n")
    for line in [s + "\n" for s in lines[:-1]] + lines[-1:]:
        unescape = unescape and "<" not in line  # once off, off for the rest of the text (as in ftfy)
        out.append(_fix_segment(line, unescape) if line else line)
    return "".join(out)


def clean_text(text):
    """CLIP's text normalisation: ftfy fix, HTML-unescape twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return " ".join(text.split()).lower()


@lru_cache()
def _pretokenize_re():
    # CLIP splits words with the `regex` pattern
    #   's|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+      (IGNORECASE)
    # In the standard `re` module \w is exactly letters + numbers + '_', and \d is only the decimal digits (Nd),
    # so the other numbers (Nl, No: '½', '²', 'Ⅻ') are listed explicitly from unicodedata.
    ranges = []
    for cp in range(0x110000):
        if unicodedata.category(chr(cp)) in ("Nl", "No"):
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    num = "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)
    letters = rf"[^\W\d_{num}]+"  # word chars that are not numbers or '_'
    number = rf"[\d{num}]"  # one digit at a time, as in CLIP
    # everything else; U+0345 (combining iota) is dropped, as `regex` under IGNORECASE matches it nowhere
    other = r"(?:[^\s\w\u0345]|_)+"
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d|{letters}|{number}|{other}", re.IGNORECASE)


def pretokenize(text):
    """Clean `text` and split it into words, each as a string of byte symbols (see bytes_to_unicode)."""
    byte_encoder = bytes_to_unicode()
    return ["".join(byte_encoder[b] for b in w.encode("utf-8")) for w in _pretokenize_re().findall(clean_text(text))]


def _read_merges(path):
    """Read a bpe_simple_vocab_16e6.txt.gz-style file: gzip text, a header line, then one 'a b' merge per line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BPE merges file not found: {path}")
    try:
        with gzip.open(path, "rb") as f:
            lines = f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:  # OSError includes gzip.BadGzipFile
        raise ValueError(f"BPE merges file {path} is not gzip-compressed UTF-8 text ({e})") from e
    if not lines[0].strip():
        raise ValueError(f"BPE merges file {path} is empty (expected a header line, then 'a b' merges)")
    merges = []
    symbols = set(bytes_to_unicode().values())
    symbols |= {s + "</w>" for s in symbols}
    for lineno, line in enumerate(lines[1 : OPENAI_NUM_MERGES + 1], start=2):
        if not line and all(not rest for rest in lines[lineno - 1 :]):
            break  # trailing newline(s)
        parts = line.split(" ")
        # each merge joins two symbols that already exist (bytes or earlier merges); '</w>' only ends a word
        if len(parts) != 2 or parts[0] not in symbols or parts[1] not in symbols or parts[0].endswith("</w>"):
            raise ValueError(f"BPE merges file {path}, line {lineno}: expected 'a b' with a, b known symbols, "
                             f"got {line[:80]!r}")
        merges.append(tuple(parts))
        symbols.add(parts[0] + parts[1])
    return merges


class Tokenizer:
    """CLIP byte-level BPE. ids: 256 byte symbols, the same 256 ending a word ('</w>'), one per merge, SOT, EOT.

    tok = Tokenizer("bpe_simple_vocab_16e6.txt.gz")
    tok(["a photo of a cat"])  # LongTensor [1, 77]: SOT, bpe ids..., EOT, 0-padding
    """

    def __init__(self, merges_path=None, cache_size=1_000_000):
        if merges_path is None:
            raise ValueError(
                "Tokenizer needs a BPE merges file. OpenAI's is bpe_simple_vocab_16e6.txt.gz: it ships inside the "
                "open_clip_torch package (open_clip/bpe_simple_vocab_16e6.txt.gz) and in OpenAI's CLIP repo "
                "(clip/bpe_simple_vocab_16e6.txt.gz). Or learn one from your captions with data.learn_bpe().")
        self.merges_path = os.fspath(merges_path)
        merges = _read_merges(self.merges_path)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.decoder = vocab
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.vocab_size = len(vocab)
        self.sot_token, self.eot_token = self.encoder[SOT], self.encoder[EOT]
        self.cache_size = cache_size
        self._cache = {}  # word -> ids; a plain dict so the tokenizer pickles into DataLoader workers

    def bpe(self, word):
        """Split one byte-encoded word into BPE symbols: repeatedly merge the adjacent pair with the lowest rank."""
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if pair not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode(self, text):
        """Text -> BPE ids (no SOT/EOT, no padding)."""
        ids = []
        for word in pretokenize(text):
            if word not in self._cache:
                if len(self._cache) >= self.cache_size:
                    self._cache.clear()  # crude bound on memory for huge caption sets
                self._cache[word] = [self.encoder[s] for s in self.bpe(word)]
            ids.extend(self._cache[word])
        return ids

    def decode(self, ids):
        """BPE ids -> text, words separated by spaces (padding zeros are not stripped: id 0 is '!')."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        text = "".join(self.decoder[i] for i in ids)
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts, context_length=77):
        """str or list of str -> LongTensor [N, context_length] of [SOT] + bpe + [EOT], zero-padded.
        Too-long texts are cut to context_length with EOT forced into the last slot, as in CLIP."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        result = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot_token] + self.encode(text) + [self.eot_token]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_token
            result[i, : len(ids)] = torch.tensor(ids)
        return result


def learn_bpe(captions, out_path, num_merges):
    """Learn byte-level BPE merges from `captions` and write them gzipped in the bpe_simple_vocab_16e6.txt.gz
    format (a Tokenizer on it has vocab_size = 512 + merges + 2). Words are split exactly as Tokenizer splits
    them; each step merges the most frequent adjacent pair, ties going to the smallest pair (deterministic).
    Stops early if no pair is left. Returns the number of merges written."""
    if not 0 <= num_merges <= OPENAI_NUM_MERGES:
        raise ValueError(f"num_merges must be in [0, {OPENAI_NUM_MERGES}] (CLIP's vocabulary size), got {num_merges}")
    captions = list(captions)
    freq = Counter(w for caption in captions for w in pretokenize(caption))
    words = sorted(freq)
    counts = [freq[w] for w in words]
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]

    # pair -> total count, pair -> ids of words that (may) contain it; updated incrementally after each merge
    pair_count, where = defaultdict(int), defaultdict(set)
    for i, (w, n) in enumerate(zip(words, counts)):
        for pair in zip(w, w[1:]):
            pair_count[pair] += n
            where[pair].add(i)
    # max-heap on (count, then smallest pair) with lazy deletion: an entry is live if its count is current
    heap = [(-n, pair) for pair, n in pair_count.items()]
    heapq.heapify(heap)
    merges, symbols, banned = [], set(), set()  # symbols: strings made by merges so far
    while len(merges) < num_merges and heap:
        neg_n, pair = heapq.heappop(heap)
        if pair in banned or pair_count.get(pair, 0) != -neg_n:
            continue  # stale entry
        a, b = pair
        if a + b in symbols:  # another merge already made this string: skip, so the vocabulary stays unique
            banned.add(pair)
            continue
        del pair_count[pair]  # merging removes every occurrence
        symbols.add(a + b)
        merges.append(pair)
        touched = set()
        for i in sorted(where.pop(pair)):
            w, n = words[i], counts[i]
            new, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    new.append(a + b)
                    j += 2
                else:
                    new.append(w[j])
                    j += 1
            if len(new) == len(w):
                continue  # stale index: this word no longer holds the pair
            for p in zip(w, w[1:]):
                if p != pair:
                    pair_count[p] -= n
                    touched.add(p)
            for p in zip(new, new[1:]):
                pair_count[p] += n
                where[p].add(i)
                touched.add(p)
            words[i] = new
        for p in sorted(touched - banned):
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
            else:
                del pair_count[p]

    text = f"#version: 0.2 - learned by data.learn_bpe: {len(merges)} merges from {len(captions)} captions\n"
    text += "".join(f"{a} {b}\n" for a, b in merges)
    tmp = f"{out_path}.tmp{os.getpid()}"
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(text.encode("utf-8"))  # mtime=0 and no file name: identical input gives identical bytes
    os.replace(tmp, out_path)
    return len(merges)


# --- Image transforms (CLIP normalisation; the paper's augmentations, §3.4) ---
# Reads no files: PIL images in, normalised tensors out; the readers below apply them.

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's RGB statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def eval_transform(image_size=224):
    """Resize the short side (bicubic), centre-crop, normalise: CLIP's and DreamSim's test-time preprocessing."""
    return v2.Compose([
        v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def train_transform(image_size=224):
    """The paper's training augmentations (§3.4): random crop, colour jitter, grayscale, Gaussian blur, horizontal
    flip, then CLIP normalisation. The paper names the operations but not their strengths; these are SimCLR's
    (Chen et al. 2020), with a milder crop so a caption still describes its image.

    A torchvision v2 transform draws its random parameters once per call, so `t(ref, left, right)` applies the SAME
    crop, jitter and flip to all three images of a NIGHTS triplet (independent jitter could change which variation
    looks closer to the reference)."""
    blur_kernel = 2 * (image_size // 20) + 1  # ~10% of the side, odd, as SimCLR
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToImage(),  # uint8 tensor: the colour ops below are cheaper on the 224-px crop than on the full image
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(CLIP_MEAN, CLIP_STD),
    ])


# --- NIGHTS (human 2AFC triplets) ---
# NIGHTS (Fu et al. 2023, "DreamSim") as distributed: a folder with data.csv and the images it names, e.g.
#   nights/data.csv
#   nights/ref/000/000.png, nights/distort/000/000_0.png, nights/distort/000/000_1.png, ...
# data.csv has a header; we read it by column name (csv.DictReader) and ignore columns we do not use. The columns
# we need: votes, right_vote, ref_path, left_path, right_path, split, is_imagenet. Following the reference loader,
# only triplets with votes >= 6 (unanimous judgements) are kept; `test_imagenet` / `test_no_imagenet` are the rows
# of `test` with is_imagenet true / false. The label is 1 when humans judged the RIGHT variation x~1 more similar
# (right_vote > 0.5), 0 when the LEFT x~0 was: the convention of model.perceptual_hinge_loss (PI paper eq. 2).

NIGHTS_SPLITS = ("train", "val", "test", "test_imagenet", "test_no_imagenet")
NIGHTS_COLUMNS = ("votes", "right_vote", "ref_path", "left_path", "right_path", "split", "is_imagenet")


def _is_true(value):
    return str(value).strip().lower() in ("true", "1", "yes", "t", "1.0")


def read_nights_csv(root, split, min_votes=6):
    """The rows of `<root>/data.csv` in `split` with votes >= min_votes, as dicts (paths are relative to root)."""
    if split not in NIGHTS_SPLITS:
        raise ValueError(f"unknown NIGHTS split '{split}'; choose one of {', '.join(NIGHTS_SPLITS)}")
    csv_path = os.path.join(root, "data.csv")
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"NIGHTS index not found: {csv_path} (expected the dataset folder as distributed "
                                f"with DreamSim: data.csv plus the ref/ and distort/ image folders)")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in NIGHTS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path} lacks the column(s) {', '.join(missing)}; found {reader.fieldnames}")
        rows = [r for r in reader if float(r["votes"]) >= min_votes]
    base = "test" if split.startswith("test") else split
    rows = [r for r in rows if r["split"] == base]
    if split == "test_imagenet":
        rows = [r for r in rows if _is_true(r["is_imagenet"])]
    elif split == "test_no_imagenet":
        rows = [r for r in rows if not _is_true(r["is_imagenet"])]
    return rows


class NightsTriplets(Dataset):
    """NIGHTS triplets (x, x~0, x~1, y): returns (reference, left, right, label) with label a float 0/1.

    augment=False: resize (bicubic) + centre crop + CLIP normalisation (data.eval_transform), as the reference
    evaluation does. augment=True: the paper's training augmentations (§3.4, data.train_transform), drawn ONCE per
    triplet and applied to all three images alike -- independent jitter of each image would change which
    variation looks closer and so corrupt the human label.

    The augmentation randomness of sample i in epoch e comes from its own generator seeded with (seed, e, i), so a
    resumed run (or any number of DataLoader workers) sees exactly the same augmented images; call set_epoch(e)
    before each epoch. subset < 1 keeps a fixed random fraction of the triplets (subset_seed, independent of the
    training seed), for the PI paper's proposed sub-sampling study (§5). All image files are checked up front.
    """

    def __init__(self, root, split="train", image_size=224, augment=False, subset=1.0, subset_seed=0, seed=0,
                 min_votes=6, check_files=True):
        if not 0 < subset <= 1:
            raise ValueError(f"subset must be a fraction in (0, 1], got {subset}")
        self.root, self.split, self.augment, self.seed, self.epoch = root, split, augment, seed, 0
        rows = read_nights_csv(root, split, min_votes)
        if not rows:
            raise ValueError(f"{os.path.join(root, 'data.csv')} has no triplets in split '{split}' "
                             f"with votes >= {min_votes}")
        if check_files:  # fail before training starts, not hours in
            paths = [r[k] for r in rows for k in ("ref_path", "left_path", "right_path")]
            absent = [p for p in paths if not os.path.isfile(os.path.join(root, p))]
            if absent:
                raise FileNotFoundError(f"{len(absent)} of the {len(paths)} images named in "
                                        f"{os.path.join(root, 'data.csv')} for split '{split}' are missing under "
                                        f"{root}, e.g. {', '.join(absent[:3])}")
        if subset < 1:
            g = torch.Generator().manual_seed(subset_seed)
            keep = torch.randperm(len(rows), generator=g)[: max(1, round(subset * len(rows)))]
            rows = [rows[i] for i in sorted(keep.tolist())]
        self.rows = rows
        self.transform = train_transform(image_size) if augment else eval_transform(image_size)

    def __len__(self):
        return len(self.rows)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _load(self, rel_path):
        with Image.open(os.path.join(self.root, rel_path)) as im:
            return im.convert("RGB")

    def __getitem__(self, i):
        r = self.rows[i]
        ref, left, right = (self._load(r[k]) for k in ("ref_path", "left_path", "right_path"))
        if self.augment:
            # one draw of the random parameters for the whole triplet, from a seed that depends only on
            # (seed, epoch, index); fork_rng leaves the global RNG of the process as it was
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i)
                ref, left, right = self.transform(ref, left, right)
        else:
            ref, left, right = self.transform(ref), self.transform(left), self.transform(right)
        label = torch.tensor(1.0 if float(r["right_vote"]) > 0.5 else 0.0)
        return ref, left, right, label


# --- Image-text data (tar shards, CSV) ---
# Stage 2's (image, caption) pairs (PI paper §3.2), in the two layouts people have:
#   * webdataset-style tar shards as img2dataset writes them: consecutive members {key}.jpg|png|webp, {key}.txt and an
#     optional {key}.json, read as a stream with the standard tarfile module (TarImageText);
#   * a CSV/TSV file with an image-path column and a caption column (open_clip's filepath/title; CsvImageText).
# Both hand out whole batches for one rank -- dicts with images [b, 3, H, W], tokens [b, 77] and `bad`, the samples
# skipped on the way -- and the same number of them on every rank, so DDP ranks never wait on each other at an
# epoch's end. Data order and each sample's augmentation are functions of (seed, epoch, position) only, so a resumed
# run sees exactly the batches the killed one would have seen. Corrupt images, missing captions and truncated tar
# members are skipped and counted, never fatal.
# Entry point: image_text_loader(...) -> ImageTextData with .steps_per_epoch and .epoch(e, start_step, positions).
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def stable_seed(*keys):
    """A 63-bit seed from a tuple of ints/strings that is the same in every process and run (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


def expand_shards(spec):
    """'yfcc/{00000..01499}.tar' -> the 1,500 paths (zero-padded like the pattern); '{a,b}' lists alternatives;
    several patterns may be joined with '::' (open_clip's convention) or given as a list."""
    if isinstance(spec, (list, tuple)):
        return [path for s in spec for path in expand_shards(s)]
    paths = []
    for part in str(spec).split("::"):
        m = re.search(r"\{([^{}]*)\}", part)
        if m is None:
            paths.append(part)
            continue
        r = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
        options = ([str(i).zfill(len(r.group(1))) for i in range(int(r.group(1)), int(r.group(2)) + 1)] if r
                   else m.group(1).split(","))
        for option in options:
            paths += expand_shards(part[:m.start()] + option + part[m.end():])
    return paths


# ---- decoding and augmentation


class SeparableGaussianBlur(v2.GaussianBlur):
    """v2.GaussianBlur -- same random sigma, same kernel, same reflect padding -- computed as B_h @ X @ B_w^T, where
    B is the [n, n] matrix of the reflect-padded 1-D convolution. torchvision convolves with the full k x k kernel:
    at k = 23 (train_transform at 224 px) that is ~5x slower on one CPU core. Equal up to float rounding."""

    def transform(self, inpt, params):
        if not isinstance(inpt, torch.Tensor) or inpt.ndim < 3:
            return super().transform(inpt, params)  # PIL images etc.: torchvision's own kernel
        x = inpt.as_subclass(torch.Tensor)
        x = x if x.is_floating_point() else x.float()
        (kx, ky), (sx, sy), (h, w) = self.kernel_size, params["sigma"], x.shape[-2:]
        x = _blur_matrix(h, ky, sy, x.dtype) @ x @ _blur_matrix(w, kx, sx, x.dtype).T
        if not inpt.is_floating_point():
            x = x.round_().clamp_(0, torch.iinfo(inpt.dtype).max).to(inpt.dtype)
        return tv_tensors.wrap(x, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else x


def _blur_matrix(n, k, sigma, dtype):
    """[n, n] matrix M with (M @ v)[i] = sum_t g[t] * v[reflect(i + t - k // 2)]: torchvision's Gaussian kernel g
    (softmax of -(x / sigma)^2 on its grid) with reflect padding folded in."""
    if k // 2 > n - 1:
        raise ValueError(f"blur kernel {k} is too large for a side of {n} pixels")
    lim = (k - 1) / (2.0 * 2 ** 0.5)
    g = torch.softmax(torch.linspace(-lim, lim, k, dtype=dtype).div(sigma).pow(2).neg(), dim=0)
    idx = (torch.arange(n)[:, None] + torch.arange(k) - k // 2).abs()  # reflect at 0 ...
    idx = torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)  # ... and at n - 1
    return torch.zeros(n, n, dtype=dtype).scatter_add_(1, idx, g.expand(n, k).contiguous())


def _with_fast_blur(t):
    if type(t) is v2.GaussianBlur:
        return SeparableGaussianBlur(t.kernel_size, t.sigma)
    if isinstance(t, v2.RandomApply):
        return v2.RandomApply([_with_fast_blur(s) for s in t.transforms], p=t.p)
    if isinstance(t, v2.Compose):
        return v2.Compose([_with_fast_blur(s) for s in t.transforms])
    return t


class ImageDecoder:
    """Encoded image bytes -> transformed tensor, decoding no more JPEG pixels than the output can show.

    If the transform starts with RandomResizedCrop (train_transform), the crop box is drawn -- by that transform's
    own make_params, so with the same random numbers -- from the image size in the file header, before decoding.
    Pillow's JPEG draft mode then decodes at the smallest DCT scale (1, 1/2, 1/4, 1/8) at which the box still
    covers at least the output size, and Pillow crops and resizes it. If it starts with Resize(s)
    (eval_transform), the draft keeps the short side >= s. Either way only pixels the final resize would have
    averaged away are skipped. Gaussian blurs run separably (SeparableGaussianBlur); everything else is the
    transform as given. PNG and WebP are decoded in full.
    """

    def __init__(self, transform):
        steps = list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]
        self.crop = steps.pop(0) if type(steps[0]) is v2.RandomResizedCrop else None
        first = steps[0] if steps else None
        self.draft_side = None
        if isinstance(first, v2.Resize) and first.max_size is None and len(first.size or []) == 1:
            self.draft_side = first.size[0]  # Resize(s): the short side becomes s
        self.rest = v2.Compose([_with_fast_blur(t) for t in steps])

    def __call__(self, data):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Palette images with transparency...": harmless for training
            img = Image.open(io.BytesIO(data))
            if self.crop is not None:
                img = self._crop_and_resize(img)
            else:
                if self.draft_side and img.format == "JPEG":
                    img.draft("RGB", (self.draft_side, self.draft_side))
                img = _decoded_rgb(img)
        return self.rest(img)

    def _crop_and_resize(self, img):
        full_w, full_h = img.size
        make_params = getattr(self.crop, "make_params", None) or self.crop._get_params  # torchvision < 0.21
        p = make_params([img])  # reads only img.size: the header
        out_h, out_w = self.crop.size
        scale = 1
        while scale < 8 and p["height"] // (2 * scale) >= out_h and p["width"] // (2 * scale) >= out_w:
            scale *= 2
        if scale > 1 and img.format == "JPEG":
            img.draft("RGB", (full_w // scale, full_h // scale))  # Pillow picks this DCT scale (or 1 if it must)
        resample = pil_modes_mapping[self.crop.interpolation]
        box = (p["left"], p["top"], p["left"] + p["width"], p["top"] + p["height"])
        if img.size == (full_w, full_h):  # full-size decode: exactly torchvision's crop, then resize
            return _decoded_rgb(img).crop(box).resize((out_w, out_h), resample)
        sx, sy = img.size[0] / full_w, img.size[1] / full_h  # the box on the reduced image, in fractional pixels
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        return _decoded_rgb(img).resize((out_w, out_h), resample, box=box)


def _decoded_rgb(img):
    img.load()  # decodes; raises on truncated or corrupt data
    return img if img.mode == "RGB" else img.convert("RGB")  # (convert would copy an RGB image)


def _augment(decoder, data, seed):
    """Run the random transform with torch's CPU generator seeded for this one sample, then put the generator back:
    a sample's augmentation is then the same whichever worker or rank runs it, and in a resumed run.
    (torch.manual_seed would also touch the CUDA generators: ~0.1 ms a call.)"""
    gen = torch.default_generator
    state = gen.get_state()
    gen.manual_seed(seed)
    try:
        return decoder(data)
    finally:
        gen.set_state(state)


def _collate(images, captions, tokenizer, context_length, bad, **extra):
    return dict(images=torch.stack(images), tokens=tokenizer(captions, context_length=context_length),
                bad=dict(bad), **extra)


# ---- webdataset-style tar shards


def tar_samples(path, bad):
    """The samples of one tar shard as dicts {"__key__": key, ext: bytes}, grouping consecutive members by key (the
    file name up to its first dot, as webdataset does). A truncated or unreadable shard ends early, keeping what came
    before; `bad` (a Counter) counts the damage."""
    sample = {}
    try:
        with tarfile.open(path, "r|*") as tar:  # "|": a forward-only stream, each byte read once, no seeks
            for member in tar:
                if not member.isfile():
                    continue
                folder, name = os.path.split(member.name)
                key, _, ext = name.partition(".")
                key = f"{folder}/{key}" if folder else key
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample["__key__"] = key
                sample[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:  # truncated member or archive, unreadable file
        bad["truncated"] += 1
        warnings.warn(f"{path}: {type(err).__name__}: {err}; keeping the samples before it")
        sample = {}  # the sample being read is incomplete
    if sample:
        yield sample


def shuffle_buffer(items, size, rng):
    """Streaming shuffle: keep `size` items, and for each new one hand out a random one of them (webdataset's)."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def _steps_of_worker(n_steps, worker, n_workers):
    """How many of the steps 0 .. n_steps-1 fall to `worker` when step k comes from worker k % n_workers."""
    return max(0, (n_steps - worker + n_workers - 1) // n_workers)


def img2dataset_sample_count(shards):
    """Sum of the "successes" in img2dataset's {shard}_stats.json files, or None if any is missing."""
    total = 0
    for path in shards:
        stats = re.sub(r"\.tar(\.\w+)?$", "_stats.json", path)
        if stats == path or not os.path.isfile(stats):
            return None
        with open(stats) as f:
            total += int(json.load(f)["successes"])
    return total


class TarImageText(IterableDataset):
    """Streaming (image, caption) batches from tar shards for one rank.

    Shards are dealt disjointly to the ranks x DataLoader workers: every epoch all ranks put the shard list in the
    same order drawn from (seed, epoch) and unit u = rank * workers + worker takes shards u, u + units, ... Each unit
    reads its shards (cycling through them again if it needs more samples) through a shuffle buffer and yields its
    quota of batches: the epoch is `steps_per_epoch` batches per rank, whatever the shards hold, so every rank
    takes the same number of steps. If each unit's shards hold exactly its quota, every sample is seen once.

    Each batch reports `worker` and `pos` (how many samples of that worker's stream it has consumed); given those
    positions, `set_epoch(e, start_step, positions)` continues an epoch exactly where a killed run left it: the
    workers replay their streams up to there without decoding anything, then carry on.
    """

    def __init__(self, shards, tokenizer, transform, batch_size, steps_per_epoch, rank=0, world_size=1, seed=0,
                 buffer_size=2000, context_length=77):
        self.shards = expand_shards(shards)
        missing = [p for p in self.shards if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.shards)} shards do not exist, e.g. {missing[0]}")
        self.tokenizer, self.decoder, self.context_length = tokenizer, ImageDecoder(transform), context_length
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.rank, self.world_size, self.seed, self.buffer_size = rank, world_size, seed, buffer_size
        self.set_epoch(0)

    def set_epoch(self, epoch, start_step=0, positions=None):
        self.epoch, self.start_step, self.positions = epoch, start_step, dict(positions or {})

    def _pairs(self, unit, n_units, bad):
        """This unit's endless stream of (image bytes, caption): its shards, in an order drawn from (seed, epoch,
        pass), through a shuffle buffer that is emptied at the end of each pass, so that one pass yields every
        sample once before the next pass begins."""
        order = list(self.shards)
        random.Random(stable_seed(self.seed, self.epoch)).shuffle(order)  # the same on every rank
        mine = order[unit::n_units]
        for p in itertools.count():
            random.Random(stable_seed(self.seed, self.epoch, unit, p)).shuffle(mine)
            samples = (s for path in mine for s in tar_samples(path, bad))
            n = 0
            for pair in shuffle_buffer(self._usable(samples, bad), self.buffer_size,
                                       random.Random(stable_seed(self.seed, self.epoch, unit, p, "buffer"))):
                n += 1
                yield pair
            if n == 0:
                raise RuntimeError(f"no usable samples in the shards {mine[:3]}...")

    @staticmethod
    def _usable(samples, bad):
        for sample in samples:
            data = next((sample[e] for e in SHARD_IMAGE_EXTENSIONS if e in sample), None)
            caption = sample.get("txt", b"").decode("utf-8", errors="replace").strip()
            if data is None or not caption:
                bad["no image" if data is None else "no caption"] += 1
                continue
            yield data, caption

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        n_units = self.world_size * n_workers
        if len(self.shards) < n_units:
            raise ValueError(f"{len(self.shards)} shards cannot be dealt to {self.world_size} ranks x {n_workers} "
                             f"workers: use fewer --workers or split the data into more shards")
        # The DataLoader asks its workers in turn, starting from worker 0, so after `start_step` steps worker w
        # serves step start_step + w: it plays the part of worker (w + start_step) % n_workers of the epoch.
        worker = (worker + self.start_step) % n_workers
        todo = (_steps_of_worker(self.steps_per_epoch, worker, n_workers)
                - _steps_of_worker(self.start_step, worker, n_workers))
        if todo <= 0:
            return
        unit, skip = self.rank * n_workers + worker, self.positions.get(worker, 0)
        images, captions, bad = [], [], Counter()
        for pos, (data, caption) in enumerate(self._pairs(unit, n_units, bad)):
            if pos < skip:
                continue  # consumed before the checkpoint: replayed without decoding
            try:
                images.append(_augment(self.decoder, data, stable_seed(self.seed, self.epoch, unit, pos)))
            except Exception:  # corrupt, truncated or unsupported image
                bad["undecodable"] += 1
                continue
            captions.append(caption)
            if len(images) == self.batch_size:
                yield _collate(images, captions, self.tokenizer, self.context_length, bad, worker=worker, pos=pos + 1)
                images, captions, bad = [], [], Counter()
                todo -= 1
                if todo == 0:
                    return


# ---- CSV / TSV


class CsvImageText(Dataset):
    """(image, caption) rows of a CSV/TSV file (open_clip's `filepath` / `title` columns by default). Relative image
    paths are taken from the file's folder. Rows with an empty caption are dropped here (counted in
    `no_caption`); unreadable images are replaced at load time (see GlobalBatchSampler)."""

    def __init__(self, path, tokenizer, transform, img_key="filepath", caption_key="title", sep=None,
                 context_length=77):
        sep = sep or ("\t" if path.endswith(".tsv") else ",")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=sep)
            absent = [k for k in (img_key, caption_key) if k not in (reader.fieldnames or [])]
            if absent:
                raise ValueError(f"{path}: no column {absent} among {reader.fieldnames}; "
                                 f"set --csv-img-key / --csv-caption-key (and --csv-separator)")
            rows = [(r[img_key], (r[caption_key] or "").strip()) for r in reader]
        root = os.path.dirname(os.path.abspath(path))
        self.paths = [os.path.join(root, p) for p, c in rows if c]
        self.captions = [c for _, c in rows if c]
        self.no_caption = len(rows) - len(self.captions)
        self.tokenizer, self.decoder, self.context_length = tokenizer, ImageDecoder(transform), context_length

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        """key = (row, substitute rows, augmentation seed) from GlobalBatchSampler -> (image, caption, #bad)."""
        row, substitutes, seed = key
        for n_bad, i in enumerate((row, *substitutes)):
            try:
                with open(self.paths[i], "rb") as f:
                    return _augment(self.decoder, f.read(), seed), self.captions[i], n_bad
            except Exception:
                continue
        raise RuntimeError(f"neither {self.paths[row]} nor its {len(substitutes)} substitutes could be read")

    def collate(self, items):
        images, captions, n_bad = zip(*items)
        return _collate(list(images), list(captions), self.tokenizer, self.context_length,
                        {"undecodable": sum(n_bad)} if sum(n_bad) else {})


class GlobalBatchSampler:
    """Which rows each rank reads at each step, with the rank split explicit.

    Epoch e orders all rows by a permutation drawn from (seed, e); global batch k is positions [k*B, (k+1)*B) of
    it and rank r reads the contiguous slice [k*B + r*b, k*B + (r+1)*b), b = B / world_size. Each sample's
    augmentation is seeded by (seed, e, position). So the global order and the images themselves do not depend on
    the number of ranks or workers: 2 ranks see exactly the batches one process sees, and a resumed run starts at
    step k of the same order. The positions past the last full batch are the epoch's spare rows: a row whose image
    cannot be read is replaced by a spare one (or, without spares, by the row one batch further on).
    """

    def __init__(self, n_rows, batch_size, steps_per_epoch, rank=0, world_size=1, seed=0, n_substitutes=4):
        self.n, self.batch_size, self.steps_per_epoch = n_rows, batch_size, steps_per_epoch
        self.rank, self.world_size, self.seed, self.n_substitutes = rank, world_size, seed, n_substitutes
        self.set_epoch(0)

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        order = np.random.default_rng(stable_seed(self.seed, self.epoch)).permutation(self.n)
        spare = order[self.steps_per_epoch * self.batch_size:]
        b = self.batch_size // self.world_size
        for k in range(self.start_step, self.steps_per_epoch):
            batch = []
            for j in range(k * self.batch_size + self.rank * b, k * self.batch_size + (self.rank + 1) * b):
                if len(spare):
                    subs = [spare[(j + t) % len(spare)] for t in range(min(self.n_substitutes, len(spare)))]
                else:
                    subs = [order[(j + t * self.batch_size) % self.n] for t in range(1, self.n_substitutes + 1)]
                batch.append((int(order[j]), tuple(int(s) for s in subs), stable_seed(self.seed, self.epoch, j)))
            yield batch


# ---- one entry point for train_clip.py


def is_csv(spec):
    return isinstance(spec, str) and spec.lower().endswith((".csv", ".tsv"))


class ImageTextData:
    """Per-epoch DataLoaders over tar shards or a CSV for one rank (made by image_text_loader)."""

    def __init__(self, dataset, sampler, steps_per_epoch, samples_per_epoch, workers, pin_memory):
        self.dataset, self.sampler, self.workers, self.pin_memory = dataset, sampler, workers, pin_memory
        self.steps_per_epoch, self.samples_per_epoch = steps_per_epoch, samples_per_epoch
        self.kind = "csv" if sampler is not None else "tar"

    def epoch(self, epoch, start_step=0, positions=None):
        """The batches of `epoch` from step `start_step` on (positions: the last `worker -> pos` of each tar
        worker before start_step, as reported in the batches; ignored for CSV)."""
        kw = dict(num_workers=self.workers, pin_memory=self.pin_memory, persistent_workers=False)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start_step)
            return DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=self.dataset.collate, **kw)
        units = self.dataset.world_size * max(1, self.workers)
        if len(self.dataset.shards) < units:  # (the workers check too; failing here is quicker)
            raise ValueError(f"{len(self.dataset.shards)} shards cannot be dealt to {self.dataset.world_size} ranks "
                             f"x {max(1, self.workers)} workers: use fewer --workers or split the data into more "
                             f"shards")
        self.dataset.set_epoch(epoch, start_step, positions)
        return DataLoader(self.dataset, batch_size=None, **kw)


def image_text_loader(data, tokenizer, transform, batch_size, rank=0, world_size=1, workers=4, seed=0,
                      samples_per_epoch=None, buffer_size=2000, csv_img_key="filepath", csv_caption_key="title",
                      csv_sep=None, context_length=77, pin_memory=False):
    """Image-text batches for one rank. `data`: a .csv/.tsv file, or tar shards ('dir/{00000..01499}.tar', a list,
    or patterns joined by '::'). `batch_size` is the GLOBAL batch; each rank gets batch_size / world_size samples
    per step. An epoch is samples_per_epoch // batch_size steps (the last partial batch is dropped);
    samples_per_epoch defaults to the CSV's rows with a caption, or for shards to the sum of img2dataset's
    *_stats.json "successes"."""
    if batch_size % world_size:
        raise ValueError(f"the global batch {batch_size} is not divisible by the {world_size} ranks")
    per_rank = batch_size // world_size
    if is_csv(data):
        ds = CsvImageText(data, tokenizer, transform, csv_img_key, csv_caption_key, csv_sep, context_length)
        if ds.no_caption:
            warnings.warn(f"{data}: skipped {ds.no_caption} rows without a caption")
        samples_per_epoch = min(samples_per_epoch or len(ds), len(ds))
        steps = samples_per_epoch // batch_size
        sampler = GlobalBatchSampler(len(ds), batch_size, steps, rank, world_size, seed)
    else:
        shards = expand_shards(data)
        samples_per_epoch = samples_per_epoch or img2dataset_sample_count(shards)
        if not samples_per_epoch:
            raise ValueError("cannot tell how many samples the shards hold (no img2dataset *_stats.json beside "
                             "them): pass --train-num-samples")
        steps = samples_per_epoch // batch_size
        ds = TarImageText(shards, tokenizer, transform, per_rank, steps, rank, world_size, seed, buffer_size,
                          context_length)
        sampler = None
    if steps < 1:
        raise ValueError(f"an epoch of {samples_per_epoch} samples holds no full batch of {batch_size}")
    return ImageTextData(ds, sampler, steps, samples_per_epoch, workers, pin_memory)
