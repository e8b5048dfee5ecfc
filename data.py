"""
Data for PI-CLIP: everything between files on disk and the tensors the model eats.

- the CLIP byte-level BPE tokenizer (`Tokenizer`) and `learn_bpe` to learn a merges file from captions;
- image transforms (CLIP normalisation, eval / train augmentations, paper section 3.4);
- datasets: NIGHTS triplets (stage 1) and image-caption pairs (stage 2).

Only the runtime dependencies (torch, torchvision, numpy, pillow, tqdm) and the standard library are imported.
"""

import gzip
import heapq
import html
import html.entities
import os
import re
import unicodedata
from collections import Counter, defaultdict
from functools import lru_cache

import torch
from torchvision.transforms import v2

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
