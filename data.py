"""
Data for PI-CLIP: everything between files on disk and the tensors the model eats.

- the CLIP byte-level BPE tokenizer (`Tokenizer`) and `learn_bpe` to learn a merges file from captions;
- image transforms (CLIP normalisation, eval / train augmentations, paper section 3.4);
- datasets: NIGHTS triplets (stage 1) and image-caption pairs (stage 2).

The CPU demo's synthetic world, which writes data in these formats, lives in synthetic_world.py.

Only the runtime dependencies (torch, torchvision, numpy, pillow, tqdm) and the standard library are imported.
"""

import csv
import glob
import gzip
import hashlib
import heapq
import html
import html.entities
import io
import itertools
import json
import math
import os
import random
import re
import signal
import tarfile
import time
import unicodedata
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
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
# Reads no files: PIL images (or, ImageDecoder, encoded bytes) in, tensors out; the readers below apply them.

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


# train_transform split in two for large batches: the loader's workers run the geometric part (train_crop_transform,
# uint8 out, a quarter of float32's bytes) and draw each sample's photometric parameters (draw_photometric_params);
# the training device applies colour jitter, grayscale, blur and normalisation to the whole batch (device_transform).
# One sample's parameter vector:
#   [0] colour jitter applied (0/1)   [1:5] brightness, contrast, saturation, hue factors
#   [5:9] the order of the four jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue; ColorJitter permutes them)
#   [9] grayscale (0/1)   [10] blur (0/1)   [11] blur sigma
PHOTOMETRIC_PARAMS = 12


def train_crop_transform(image_size=224):
    """train_transform's first steps (random resized crop, flip) -> uint8 [3, S, S]; the same random draws."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToImage(),
    ])


def eval_crop_transform(image_size=224):
    """eval_transform's resize and centre crop -> uint8 [3, S, S]; device_transform(images) finishes it."""
    return v2.Compose([
        v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
        v2.ToImage(),
    ])


def draw_photometric_params(generator=None):
    """One sample's photometric parameters [PHOTOMETRIC_PARAMS], drawn from `generator` (default: torch's global one)
    with the same calls, in the same order, as train_transform's photometric steps draw them: RandomApply's
    torch.rand(1) >= p skips a step, ColorJitter draws torch.randperm(4) then its four factors, GaussianBlur its
    sigma. So these parameters equal what train_transform would draw after its crop and flip."""
    p = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0])  # nothing applied
    if torch.rand(1, generator=generator) < 0.8:  # RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
        p[0] = 1.0
        p[5:9] = torch.randperm(4, generator=generator)
        for i, (lo, hi) in enumerate([(1 - 0.4, 1 + 0.4)] * 3 + [(-0.1, 0.1)]):
            p[1 + i] = torch.empty(1).uniform_(lo, hi, generator=generator)
    p[9] = float(torch.rand(1, generator=generator) < 0.2)  # RandomGrayscale(p=0.2)
    if torch.rand(1, generator=generator) < 0.5:  # RandomApply([GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5)
        p[10] = 1.0
        p[11] = torch.empty(1).uniform_(0.1, 2.0, generator=generator)
    return p


def photometric_augment(images, params):
    """uint8 [B, 3, H, W] -> float32 [B, 3, H, W] in [0, 1]: train_transform's colour jitter, grayscale and blur,
    image b with its own params[b] ([B, PHOTOMETRIC_PARAMS], from draw_photometric_params), batched on the images'
    device. Each op is computed for the whole batch and kept where a sample has it on (torch.where): no host sync.
    Unlike torchvision on uint8 images, the result is not rounded to uint8 after every op (see the tests).
    Working memory is ~5x the float32 output (peak 3.7 GB for 1,024 images at 224 px on CPU): chunk huge batches."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"photometric_augment wants uint8 [B, 3, H, W] images, "
                         f"got {images.dtype} {list(images.shape)}")
    if params.shape != (images.shape[0], PHOTOMETRIC_PARAMS):
        raise ValueError(f"photometric_augment wants params [{images.shape[0]}, {PHOTOMETRIC_PARAMS}], "
                         f"got {list(params.shape)}")
    params = params.to(device=images.device, dtype=torch.float32)
    x = images.float().mul_(1.0 / 255)  # v2.ToDtype(float32, scale=True)
    x = _color_jitter(x, params)
    x = torch.where(params[:, 9].view(-1, 1, 1, 1) > 0, _grayscale(x), x)
    blur = params[:, 10] > 0
    sigma = torch.where(blur, params[:, 11], 1.0)  # any positive sigma where the blur is off
    blurred = _gaussian_blur(x, kernel_size=2 * (x.shape[2] // 20) + 1, sigma=sigma)
    return torch.where(blur.view(-1, 1, 1, 1), blurred, x).clamp_(0, 1)  # the kernel sums to 1 only up to rounding


def normalize(images):
    """v2.Normalize(CLIP_MEAN, CLIP_STD) on float [B, 3, H, W] images in [0, 1]."""
    mean = torch.tensor(CLIP_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return images.sub(mean).div_(std)


def device_transform(images, params=None):
    """uint8 [B, 3, H, W] crops (train_crop_transform / eval_crop_transform) -> the model's normalised float32 input:
    with params, train_transform's photometric steps (photometric_augment); without, eval_transform's ToDtype."""
    if images.dtype != torch.uint8:
        raise ValueError(f"device_transform wants uint8 images, got {images.dtype}")
    x = images.float().mul_(1.0 / 255) if params is None else photometric_augment(images, params)
    return normalize(x)


def _grayscale(x):
    """Luma [B, 1, H, W] of float RGB [B, 3, H, W], with torchvision rgb_to_grayscale's ITU-R 601 weights."""
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _blend_op(x, op, factors, active):
    """Brightness (op 0), contrast (1) or saturation (2) with factor f = factors[b, op[b]] on sample b where active:
    f * x + (1 - f) * reference, reference = black, the mean luma, or the pixel's luma (torchvision's _blend)."""
    gray = _grayscale(x)
    op4 = op.view(-1, 1, 1, 1)
    reference = torch.where(op4 == 2, gray, torch.where(op4 == 1, gray.mean(dim=(1, 2, 3), keepdim=True), 0.0))
    f = torch.where(active, factors.gather(1, op.clamp(max=2)[:, None]).squeeze(1), 1.0).view(-1, 1, 1, 1)
    return x.mul(f).add_(reference * (1 - f)).clamp_(0, 1)  # f = 1: x exactly


