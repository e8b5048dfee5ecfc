"""
Data for PI-CLIP: everything between files on disk and the tensors the model eats.

- the CLIP byte-level BPE tokenizer (`Tokenizer`) and `learn_bpe` to learn a merges file from captions;
- image transforms (CLIP normalisation, eval / train augmentations, paper section 3.4);
- datasets: NIGHTS triplets (stage 1) and image-caption pairs (stage 2);
- a synthetic world of coloured shapes written in the real formats, for the CPU demo.

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
import math
import os
import random
import re
import shutil
import tarfile
import unicodedata
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_modes_mapping

# --- Tokenizer (CLIP BPE) ---
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


# --- Synthetic world (the CPU demo's data; no download) ---
# A tiny world of flat coloured shapes, written to disk in EXACTLY the formats of the real data, so the CPU demo
# runs the real readers end to end:
#   <root>/nights/data.csv + ref/000/000.png, distort/000/000_0.png, 000_1.png   NIGHTS as distributed with DreamSim
#   <root>/shards/00000.tar, 00001.tar, ...  ({key}.jpg, {key}.json, {key}.txt)     webdataset shards as img2dataset
#   <root>/zeroshot/{shape,colour,count}/test/<classname>/<i>.png                   ImageFolder trees
#   <root>/retrieval/dataset_synthetic.json + retrieval/images/00000.png           Karpathy split JSON, 5 captions
# A scene is 1-4 copies of ONE shape in ONE colour (so shape, colour and count are each a well-defined class), of
# one size class, placed in one region of the image, each with its own rotation, on a plain / noisy / graded
# neutral background. Captions name these attributes in varied wording; the position words ("on the left") are
# a minor part of them, so a horizontal-flip augmentation makes only a few words wrong.
#
# The NIGHTS stand-in. Each triplet is a reference scene and two variations, each changing ONE attribute:
#   minor changes: "pose"   (every object turns by 20-45 degrees and shifts slightly)
#                  "layout" (the objects are re-placed in another region of the image)
#   major changes: "colour" (another colour of the palette)
#                  "count"  (one object added or removed)
# The rule standing in for the human vote: people judge the variation with a MINOR change more similar than the
# one with a MAJOR change, unanimously (votes 6-10, right_vote 0.0 or 1.0). This is learnable from pixels but not
# from pixel distance: moving every object (layout) changes far more pixels than recolouring red to orange or
# adding one small star, so the model must learn invariance to where things are and sensitivity to what they are.
# A few extra rows pair two changes of the SAME tier (pose vs layout, colour vs count): people disagree there,
# so they carry split votes (3-5 voters, right_vote strictly between 0 and 1) and the reader's votes >= 6 filter
# drops them, as it drops the non-unanimous triplets of the real NIGHTS. <root>/nights/changes.csv (a sidecar
# the readers ignore) records which change each side got, for per-change analysis.
#
# is_imagenet is a category-level flag as in NIGHTS (there: is the prompt's category an ImageNet class); here it
# is True for circle, square and star, so test_imagenet and test_no_imagenet both exist. Splits are 80/10/10,
# stratified on that flag. Everything is a deterministic function of `seed` (numpy Generator); each of the four
# parts has its own child seed, so e.g. changing n_pairs leaves the NIGHTS images byte-identical.


SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
COLOURS = {"red": (215, 35, 35), "green": (40, 165, 60), "blue": (40, 80, 215),
           "yellow": (235, 205, 30), "purple": (135, 55, 185), "orange": (245, 135, 25)}
COUNTS = ("one", "two", "three", "four")
SIZES = {"small": (0.06, 0.085), "large": (0.10, 0.13)}  # object radius as a fraction of the image side
# where the objects' centres may go (x0, y0, x1, y1 in unit coordinates); "anywhere" is not named in captions
REGIONS = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0), "top": (0.0, 0.0, 1.0, 0.5),
           "bottom": (0.0, 0.5, 1.0, 1.0), "centre": (0.25, 0.25, 0.75, 0.75), "anywhere": (0.0, 0.0, 1.0, 1.0)}
BACKGROUNDS = {"white": (242, 242, 242), "grey": (160, 160, 160), "dark": (55, 55, 60), "cream": (236, 226, 202)}
TEXTURES = ("plain", "noise", "gradient")
MINOR_CHANGES, MAJOR_CHANGES = ("pose", "layout"), ("colour", "count")
IMAGENET_SHAPES = ("circle", "square", "star")
SYNTH_NIGHTS_HEADER = ("id", "left_vote", "right_vote", "votes", "ref_path", "left_path", "right_path", "split",
                       "is_imagenet", "prompt")
_SUPERSAMPLE = 4  # shapes are drawn as a mask at 4x and box-filtered down: anti-aliased edges for free
_TAR_MTIME = 1_700_000_000  # fixed member time, so the same seed gives byte-identical shards


@dataclass
class Scene:
    shape: str
    colour: str
    size: str
    region: str
    objects: list  # [(x, y, radius, angle_degrees)] in unit coordinates; len(objects) is the count
    background: str
    texture: str
    tone: tuple  # (rgb of the objects after a small jitter, gradient angle, gradient strength, noise sigma)

    @property
    def count(self):
        return COUNTS[len(self.objects) - 1]


@dataclass
class SyntheticWorld:
    root: str
    nights: str  # pass to the NIGHTS reader: <root>/nights (holds data.csv)
    shards: list  # the .tar paths, in order
    shard_pattern: str  # the same as one brace pattern (None without shards), e.g. <root>/shards/{00000..00004}.tar
    zeroshot: dict  # task -> its ImageFolder root <root>/zeroshot/<task>/test
    retrieval_json: str
    retrieval_root: str  # image paths in the JSON are relative to this (filepath "images" + filename)
    counts: dict = field(default_factory=dict)


def synthetic_zeroshot_tasks():
    """{task: (classnames, templates)} for the zero-shot folders. The class names are in the order
    torchvision.datasets.ImageFolder numbers the class folders (sorted), so label i is classnames[i]."""
    return {
        "shape": (sorted(SHAPES), ["a photo of a {}.", "a {} shape.", "a drawing of a {}.",
                                   "a picture with a {} in it."]),
        "colour": (sorted(COLOURS), ["a photo of a {} shape.", "a {} object.", "something {}.", "a drawing in {}."]),
        "count": (sorted(COUNTS), ["a photo of {} objects.", "{} shapes.", "a picture of {} things.",
                                   "there are {} objects in the picture."]),
    }


# ---- scenes ----

def _place(rng, radii, region, existing=()):
    """Objects of the given radii, their centres inside `region`, not overlapping each other or `existing`;
    None if they do not fit. Each gets a random rotation."""
    x0, y0, x1, y1 = REGIONS[region]
    placed = list(existing)
    for r in radii:
        lo_x, hi_x = max(x0, r + 0.02), min(x1, 1 - r - 0.02)  # keep the whole object inside the image
        lo_y, hi_y = max(y0, r + 0.02), min(y1, 1 - r - 0.02)
        for _try in range(100):
            x, y = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            if all(math.hypot(x - px, y - py) > r + pr + 0.03 for px, py, pr, _ in placed):
                placed.append((x, y, r, rng.uniform(0, 360)))
                break
        else:
            return None
    return placed[len(existing):]


def _layout(rng, radii, region):
    """Place objects of the given radii in `region`, falling back to the whole image when they do not fit there."""
    objects = _place(rng, radii, region)
    if objects is None:
        region, objects = "anywhere", _place(rng, radii, "anywhere")
    return region, objects


def _tone(rng, colour):
    rgb = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLOURS[colour])
    return rgb, float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(8, 25)), float(rng.uniform(2, 6))


def random_scene(rng, shape=None, colour=None, count=None):
    """A random scene; shape / colour / count (a word, e.g. "three") may be fixed."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    n = COUNTS.index(count) + 1 if count else int(rng.integers(1, 5))
    size = "small" if rng.random() < 0.5 else "large"
    # one scene in six is scattered over the whole image; the others sit in a named region
    region = "anywhere" if rng.random() < 1 / 6 else list(REGIONS)[rng.integers(5)]
    radii = rng.uniform(*SIZES[size]) * rng.uniform(0.92, 1.08, n)  # one size class, slightly uneven
    region, objects = _layout(rng, [float(r) for r in radii], region)
    return Scene(shape, colour, size, region, objects, list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
                 TEXTURES[rng.integers(len(TEXTURES))], _tone(rng, colour))


