"""Tests for the hand-written CLIP BPE tokenizer in data.py, checked against open_clip's SimpleTokenizer."""

import gzip
import html
import os
import random
import sys
import unicodedata
from collections import Counter

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
from data import Tokenizer, learn_bpe  # noqa: E402

# Captions covering what the issue asks for; every one must give exactly open_clip.tokenize's ids.
CAPTIONS = [
    "A photo of a cat.",
    "a photo of a CAT sitting on a MAT!!!",
    "MiXeD CaSe TeXt",
    # numbers: CLIP splits them into single digits
    "1,234.5 apples", "the 3rd of may 2024", "pi is 3.14159; e = 2.718...", "½ cup, x² and Ⅻ o'clock", "٣ arabic-indic digit",
    # contractions, including upper case and curly apostrophes (ftfy straightens those)
    "don't", "it's", "we'll", "they're here, you've won, I'm done, he'd go", "DON'T STOP", "it’s ‘quoted’ and “double”",
    # accents, composed and decomposed (ftfy NFC-normalises)
    "café", "naïve", "Zürich", "cafe\u0301 nai\u0308ve", "İstanbul straße ÉCOLE", "Ελληνικά Русский",
    # HTML entities, escaped once, twice, thrice; and text that looks like HTML
    "rock &amp; roll", "&lt;b&gt;bold&lt;/b&gt;", "it&#39;s", "&#x2019;s &nbsp;gap", "a&amp;amp;amp;b", "P&EACUTE;REZ",
    "<b>bold</b> &amp; co", "x < y &amp;amp; z", "line one &amp;amp;\nline <two> &amp;amp;",
    # emoji, CJK, scripts with combining marks, symbols
    "🐱🐶 cute pets 👍🏽", "東京タワーの夜景", "ＬＯＵＤ　ＮＯＩＳＥＳ ｶﾀｶﾅ", "नमस्ते दुनिया", "مرحبا بالعالم", "한국어 텍스트",
    "ﬁsh and ﬂowers", "C++ / C# & snake_case __init__ @user #hashtag http://example.com/a?b=1&c=2",
    "price: $5.99 (50% off) — 10–20 ×3 ≥ 2 ~ ^ ` | \\ {}[]",
    "'quoted' \"text\" ''' '''s",
    # whitespace and control characters
    "  extra   spaces  ", "new\nlines\r\nand\ttabs\x0bvt\x0cff", "\u00a0nbsp\u2003em\u3000ideo\u200bzwsp",
    "\x1b[31mred\x1b[0m terminal", "\x85 \x91c1 quotes\x92 \x96dash", "bom\ufeff and \x00nul",
    "",
    " ",
    # longer than 77 tokens: cut, EOT forced into the last slot
    "a very long caption " * 30,
    "word" + ",word" * 200,
]


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def tok(open_clip):
    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    return Tokenizer(path)


# --- agreement with open_clip on OpenAI's merges file ---

def test_vocabulary_matches_open_clip(tok, open_clip):
    ref = open_clip.tokenizer._tokenizer
    assert tok.vocab_size == 49408 == ref.vocab_size
    assert (tok.sot_token, tok.eot_token) == (49406, 49407) == (ref.sot_token_id, ref.eot_token_id)
    assert tok.decoder[:49406] == [ref.decoder[i] for i in range(49406)]
    assert tok.decoder[49406:] == ["<|startoftext|>", "<|endoftext|>"]  # open_clip names them <start_of_text> etc.


def test_tokenize_matches_open_clip(tok, open_clip):
    ours, ref = tok(CAPTIONS), open_clip.tokenize(CAPTIONS)
    assert ours.dtype == torch.long and ours.shape == (len(CAPTIONS), 77)
    for caption, a, b in zip(CAPTIONS, ours, ref):
        assert torch.equal(a, b), f"{caption!r}: {a.tolist()} != {b.tolist()}"


def test_context_length_and_truncation_match_open_clip(tok, open_clip):
    for n in (2, 5, 16, 77, 100):
        assert torch.equal(tok(CAPTIONS, context_length=n), open_clip.tokenize(CAPTIONS, context_length=n))
    long = tok("a very long caption " * 30)[0]
    assert long[0] == tok.sot_token and long[-1] == tok.eot_token and (long != 0).all()
    short = tok("a cat")[0]
    assert short.tolist()[:4] == [tok.sot_token, *tok.encode("a cat"), tok.eot_token] and (short[4:] == 0).all()
    assert torch.equal(tok("a cat"), tok(["a cat"]))