def _adjust_hue(x, hue_factor):
    """Rotate the HSV hue of float RGB [B, 3, H, W] by hue_factor[b] turns (torchvision adjust_hue), batched."""
    r, g, b = x.unbind(dim=1)
    v = torch.maximum(torch.maximum(r, g), b)
    delta = v - torch.minimum(torch.minimum(r, g), b)  # V * S
    d = delta.clamp(min=1e-12)  # delta = 0: r = g = b, so every numerator below is 0 (and the output is V)
    # hue in sextants [0, 6): (g - b) / delta where R is the max, 2 + (b - r) / delta where G, 4 + (r - g) / delta
    h6 = torch.where(v == r, (g - b).div_(d), torch.where(v == g, (b - r).div_(d).add_(2), (r - g).div_(d).add_(4)))
    h6 = h6.add_(6 * hue_factor.view(-1, 1, 1)).remainder_(6).unsqueeze(1)
    # back to RGB: channel = V - delta * w, w = how far the pure hue's channel is below 1: clamp(2 - |h6 - 3|, 0, 1)
    # for R, clamp(|h6 - 2| - 1, 0, 1) for G, clamp(|h6 - 4| - 1, 0, 1) for B
    centre = torch.tensor([3.0, 2.0, 4.0], device=x.device).view(1, 3, 1, 1)
    sign = torch.tensor([-1.0, 1.0, 1.0], device=x.device).view(1, 3, 1, 1)
    w = (h6 - centre).abs_().sub_(1.5).mul_(sign).add_(0.5).clamp_(0, 1)
    return w.mul_(-delta.unsqueeze(1)).add_(v.unsqueeze(1))


def _color_jitter(x, params):
    """ColorJitter with each sample's factors, in each sample's op order, where params[:, 0] is set. Brightness,
    contrast and saturation are cheap blends; hue, the costly op, runs once for the whole batch, between the blends
    that each sample does before it (slots < its hue slot) and those it does after it."""
    on, order = params[:, 0] > 0, params[:, 5:9].long()
    hue_slot = (order == 3).long().argmax(dim=1)
    for slot in range(3):
        x = _blend_op(x, op=order[:, slot], factors=params[:, 1:4], active=on & (slot < hue_slot))
    x = torch.where(on.view(-1, 1, 1, 1), _adjust_hue(x, params[:, 4]), x)
    for slot in range(1, 4):
        x = _blend_op(x, op=order[:, slot], factors=params[:, 1:4], active=on & (slot > hue_slot))
    return x


def _gaussian_blur(x, kernel_size, sigma):
    """torchvision gaussian_blur (its kernel: softmax of -(t / sigma)^2 on its grid t; reflect padding) of float
    [B, C, H, W] with sigma[b] for image b, as two 1-D depthwise convolutions, one kernel per image and channel."""
    n, c, h, w = x.shape
    lim = (kernel_size - 1) / (2.0 * 2 ** 0.5)
    t = torch.linspace(-lim, lim, kernel_size, dtype=x.dtype, device=x.device)
    g = torch.softmax(t.div(sigma.view(-1, 1)).pow(2).neg(), dim=1).repeat_interleave(c, dim=0)  # [B * C, k]
    pad = kernel_size // 2
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect").view(1, n * c, h + 2 * pad, w + 2 * pad)
    x = torch.nn.functional.conv2d(x, g.view(n * c, 1, 1, kernel_size), groups=n * c)  # along W
    x = torch.nn.functional.conv2d(x, g.view(n * c, 1, kernel_size, 1), groups=n * c)  # along H
    return x.view(n, c, h, w)


# ---- stage 2's CPU part: encoded bytes -> uint8 crop + the sample's photometric parameters (device_transform does
# the rest)