def change_scene(rng, scene, change):
    """The reference `scene` with ONE attribute changed: pose, layout, colour or count."""
    if change == "pose":  # turn every object by 20-45 degrees (less than any shape's symmetry) and nudge it
        nudge = lambda v, r: float(np.clip(v + rng.normal(0, 0.015), r, 1 - r))
        objects = [(nudge(x, r), nudge(y, r), r, float(a + rng.choice([-1, 1]) * rng.uniform(20, 45)))
                   for x, y, r, a in scene.objects]
        return replace(scene, objects=objects)
    if change == "layout":  # the objects move to another named region, keeping their sizes and rotations
        others = [g for g in list(REGIONS)[:5] if g != scene.region]
        for _try in range(20):  # regions overlap (bottom / centre): insist that objects move a fifth of the image
            region, moved = _layout(rng, [r for _, _, r, _ in scene.objects], others[rng.integers(len(others))])
            if np.mean([math.hypot(x - u, y - v) for (x, y, *_), (u, v, *_) in zip(moved, scene.objects)]) > 0.2:
                break
        objects = [(x, y, r, a) for (x, y, r, _), (*_, a) in zip(moved, scene.objects)]
        return replace(scene, region=region, objects=objects)
    if change == "colour":
        colour = [c for c in COLOURS if c != scene.colour][rng.integers(len(COLOURS) - 1)]
        return replace(scene, colour=colour, tone=(_tone(rng, colour)[0],) + scene.tone[1:])
    if change == "count":  # add one object in the group's region (or anywhere free), or remove one
        n = len(scene.objects)
        if n < 4 and (n == 1 or rng.random() < 0.5):
            radius = [float(np.mean([r for _, _, r, _ in scene.objects]))]
            extra = _place(rng, radius, scene.region, scene.objects) or _place(rng, radius, "anywhere", scene.objects)
            if extra:
                return replace(scene, objects=scene.objects + extra)
        drop = rng.integers(n)
        return replace(scene, objects=[o for i, o in enumerate(scene.objects) if i != drop])
    raise ValueError(f"unknown change '{change}'")


def _shape_points(shape, x, y, r, angle):
    """Polygon vertices of `shape` centred at (x, y) with circumradius r, turned by `angle` degrees."""
    if shape == "square":
        polar = [(1.0, 45 + 90 * k) for k in range(4)]
    elif shape == "triangle":
        polar = [(1.0, 90 + 120 * k) for k in range(3)]
    elif shape == "star":
        polar = [(1.0 if k % 2 == 0 else 0.45, 90 + 36 * k) for k in range(10)]
    elif shape == "cross":  # a plus sign with arms 0.6 r wide: the 12 corners by their polar coordinates
        w, polar = 0.3, []
        for k in range(4):
            for dx, dy in ((1.0, -w), (1.0, w), (w, w)):
                polar.append((math.hypot(dx, dy), math.degrees(math.atan2(dy, dx)) + 90 * k))
    else:
        raise ValueError(shape)
    return [(x + r * p * math.cos(math.radians(t + angle)), y - r * p * math.sin(math.radians(t + angle)))
            for p, t in polar]