def test_cleaning_matches_ftfy():
    # the ftfy emulation, compared with ftfy itself (minus its mojibake repair, see the xfail below)
    ftfy = pytest.importorskip("ftfy")
    texts = CAPTIONS + ["\ud83d\ude00 paired surrogates", "lone \ud800 surrogate", "ŉ ǆ ǈ ﬅ", "&NTILDE; &nTILDE; &#xZZ; &bogus;",
                        "\u2028ls\u2029ps\r\rcr", "\u206a\ufff9x\ufffc", "&lt;&amp;lt;\n&amp;lt;"]
    for t in texts:
        expected = " ".join(html.unescape(html.unescape(ftfy.fix_text(t))).strip().split()).lower()
        assert data.clean_text(t) == expected, repr(t)


def test_pretokenizer_matches_regex_on_all_codepoints():
    # CLIP's pattern uses the `regex` package's \p{L} / \p{N}; ours is built from the standard `re` module.
    # Compared on every code point Python's Unicode database assigns (minus surrogates and \x1c-\x1f, which
    # ftfy deletes before splitting), alone, in runs, and after an apostrophe.
    regex = pytest.importorskip("regex")
    ref = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    ours = data._pretokenize_re()
    chars = [chr(c) for c in range(0x110000)
             if unicodedata.category(chr(c)) not in ("Cn", "Cs") and not 0x1C <= c <= 0x1F]
    for text in (" ".join(chars), "".join(chars), " ".join("'" + c for c in chars), " ".join("a" + c + "1" for c in chars)):
        assert ours.findall(text) == ref.findall(text)


def test_encode_decode_round_trip(tok):
    for caption in CAPTIONS:
        words = data.pretokenize(caption)
        decoded = tok.decode(tok.encode(caption))
        assert decoded == "".join(bytes(tok.byte_decoder[c] for c in w).decode() + " " for w in words)
    assert tok.decode(tok.encode("A photo of a Cat.")) == "a photo of a cat . "
    assert tok.decode(tok.encode("café 東京 🐱")) == "café 東京 🐱 "
    assert tok.decode(torch.tensor(tok.encode("don't"))) == "don 't "


@pytest.mark.xfail(strict=True, reason="known difference: ftfy's mojibake repair (fix_encoding) is not emulated")
def test_known_difference_mojibake(tok, open_clip):
    assert torch.equal(tok("cafÃ© â€œquotedâ€\x9d"), open_clip.tokenize("cafÃ© â€œquotedâ€\x9d"))


@pytest.mark.xfail(strict=True, reason="known difference: open_clip treats the literal text '<end_of_text>' as its special token")
def test_known_difference_special_token_text(tok, open_clip):
    assert torch.equal(tok("a <end_of_text> b"), open_clip.tokenize("a <end_of_text> b"))


def test_special_token_text_is_plain_text(tok, open_clip):
    ids = tok("a <|endoftext|> b")[0]
    assert (ids == tok.eot_token).sum() == 1  # cannot inject an EOT
    assert torch.equal(ids, open_clip.tokenize("a <|endoftext|> b")[0])


# --- learn_bpe ---

def _captions(n, seed=0, n_words=500):
    rng = random.Random(seed)
    syllables = "ka lo mi ne ra tu po shi an el or ing ed st th qu ve ba é ü 東".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(n_words)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice([".", "!", "", " 2024", "'s"])
            for _ in range(n)]


def _naive_bpe(captions, num_merges):
    """Textbook BPE, recounting every pair at every step: the reference for learn_bpe's incremental version."""
    freq = Counter(w for c in captions for w in data.pretokenize(c))
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in freq.items()}
    merges, made = [], set()
    while len(merges) < num_merges:
        counts = Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                counts[p] += n
        candidates = sorted((-n, p) for p, n in counts.items() if "".join(p) not in made)
        if not candidates:
            break
        a, b = candidates[0][1]
        merges.append((a, b))
        made.add(a + b)
        new_words = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + n
        words = new_words
    return merges


def _read(path):
    with gzip.open(path, "rb") as f:
        return f.read().decode("utf-8")