class ImageDecoder:
    """Encoded image bytes -> transformed tensor, decoding no more JPEG pixels than the output can show.

    If the transform starts with RandomResizedCrop (train_crop_transform), the crop box is drawn -- by that
    transform's own make_params, so with the same random numbers -- from the image size in the file header, before
    decoding. Pillow's JPEG draft mode then decodes at the smallest DCT scale (1, 1/2, 1/4, 1/8) at which the box
    still covers at least the output size, and Pillow crops and resizes it. If it starts with Resize(s)
    (eval_crop_transform), the draft keeps the short side >= s. Either way only pixels the final resize would have
    averaged away are skipped. The rest of the transform runs as given. PNG and WebP are decoded in full.
    """

    def __init__(self, transform):
        steps = list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]
        self.crop = steps.pop(0) if type(steps[0]) is v2.RandomResizedCrop else None
        first = steps[0] if steps else None
        self.draft_side = None
        if isinstance(first, v2.Resize) and first.max_size is None and len(first.size or []) == 1:
            self.draft_side = first.size[0]  # Resize(s): the short side becomes s
        # Resize(s), CenterCrop(s), ToImage leave an s x s image as it is (as img2dataset's center_crop mode writes
        # them): such an image goes straight to ToImage, saving most of the per-image time on small images
        self.unchanged_side = None
        if (self.draft_side and [type(t) for t in steps] == [v2.Resize, v2.CenterCrop, v2.ToImage]
                and list(steps[1].size) == [self.draft_side] * 2):
            self.unchanged_side = self.draft_side
        self.rest = v2.Compose(steps)

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
                if img.size == (self.unchanged_side, self.unchanged_side):
                    return v2.functional.to_image(img)
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


def crop_decoder(image_size, augment=True):
    """The CPU part of stage 2's preprocessing: train_crop_transform (random crop + flip) or eval_crop_transform."""
    return ImageDecoder((train_crop_transform if augment else eval_crop_transform)(image_size))


def decode_sample(decoder, data, seed, augment=True):
    """bytes -> (uint8 [3, S, S] crop, photometric parameters [PHOTOMETRIC_PARAMS] or None), with torch's CPU
    generator seeded for this one sample and put back afterwards. The crop and flip draw first, then the photometric
    parameters, in train_transform's order: a sample's augmentation is the same whichever worker or rank makes it,
    and in a resumed run. (torch.manual_seed would also touch the CUDA generators: ~0.1 ms a call.)"""
    gen = torch.default_generator
    state = gen.get_state()
    gen.manual_seed(seed)
    try:
        image = decoder(data)
        return image, (draw_photometric_params(gen) if augment else None)
    finally:
        gen.set_state(state)


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


def _votes(row, csv_path, line):
    """The row's vote count, None for an empty cell; a clear error for anything else that is not a number."""
    cell = (row["votes"] or "").strip()
    if not cell:
        return None
    try:
        return float(cell)
    except ValueError:
        raise ValueError(f"{csv_path}, line {line}: votes is {cell!r}, not a number") from None


def read_nights_csv(root, split, min_votes=6, dropped=None):
    """The rows of `<root>/data.csv` in `split` with votes >= min_votes, as dicts (paths are relative to root).
    A row whose `votes` cell is empty is dropped, as DreamSim's pandas filter (votes >= 6 is False for NaN) drops it,
    and counted in dropped["no_votes"] when a dict is given. The file is read as UTF-8 whatever the locale."""
    if split not in NIGHTS_SPLITS:
        raise ValueError(f"unknown NIGHTS split '{split}'; choose one of {', '.join(NIGHTS_SPLITS)}")
    csv_path = os.path.join(root, "data.csv")
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"NIGHTS index not found: {csv_path} (expected the dataset folder as distributed "
                                f"with DreamSim: data.csv plus the ref/ and distort/ image folders)")
    base = "test" if split.startswith("test") else split
    rows, no_votes = [], 0
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in NIGHTS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path} lacks the column(s) {', '.join(missing)}; found {reader.fieldnames}")
        for line, r in enumerate(reader, start=2):
            votes = _votes(r, csv_path, line)
            no_votes += votes is None and r["split"] == base
            if votes is not None and votes >= min_votes and r["split"] == base:
                rows.append(r)
    if dropped is not None:
        dropped["no_votes"] = dropped.get("no_votes", 0) + no_votes
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
        self.dropped = {}
        rows = read_nights_csv(root, split, min_votes, dropped=self.dropped)
        if self.dropped["no_votes"]:
            warnings.warn(f"{os.path.join(root, 'data.csv')}: {self.dropped['no_votes']} row(s) of split '{split}' "
                          f"with an empty votes cell dropped (as DreamSim's loader drops them)")
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
# Stage 2's (image, caption) pairs (PI paper §3.2), in the two layouts people have, each a sample source:
#   * webdataset-style tar shards as img2dataset writes them: consecutive members {key}.jpg|png|webp, {key}.txt and an
#     optional {key}.json, with a {shard}_stats.json beside each (TarShards);
#   * a CSV/TSV file with an image-path column and a caption column (open_clip's filepath/title; CsvRows).
# Both are read by canonical streams (ImageTextStreams): the order is a function of (seed, epoch, data) only, never
# of the ranks or workers (stream_pieces); every rank takes the same steps; an epoch reads each sample at most once;
# unusable samples are skipped, counted and replaced by their stream's next one. DataLoader workers decode and crop
# (decode_sample) and hand over uint8 crops with each sample's photometric parameters; the rest of §3.4's
# augmentation runs batched on the device (device_transform). One DataLoader serves the whole run, a step of items
# deep, and a thread joins the next rank batch while the step runs (ImageTextData.batches).
#
# What is held, at the paper's scale (global batch 30,720 = 5,120 per GPU on 6 ranks, 480 streams = 80 per rank of
# 64 samples a step, 4 workers per rank, 15M samples in 1,500 shards of 10,000, 224 px, JPEGs of ~20-90 KB):
#   stream shuffle buffer   1,000 sample references per stream  (offsets into the tar, not bytes): ~60 MB per rank
#   open shards             one per stream (two at a boundary)  2 file handles each (headers, bytes when decoded)
#   DataLoader queue        one step + one item per worker      84 items x 64 x 150 KB = 810 MB of /dev/shm per rank
#   joined rank batch       5,120 x 3 x 224 x 224 uint8         771 MB pinned; one queued, one being joined
#   device                  uint8 rank batch + float chunk      771 MB + 3.1 GB per 5,120 (see train_clip.train_step)
#   (a CSV of 15M rows: its paths and captions as Python strings in every worker, several GB each once
#   copy-on-write has copied them (PyTorch issue 13246), and a 120 MB row order per worker and epoch)
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Why a sample was skipped, as counted (each time it is read) in each batch's "bad" and summed over ranks in log.jsonl
NO_IMAGE, NO_CAPTION, UNDECODABLE, TRUNCATED = "no image", "no caption", "undecodable", "truncated"
SKIPS = (NO_IMAGE, NO_CAPTION, UNDECODABLE, TRUNCATED)
# Not a skip: a sample a stream read a second time in one epoch because its share held fewer usable samples than
# planned (so that every rank still takes the same number of steps; see stream_samples)
REREAD = "reread"
# the default streams: gcd(global batch, 480); 480 shares out over 1-6, 8, 10, 12, 15, 16, 20, 24, 30, 32, 40, 48 ranks
DATA_STREAMS = 480
ORDER_VERSION = 2  # of stream_pieces' order, kept in state.pt: positions of another order do not resume mid-epoch
SHUFFLE_BUFFER = 1000  # sample references per stream shuffle buffer