def render_scene(scene, rng, image_size=64):
    """The scene as an RGB PIL image. rng draws only the background noise, so a variation re-rendered with its
    own noise is never pixel-identical to its reference (as two photographs never are)."""
    big = image_size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for x, y, r, angle in scene.objects:
        cx, cy, cr = x * big, y * big, r * big
        if scene.shape == "circle":
            draw.ellipse((cx - cr, cy - cr, cx + cr, cy + cr), fill=255)
        else:
            draw.polygon(_shape_points(scene.shape, cx, cy, cr, angle), fill=255)
    alpha = np.asarray(mask.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255
    rgb, grad_angle, grad_strength, sigma = scene.tone
    bg = np.broadcast_to(np.array(BACKGROUNDS[scene.background], np.float32), (image_size, image_size, 3)).copy()
    if scene.texture == "gradient":
        t = np.linspace(-0.5, 0.5, image_size, dtype=np.float32)
        bg += grad_strength * (math.cos(grad_angle) * t[None, :, None] + math.sin(grad_angle) * t[:, None, None])
    elif scene.texture == "noise":
        bg += rng.normal(0, sigma, (image_size, image_size, 1)).astype(np.float32)
    img = bg * (1 - alpha) + np.array(rgb, np.float32) * alpha
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))


# ---- captions ----

_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_REGION_WORDS = {"left": ("on the left", "on the left side"), "right": ("on the right", "on the right side"),
                 "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom"),
                 "centre": ("in the middle", "in the centre"), "anywhere": ("scattered around", "")}
_CAPTION_TEMPLATES = (
    "{n} {size} {colour} {noun} {where}",
    "a photo of {n} {colour} {noun}",
    "{n} {colour} {noun} on a {bg} background",
    "there {is_are} {n} {size} {colour} {noun} {where}",
    "a picture of {n} {size} {noun}, coloured {colour}",
    "{where}, {n} {colour} {noun}",
    "a drawing of {n} {colour} {noun} {where} on a {bg} background",
    "{n} {noun} in {colour}",
    "an image showing {n} {size} {colour} {noun}",
)
_BG_WORDS = {"white": "white", "grey": "grey", "dark": "dark", "cream": "cream"}


def scene_caption(scene, rng, template=None):
    """A natural-language description of the scene; template is an index into _CAPTION_TEMPLATES (random if None)."""
    n = len(scene.objects)
    words = {
        "n": ("a", "one", "a single")[rng.integers(3)] if n == 1 else COUNTS[n - 1],
        "size": _SIZE_WORDS[scene.size][rng.integers(len(_SIZE_WORDS[scene.size]))],
        "colour": scene.colour, "noun": scene.shape if n == 1 else PLURAL[scene.shape],
        "where": _REGION_WORDS[scene.region][rng.integers(2)], "bg": _BG_WORDS[scene.background],
        "is_are": "is" if n == 1 else "are",
    }
    if template is None:
        template = rng.integers(len(_CAPTION_TEMPLATES))
    text = _CAPTION_TEMPLATES[template].format(**words)
    text = re.sub(r"\ba (?=[aeiou])", "an ", text)  # "a orange star" -> "an orange star"
    return re.sub(r"\s+", " ", text).strip(" ,")  # an empty "where" leaves stray spaces / a leading comma


# ---- writers ----

def _save_png(img, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format="PNG")


def _stratified_splits(rng, flags):
    """80/10/10 train/val/test, separately within each value of `flags` (so every split has both)."""
    splits = [None] * len(flags)
    for value in (True, False):
        idx = [i for i, f in enumerate(flags) if f == value]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        n_eval = max(1, round(0.1 * len(idx))) if len(idx) >= 3 else 0
        for j, i in enumerate(idx):
            splits[i] = "val" if j < n_eval else "test" if j < 2 * n_eval else "train"
    return splits