def test_learn_bpe_file_loads_and_tokenizes(tmp_path):
    captions = _captions(300)
    path = tmp_path / "bpe.txt.gz"
    n = learn_bpe(captions, path, 200)
    assert n == 200
    lines = _read(path).split("\n")
    assert lines[0].startswith("#version") and len(lines) == 1 + 200 + 1 and lines[-1] == ""
    tok = Tokenizer(path)
    assert tok.vocab_size == 512 + 200 + 2
    assert (tok.sot_token, tok.eot_token) == (512 + 200, 512 + 200 + 1)
    ids = tok(captions)
    assert ids.max() < tok.vocab_size and (ids[:, 0] == tok.sot_token).all()
    for caption in captions[:20]:
        assert tok.decode(tok.encode(caption)) == "".join(
            bytes(tok.byte_decoder[c] for c in w).decode() + " " for w in data.pretokenize(caption))
    # the most frequent word of the corpus became a single token
    top = Counter(w for c in captions for w in data.pretokenize(c)).most_common(1)[0][0]
    assert len(tok.encode(top)) == 1


def test_learn_bpe_matches_naive_bpe(tmp_path):
    captions = _captions(150, seed=1)
    learn_bpe(captions, tmp_path / "bpe.txt.gz", 150)
    merges = [tuple(line.split(" ")) for line in _read(tmp_path / "bpe.txt.gz").split("\n")[1:] if line]
    assert merges == _naive_bpe(captions, 150)


def test_learn_bpe_is_deterministic(tmp_path):
    captions = _captions(300)
    learn_bpe(captions, tmp_path / "a.gz", 150)
    learn_bpe(list(reversed(captions)), tmp_path / "b.gz", 150)  # caption order does not matter either
    assert _read(tmp_path / "a.gz").split("\n")[1:] == _read(tmp_path / "b.gz").split("\n")[1:]
    learn_bpe(captions, tmp_path / "c.gz", 150)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "c.gz").read_bytes()  # even the gzip bytes


def test_learn_bpe_runs_out_of_pairs(tmp_path):
    n = learn_bpe(["ab ab", "ab"], tmp_path / "bpe.txt.gz", 10)
    assert n == 1  # only ('a', 'b</w>') exists
    tok = Tokenizer(tmp_path / "bpe.txt.gz")
    assert tok.vocab_size == 512 + 1 + 2 and tok.encode("ab") == [512]
    with pytest.raises(ValueError, match="num_merges"):
        learn_bpe(["ab"], tmp_path / "x.gz", 10**6)


def test_learn_bpe_speed(tmp_path):
    # a few thousand captions, 1000 merges: well under a couple of seconds
    n = learn_bpe(_captions(3000, n_words=3000), tmp_path / "bpe.txt.gz", 1000)
    assert n == 1000 and Tokenizer(tmp_path / "bpe.txt.gz").vocab_size == 1514


# --- errors ---

def test_no_path_explains_where_to_get_the_file():
    with pytest.raises(ValueError, match="open_clip") as e:
        Tokenizer()
    assert "bpe_simple_vocab_16e6.txt.gz" in str(e.value) and "learn_bpe" in str(e.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt.gz"
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        Tokenizer(path)


@pytest.mark.parametrize("content, what", [
    (b"i n\nt h\n", "not gzip"),  # plain text, not gzipped
    (gzip.compress(b""), "empty"),
    (gzip.compress(b"#version: 0.2\ni n\nthis line has four words\n"), "line 3"),
    (gzip.compress(b"#version: 0.2\ni n\nonlyone\n"), "line 3"),
    (gzip.compress(b"#version: 0.2\nin t\n"), "line 2"),  # 'in' is not a symbol yet
    (gzip.compress(b"#version: 0.2\ni n\n\nt h\n"), "line 3"),  # blank line in the middle
    (gzip.compress(b"#version: 0.2\n\xff\xfe n\n"), "UTF-8"),
    (gzip.compress(b"#version: 0.2\ni n\n")[:-6], "gzip"),  # truncated
])
def test_malformed_file(tmp_path, content, what):
    path = tmp_path / "bad_merges.txt.gz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad_merges.txt.gz") as e:
        Tokenizer(path)
    assert what.lower() in str(e.value).lower()


def test_header_only_file_is_valid(tmp_path):
    path = tmp_path / "bpe.txt.gz"
    path.write_bytes(gzip.compress(b"#version: 0.2\n"))
    tok = Tokenizer(path)
    assert tok.vocab_size == 514 and tok.encode("ab") == [ord("a") - ord("!"), 256 + ord("b") - ord("!")]