def stable_seed(*keys):
    """A 63-bit seed from a tuple of ints/strings that is the same in every process and run (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


def is_csv(spec):
    return isinstance(spec, str) and spec.lower().endswith((".csv", ".tsv"))


def expand_shards(spec):
    """'yfcc/{00000..01499}.tar' -> the 1,500 paths (zero-padded like the pattern); '{a,b}' lists alternatives;
    several patterns may be joined with '::' (open_clip's convention) or given as a list. Since a quoted pattern
    reaches the script as it is, a shell pattern ('yfcc/*.tar') is expanded too, and a folder ('yfcc/') stands for
    its .tar files, sorted. A pattern or folder that names no file is an error; a missing plain path is returned."""
    if isinstance(spec, (list, tuple)) or "::" in spec:
        return [path for s in (spec if isinstance(spec, (list, tuple)) else spec.split("::"))
                for path in expand_shards(s)]
    m = re.search(r"\{([^{}]*)\}", spec)
    if m:
        r = re.fullmatch(r"(\d+)\.\.(\d+)", m[1])
        options = [str(i).zfill(len(r[1])) for i in range(int(r[1]), int(r[2]) + 1)] if r else m[1].split(",")
        return [path for o in options for path in expand_shards(spec[:m.start()] + o + spec[m.end():])]
    if os.path.isdir(spec):
        found = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
    elif os.path.exists(spec) or not glob.has_magic(spec):
        return [spec]
    else:
        found = sorted(glob.glob(spec))
    if not found:
        raise FileNotFoundError(f"no .tar file is named by {spec!r}; shards can be named as "
                                f"'dir/{{00000..00099}}.tar', 'dir/*.tar' or 'dir/'")
    return found


# ---- sample sources: their sizes, a piece's samples in file order, and a sample's bytes


def tar_index(path, bad, start=0, stop=None):
    """(index, sample) for samples start, ..., stop - 1 of one plain (uncompressed) tar shard, in file order, from
    the headers alone: sample = {"__key__": key, ext: (offset, size)}, where each member's bytes lie (MemberReader
    reads them). A sample is the consecutive members sharing a key (the file name up to its first dot, as
    webdataset groups them). A truncated or unreadable shard ends early, keeping what came before; `bad` (a
    Counter) counts the damage."""
    sample, index = {}, -1
    try:
        # unbuffered, so that only the 512-byte headers are read (a buffered file on Lustre or NFS would read a
        # block of several MB at each header, most of the shard)
        with open(path, "rb", buffering=0) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            end = os.fstat(f.fileno()).st_size
            for member in tar:
                tar.members = []  # tarfile keeps every header it has read: ~15 MB for a 10,000-sample shard
                if not member.isfile():
                    continue
                folder, name = os.path.split(member.name)
                key, _, ext = name.partition(".")
                key = os.path.join(folder, key)
                if index < 0 or sample["__key__"] != key:
                    if index >= start and len(sample) > 1:
                        yield index, sample
                    index, sample = index + 1, {"__key__": key}
                    if stop is not None and index >= stop:
                        return
                if member.offset_data + member.size > end:
                    raise EOFError(f"{member.name} is cut short")
                sample[ext.lower()] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as err:  # truncated member or archive, unreadable file
        bad[TRUNCATED] += 1
        warnings.warn(f"{path}: {type(err).__name__}: {err}; keeping the samples before it")
        sample = {}  # the sample being read is incomplete
    if index >= start and len(sample) > 1:
        yield index, sample


class MemberReader:
    """Reads tar members' bytes by (path, offset, size), keeping the most recently used files open."""

    def __init__(self, keep=64):
        self.keep, self.files = keep, {}  # path -> fd, in order of use (dicts keep insertion order)

    def __call__(self, path, offset, size):
        fd = self.files.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if len(self.files) >= self.keep:
                os.close(self.files.pop(next(iter(self.files))))
        self.files[path] = fd
        return os.pread(fd, size, offset)

    def close(self):
        for fd in self.files.values():
            os.close(fd)
        self.files = {}