def _write_nights(rng, out, n_triplets, image_size):
    # unanimous rows (kept by the reader) and 1 in 20 extra split-vote rows, in random order
    ambiguous = rng.permutation(np.r_[np.zeros(n_triplets, bool), np.ones(n_triplets // 20, bool)])
    rows, changes = [], []
    for i, amb in enumerate(ambiguous):
        ref = random_scene(rng)
        if amb:  # two changes of the same tier: people disagree
            kinds = list(MINOR_CHANGES if rng.random() < 0.5 else MAJOR_CHANGES)
        else:
            kinds = [MINOR_CHANGES[rng.integers(2)], MAJOR_CHANGES[rng.integers(2)]]
        if rng.random() < 0.5:
            kinds.reverse()  # kinds = [left change, right change]
        left, right = (change_scene(rng, ref, k) for k in kinds)
        rel = {"ref_path": f"ref/{i // 1000:03d}/{i % 1000:03d}.png",
               "left_path": f"distort/{i // 1000:03d}/{i % 1000:03d}_0.png",
               "right_path": f"distort/{i // 1000:03d}/{i % 1000:03d}_1.png"}
        for key, scene in (("ref_path", ref), ("left_path", left), ("right_path", right)):
            _save_png(render_scene(scene, rng, image_size), os.path.join(out, rel[key]))
        if amb:
            votes = int(rng.integers(3, 6))
            right_vote = round(int(rng.integers(1, votes)) / votes, 4)
        else:
            votes, right_vote = int(rng.integers(6, 11)), float(kinds[1] in MINOR_CHANGES)
        rows.append({"id": i, "left_vote": round(1 - right_vote, 4), "right_vote": right_vote, "votes": votes, **rel,
                     "is_imagenet": ref.shape in IMAGENET_SHAPES, "prompt": scene_caption(ref, rng, template=1)})
        changes.append({"id": i, "left_change": kinds[0], "right_change": kinds[1]})
    kept = [i for i, amb in enumerate(ambiguous) if not amb]
    for i, split in zip(kept, _stratified_splits(rng, [rows[i]["is_imagenet"] for i in kept])):
        rows[i]["split"] = split
    for i in np.flatnonzero(ambiguous):
        rows[i]["split"] = ("train", "val", "test")[rng.choice(3, p=[0.8, 0.1, 0.1])]
    for name, header, table in (("data.csv", SYNTH_NIGHTS_HEADER, rows),
                                ("changes.csv", ("id", "left_change", "right_change"), changes)):
        with open(os.path.join(out, name), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(table)
    return len(rows)


def _tar_add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), _TAR_MTIME, 0o444, "bigdata", "bigdata"
    tar.addfile(info, io.BytesIO(data))


def _write_shards(rng, out, n_pairs, samples_per_shard, image_size):
    # img2dataset's naming: shard s is f"{s:05d}.tar" and its j-th sample has key f"{s:05d}{j:04d}" (at most 10^4
    # samples per shard). Members per sample come in webdataset's TarWriter order (sorted extensions).
    if not 1 <= samples_per_shard <= 10_000:
        raise ValueError("samples_per_shard must be in 1..10000 (img2dataset's 4-digit sample index)")
    os.makedirs(out, exist_ok=True)
    paths = []
    for s in range(math.ceil(n_pairs / samples_per_shard)):
        paths.append(os.path.join(out, f"{s:05d}.tar"))
        with tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT) as tar:
            for j in range(min(samples_per_shard, n_pairs - s * samples_per_shard)):
                key = f"{s:05d}{j:04d}"
                scene = random_scene(rng)
                text = scene_caption(scene, rng)
                jpg = io.BytesIO()
                render_scene(scene, rng, image_size).save(jpg, format="JPEG", quality=95)
                meta = {"url": f"synthetic://{key}", "key": key, "status": "success", "error_message": None,
                        "width": image_size, "height": image_size, "original_width": image_size,
                        "original_height": image_size, "caption": text}
                _tar_add(tar, f"{key}.jpg", jpg.getvalue())
                _tar_add(tar, f"{key}.json", json.dumps(meta, indent=4).encode("utf-8"))
                _tar_add(tar, f"{key}.txt", text.encode("utf-8"))
        n = min(samples_per_shard, n_pairs - s * samples_per_shard)
        with open(os.path.join(out, f"{s:05d}_stats.json"), "w") as f:  # img2dataset writes one per shard
            json.dump({"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0}, f, indent=4)
    return paths


def _write_zeroshot(rng, out, n_test_per_class, image_size):
    dirs = {}
    for task, (classnames, _) in synthetic_zeroshot_tasks().items():
        dirs[task] = os.path.join(out, task, "test")
        for name in classnames:
            for i in range(n_test_per_class):
                scene = random_scene(rng, **{task: name})
                _save_png(render_scene(scene, rng, image_size), os.path.join(dirs[task], name, f"{i}.png"))
    return dirs


def _write_retrieval(rng, out, n_retrieval, image_size):
    images, sentid = [], 0
    for i in range(n_retrieval):
        scene = random_scene(rng)
        filename = f"{i:05d}.png"
        _save_png(render_scene(scene, rng, image_size), os.path.join(out, "images", filename))
        # 5 different templates -> 5 distinct captions (the templates differ in their fixed words)
        raws = [scene_caption(scene, rng, template=t) for t in rng.choice(len(_CAPTION_TEMPLATES), 5, replace=False)]
        sentences = [{"raw": r, "tokens": r.replace(",", "").split(), "imgid": i, "sentid": sentid + k}
                     for k, r in enumerate(raws)]
        images.append({"filepath": "images", "filename": filename, "imgid": i, "split": "test",
                       "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
        sentid += 5
    path = os.path.join(out, "dataset_synthetic.json")
    with open(path, "w") as f:
        json.dump({"images": images, "dataset": "synthetic"}, f)
    return path


_PARTS = ("nights", "shards", "zeroshot", "retrieval")
_MARKER = "synthetic_world.json"


def make_synthetic_world(root, seed=0, n_pairs=5000, n_triplets=2000, n_test_per_class=40, n_retrieval=500,
                         image_size=64, samples_per_shard=1000):
    """Write the synthetic world under `root` (see the section comment) and return its paths as a SyntheticWorld.

    n_pairs image-caption pairs in shards of samples_per_shard; n_triplets unanimous NIGHTS triplets (plus
    n_triplets // 20 split-vote rows the reader filters out); n_test_per_class images per class of each zero-shot
    task; n_retrieval images with 5 captions each. Re-running on a root this function wrote replaces its parts;
    a root holding any of nights/, shards/, zeroshot/, retrieval/ that it did not write is refused, so real data
    is never deleted."""
    marker = os.path.join(root, _MARKER)
    present = [p for p in _PARTS if os.path.exists(os.path.join(root, p))]
    if present and not os.path.isfile(marker):
        raise FileExistsError(f"{root} already holds {', '.join(present)} not written by make_synthetic_world; "
                              f"choose an empty folder")
    for p in present:
        shutil.rmtree(os.path.join(root, p))
    os.makedirs(root, exist_ok=True)
    # one child generator per part: the parts do not shift each other when one's size changes
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(_PARTS))]
    nights = os.path.join(root, "nights")
    n_rows = _write_nights(rngs[0], nights, n_triplets, image_size)
    shards = _write_shards(rngs[1], os.path.join(root, "shards"), n_pairs, samples_per_shard, image_size)
    zeroshot = _write_zeroshot(rngs[2], os.path.join(root, "zeroshot"), n_test_per_class, image_size)
    retrieval_root = os.path.join(root, "retrieval")
    retrieval_json = _write_retrieval(rngs[3], retrieval_root, n_retrieval, image_size)
    args = {"seed": seed, "n_pairs": n_pairs, "n_triplets": n_triplets, "n_test_per_class": n_test_per_class,
            "n_retrieval": n_retrieval, "image_size": image_size, "samples_per_shard": samples_per_shard}
    with open(marker, "w") as f:
        json.dump(args, f, indent=1)
    pattern = os.path.join(root, "shards", f"{{00000..{len(shards) - 1:05d}}}.tar") if shards else None
    return SyntheticWorld(root, nights, shards, pattern, zeroshot, retrieval_json, retrieval_root,
                          counts={"nights_rows": n_rows, **args})


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
# Stage 2's (image, caption) pairs (PI paper §3.2), in the two layouts people have:
#   * webdataset-style tar shards as img2dataset writes them: consecutive members {key}.jpg|png|webp, {key}.txt and an
#     optional {key}.json, with a {shard}_stats.json beside each (TarImageText);
#   * a CSV/TSV file with an image-path column and a caption column (open_clip's filepath/title; CsvImageText).
# The CPU does only what must happen per image: DataLoader workers decode (JPEGs at the reduced DCT scale the crop
# needs), random-resized-crop, resize and flip, and hand over uint8 [3, S, S] crops plus each sample's photometric
# parameters (drawn from the sample's own seed). The photometric augmentations of §3.4 and the CLIP normalisation
# run batched on the training device (device_transform). Workers make micro-batches; the main process joins
# `items_per_step` of them, from all its workers in turn, into one rank batch, so a rank batch mixes every worker's
# shards. Every rank takes the same number of steps, an epoch reads each sample at most once, and data order and
# augmentation are functions of (seed, epoch, position) only, so a resumed run sees exactly the batches the killed
# one would have seen. Corrupt images, missing captions and truncated tar members are skipped and counted.
#
# What is held, at the paper's scale (global batch 30,720 = 5,120 per GPU on 6 ranks, 4 workers per rank, micro-
# batches of 256, 15M samples in 1,500 shards of 10,000, 224 px, JPEGs of ~20-90 KB):
#   worker shuffle buffer     1,000 encoded samples          20-90 MB per worker, 80-360 MB per rank
#   open shards per worker    16 tar streams                 file handles and 10 KB read buffers
#   DataLoader queue          2 micro-batches per worker     8 x 256 x 150 KB = 308 MB of /dev/shm per rank
#   rank batch (host)         5,120 x 3 x 224 x 224 uint8    771 MB (pinned on GPU), at most 2 alive at a time
#   device                    uint8 chunk + its float copy   771 MB + 3.1 GB per 5,120 on the GPU, per chunk
# The float images exist only on the device and only per --accum-steps chunk (see train_clip.train_step).
# Entry point: image_text_loader(...) -> ImageTextData with .steps_per_epoch and .epoch(e, start_step, positions).
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Why a sample was skipped, as counted in each batch's "bad" and summed over ranks in train_clip's log.jsonl
NO_IMAGE, NO_CAPTION, UNDECODABLE, TRUNCATED = "no image", "no caption", "undecodable", "truncated"
SKIPS = (NO_IMAGE, NO_CAPTION, UNDECODABLE, TRUNCATED)
# Not a skip: a sample a tar worker read a second time in one epoch because its shards held fewer usable samples than
# their _stats.json said (so that every rank still takes the same number of steps; see unit_stream)
REREAD = "reread"
MICRO_BATCH = 256  # samples per worker item: small items keep the DataLoader's queue small (see above)
SHARDS_PER_WORKER = 16  # tar shards a worker reads at once, interleaved
SHUFFLE_BUFFER = 1000  # encoded samples per worker shuffle buffer


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


# ---- decoding: encoded bytes -> uint8 crop + the sample's photometric parameters


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


def _micro_batch(images, params, captions, tokenizer, context_length, bad, **extra):
    return dict(images=torch.stack(images), params=torch.stack(params) if params and params[0] is not None else None,
                tokens=tokenizer(captions, context_length=context_length), bad=dict(bad), **extra)


def _split(n, parts):
    """Sizes of n split into `parts` near-equal parts, the larger ones first."""
    return [n // parts + (i < n % parts) for i in range(parts)]


# ---- webdataset-style tar shards


def tar_samples(path, bad, start=0, stop=None):
    """Samples start, ..., stop - 1 of one tar shard, in file order, as dicts {"__key__": key, ext: bytes}; a sample
    is the consecutive members sharing a key (the file name up to its first dot, as webdataset groups them). The
    members before `start` are stepped over without reading their data. A truncated or unreadable shard ends early,
    keeping what came before; `bad` (a Counter) counts the damage."""
    sample, index = {}, -1
    try:
        with tarfile.open(path, "r:*") as tar:  # seekable: skipped members' data are never read
            for member in tar:
                tar.members = []  # tarfile keeps every header it has read: ~15 MB for a 10,000-sample shard
                if not member.isfile():
                    continue
                key, ext = _key_and_ext(member.name)
                if index < 0 or sample.get("__key__") != key:
                    if len(sample) > 1:
                        yield sample
                    index += 1
                    sample = {"__key__": key}
                    if stop is not None and index >= stop:
                        return
                if index >= start:
                    sample[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:  # truncated member or archive, unreadable file
        bad[TRUNCATED] += 1
        warnings.warn(f"{path}: {type(err).__name__}: {err}; keeping the samples before it")
        sample = {}  # the sample being read is incomplete
    if index >= start and len(sample) > 1:
        yield sample


def _key_and_ext(name):
    folder, name = os.path.split(name)
    key, _, ext = name.partition(".")
    return (f"{folder}/{key}" if folder else key), ext


def count_tar_samples(path):
    """Samples in a tar shard, from its headers alone (seeks over the data); a damaged shard counts what precedes
    the damage."""
    n, last = 0, None
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                tar.members = []
                key = _key_and_ext(member.name)[0]
                if member.isfile() and key != last:
                    n, last = n + 1, key
    except (tarfile.TarError, OSError, EOFError):
        pass
    return n


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


def interleave(pieces, read, n_open, rng):
    """Items of several sources at once: `n_open` of the pieces are open, and each next item comes from one of them
    with probability proportional to the items it has left, so that the open pieces run out together (a pure
    function of the plan and rng: the same on resume). pieces: [(source, start, stop)]; read(piece) iterates its
    items (fewer than planned if a source is damaged)."""
    pending, active = list(pieces), []  # active: [iterator, items left as planned]
    while pending or active:
        while pending and len(active) < n_open:
            piece = pending.pop(0)
            active.append([iter(read(piece)), piece[2] - piece[1]])
        r, i = rng.random() * sum(left for _, left in active), 0
        while i < len(active) - 1 and r >= active[i][1]:
            r -= active[i][1]
            i += 1
        item = next(active[i][0], None)
        if item is None or active[i][1] <= 1:
            active.pop(i)
        else:
            active[i][1] -= 1
        if item is not None:
            yield item


def img2dataset_sample_count(shards):
    """Sum of the "successes" in img2dataset's {shard}_stats.json files, or None if any is missing."""
    sizes = [_stats_size(path) for path in shards]
    return None if None in sizes else sum(sizes)


def _stats_size(path):
    stats = re.sub(r"\.tar(\.\w+)?$", "_stats.json", path)
    if stats == path or not os.path.isfile(stats):
        return None
    with open(stats) as f:
        return int(json.load(f)["successes"])


def shard_sizes(shards):
    """Samples per shard: img2dataset's {shard}_stats.json "successes", or, without one, the shard's samples counted
    from its tar headers (no image data read)."""
    sizes = []
    for path in shards:
        n = _stats_size(path)
        sizes.append(n if n is not None else count_tar_samples(path))
    return sizes


def item_sizes(rank_batch, n_items):
    """Sizes of the micro-batches that make one rank batch: rank_batch split into n_items near-equal parts."""
    return _split(rank_batch, n_items)


def epoch_pieces(sizes, steps, rank_batch, items_per_step, world_size, n_workers, seed, epoch):
    """Which samples each unit (rank, worker) reads in an epoch, as {unit: [(shard index, start, stop)]}.

    The shards are put in an order drawn from (seed, epoch), the same on every rank, and read as one sequence of
    sum(sizes) samples. Item j of a rank's epoch (a micro-batch) comes from worker j % n_workers, so each worker's
    quota is known; unit u = rank * n_workers + worker takes the next contiguous range of the sequence of that
    length. A shard split between two units is read by both, each only its own samples. The sequence's tail past
    steps x global batch (less than one global batch) is not read this epoch."""
    order = list(range(len(sizes)))
    random.Random(stable_seed(seed, epoch)).shuffle(order)
    parts = item_sizes(rank_batch, items_per_step)
    quota = [sum(parts[j % items_per_step] for j in range(steps * items_per_step) if j % n_workers == w)
             for w in range(n_workers)]
    plan, shard, offset = {}, 0, 0  # offset: samples of order[shard] already given out
    for unit in range(world_size * n_workers):
        need, plan[unit] = quota[unit % n_workers], []
        while need:
            take = min(need, sizes[order[shard]] - offset)
            if take:
                plan[unit].append((order[shard], offset, offset + take))
            need, offset = need - take, offset + take
            if offset == sizes[order[shard]]:
                shard, offset = shard + 1, 0
    return plan


def unit_stream(pieces, read, seed, epoch, unit, n_open, buffer_size):
    """The endless stream of one unit: (pass, item) for the items of its pieces, interleaved and shuffled, pass
    after pass. Pass 0 reads each sample once; a unit needs pass 1 only when its shards held fewer usable samples
    than planned (corrupt members, stats that overcount), and then re-reads its own samples, never another unit's."""
    for p in itertools.count():
        rng = random.Random(stable_seed(seed, epoch, unit, p))
        n = 0
        for item in shuffle_buffer(interleave(pieces, read, n_open, rng), buffer_size, rng):
            n += 1
            yield p, item
        if n == 0:
            raise RuntimeError(f"no samples could be read from the shards of data unit {unit}: {pieces[:3]}...")


class TarImageText(IterableDataset):
    """Streaming micro-batches of (uint8 crop, photometric parameters, tokens) from tar shards for one rank.

    Each epoch the shards are dealt to the ranks x workers as contiguous ranges of samples (epoch_pieces). A worker
    reads `shards_per_worker` shards at once, interleaved, through a shuffle buffer, and makes the micro-batches the
    DataLoader asks it for (item j of the rank's epoch from worker j % n_workers). A sample's augmentation is seeded
    by (seed, epoch, shard, index in shard, pass).

    Each micro-batch reports `worker` and `pos` (how many entries of that worker's stream it has consumed); given
    those positions, `set_epoch(e, start_step, positions)` continues an epoch exactly where a killed run left it:
    the workers replay their streams up to there without decoding anything, and without counting skips again.
    """

    def __init__(self, shards, tokenizer, image_size, batch_size, steps_per_epoch, rank=0, world_size=1, seed=0,
                 buffer_size=SHUFFLE_BUFFER, context_length=77, augment=True, micro_batch=MICRO_BATCH,
                 shards_per_worker=SHARDS_PER_WORKER, sizes=None):
        self.shards = expand_shards(shards)
        missing = [p for p in self.shards if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.shards)} shards do not exist, e.g. {missing[0]}")
        self.sizes = sizes if sizes is not None else shard_sizes(self.shards)
        self.tokenizer, self.context_length, self.augment = tokenizer, context_length, augment
        self.decoder = crop_decoder(image_size, augment)
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.items_per_step = math.ceil(batch_size / micro_batch)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.buffer_size, self.shards_per_worker = buffer_size, shards_per_worker
        self.set_epoch(0)

    def set_epoch(self, epoch, start_step=0, positions=None):
        self.epoch, self.start_step, self.positions = epoch, start_step, dict(positions or {})

    def _read(self, piece):
        """(shard, index, sample dict) for the samples of one piece."""
        shard, start, stop = piece
        samples = tar_samples(self.shards[shard], self.bad, start, stop)
        return ((shard, i, s) for i, s in zip(itertools.count(start), samples))

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader asks its workers in turn, starting from worker 0, so after `start_step` steps worker w
        # makes item first + w: it plays the part of worker (w + first) % n_workers of the epoch.
        first, n_items = self.start_step * self.items_per_step, self.steps_per_epoch * self.items_per_step
        worker = (worker + first) % n_workers
        items = [j for j in range(first, n_items) if j % n_workers == worker]
        if not items:
            return
        unit = self.rank * n_workers + worker
        pieces = epoch_pieces(self.sizes, self.steps_per_epoch, self.batch_size, self.items_per_step,
                              self.world_size, n_workers, self.seed, self.epoch)[unit]
        self.bad = Counter()  # read by _read (tar damage) and below
        stream = unit_stream(pieces, self._read, self.seed, self.epoch, unit, self.shards_per_worker,
                             self.buffer_size)
        pos = self.positions.get(worker, 0)
        for _ in range(pos):
            next(stream)  # consumed before the checkpoint: replayed without decoding
        self.bad.clear()  # and its skips were counted then
        sizes = item_sizes(self.batch_size, self.items_per_step)
        for j in items:
            images, params, captions = [], [], []
            while len(images) < sizes[j % self.items_per_step]:
                p, (shard, index, sample) = next(stream)
                pos += 1
                decoded = self._decode(sample, stable_seed(self.seed, self.epoch, shard, index, p))
                if decoded is not None:
                    images.append(decoded[0])
                    params.append(decoded[1])
                    captions.append(decoded[2])
                    self.bad[REREAD] += p > 0
            yield _micro_batch(images, params, captions, self.tokenizer, self.context_length, +self.bad,
                               worker=worker, pos=pos)
            self.bad.clear()

    def _decode(self, sample, seed):
        """(image, params, caption), or None for a counted skip."""
        data = next((sample[e] for e in SHARD_IMAGE_EXTENSIONS if e in sample), None)
        caption = sample.get("txt", b"").decode("utf-8", errors="replace").strip()
        if data is None or not caption:
            self.bad[NO_IMAGE if data is None else NO_CAPTION] += 1
            return None
        try:
            image, params = decode_sample(self.decoder, data, seed, self.augment)
        except Exception:  # corrupt, truncated or unsupported image
            self.bad[UNDECODABLE] += 1
            return None
        return image, params, caption


# ---- CSV / TSV


class CsvImageText(Dataset):
    """(image, caption) rows of a CSV/TSV file (open_clip's `filepath` / `title` columns by default). Relative image
    paths are taken from the file's folder. Rows with an empty caption are dropped here (counted in
    `no_caption`); unreadable images are replaced at load time (see GlobalBatchSampler)."""

    def __init__(self, path, tokenizer, image_size, img_key="filepath", caption_key="title", sep=None,
                 context_length=77, augment=True):
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
        self.tokenizer, self.context_length, self.augment = tokenizer, context_length, augment
        self.decoder = crop_decoder(image_size, augment)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        """key = (row, substitute rows, augmentation seed) from GlobalBatchSampler -> (image, params, caption, #bad)."""
        row, substitutes, seed = key
        for n_bad, i in enumerate((row, *substitutes)):
            try:
                with open(self.paths[i], "rb") as f:
                    return (*decode_sample(self.decoder, f.read(), seed, self.augment), self.captions[i], n_bad)
            except Exception:
                continue
        raise RuntimeError(f"neither {self.paths[row]} nor its {len(substitutes)} substitutes could be read")

    def collate(self, items):
        images, params, captions, n_bad = zip(*items)
        return _micro_batch(list(images), list(params), list(captions), self.tokenizer, self.context_length,
                            {UNDECODABLE: sum(n_bad)} if sum(n_bad) else {})


class GlobalBatchSampler:
    """Which rows each rank reads at each step, with the rank split explicit.

    Epoch e orders all rows by a permutation drawn from (seed, e); global batch k is positions [k*B, (k+1)*B) of
    it and rank r reads the contiguous slice [k*B + r*b, k*B + (r+1)*b), b = B / world_size, as `items_per_step`
    micro-batches. Each sample's augmentation is seeded by (seed, e, position). So the global order and the images
    themselves do not depend on the number of ranks or workers: 2 ranks see exactly the batches one process sees,
    and a resumed run starts at step k of the same order. The positions past the last full batch are the epoch's
    spare rows: a row whose image cannot be read is replaced by a spare one (or, without spares, by the row one
    batch further on).
    """

    def __init__(self, n_rows, batch_size, steps_per_epoch, rank=0, world_size=1, seed=0, n_substitutes=4,
                 items_per_step=1):
        self.n, self.batch_size, self.steps_per_epoch = n_rows, batch_size, steps_per_epoch
        self.rank, self.world_size, self.seed, self.n_substitutes = rank, world_size, seed, n_substitutes
        self.items_per_step = items_per_step
        self.set_epoch(0)

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return (self.steps_per_epoch - self.start_step) * self.items_per_step

    def __iter__(self):
        order = np.random.default_rng(stable_seed(self.seed, self.epoch)).permutation(self.n)
        spare = order[self.steps_per_epoch * self.batch_size:]
        b = self.batch_size // self.world_size
        for k in range(self.start_step, self.steps_per_epoch):
            start = k * self.batch_size + self.rank * b
            for size in item_sizes(b, self.items_per_step):
                yield [self._row(j, order, spare) for j in range(start, start + size)]
                start += size

    def _row(self, j, order, spare):
        if len(spare):
            subs = [spare[(j + t) % len(spare)] for t in range(min(self.n_substitutes, len(spare)))]
        else:
            subs = [order[(j + t * self.batch_size) % self.n] for t in range(1, self.n_substitutes + 1)]
        return int(order[j]), tuple(int(s) for s in subs), stable_seed(self.seed, self.epoch, j)


# ---- one entry point for train_clip.py


def is_csv(spec):
    return isinstance(spec, str) and spec.lower().endswith((".csv", ".tsv"))


def join_micro_batches(items, pin_memory=False):
    """One rank batch from its micro-batches: images stay uint8, copied once into (pinned) host memory so that the
    copy to the GPU can be non-blocking; `positions` are the tar workers' stream positions after this batch."""
    n, first = sum(len(it["tokens"]) for it in items), items[0]["images"]
    images = torch.empty((n, *first.shape[1:]), dtype=torch.uint8, pin_memory=pin_memory)
    torch.cat([it["images"] for it in items], out=images)
    params = None if items[0]["params"] is None else torch.cat([it["params"] for it in items])
    bad = Counter()
    for it in items:
        bad.update(it["bad"])
    return dict(images=images, params=params, tokens=torch.cat([it["tokens"] for it in items]), bad=dict(bad),
                positions={it["worker"]: it["pos"] for it in items if "worker" in it})


class ImageTextData:
    """Per-epoch rank batches over tar shards or a CSV for one rank (made by image_text_loader)."""

    def __init__(self, dataset, sampler, steps_per_epoch, samples_per_epoch, workers, pin_memory, items_per_step):
        self.dataset, self.sampler, self.workers, self.pin_memory = dataset, sampler, workers, pin_memory
        self.steps_per_epoch, self.samples_per_epoch, self.items_per_step = (steps_per_epoch, samples_per_epoch,
                                                                             items_per_step)
        self.kind = "csv" if sampler is not None else "tar"

    def epoch(self, epoch, start_step=0, positions=None):
        """The rank batches of `epoch` from step `start_step` on (positions: the last `worker -> pos` of each tar
        worker before start_step, as reported in the batches' `positions`; ignored for CSV)."""
        kw = dict(num_workers=self.workers, persistent_workers=False)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start_step)
            loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=self.dataset.collate, **kw)
        else:
            self.dataset.set_epoch(epoch, start_step, positions)
            loader = DataLoader(self.dataset, batch_size=None, **kw)
        items = iter(loader)
        for _ in range(start_step, self.steps_per_epoch):
            yield join_micro_batches([next(items) for _ in range(self.items_per_step)], self.pin_memory)


def image_text_loader(data, tokenizer, image_size, batch_size, rank=0, world_size=1, workers=4, seed=0,
                      samples_per_epoch=None, buffer_size=SHUFFLE_BUFFER, csv_img_key="filepath",
                      csv_caption_key="title", csv_sep=None, context_length=77, pin_memory=False, augment=True,
                      micro_batch=MICRO_BATCH, shards_per_worker=SHARDS_PER_WORKER):
    """Image-text batches for one rank: dicts with images (uint8 [b, 3, S, S]), params ([b, PHOTOMETRIC_PARAMS] for
    device_transform, or None without augmentation), tokens [b, 77], bad (skips by kind) and, for tar shards,
    positions. `data`: a .csv/.tsv file, or tar shards ('dir/{00000..01499}.tar', a list, or patterns joined by
    '::'). `batch_size` is the GLOBAL batch; each rank gets batch_size / world_size samples per step. An epoch is
    samples_per_epoch // batch_size steps (at most one global batch is left out); samples_per_epoch defaults to, and
    is at most, the CSV's rows with a caption, or the shards' samples (img2dataset's *_stats.json "successes", or
    counted from the tar headers)."""
    if batch_size % world_size:
        raise ValueError(f"the global batch {batch_size} is not divisible by the {world_size} ranks")
    per_rank = batch_size // world_size
    items_per_step = math.ceil(per_rank / micro_batch)
    if is_csv(data):
        ds = CsvImageText(data, tokenizer, image_size, csv_img_key, csv_caption_key, csv_sep, context_length, augment)
        if ds.no_caption:
            warnings.warn(f"{data}: skipped {ds.no_caption} rows without a caption")
        available = len(ds)
    else:
        shards = expand_shards(data)
        missing = [p for p in shards if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards do not exist, e.g. {missing[0]}")
        sizes = shard_sizes(shards)
        available = sum(sizes)
    if samples_per_epoch and samples_per_epoch > available:
        warnings.warn(f"{data} holds {available} samples, fewer than the {samples_per_epoch} asked for per epoch: "
                      f"an epoch reads each sample at most once, so it is {available} samples")
    samples_per_epoch = min(samples_per_epoch or available, available)
    steps = samples_per_epoch // batch_size
    if steps < 1:
        raise ValueError(f"an epoch of {samples_per_epoch} samples holds no full batch of {batch_size}")
    if is_csv(data):
        sampler = GlobalBatchSampler(len(ds), batch_size, steps, rank, world_size, seed, items_per_step=items_per_step)
    else:
        ds = TarImageText(shards, tokenizer, image_size, per_rank, steps, rank, world_size, seed, buffer_size,
                          context_length, augment, micro_batch, shards_per_worker, sizes)
        sampler = None
    return ImageTextData(ds, sampler, steps, samples_per_epoch, workers, pin_memory, items_per_step)