def shard_sizes(shards):
    """Samples per shard: img2dataset's {shard}_stats.json "successes", or, without one, the shard's samples counted
    from its tar headers (no image data read; a damaged shard counts what precedes the damage)."""
    sizes = []
    for path in shards:
        stats = re.sub(r"\.tar$", "_stats.json", path)
        if stats != path and os.path.isfile(stats):
            with open(stats) as f:
                sizes.append(int(json.load(f)["successes"]))
        else:
            sizes.append(sum(1 for _ in tar_index(path, Counter())))
    return sizes


class TarShards:
    """Plain tar shards as a sample source: a sample is (shard, index in shard, {ext: (offset, size)})."""

    def __init__(self, shards):
        missing = [p for p in shards if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards do not exist, e.g. {missing[0]}")
        for path in shards:  # compressed shards cannot be read by offset: say so now, not as skips
            with open(path, "rb") as f:
                if f.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")):
                    raise ValueError(f"{path} is a compressed tar: shards must be plain .tar files (as img2dataset "
                                     f"and webdataset's TarWriter write them); unpack it, e.g. gunzip")
        self.shards, self.sizes = shards, shard_sizes(shards)

    def open_readers(self, n_streams):
        self.read = MemberReader(keep=2 * n_streams + 2)  # each stream's shard, and the next one at a boundary

    def samples(self, piece, seed, epoch, bad):
        shard, start, stop = piece
        return ((shard, index, sample) for index, sample in tar_index(self.shards[shard], bad, start, stop))

    def load(self, shard, sample, bad):
        """(encoded image, caption) of one sample, or None for a counted skip."""
        where = next((sample[e] for e in SHARD_IMAGE_EXTENSIONS if e in sample), None)
        if where is None or "txt" not in sample:
            bad[NO_IMAGE if where is None else NO_CAPTION] += 1
            return None
        try:
            path = self.shards[shard]
            return self.read(path, *where), self.read(path, *sample["txt"]).decode("utf-8", errors="replace")
        except OSError:  # the file went away or the disk failed under it
            bad[TRUNCATED] += 1
            return None

    def describe(self, shard, sample):
        return (f"{self.shards[shard]} has members {sorted(k for k in sample if k != '__key__')} for "
                f"{sample['__key__']}; a sample needs an image ({'/'.join(SHARD_IMAGE_EXTENSIONS)}) and a txt caption")

    def close(self):
        self.read.close()


class CsvRows:
    """A CSV/TSV file of (image path, caption) rows as a sample source: one shard, read in a row order drawn from
    (seed, epoch). A relative image path is read, as open_clip does, from the working directory the run started in;
    where no file is there, from the CSV's own folder (so a CSV beside its images works from anywhere). Rows with
    an empty caption are dropped (counted in `no_caption`). If none of the first rows' images exists, the paths are
    wrong: an error at once, naming both places looked in."""

    def __init__(self, path, img_key="filepath", caption_key="title", sep=None):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=sep or ("\t" if path.endswith(".tsv") else ","))
            absent = [k for k in (img_key, caption_key) if k not in (reader.fieldnames or [])]
            if absent:
                raise ValueError(f"{path}: no column {absent} among {reader.fieldnames}; "
                                 f"set --csv-img-key / --csv-caption-key (and --csv-separator)")
            rows = [(r[img_key], (r[caption_key] or "").strip()) for r in reader]
        # absolute now: DataLoader workers resolve the same paths whatever their working directory
        self.cwd, self.root = os.getcwd(), os.path.dirname(os.path.abspath(path))
        self.paths, self.captions = [p for p, c in rows if c], [c for _, c in rows if c]
        self.no_caption, self.sizes, self.order = len(rows) - len(self.paths), [len(self.paths)], (None, None)
        first = range(min(16, len(self.paths)))
        if len(first) and not any(os.path.isfile(self.path(i)) for i in first):
            p = self.paths[0]
            where = (f"{p} does not exist" if os.path.isabs(p) else
                     f"{p!r} is neither at {os.path.join(self.cwd, p)} (the working directory, as open_clip reads "
                     f"it) nor at {os.path.join(self.root, p)} (the CSV's folder)")
            raise FileNotFoundError(f"{path}: none of the first {len(first)} images exists: {where}")

    def path(self, i):
        p = self.paths[i]
        if os.path.isabs(p):
            return p
        here = os.path.join(self.cwd, p)
        return here if os.path.exists(here) else os.path.join(self.root, p)

    def samples(self, piece, seed, epoch, bad):
        # a permutation of all rows, drawn once per worker and epoch by NumPy's frozen legacy generator (its stream
        # is the same in every NumPy version); a row is its own index and its own sample: (shard 0, row, row)
        if self.order[0] != (seed, epoch):
            self.order = (seed, epoch), np.random.RandomState(stable_seed(seed, epoch) % 2 ** 32).permutation(
                self.sizes[0])
        return ((0, int(row), int(row)) for row in self.order[1][piece[1]:piece[2]])

    def load(self, shard, row, bad):
        try:
            with open(self.path(row), "rb") as f:
                return f.read(), self.captions[row]
        except OSError:
            bad[NO_IMAGE] += 1
            return None

    def describe(self, shard, row):
        return f"{self.path(row)} ({self.captions[row]!r})"

    def open_readers(self, n_streams):
        pass

    def close(self):
        pass


# ---- the sample order: canonical streams


def stream_pieces(sizes, streams, stream_length, seed, epoch):
    """THE ORDER. Which samples each of the `streams` canonical streams reads in an epoch: [[(shard, start, stop)]].

    The shards are put in an order drawn from (seed, epoch) and read as one sequence of sum(sizes) samples (a shard
    in file order; a CSV is one shard, its rows in an order drawn from (seed, epoch)); stream s takes the s-th
    contiguous range of `stream_length` samples of it (steps x batch / streams; the tail, less than a global batch,
    is not read this epoch). A shard split between two streams is read by both, each only its own samples. Each
    stream then goes through its samples in an order drawn from (seed, epoch, stream) (stream_samples), and global
    batch t of the epoch is, for s = 0, 1, ..., streams - 1, the t-th batch/streams usable samples of stream s.
    Nothing here depends on the ranks or workers: rank r of R reads streams [r S/R, (r+1) S/R), shared out among its
    workers, and the ranks' batches, joined in rank order, are the global batch in stream order. So the global batch
    is the same on any R x W, and a stream resumes from its position alone on any other R' x W'."""
    order = list(range(len(sizes)))
    random.Random(stable_seed(seed, epoch)).shuffle(order)
    plan, shard, offset = [], 0, 0  # offset: samples of order[shard] already given out
    for _ in range(streams):
        need, pieces = stream_length, []
        while need:
            take = min(need, sizes[order[shard]] - offset)
            if take:
                pieces.append((order[shard], offset, offset + take))
            need, offset = need - take, offset + take
            if offset == sizes[order[shard]]:
                shard, offset = shard + 1, 0
        plan.append(pieces)
    return plan


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


def stream_samples(plan, stream, read, seed, epoch, buffer_size):
    """The endless sequence of one stream of an epoch's plan (stream_pieces): (pass, item) for the items of its
    pieces, read one after another through a shuffle buffer, pass after pass. read(piece) iterates a piece's items
    (fewer than planned if a shard is damaged). Pass 0 reads each sample once; a stream needs pass 1 only when its
    share held fewer usable samples than planned (corrupt members, stats that overcount), and then re-reads its own
    samples. Only a stream none of whose samples can be read at all (its whole range lies past the end of a shard
    cut short) reads another's: the next stream's, in stream order."""
    source = stream
    for p in itertools.count():
        rng = random.Random(stable_seed(seed, epoch, stream, p))
        n = 0
        for item in shuffle_buffer(itertools.chain.from_iterable(map(read, plan[source])), buffer_size, rng):
            n += 1
            yield p, item
        if n == 0:
            source = (source + 1) % len(plan)
            if source == stream:
                raise RuntimeError(f"no samples could be read from the shards of any of the {len(plan)} data "
                                   f"streams (the first's pieces: {plan[0][:3]}...)")


def default_streams(batch_size):
    return math.gcd(batch_size, DATA_STREAMS)


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def check_streams(streams, batch_size, world_size):
    """The streams must divide the global batch and share out evenly over the ranks; otherwise an error naming
    the nearest setups that work (changing --data-streams changes the order: set it alike in runs you compare)."""
    if streams < 1 or batch_size % streams:
        raise ValueError(f"--data-streams {streams} must divide the global batch {batch_size} (each stream gives "
                         f"batch / streams samples a step); e.g. {default_streams(batch_size)}")
    if streams % world_size:
        fewer = max(r for r in _divisors(streams) if r < world_size)
        more = [f" or {r}" for r in _divisors(streams) if r > world_size][:1]
        nearest = min((s for s in _divisors(batch_size) if s % world_size == 0), key=lambda s: abs(s - streams))
        raise ValueError(f"{world_size} ranks cannot share {streams} data streams evenly: run on {fewer}{''.join(more)}"
                         f" ranks, or pass --data-streams {nearest} (a different sample order: give the same value "
                         f"to every run you compare)")


class ImageTextStreams(IterableDataset):
    """One rank's share of the canonical streams (stream_pieces) of a sample source, as items: one stream's
    batch/streams usable samples for one step, dict(images uint8 [n, 3, S, S], params, tokens, bad, stream, step,
    pos, decode_s), from step `first_step` to the end of the run (all epochs: the workers never restart). Worker w
    of W takes the rank's streams w, w + W, ...; pos counts the entries a stream consumed this epoch. A sample's
    augmentation is seeded by (seed, epoch, shard, index in shard, pass). Given the positions of a killed run,
    `start(step, positions)` replays each stream to its position from the tar headers alone (nothing decoded)."""

    def __init__(self, source, tokenizer, image_size, batch_size, steps_per_epoch, epochs, streams, rank=0,
                 world_size=1, seed=0, buffer_size=SHUFFLE_BUFFER, context_length=77, augment=True):
        self.source, self.tokenizer, self.context_length, self.augment = source, tokenizer, context_length, augment
        self.decoder, self.image_size = crop_decoder(image_size, augment), image_size
        self.steps_per_epoch, self.epochs, self.seed = steps_per_epoch, epochs, seed
        self.streams, self.per_stream = streams, batch_size // streams  # samples a stream gives each step
        self.rank_streams = range(rank * streams // world_size, (rank + 1) * streams // world_size)
        self.buffer_size = buffer_size
        self.start()

    def start(self, step=0, positions=None):
        self.first_step, self.positions = step, dict(positions or {})

    def __iter__(self):
        info = get_worker_info()
        mine = self.rank_streams[info.id::info.num_workers] if info else self.rank_streams
        self.bad = Counter()  # skips and damage, handed out with each item
        self.source.open_readers(len(mine))
        step, total, spe = self.first_step, self.steps_per_epoch * self.epochs, self.steps_per_epoch
        positions = self.positions if step % spe else {}
        try:
            while step < total:
                epoch = step // spe
                plan = stream_pieces(self.source.sizes, self.streams, spe * self.per_stream, self.seed, epoch)
                streams = {s: self._open(plan, s, epoch, positions.get(s, 0)) for s in mine}
                positions = {}  # later epochs start at their beginning
                self.bad.clear()  # the replayed samples' skips were counted before the checkpoint
                for t in range(step, (epoch + 1) * spe):
                    for s in mine:
                        yield self._take(streams[s], t, epoch, shared=info is not None)
                step = (epoch + 1) * spe
        finally:
            self.source.close()

    def _open(self, plan, stream, epoch, pos):
        """A cursor on one stream of the epoch's plan: its id, its entries (stream_samples), and its position,
        replayed to `pos` entries."""
        read = partial(self.source.samples, seed=self.seed, epoch=epoch, bad=self.bad)
        entries = stream_samples(plan, stream, read, self.seed, epoch, self.buffer_size)
        for _ in range(pos):
            next(entries)
        return SimpleNamespace(stream=stream, entries=entries, pos=pos)

    def _take(self, cursor, step, epoch, shared):
        """The next per_stream usable samples of one stream, as an item."""
        t0, n = time.thread_time(), self.per_stream
        images = torch.empty((n, 3, self.image_size, self.image_size), dtype=torch.uint8)
        if shared:
            images.share_memory_()  # in a worker: handing the item to the main process copies nothing
        params, captions, misses = [], [], 0
        while len(captions) < n:
            pass_, (shard, index, sample) = next(cursor.entries)
            cursor.pos += 1
            decoded = self._decode(shard, sample, stable_seed(self.seed, epoch, shard, index, pass_))
            if decoded is None:
                misses += 1  # in a row: two passes' worth, and none usable (each pass holds the same samples)
                if misses >= 2 * self.steps_per_epoch * n:
                    raise ValueError(f"data stream {cursor.stream} holds no usable sample ({dict(self.bad)}): e.g. "
                                     f"{self.source.describe(shard, sample)}")
                continue
            images[len(captions)], misses = decoded[0], 0
            params.append(decoded[1])
            captions.append(decoded[2])
            self.bad[REREAD] += pass_ > 0
        item = dict(images=images, params=torch.stack(params) if self.augment else None,
                    tokens=self.tokenizer(captions, context_length=self.context_length), bad=dict(+self.bad),
                    stream=cursor.stream, step=step, pos=cursor.pos, decode_s=time.thread_time() - t0)
        self.bad.clear()
        return item

    def _decode(self, shard, sample, seed):
        """(image, params, caption), or None for a counted skip."""
        loaded = self.source.load(shard, sample, self.bad)
        if loaded is None:
            return None
        encoded, caption = loaded[0], loaded[1].strip()
        if not caption:
            self.bad[NO_CAPTION] += 1
            return None
        try:
            return (*decode_sample(self.decoder, encoded, seed, self.augment), caption)
        except Exception:  # corrupt, truncated or unsupported image: PIL raises OSError, SyntaxError, ValueError, ...
            self.bad[UNDECODABLE] += 1
            return None


# ---- one entry point for train_clip.py: rank batches, a step ahead


def join_items(items, pin_memory=False):
    """One rank batch from the items of one step, in stream order: images stay uint8, copied once into (pinned)
    host memory so that the copy to the GPU can be non-blocking; `positions` are the streams' positions after it."""
    items = sorted(items, key=lambda it: it["stream"])
    n, first = sum(len(it["tokens"]) for it in items), items[0]["images"]
    images = torch.empty((n, *first.shape[1:]), dtype=torch.uint8, pin_memory=pin_memory)
    torch.cat([it["images"] for it in items], out=images)
    params = None if items[0]["params"] is None else torch.cat([it["params"] for it in items])
    return dict(images=images, params=params, tokens=torch.cat([it["tokens"] for it in items]),
                bad=dict(sum((Counter(it["bad"]) for it in items), Counter())),
                positions={it["stream"]: it["pos"] for it in items}, decode_s=sum(it["decode_s"] for it in items))


def batch_to_device(batch, device):
    """The batch's tensors on `device` (non-blocking from pinned memory); the other entries as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def worker_ignores_stop_signals(worker_id=None):
    """DataLoader workers ignore Ctrl-C, SIGTERM and SIGUSR1 (SLURM sends them to every process of a job): the main
    process finishes its step, saves and stops the workers itself. A worker killed by one would end the run at once
    through PyTorch's SIGCHLD handler, before state.pt is written."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class ImageTextData:
    """The rank batches of a whole run for one rank (made by image_text_loader)."""

    def __init__(self, dataset, samples_per_epoch, workers, pin_memory):
        self.dataset, self.samples_per_epoch, self.pin_memory = dataset, samples_per_epoch, pin_memory
        self.workers = workers
        self.steps_per_epoch, self.streams = dataset.steps_per_epoch, dataset.streams
        self.items_per_step = len(dataset.rank_streams)  # one item per stream per step

    def batches(self, start_step=0, positions=None):
        """The rank batches from global step `start_step` to the end of the last epoch, each a dict with images,
        params, tokens, bad (skips by kind), positions, step and decode_s (worker CPU seconds). positions: the
        streams' `stream -> pos` of the batches before start_step (from their `positions`; ignored at an epoch
        start). The DataLoader's queue holds a step's items plus one per worker, and a thread joins the next batch
        while the caller's step runs."""
        self.dataset.start(start_step, positions)
        depth = dict(prefetch_factor=math.ceil(self.items_per_step / self.workers) + 1) if self.workers else {}
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                            worker_init_fn=worker_ignores_stop_signals, **depth)
        items = iter(loader)  # starts the workers here, in the caller's thread
        steps = range(start_step, self.steps_per_epoch * self.dataset.epochs)
        if not self.workers:  # decoding here: in this thread, since decode_sample seeds torch's global generator
            yield from (self._join_next(items, step) for step in steps)
            return
        with ThreadPoolExecutor(1) as thread:  # joins batch t + 1 while the caller runs step t
            joining = thread.submit(self._join_next, items, steps[0]) if steps else None
            for step in steps:
                batch = joining.result()
                joining = thread.submit(self._join_next, items, step + 1) if step + 1 < steps.stop else None
                yield batch

    def _join_next(self, items, step):
        parts = [next(items) for _ in range(self.items_per_step)]
        streams = sorted(it["stream"] for it in parts)
        if any(it["step"] != step for it in parts) or streams != list(self.dataset.rank_streams):  # a bug, not data
            raise RuntimeError(f"step {step}: items of steps {sorted({it['step'] for it in parts})} and streams "
                               f"{streams} arrived, for streams {list(self.dataset.rank_streams)}")
        return dict(join_items(parts, self.pin_memory), step=step)


def image_text_loader(data, tokenizer, image_size, batch_size, epochs=1, rank=0, world_size=1, workers=4, seed=0,
                      samples_per_epoch=None, streams=None, buffer_size=SHUFFLE_BUFFER, csv_img_key="filepath",
                      csv_caption_key="title", csv_sep=None, context_length=77, pin_memory=False, augment=True):
    """Image-text batches for one rank over `epochs` epochs: ImageTextData, whose batches(start_step, positions)
    gives dicts with images (uint8 [b, 3, S, S]), params ([b, PHOTOMETRIC_PARAMS] for device_transform, or None
    without augmentation), tokens [b, 77], bad (skips by kind) and positions. `data`: a .csv/.tsv file, or tar
    shards (see expand_shards). `batch_size` is the GLOBAL batch; each rank gets batch_size / world_size samples per
    step. An epoch is samples_per_epoch // batch_size steps (at most one global batch is left out); samples_per_epoch
    defaults to, and is at most, the CSV's rows with a caption, or the shards' samples (img2dataset's
    *_stats.json "successes", or counted from the tar headers). `streams`: the canonical streams of the order
    (stream_pieces), default gcd(batch_size, 480). Workers that would not share the rank's streams evenly are
    lowered to the largest count that does (each makes one item per stream per step, taken in turn)."""
    if is_csv(data):
        source = CsvRows(data, csv_img_key, csv_caption_key, csv_sep)
        if source.no_caption:
            warnings.warn(f"{data}: skipped {source.no_caption} rows without a caption")
    else:
        source = TarShards(expand_shards(data))
    available = sum(source.sizes)
    if samples_per_epoch and samples_per_epoch > available:
        warnings.warn(f"{data} holds {available} samples, fewer than the {samples_per_epoch} asked for per epoch: "
                      f"an epoch reads each sample at most once, so it is {available} samples")
    samples_per_epoch = min(samples_per_epoch or available, available)
    steps = samples_per_epoch // batch_size
    if steps < 1:
        raise ValueError(f"an epoch of {samples_per_epoch} samples holds no full batch of {batch_size}")
    streams = streams or default_streams(batch_size)
    check_streams(streams, batch_size, world_size)
    per_rank = streams // world_size
    balanced = max(d for d in _divisors(per_rank) if d <= workers) if workers > 0 else 0
    if balanced != workers:
        warnings.warn(f"{workers} workers cannot share this rank's {per_rank} data streams evenly: using "
                      f"{balanced} (worker counts that can: {[d for d in _divisors(per_rank) if d <= 64]})")
    dataset = ImageTextStreams(source, tokenizer, image_size, batch_size, steps, epochs, streams, rank, world_size,
                               seed, buffer_size, context_length, augment)
    return ImageTextData(dataset, samples_per_epoch, balanced, pin_memory)
