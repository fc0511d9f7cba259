"""Data for DeCLIP pretraining: tokenizer, text views, caption/class datasets and batched image views.

Everything a training step needs before the model:

* ``tokenize``: the CLIP byte-level BPE with DeCLIP's special ids (mask 49406, SOT 49407, EOT 49408).
* ``mask_tokens`` (MLM view, batched on any device) and ``eda`` (EDA view, one caption, seeded).
* Caption datasets (``build_caption_dataset``): the embedded Fashion-MNIST (default) and the formats
  researchers have (JSON lines, CSV/TSV, webdataset tar shards, Hugging Face ``datasets``). Every dataset
  yields uint8 CHW RGB images of one square "load size" S, or with ``keep_aspect`` (training) whole
  images with their aspect kept at a bounded size; unreadable images and empty captions come back
  as ``None`` fields (bad samples) and are never replaced by another sample.
* Class datasets for zero-shot evaluation (``build_class_dataset``).
* ``TrainPairs`` / ``TrainPairsIterable`` (per-sample randomness from ``(seed, virtual index)`` only),
  ``EpochSampler`` and ``collate_pairs``.
* ``GpuAugment``: MoCo-v2 views computed batched on the device; ``eval_transform`` for evaluation.
"""

from __future__ import annotations

import copy
import csv
import glob
import gzip
import hashlib
import html
import io
import json
import math
import os
import random
import re as _re
import struct
import sys
import tarfile
from functools import lru_cache
from typing import Callable, Iterator, Optional, Sequence

import regex
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------

VOCAB_SIZE = 49409
MASK_ID = 49406
SOT_ID = 49407
EOT_ID = 49408
PAD_ID = 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
WORDNET_DIR = "/usr/share/wordnet"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path, write: Callable) -> None:
    """Write a file all at once or not at all: write(tmp) fills a temporary file (a pathlib.Path, unique to
    the caller, ending in path's name) beside path, which then replaces path; a failure leaves path as it
    was. The file gets the mode open() would give it (0666 less the umask)."""
    import tempfile
    from pathlib import Path

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class UserError(Exception):
    """A mistake in the user's input (flag, file, column); scripts print it as `error: ...` and exit 2."""


PREEMPTED_EXIT_BASE = 128  # exit 128 + signal number (143 for SIGTERM), as a shell reports a killed process


class Preempted(Exception):
    """A signal (SIGTERM, what Slurm sends before a kill or a preemption) stopped the run after it
    saved its state. Not an error: run_main prints the message with the resume command and exits with
    `exit_code` = 128 + the signal number (143), so `train && eval` chains stop and a requeue wrapper
    can tell "resume me" (143) from "finished" (0) and "fix the input" (2)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = PREEMPTED_EXIT_BASE + self.signum


def is_main_env() -> bool:
    """Whether this is the main process of a launch (or no launch), read before any process group exists."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def run_main(main: Callable, argv: Optional[Sequence[str]] = None) -> int:
    """Run a script's main(argv) and return the exit status every script shares: 0 when it finishes;
    2 after a user error (a UserError, a checkpoint that cannot be read), printed by the main process as
    one `error: ...` line without a traceback; 128 + the signal after a preempted run saved its state,
    printing how to resume. A process group, if one was made, is closed on the way out."""
    try:
        main(argv)
        return 0
    except UserError as e:
        if is_main_env():  # every process raises the same error: one message, also under a launch
            print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        if is_main_env():
            print(str(e), file=sys.stderr)
        return e.exit_code
    finally:
        sys.stdout.flush()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # a clean gloo/NCCL shutdown before the interpreter exits


def add_caption_data_args(g):
    """--data and its format flags, the same in every script that reads caption data."""
    g.add_argument("--data", default=None,
                   help="caption data: none = embedded Fashion-MNIST; a .jsonl/.json meta, .csv/.tsv, "
                        "webdataset .tar shards ('shards-{000..009}.tar'), a Hugging Face dataset dir or .parquet")
    g.add_argument("--data-root", default=None, help="directory the image paths of a meta/CSV file are relative to")
    g.add_argument("--image-column", default=None, help="image column of CSV/TSV/HF data (default: auto)")
    g.add_argument("--caption-column", default=None, help="caption column of CSV/TSV/HF data (default: auto)")
    g.add_argument("--csv-separator", default=None, help="CSV separator (default: from the extension)")


def caption_data_options(args) -> dict:
    """build_caption_dataset's format options from add_caption_data_args' flags (those given)."""
    fmt = dict(root=args.data_root, image_column=args.image_column, caption_column=args.caption_column,
               separator=args.csv_separator, label_column=getattr(args, "label_column", None))
    return {k: v for k, v in fmt.items() if v is not None}


def read_config(path: str, parser, sections: Sequence[str] = (), strict: bool = False) -> dict:
    """Flag defaults from a YAML --config file: its top-level scalar keys, overridden by the first of
    `sections` that is present (a mapping), keys read with '-' as '_'. Keys that are not flags of
    `parser` are ignored, so one file can serve several scripts, or, with `strict` (training
    recipes, where a misspelt key would silently change a run), refused."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--config {path}: cannot read it ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values")
    section = next((cfg[s] for s in sections if cfg.get(s)), {})
    merged = {**{k: v for k, v in cfg.items() if not isinstance(v, dict) or not sections},
              **(section if isinstance(section, dict) else {})}
    merged = {k.replace("-", "_"): v for k, v in merged.items()}
    dests = {a.dest for a in parser._actions}
    unknown = sorted(set(merged) - dests)
    if strict and unknown:
        raise UserError(f"--config {path} has unknown keys: {', '.join(unknown)}")
    return {k: v for k, v in merged.items() if k in dests}


# --------------------------------------------------------------------------------------------------
# Tokenizer: CLIP byte-level BPE, DeCLIP special ids
# --------------------------------------------------------------------------------------------------

# Bytes that stand for themselves in CLIP's byte-level alphabet; the other 68 get chr(256 + k).
_PRINTABLE_BYTES = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
_OTHER_BYTES = [b for b in range(256) if b not in _PRINTABLE_BYTES]


def _byte_symbols() -> list[str]:
    """The printable unicode stand-in of each byte value 0..255."""
    sym = {b: chr(b) for b in _PRINTABLE_BYTES}
    sym.update({b: chr(256 + k) for k, b in enumerate(_OTHER_BYTES)})
    return [sym[b] for b in range(256)]


def _vocab_order_bytes() -> list[str]:
    """Byte symbols in vocabulary order: the printable bytes first, then the others (as in CLIP)."""
    sym = _byte_symbols()
    return [sym[b] for b in _PRINTABLE_BYTES + _OTHER_BYTES]


def _bpe_merges_path() -> str:
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the CLIP BPE merges file ships with open_clip_torch; install it with "
                        "`pip install open_clip_torch` (no network is used at run time).")
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.exists(path):
        raise UserError(f"{path} is missing; reinstall open_clip_torch.")
    return path


class _BPE:
    """Byte-level BPE over CLIP's merges; ids 0..49405 equal OpenAI's."""

    _PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                             regex.IGNORECASE)

    def __init__(self, path: str):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        assert len(merges) == 48894, len(merges)
        base = _vocab_order_bytes()
        vocab = base + [s + "</w>" for s in base] + ["".join(m) for m in merges]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.byte_sym = _byte_symbols()
        self.byte_table = {b: self.byte_sym[b] for b in range(256)}  # latin-1 char -> byte symbol
        self.words: dict[str, tuple[int, ...]] = {}
        self.text_cache = lru_cache(maxsize=1 << 16)(self._encode)

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        """BPE ids of one pre-token (already mapped to byte symbols)."""
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = self.ranks
        while len(parts) > 1:
            best, best_rank = None, None
            for pair in zip(parts, parts[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.encoder[p] for p in parts)

    def _encode(self, text: str) -> tuple[int, ...]:
        ids: list[int] = []
        words, table = self.words, self.byte_table
        for tok in self._PATTERN.findall(_clean(text)):
            got = words.get(tok)
            if got is None:
                if len(words) > 1 << 19:  # bound the word cache
                    words.clear()
                got = words[tok] = self._bpe_word(tok.encode("utf-8").decode("latin-1").translate(table))
            ids.extend(got)
        return tuple(ids)


# Printable ASCII without '&' (HTML entities) plus tab/newline/CR: ftfy leaves such text unchanged,
# so the (slow) ftfy call is skipped for it. tests/test_data.py checks this against open_clip.
_FTFY_NOOP = _re.compile(r"[\x20-\x25\x27-\x7e\t\n\r]*")


def _clean(text: str) -> str:
    """CLIP's cleaning: ftfy, HTML unescape twice, whitespace collapse, lower case."""
    if not _FTFY_NOOP.fullmatch(text):
        import ftfy  # only needed for non-ASCII or HTML text
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


@lru_cache(maxsize=1)
def _bpe() -> _BPE:
    return _BPE(_bpe_merges_path())


def encode(text: str) -> list[int]:
    """BPE ids of one caption, without SOT/EOT (ids < 49406, equal to OpenAI's)."""
    return list(_bpe().text_cache(text))


def tokenize(texts: str | Sequence[str], context_length: int = 77, trim: bool = False) -> torch.LongTensor:
    """[SOT] + BPE ids + [EOT], right-padded with 0; too long -> SOT, first L-2 ids, EOT. trim: cut the
    batch to its longest caption (``trim_padding``), as training and evaluation feed the text tower.

    Literal special strings such as "<|endoftext|>" in a caption are ordinary text here (a caption can
    never inject a special id), which differs from OpenAI's tokenizer for such captions only.
    """
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError("context_length must be at least 2")
    cache, pad = _bpe().text_cache, (PAD_ID,) * context_length
    rows = []
    for text in texts:
        row = (SOT_ID,) + cache(text)[:context_length - 2] + (EOT_ID,)
        rows.append(row + pad[len(row):])
    if not rows:
        return torch.zeros(0, context_length, dtype=torch.long)
    tokens = torch.tensor(rows, dtype=torch.long)
    return trim_padding(tokens)[0] if trim else tokens


def trim_padding(*tokens: torch.Tensor, multiple: int = 8) -> tuple[torch.Tensor, ...]:
    """The token batches cut to their longest caption, rounded up to ``multiple`` positions (a few
    shapes for torch.compile and tensor cores), all to one length (CleanCLIP concatenates its two
    views). Exact: under the text tower's causal mask no position after a row's EOT reaches its
    features, so the cut only saves the work on padding (32 -> 16 positions on the demo's captions)."""
    full = tokens[0].shape[1]
    cols = [t.ne(PAD_ID).any(0).nonzero() for t in tokens]
    used = max((int(c.max()) + 1 for c in cols if c.numel()), default=1)
    n = min(full, -(-used // multiple) * multiple)
    return tuple(t[:, :n] for t in tokens)


def decode(tokens: Sequence[int]) -> str:
    """Text of token ids up to the first EOT (SOT/mask skipped); for debugging and tests."""
    bpe = _bpe()
    if not hasattr(bpe, "decoder"):
        bpe.decoder = {i: t for t, i in bpe.encoder.items()}
        bpe.byte_of = {s: b for b, s in enumerate(bpe.byte_sym)}
    syms = []
    for t in (int(t) for t in tokens):
        if t == EOT_ID:
            break
        if t < MASK_ID:
            syms.append(bpe.decoder[t])
    text = "".join(syms).replace("</w>", " ")
    raw = bytes(bpe.byte_of.get(c, 0x20) for c in text)
    return raw.decode("utf-8", "replace").strip()


# --------------------------------------------------------------------------------------------------
# Text views: MLM masking (batched) and EDA (per caption)
# --------------------------------------------------------------------------------------------------

def mask_tokens(tokens: torch.Tensor, generator: torch.Generator, prob: float = 0.15
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking of tokenized captions.

    Eligible positions: strictly between SOT and the first EOT, and not already MASK_ID (padding after
    EOT is never eligible; a row without EOT treats its trailing zeros as padding). Each eligible token is
    selected with probability ``prob``; a selected token becomes MASK_ID (80%), a uniform id in
    [0, 49406) (10%, never a special id) or stays (10%). Labels are the original ids at selected positions
    and -100 elsewhere; a batch with nothing selected is allowed (all -100).
    Random numbers are drawn on ``generator.device`` and moved to ``tokens.device``, so a CPU generator
    gives the same masks on every device.
    """
    n, length = tokens.shape
    gdev = generator.device
    u_sel = torch.rand(n, length, generator=generator, device=gdev).to(tokens.device)
    u_kind = torch.rand(n, length, generator=generator, device=gdev).to(tokens.device)
    rand_ids = torch.randint(0, MASK_ID, (n, length), generator=generator, device=gdev).to(tokens.device)
    is_eot = tokens == EOT_ID
    after_eot = torch.cumsum(is_eot.int(), dim=1) > 0
    trailing_pad = torch.flip(torch.cumprod(torch.flip(tokens == PAD_ID, [1]).int(), dim=1), [1]).bool()
    has_eot = is_eot.any(dim=1, keepdim=True)
    pad = torch.where(has_eot, after_eot, trailing_pad)
    special = (tokens == SOT_ID) | (tokens == MASK_ID) | is_eot
    eligible = ~pad & ~special
    selected = eligible & (u_sel < prob)
    labels = torch.where(selected, tokens, torch.full_like(tokens, -100))
    masked = torch.where(selected & (u_kind < 0.8), torch.full_like(tokens, MASK_ID), tokens)
    masked = torch.where(selected & (u_kind >= 0.8) & (u_kind < 0.9), rand_ids, masked)
    return masked, labels


# A small built-in list of English stop words (the usual function words; no NLTK download).
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers
herself it its itself they them their theirs themselves what which who whom this that these those am is
are was were be been being have has had having do does did doing a an the and but if or because as until
while of at by for with about against between into through during before after above below to from up
down in out on off over under again further then once here there when where why how all any both each
few more most other some such no nor not only own same so than too very s t can will just don should now
d ll m o re ve y ain aren couldn didn doesn hadn hasn haven isn ma mightn mustn needn shan shouldn wasn
weren won wouldn
""".split())


class _WordNet:
    """Synonyms from WordNet 3.0 database files (index.* / data.*), e.g. Debian's wordnet-base.

    A tiny reader: the index files are parsed once per process on first use (about 0.2 s), data lines are
    read by byte offset, and lookups are cached. Base forms follow WordNet's morphy (exception lists plus
    detachment rules), so "dresses" finds "dress".
    """

    POS = ("noun", "verb", "adj", "adv")
    RULES = {"noun": [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
                      ("men", "man"), ("ies", "y")],
             "verb": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""),
                      ("ing", "e"), ("ing", "")],
             "adj": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
             "adv": []}

    def __init__(self, root: str):
        self.root = root
        self.index: dict[str, dict[str, tuple[int, ...]]] = {}
        self.exc: dict[str, dict[str, list[str]]] = {}
        for pos in self.POS:
            table = {}
            with open(os.path.join(root, f"index.{pos}"), encoding="latin-1") as f:
                for line in f:
                    if line.startswith(" "):
                        continue
                    p = line.split()
                    table[p[0]] = tuple(int(o) for o in p[6 + int(p[3]):])
            self.index[pos] = table
            exc = {}
            path = os.path.join(root, f"{pos}.exc")
            if os.path.exists(path):
                with open(path, encoding="latin-1") as f:
                    for line in f:
                        p = line.split()
                        if len(p) >= 2:
                            exc.setdefault(p[0], []).extend(p[1:])
            self.exc[pos] = exc
        self.synonyms = lru_cache(maxsize=1 << 16)(self._synonyms)

    @staticmethod
    def available(root: str) -> bool:
        return all(os.path.exists(os.path.join(root, f"{k}.{pos}"))
                   for k in ("index", "data") for pos in _WordNet.POS)

    def _morphy(self, form: str, pos: str) -> list[str]:
        table = self.index[pos]
        if form in self.exc[pos]:
            forms = [form] + self.exc[pos][form]
        else:
            forms = [form] + [form[:-len(old)] + new for old, new in self.RULES[pos] if form.endswith(old)]
        out = []
        for f in forms:
            if f in table and f not in out:
                out.append(f)
        return out

    def _synset_words(self, pos: str, offset: int) -> list[str]:
        with open(os.path.join(self.root, f"data.{pos}"), "rb") as f:
            f.seek(offset)
            p = f.readline().decode("latin-1").split()
        n = int(p[3], 16)
        return [_re.sub(r"\(.*\)$", "", p[4 + 2 * k]) for k in range(n)]

    def _synonyms(self, word: str) -> tuple[str, ...]:
        """Sorted distinct synonyms of ``word`` (lower case, '_'/'-' -> space, only a-z and space)."""
        word = word.lower().replace(" ", "_")
        out = set()
        for pos in self.POS:
            for base in self._morphy(word, pos):
                for off in self.index[pos][base]:
                    for lemma in self._synset_words(pos, off):
                        s = lemma.replace("_", " ").replace("-", " ").lower()
                        s = "".join(c for c in s if c == " " or "a" <= c <= "z")
                        if s.strip():
                            out.add(s)
        out.discard(word.replace("_", " "))
        return tuple(sorted(out))


@lru_cache(maxsize=1)
def _wordnet() -> Optional[_WordNet]:
    root = os.environ.get("WORDNET_DIR", WORDNET_DIR)
    return _WordNet(root) if _WordNet.available(root) else None


def wordnet_synonyms(word: str) -> tuple[str, ...]:
    """Synonyms of one word from WordNet (empty when WordNet is not installed)."""
    wn = _wordnet()
    return wn.synonyms(word) if wn is not None else ()


_WORD_CORE = _re.compile(r"^(\W*)(.*?)(\W*)$")


def eda_synonym_replacement(words: list[str], rng: random.Random) -> list[str]:
    """Replace every occurrence of one random non-stop word that has WordNet synonyms by one synonym.

    Words are compared without surrounding punctuation, which is kept ("dress." -> "frock.").
    Unchanged when no word has a synonym.
    """
    cores = [_WORD_CORE.match(w).group(2).lower() for w in words]
    candidates = sorted({c for c in cores if c not in STOPWORDS and c.replace("-", "").replace("'", "").isalpha()})
    rng.shuffle(candidates)
    for cand in candidates:
        syns = wordnet_synonyms(cand)
        if syns:
            syn = rng.choice(syns)
            out = []
            for w, c in zip(words, cores):
                if c == cand:
                    pre, _, post = _WORD_CORE.match(w).groups()
                    out.append(pre + syn + post)
                else:
                    out.append(w)
            return out
    return list(words)


def eda_random_swap(words: list[str], rng: random.Random) -> list[str]:
    """Swap two random word positions (up to 3 retries to draw two distinct positions)."""
    words = list(words)
    if len(words) < 2:
        return words
    a = rng.randrange(len(words))
    b = a
    for _ in range(4):
        b = rng.randrange(len(words))
        if b != a:
            break
    words[a], words[b] = words[b], words[a]
    return words


def eda_random_deletion(words: list[str], rng: random.Random, p: float = 0.1) -> list[str]:
    """Drop each word with probability p; a caption of one word is kept; if all go, keep one at random."""
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() >= p]
    return kept if kept else [rng.choice(words)]


def eda(caption: str, rng: random.Random) -> str:
    """EDA text view: one of synonym replacement, random swap, random deletion(p=0.1), chosen uniformly.

    Synonym replacement needs WordNet (Debian's ``wordnet-base`` at /usr/share/wordnet, or $WORDNET_DIR);
    without it that choice falls back to random swap. Deterministic given ``rng``.
    """
    words = caption.split()
    if not words:
        return caption
    op = rng.randrange(3)
    if op == 0 and _wordnet() is not None:
        words = eda_synonym_replacement(words, rng)
    elif op in (0, 1):
        words = eda_random_swap(words, rng)
    else:
        words = eda_random_deletion(words, rng, 0.1)
    return " ".join(words)


def eda_random_insertion(words: list[str], rng: random.Random) -> list[str]:
    """Insert a synonym of a random word (up to 10 draws to find one with synonyms) at a random position."""
    words = list(words)
    for _ in range(10):
        syns = wordnet_synonyms(words[rng.randrange(len(words))]) if _wordnet() is not None else ()
        if syns:
            words.insert(rng.randrange(len(words)), rng.choice(syns))
            break
    return words


def eda_cleanclip(caption: str, rng: random.Random) -> str:
    """CleanCLIP's caption view: Wei & Zou's EDA with num_aug=1 (CleanCLIP utils/eda.py), i.e. one of
    synonym replacement, random insertion, random swap (each n = max(1, 10 % of the words) times) and
    random deletion (p 0.1), chosen uniformly, on the caption lower-cased to letters and spaces.
    (Repeated synonym replacements may pick the same word; they coincide for captions under 20 words.)"""
    words = _re.sub(r"[^a-z ]", " ", caption.lower().replace("'", "").replace("’", "")).split()
    if not words:
        return caption
    n = max(1, int(0.1 * len(words)))
    op = rng.randrange(4)
    for _ in range(n if op < 3 else 1):
        if op == 0:
            words = eda_synonym_replacement(words, rng)
        elif op == 1:
            words = eda_random_insertion(words, rng)
        elif op == 2:
            words = eda_random_swap(words, rng)
        else:
            words = eda_random_deletion(words, rng, 0.1)
    return _re.sub(r"[^a-z ]", " ", " ".join(words)).strip()


# the second caption view of a training item, by name
TEXT_AUGS = {"declip": eda, "cleanclip": eda_cleanclip}


# --------------------------------------------------------------------------------------------------
# Image decoding
# --------------------------------------------------------------------------------------------------

# Training decodes keep the aspect ratio at a bounded size, so the random resized crop sees the whole
# photo: the shorter side at most TRAIN_SHORT_SIDE x the model size and the longer at most
# TRAIN_LONG_SIDE x (a photo is never enlarged, nor shrunk below the model size on its shorter side).
TRAIN_SHORT_SIDE, TRAIN_LONG_SIDE = 2.0, 4.0


def train_decode_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) at which a training image of that size is decoded for model size ``size``."""
    short, long = min(width, height), max(width, height)
    s = min(1.0, TRAIN_SHORT_SIDE * size / short, TRAIN_LONG_SIDE * size / long)
    s = max(s, min(1.0, size / short))
    return max(1, round(width * s)), max(1, round(height * s))


def load_image(src, size: int, keep_aspect: bool = False) -> Optional[torch.Tensor]:
    """Decode an image (path, bytes, file object or PIL image) to uint8 [3, H, W] RGB.

    Default (evaluation): resize the shorter side to ``size`` (bilinear), then center crop to
    size x size. ``keep_aspect`` (training views): the whole image at ``train_decode_size`` (bilinear).
    Returns None when unreadable.
    """
    from PIL import Image
    try:
        if isinstance(src, Image.Image):
            img = src
        else:
            if isinstance(src, (bytes, bytearray, memoryview)):
                src = io.BytesIO(src)
            img = Image.open(src)
            if img.format == "JPEG":
                w, h = img.size
                img.draft("RGB", train_decode_size(w, h, size) if keep_aspect else (size, size))
        img = img.convert("RGB")
        w, h = img.size
        if w < 1 or h < 1:
            return None
        if keep_aspect:
            nw, nh = train_decode_size(w, h, size)
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.BILINEAR)
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
            return data.view(nh, nw, 3).permute(2, 0, 1).contiguous()
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        if (nw, nh) != (size, size):
            img = img.crop((left, top, left + size, top + size))
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return data.view(size, size, 3).permute(2, 0, 1).contiguous()
    except Exception:  # any decoding failure marks a bad sample
        return None


def square_decoding(ds):
    """``ds`` decoding size x size centre crops (for evaluation): itself, or a shallow copy of a dataset
    built with keep_aspect (the training decode)."""
    if not getattr(ds, "keep_aspect", False):
        return ds
    out = copy.copy(ds)
    out.keep_aspect = False
    return out


def _resize_uint8(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a square uint8 [C,H,W] image to size x size (bilinear, antialiased)."""
    x = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST (embedded default)
# --------------------------------------------------------------------------------------------------

_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_FMNIST_CACHE: dict = {}


def fashion_mnist_dir(data: Optional[str] = None) -> str:
    """The Fashion-MNIST directory: ``data`` if given, else $FASHION_MNIST_DIR, else Debian's location."""
    return data or os.environ.get("FASHION_MNIST_DIR") or FASHION_MNIST_DIR


def _find_idx(root: str, stem: str) -> Optional[str]:
    for name in (stem + ".gz", stem):
        if os.path.exists(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def _is_fashion_mnist_dir(path: str) -> bool:
    return os.path.isdir(path) and all(_find_idx(path, s) for files in _FMNIST_FILES.values() for s in files)


def _read_idx(path: str) -> torch.Tensor:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        magic = struct.unpack(">I", raw[:4])[0]
        ndim = magic & 0xFF
        if magic >> 8 != 0x08 or ndim < 1:
            raise ValueError("not an unsigned-byte IDX file")
        dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        data = torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8)
        return data.view(*dims)
    except (OSError, ValueError, RuntimeError, struct.error, EOFError) as e:
        raise UserError(f"--data: {path} is not a readable IDX file ({e}); reinstall dataset-fashion-mnist.")


def load_fashion_mnist(split: str = "train", root: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N,28,28], labels int64 [N]) of a Fashion-MNIST split, loaded once per process."""
    root = fashion_mnist_dir(root)
    if split not in _FMNIST_FILES:
        raise UserError(f"Fashion-MNIST split {split!r} does not exist; use 'train' or 'test'.")
    key = (os.path.abspath(root), split)
    if key not in _FMNIST_CACHE:
        paths = [_find_idx(root, s) for s in _FMNIST_FILES[split]]
        if not all(paths):
            raise UserError(f"--data: no Fashion-MNIST IDX files in {root}; install Debian's "
                            "dataset-fashion-mnist or point --data/FASHION_MNIST_DIR at the files.")
        images, labels = _read_idx(paths[0]), _read_idx(paths[1]).long()
        if images.dim() != 3 or images.shape[0] != labels.shape[0]:
            raise UserError(f"--data: Fashion-MNIST files in {root} are inconsistent; reinstall them.")
        _FMNIST_CACHE[key] = (images, labels)
    return _FMNIST_CACHE[key]


# Natural training captions (not the 80 CLIP evaluation prompts). "a {}" gets "an" before a vowel.
CAPTION_TEMPLATES = [
    "a {} on a white background",
    "product photo: {}",
    "{} for sale, studio shot",
    "a catalogue picture of a {}",
    "small grayscale thumbnail of a {}",
    "my new {}",
    "this {} is on sale today",
    "a {} laid flat, seen from above",
    "online shop listing: {}",
    "a {} photographed for an online store",
    "{}, front view",
    "an image showing a {}",
    "the {} i bought last week",
    "a {} isolated on white",
    "picture of a {} from a fashion store",
    "a low-res scan of a {}",
    "fashion item: {}",
    "a {} in my wardrobe",
    "a secondhand {} listed online",
    "{} (catalog image)",
    "check out this {}",
    "simple studio shot of a {}",
    "a {} from the new collection",
    "look at this {}",
]
CAPTION_ADJECTIVES = ["casual", "classic", "plain", "new", "stylish", "simple", "cheap", "vintage",
                      "comfortable", "dark", "light", "basic", "elegant", "everyday"]


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a fast, well-spread hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _fix_articles(text: str) -> str:
    return _re.sub(r"\ba ([aeiou])", r"an \1", text)


def class_caption(name: str, key: int) -> str:
    """A natural caption naming class ``name``, chosen deterministically from ``key`` (e.g. the index).

    One of ``CAPTION_TEMPLATES``; about a third of them put an adjective before the name.
    """
    h = _mix64(key)
    template = CAPTION_TEMPLATES[h % len(CAPTION_TEMPLATES)]
    a = (h >> 20) % (3 * len(CAPTION_ADJECTIVES))
    phrase = f"{CAPTION_ADJECTIVES[a]} {name}" if a < len(CAPTION_ADJECTIVES) else name
    return _fix_articles(template.format(phrase))


class FashionMNISTCaptions(torch.utils.data.Dataset):
    """Fashion-MNIST as image-caption pairs (train split by default) or as a class dataset.

    Images: 28 px padded by 2 zero pixels each side to 32 (image_size 32) or resized to image_size,
    repeated to 3 channels. Captions: ``class_caption(class name, index)``, fixed per image (like a real
    caption dataset, where each image has one caption).
    """

    def __init__(self, root: Optional[str] = None, split: str = "train", image_size: int = 32,
                 with_captions: bool = True):
        self.images, self.labels = load_fashion_mnist(split, root)
        self.split, self.image_size, self.with_captions = split, image_size, with_captions
        self.classnames = list(FASHION_MNIST_CLASSES)

    def __len__(self) -> int:
        return self.images.shape[0]

    def image(self, i: int) -> torch.Tensor:
        return self.view(self.images[i])

    def view(self, img: torch.Tensor) -> torch.Tensor:
        """A grey uint8 [H, W] image as this dataset's items show theirs: uint8 [3, S, S]."""
        if self.image_size == 32 and img.shape == (28, 28):
            img = F.pad(img, (2, 2, 2, 2))
        elif img.shape != (self.image_size, self.image_size):
            img = _resize_uint8(img[None], self.image_size)[0]
        return img.expand(3, *img.shape)

    def __getitem__(self, i: int) -> dict:
        label = int(self.labels[i])
        item = dict(image=self.image(i), label=label)
        if self.with_captions:
            item["caption"] = class_caption(self.classnames[label], i)
        return item


# --------------------------------------------------------------------------------------------------
# Real caption data: JSON lines, CSV/TSV, Hugging Face datasets, webdataset shards
# --------------------------------------------------------------------------------------------------

def _clean_caption(c) -> Optional[str]:
    if isinstance(c, (list, tuple)):
        c = c[0] if len(c) else None
    if isinstance(c, bytes):
        c = c.decode("utf-8", "replace")
    if c is None:
        return None
    c = str(c).strip()
    return c or None


def _to_label(v) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return -1


def _pick_column(columns: Sequence[str], wanted: Optional[str], candidates: Sequence[str], what: str,
                 source: str, option: str, required: bool = True) -> Optional[str]:
    """The column to use: ``wanted`` (must exist) or the first present candidate."""
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"{source} has no {what} column {wanted!r} (columns: {', '.join(map(str, columns))}); "
                            f"set {option} to one of them.")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    if required:
        raise UserError(f"{source} has no {what} column (looked for {', '.join(candidates)}; columns: "
                        f"{', '.join(map(str, columns))}); set {option}.")
    return None


IMAGE_COLUMNS = ("filepath", "filename", "image", "img", "image_path", "path", "file", "jpg", "png")
CAPTION_COLUMNS = ("title", "caption", "text", "captions", "sentence", "txt")


class _PathCaptionDataset(torch.utils.data.Dataset):
    """Rows of (image path, caption, label, label_name) from a meta file; images decoded on access."""

    def __init__(self, source: str, paths: list, captions: list, labels: list, label_names: list,
                 root: str, image_size: int, with_captions: bool = True):
        self.source, self.paths, self.captions = source, paths, captions
        self.labels, self.label_names, self.root = labels, label_names, root
        self.image_size, self.with_captions = image_size, with_captions
        self.keep_aspect = False  # True: training decode (whole image, aspect kept; see load_image)
        self.classnames = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        p = self.paths[i]
        img = load_image(os.path.join(self.root, p), self.image_size, self.keep_aspect) if p else None
        item = dict(image=img, label=self.labels[i])
        if self.with_captions:
            item["caption"] = self.captions[i]
        return item


def _resolve_root(meta: str, root: Optional[str], first_path: Optional[str]) -> str:
    """Image root: ``root`` if given; else the meta file's directory if the first image is found there,
    else the working directory if it is found there, else the meta file's directory."""
    if root is not None:
        if not os.path.isdir(root):
            raise UserError(f"--data-root {root} is not a directory; point it at the image folder.")
        return root
    meta_dir = os.path.dirname(os.path.abspath(meta))
    if first_path and not os.path.isabs(first_path):
        if not os.path.exists(os.path.join(meta_dir, first_path)) and os.path.exists(first_path):
            return os.getcwd()
    return meta_dir


def read_jsonl(path: str, image_size: int = 32, root: Optional[str] = None, image_column: Optional[str] = None,
               caption_column: Optional[str] = None, label_column: Optional[str] = None,
               with_captions: bool = True) -> _PathCaptionDataset:
    """DeCLIP's JSON-lines meta (``filename``, ``caption`` str or list -> first, optional ``label`` /
    ``label_name``); a ``.json`` file holding one JSON array of such objects works too."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise UserError(f"--data {path} is not valid JSON lines ({e}); write one JSON object per line.")
    if not rows:
        raise UserError(f"--data {path} holds no samples; write one JSON object per line.")
    if not all(isinstance(r, dict) for r in rows):
        raise UserError(f"--data {path}: every line must be a JSON object with 'filename' and 'caption'.")
    keys = sorted(set().union(*(r.keys() for r in rows[:1000])))
    img_key = _pick_column(keys, image_column, ("filename",) + IMAGE_COLUMNS, "image", f"--data {path}",
                           "--image-column")
    cap_key = _pick_column(keys, caption_column, ("caption",) + CAPTION_COLUMNS, "caption", f"--data {path}",
                           "--caption-column", required=with_captions)
    lab_key = label_column or "label"
    paths = [r.get(img_key) for r in rows]
    captions = [_clean_caption(r.get(cap_key)) for r in rows] if cap_key else [None] * len(rows)
    labels = [_to_label(r.get(lab_key, -1)) for r in rows]
    names = [r.get("label_name") for r in rows]
    ds = _PathCaptionDataset(path, paths, captions, labels, names, _resolve_root(path, root, paths[0]),
                             image_size, with_captions)
    return ds


def read_csv(path: str, image_size: int = 32, root: Optional[str] = None, image_column: Optional[str] = None,
             caption_column: Optional[str] = None, label_column: Optional[str] = None, sep: Optional[str] = None,
             with_captions: bool = True) -> _PathCaptionDataset:
    """CSV/TSV with a header (open_clip / CleanCLIP style); columns default to ``filepath`` / ``title`` (then
    other common names); separator from the extension (.tsv tab, else comma) unless ``sep`` is given."""
    if sep is None:
        sep = "\t" if path.lower().endswith((".tsv", ".tsv.gz")) else ","
    sep = {"tab": "\t", "\\t": "\t", "comma": ","}.get(sep, sep)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=sep)
        try:
            header = next(reader)
        except StopIteration:
            raise UserError(f"--data {path} is empty; it needs a header row and one row per sample.")
        rows = list(reader)
    header = [h.strip() for h in header]
    img_key = _pick_column(header, image_column, IMAGE_COLUMNS, "image", f"--data {path}", "--image-column")
    cap_key = _pick_column(header, caption_column, CAPTION_COLUMNS, "caption", f"--data {path}",
                           "--caption-column", required=with_captions)
    lab_key = _pick_column(header, label_column, ("label",), "label", f"--data {path}", "--label-column",
                           required=False)
    ii = header.index(img_key)
    ci = header.index(cap_key) if cap_key else None
    li = header.index(lab_key) if lab_key else None

    def cell(row, k):
        return row[k] if k is not None and k < len(row) else None

    paths = [cell(r, ii) for r in rows]
    captions = [_clean_caption(cell(r, ci)) for r in rows]
    labels = [_to_label(cell(r, li)) if li is not None else -1 for r in rows]
    return _PathCaptionDataset(path, paths, captions, labels, [None] * len(rows),
                               _resolve_root(path, root, paths[0] if paths else None), image_size, with_captions)


class HFCaptionDataset(torch.utils.data.Dataset):
    """A Hugging Face ``datasets.Dataset`` with an image column (Image feature, bytes, dict or path) and a
    caption column. Images are decoded here, so a corrupt image is a bad sample, not an exception."""

    def __init__(self, ds, source: str, image_size: int = 32, image_column: Optional[str] = None,
                 caption_column: Optional[str] = None, label_column: Optional[str] = None,
                 root: Optional[str] = None, with_captions: bool = True):
        import datasets
        cols = list(ds.column_names)
        self.image_col = _pick_column(cols, image_column, ("image", "img", "jpg", "png") + IMAGE_COLUMNS,
                                      "image", source, "--image-column")
        self.caption_col = _pick_column(cols, caption_column, CAPTION_COLUMNS, "caption", source,
                                        "--caption-column", required=with_captions)
        self.label_col = _pick_column(cols, label_column, ("label", "labels"), "label", source,
                                      "--label-column", required=False)
        keep = [c for c in (self.image_col, self.caption_col, self.label_col) if c]
        ds = ds.select_columns(keep)
        if isinstance(ds.features[self.image_col], datasets.Image):
            ds = ds.cast_column(self.image_col, datasets.Image(decode=False))
        self.ds, self.source, self.image_size, self.with_captions = ds, source, image_size, with_captions
        self.keep_aspect = False  # True: training decode (whole image, aspect kept; see load_image)
        self.root = root if root is not None else (source if os.path.isdir(source) else os.path.dirname(source))
        feat = ds.features.get(self.label_col) if self.label_col else None
        self.classnames = list(feat.names) if isinstance(feat, datasets.ClassLabel) else None

    def __len__(self) -> int:
        return len(self.ds)

    def _image(self, v):
        if v is None:
            return None
        if isinstance(v, dict):
            if v.get("bytes"):
                return load_image(v["bytes"], self.image_size, self.keep_aspect)
            v = v.get("path")
            if not v:
                return None
        if isinstance(v, str):
            return load_image(os.path.join(self.root, v), self.image_size, self.keep_aspect)
        return load_image(v, self.image_size, self.keep_aspect)  # bytes or PIL image

    def __getitem__(self, i: int) -> dict:
        row = self.ds[int(i)]
        item = dict(image=self._image(row[self.image_col]),
                    label=_to_label(row[self.label_col]) if self.label_col else -1)
        if self.with_captions:
            item["caption"] = _clean_caption(row[self.caption_col])
        return item


def read_hf(path: str, image_size: int = 32, split: Optional[str] = None, image_column: Optional[str] = None,
            caption_column: Optional[str] = None, label_column: Optional[str] = None, root: Optional[str] = None,
            cache_dir: Optional[str] = None, with_captions: bool = True) -> HFCaptionDataset:
    """A dataset saved with ``save_to_disk`` (a Dataset, or a DatasetDict and ``split``, default 'train'),
    or ``.parquet`` file(s) (a file, a glob, or a directory of them)."""
    import datasets
    if path.endswith(".parquet") or "*" in path or (os.path.isdir(path) and glob.glob(os.path.join(path, "*.parquet"))):
        files = sorted(glob.glob(os.path.join(path, "*.parquet"))) if os.path.isdir(path) else sorted(glob.glob(path))
        if not files:
            raise UserError(f"--data {path} matches no parquet file; check the path.")
        try:
            ds = datasets.Dataset.from_parquet(files, cache_dir=cache_dir)
        except Exception as e:
            raise UserError(f"--data {path} could not be read as parquet ({type(e).__name__}: {e}).")
    else:
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:
            raise UserError(f"--data {path} is not a dataset saved with save_to_disk ({type(e).__name__}).")
        if isinstance(ds, datasets.DatasetDict):
            split = split or "train"
            if split not in ds:
                raise UserError(f"--data {path} has no split {split!r} (splits: {', '.join(ds)}); choose one.")
            ds = ds[split]
    return HFCaptionDataset(ds, path, image_size, image_column, caption_column, label_column, root,
                            with_captions)


def _expand_shards(spec: str) -> list[str]:
    """Shard list from a .tar path, a brace pattern (``shard-{000..009}.tar``), a glob, a directory of
    .tar files, or several of those joined with '::'."""
    import braceexpand
    urls = []
    for part in spec.split("::"):
        if os.path.isdir(part):
            urls += sorted(glob.glob(os.path.join(part, "*.tar")) + glob.glob(os.path.join(part, "*.tar.gz")))
            continue
        for u in braceexpand.braceexpand(part):
            urls += sorted(glob.glob(u)) if any(ch in u for ch in "*?[") else [u]
    missing = [u for u in urls if not os.path.exists(u)]
    if missing:
        raise UserError(f"--data shard {missing[0]} does not exist ({len(missing)} of {len(urls)} missing); "
                        "check the shard pattern.")
    if not urls:
        raise UserError(f"--data {spec} matches no .tar shard; check the shard pattern.")
    return urls


def _count_shard(path: str) -> int:
    """Number of samples webdataset yields from one shard, counted from tar headers only."""
    from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix
    n, last = 0, None
    try:
        with tarfile.open(path, "r:*") as tf:
            for info in tf:
                name = info.name
                if not info.isreg() or _re.match(r"__[^/]*__($|/)", name):
                    continue
                if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
                    continue
                key, _ = base_plus_ext(name)
                if key is None:
                    continue
                if key != last:
                    n, last = n + 1, key
    except (tarfile.TarError, OSError, EOFError):
        pass  # a damaged shard counts what was readable, like the reader
    return n


class WebDatasetCaptions(torch.utils.data.IterableDataset):
    """Webdataset tar shards (image + txt per key), streamed with the ``webdataset`` library.

    Yields the same dicts as the other caption datasets plus ``index``: the sample's position in the
    whole shard list read in order, stable across runs and DataLoader worker counts. Sample counts per
    shard come from a scan of the tar headers (``__len__``). In DataLoader workers the shards are split
    round-robin (every worker reads all shards and keeps every num_workers-th sample when there are fewer
    shards than workers). Ranks are not split here: Accelerate either dispatches batches from the main
    process or shards the batches itself.
    """

    def __init__(self, spec: str, image_size: int = 32, image_ext: Optional[Sequence[str]] = None,
                 text_ext: str = "txt", with_captions: bool = True):
        self.urls = _expand_shards(spec)
        self.spec, self.image_size, self.with_captions = spec, image_size, with_captions
        self.image_ext = tuple(image_ext or ("jpg", "jpeg", "png", "webp"))
        self.text_ext = text_ext
        self.keep_aspect = False  # True: training decode (whole image, aspect kept; see load_image)
        self._sizes: Optional[list[int]] = None
        self.classnames = None

    @property
    def shard_sizes(self) -> list[int]:
        if self._sizes is None:
            self._sizes = [_count_shard(u) for u in self.urls]
        return self._sizes

    def __len__(self) -> int:
        return sum(self.shard_sizes)

    def _decode(self, sample: dict) -> dict:
        img = None
        for ext in self.image_ext:
            if ext in sample:
                img = load_image(sample[ext], self.image_size, self.keep_aspect)
                break
        label = _to_label(sample["cls"].decode("utf-8", "replace").strip()) if "cls" in sample else -1
        item = dict(image=img, label=label)
        if self.with_captions:
            raw = sample.get(self.text_ext)
            item["caption"] = _clean_caption(raw.decode("utf-8", "replace")) if raw is not None else None
        return item

    def iter_indexed(self, worker: int = 0, num_workers: int = 1, rank: int = 0,
                     world: int = 1) -> Iterator[tuple[int, dict]]:
        """(index, item) pairs of this worker's share of this process's share, in shard order.

        Processes split by sample (index % world == rank), so their shares differ by at most one
        sample whatever the shard sizes and they run out of data together; a process's DataLoader
        workers split by shard when there are enough shards, else by sample. Only the kept samples
        are decoded."""
        import webdataset as wds
        offsets = [0]
        for s in self.shard_sizes:
            offsets.append(offsets[-1] + s)
        by_shard = len(self.urls) >= num_workers
        for k, url in enumerate(self.urls):
            if by_shard and k % num_workers != worker:
                continue
            pipe = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=wds.warn_and_continue))
            for j, sample in enumerate(pipe):
                index = offsets[k] + j
                if index % world != rank or (not by_shard and index // world % num_workers != worker):
                    continue
                yield index, self._decode(sample)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, item in self.iter_indexed(w, nw):
            item["index"] = index
            yield item


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------

_FMNIST_NAMES = {"fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist"}


def is_fashion_mnist(data) -> bool:
    """Whether a --data value means the embedded Fashion-MNIST: nothing, its name, or its IDX directory."""
    return data is None or str(data).lower() in _FMNIST_NAMES or _is_fashion_mnist_dir(str(data))


def _detect_format(data: str) -> str:
    low = data.lower()
    if low in _FMNIST_NAMES:
        return "fashion-mnist"
    if "::" in data or "{" in data or (low.endswith((".tar", ".tar.gz")) and ("*" in data or "?" in data)):
        return "webdataset"
    if low.endswith(".parquet") and ("*" in data or "?" in data):
        return "hf"
    if not os.path.exists(data):
        raise UserError(f"--data {data} does not exist; give a dataset file or directory "
                        "(or nothing for the embedded Fashion-MNIST).")
    if os.path.isdir(data):
        if _is_fashion_mnist_dir(data):
            return "fashion-mnist"
        if any(os.path.exists(os.path.join(data, f)) for f in ("dataset_info.json", "state.json",
                                                                 "dataset_dict.json")):
            return "hf"
        if glob.glob(os.path.join(data, "*.tar")) or glob.glob(os.path.join(data, "*.tar.gz")):
            return "webdataset"
        if glob.glob(os.path.join(data, "*.parquet")):
            return "hf"
        return "dir"
    if low.endswith(".parquet"):
        return "hf"
    if low.endswith((".jsonl", ".json", ".jsonl.gz")):
        return "jsonl"
    if low.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
        return "csv"
    if low.endswith((".tar", ".tar.gz")):
        return "webdataset"
    raise UserError(f"--data {data}: unknown format; use .jsonl/.json, .csv/.tsv, .tar shards, .parquet, "
                    "a save_to_disk directory or a Fashion-MNIST directory.")


_CAPTION_OPTIONS = {"root", "image_column", "caption_column", "label_column", "sep", "separator", "split",
                    "cache_dir", "image_ext", "text_ext"}


def build_caption_dataset(data: Optional[str] = None, image_size: int = 32, keep_aspect: bool = False, **fmt):
    """An image-caption dataset of uint8 [3,S,S] images (S = image_size), format auto-detected from ``data``;
    with ``keep_aspect`` (training) the images are whole, [3,H,W] at ``train_decode_size``.

    ``None``/'fashion-mnist'/a directory with the IDX files: Fashion-MNIST train split with generated
    captions. ``.jsonl``/``.json``: DeCLIP meta. ``.csv``/``.tsv``. ``.tar`` shards (brace pattern, glob,
    directory, '::'-joined): webdataset (an IterableDataset, use ``TrainPairsIterable``). A directory saved
    with ``save_to_disk`` or ``.parquet``: Hugging Face datasets. Options (``fmt``): root, image_column,
    caption_column, label_column, sep, split, cache_dir, image_ext, text_ext.
    """
    unknown = set(fmt) - _CAPTION_OPTIONS
    if unknown:
        raise UserError(f"unknown data option(s) {', '.join(sorted(unknown))}; "
                        f"use {', '.join(sorted(_CAPTION_OPTIONS))}.")
    fmt = {k: v for k, v in fmt.items() if v is not None}
    if "separator" in fmt:  # alias of sep
        fmt.setdefault("sep", fmt.pop("separator"))
    kind = "fashion-mnist" if data is None else _detect_format(str(data))
    data = None if data is None else str(data)
    if kind == "fashion-mnist":
        root = None if data is None or data.lower() in _FMNIST_NAMES else data
        return FashionMNISTCaptions(root, fmt.get("split", "train"), image_size)
    if kind == "jsonl":
        ds = read_jsonl(data, image_size, fmt.get("root"), fmt.get("image_column"), fmt.get("caption_column"),
                        fmt.get("label_column"))
    elif kind == "csv":
        ds = read_csv(data, image_size, fmt.get("root"), fmt.get("image_column"), fmt.get("caption_column"),
                      fmt.get("label_column"), fmt.get("sep"))
    elif kind == "webdataset":
        ds = WebDatasetCaptions(data, image_size, fmt.get("image_ext"), fmt.get("text_ext", "txt"))
    elif kind == "hf":
        ds = read_hf(data, image_size, fmt.get("split"), fmt.get("image_column"), fmt.get("caption_column"),
                     fmt.get("label_column"), fmt.get("root"), fmt.get("cache_dir"))
    else:
        raise UserError(f"--data {data} is a directory without captions (no IDX files, no save_to_disk dataset, "
                        "no .tar or .parquet files); give a caption meta file or shards.")
    ds.keep_aspect = keep_aspect
    return ds



class ImageFolderClasses(torch.utils.data.Dataset):
    """``root/<class>/<image>`` folders (sorted class folders -> labels 0..K-1)."""

    def __init__(self, root: str, image_size: int = 32):
        self.root, self.image_size = root, image_size
        self.folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.folders:
            raise UserError(f"--data {root} has no class folders; use <dir>/<class>/<image> layout.")
        self.samples = []
        for label, d in enumerate(self.folders):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, d))):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTS):
                        self.samples.append((os.path.join(dirpath, f), label))
        if not self.samples:
            raise UserError(f"--data {root} holds no image files ({', '.join(IMAGE_EXTS)}) in its class folders.")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        path, label = self.samples[i]
        return dict(image=load_image(path, self.image_size), label=label)


def _read_classnames(classnames) -> Optional[list[str]]:
    if classnames is None:
        return None
    if isinstance(classnames, str):
        if not os.path.exists(classnames):
            raise UserError(f"--classnames {classnames} does not exist; give a file with one class name per line.")
        with open(classnames, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        if not names:
            raise UserError(f"--classnames {classnames} is empty; write one class name per line.")
        return names
    return [str(c) for c in classnames]


def build_class_dataset(data: Optional[str] = None, split: str = "test", image_size: int = 32,
                        classnames=None, root: Optional[str] = None):
    """(dataset, classnames) for zero-shot evaluation; items ``dict(image=uint8[3,S,S] or None, label=int)``.

    Fashion-MNIST ``split`` by default; an ImageFolder directory (``<dir>/<split>/`` is used when it
    exists; class names from ``classnames`` (a file, one per line, or a list), else ``<dir>/classnames.txt``,
    else the folder names with '_' -> ' '); a JSONL/CSV/HF dataset with a ``label`` column (names from
    ``classnames``, else from ``label_name`` fields / ClassLabel names), its image paths relative to
    ``root`` (--data-root) when given.
    """
    names = _read_classnames(classnames)
    kind = "fashion-mnist" if data is None else _detect_format(str(data))
    if root is not None and kind not in ("jsonl", "csv", "hf"):
        raise UserError(f"--data-root applies to a JSONL/CSV/HF meta file whose image paths are relative; "
                        f"--data {data or 'fashion-mnist'} is not one, so leave --data-root out.")
    if kind == "fashion-mnist":
        root = None if data is None or str(data).lower() in _FMNIST_NAMES else str(data)
        ds = FashionMNISTCaptions(root, split, image_size, with_captions=False)
        names = names or list(FASHION_MNIST_CLASSES)
    elif kind == "dir":
        root = os.path.join(data, split) if os.path.isdir(os.path.join(data, split)) else data
        ds = ImageFolderClasses(root, image_size)
        if names is None:
            for cand in (os.path.join(root, "classnames.txt"), os.path.join(data, "classnames.txt")):
                if os.path.exists(cand):
                    names = _read_classnames(cand)
                    break
        names = names or [d.replace("_", " ") for d in ds.folders]
        if len(names) != len(ds.folders):
            raise UserError(f"--classnames lists {len(names)} names but {root} has {len(ds.folders)} class "
                            "folders; give one name per folder in sorted folder order.")
    elif kind in ("jsonl", "csv", "hf"):
        if kind == "jsonl":
            ds = read_jsonl(data, image_size, root, with_captions=False)
        elif kind == "csv":
            ds = read_csv(data, image_size, root, with_captions=False)
        else:
            ds = read_hf(data, image_size, split=None, root=root, with_captions=False)
        labels = ds.labels if kind != "hf" else [_to_label(v) for v in ds.ds[ds.label_col]] if ds.label_col else []
        if not labels or min(labels) < 0:
            raise UserError(f"--data {data} needs an integer 'label' for every sample to be a class dataset.")
        if names is None:
            names = getattr(ds, "classnames", None)
        if names is None:
            found = {}
            for lab, nm in zip(labels, getattr(ds, "label_names", [None] * len(labels))):
                if nm and lab not in found:
                    found[lab] = str(nm)
            names = [found.get(k, f"class {k}") for k in range(max(labels) + 1)]
        if max(labels) >= len(names):
            raise UserError(f"--data {data} has label {max(labels)} but only {len(names)} class names; "
                            "give a complete --classnames file.")
    else:
        raise UserError(f"--data {data} cannot be a class dataset; use Fashion-MNIST, an image folder or "
                        "a JSONL/CSV/HF dataset with labels.")
    return ds, names


# --------------------------------------------------------------------------------------------------
# Training pairs, sampler, collate
# --------------------------------------------------------------------------------------------------

def sample_rng(seed: int, v: int) -> random.Random:
    """The per-sample Python RNG of virtual index ``v`` (seeded from a string: stable across processes)."""
    return random.Random(f"{seed}/{v}")


def _int_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def source_image(ds, i: int):
    """Item i of a class or caption dataset as stored, before any resize or crop: a PIL image (mode L for
    grey Fashion-MNIST and grey files, else RGB, as ``load_image`` converts), or None when unreadable.
    Fashion-MNIST: the 28-px IDX image; path formats: the file; HF: the row's image; others: the decoded
    item. What a targeted-poisoning plan copies, so that training decodes it as it decodes its own items."""
    from PIL import Image

    while isinstance(ds, torch.utils.data.Subset):
        ds, i = ds.dataset, ds.indices[i]
    i = int(i)
    src = None
    if isinstance(ds, FashionMNISTCaptions):
        return Image.fromarray(ds.images[i].numpy(), mode="L")
    if isinstance(ds, ImageFolderClasses):
        src = ds.samples[i][0]
    elif isinstance(ds, _PathCaptionDataset):
        src = os.path.join(ds.root, ds.paths[i]) if ds.paths[i] else None
    elif isinstance(ds, HFCaptionDataset):
        src = ds.ds[i][ds.image_col]
        if isinstance(src, dict):
            src = src.get("bytes") or (os.path.join(ds.root, src["path"]) if src.get("path") else None)
        elif isinstance(src, str):
            src = os.path.join(ds.root, src)
    else:
        img = (ds[i] or {}).get("image")
        if img is None:
            return None
        return Image.fromarray(img.permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    if src is None:
        return None
    try:
        img = src if isinstance(src, Image.Image) else Image.open(io.BytesIO(src) if isinstance(
            src, (bytes, bytearray, memoryview)) else src)
        img.load()
        return img if img.mode in ("L", "RGB") else img.convert("RGB")
    except Exception:  # an unreadable file is a bad sample, as in load_image
        return None


def decode_like(base, image) -> torch.Tensor:
    """PIL ``image`` decoded as ``base`` (a caption dataset, or a Subset of one) decodes its own items:
    Fashion-MNIST's padding / resize of a grey image, any other format's ``load_image`` at its load size
    and decode (``keep_aspect`` for training). uint8 [3, H, W]."""
    while isinstance(base, torch.utils.data.Subset):
        base = base.dataset
    if isinstance(base, FashionMNISTCaptions):
        grey = image.convert("L")
        w, h = grey.size
        return base.view(torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).view(h, w))
    img = load_image(image, base.image_size, getattr(base, "keep_aspect", False))
    if img is None:
        raise UserError("a targeted-poisoning image cannot be decoded; check the run's poison_target_*.png files")
    return img


class _PairMaker:
    """Shared logic of TrainPairs and TrainPairsIterable: base item + poison + EDA -> training item."""

    def __init__(self, seed: int, context_length: int, poison, eda, base=None):
        self.seed, self.context_length, self.poison = seed, context_length, poison
        # eda: the second caption view's function (text, rng) -> text; True = DeCLIP's EDA, False/None = none
        self.text_aug = TEXT_AUGS["declip"] if eda is True else (eda or None)
        self.base = base  # decodes a plan's own images (targeted poisoning) as it decodes its items

    def make(self, item: Optional[dict], i: int, v: int, n: int) -> Optional[dict]:
        """Training item of sample i at virtual index v = epoch * n + i."""
        if item is None or item.get("image") is None or not item.get("caption"):
            return None
        rng = sample_rng(self.seed, v)
        text, image = item["caption"], item["image"]
        poisoned = bool(self.poison is not None and self.poison.is_poisoned(i))
        if poisoned:
            text = self.poison.caption(i, text, rng)
            own = getattr(self.poison, "poisoned_image", None)  # targeted poisoning: the plan's image
            own = own(i) if own is not None else None
            if own is not None:
                image = decode_like(self.base, own)
        text_aug = self.text_aug(text, rng) if self.text_aug else text
        return dict(image=image, text=text, text_aug=text_aug, index=i, poisoned=poisoned, epoch=v // n)


class TrainPairs(torch.utils.data.Dataset):
    """Training view of a map-style caption dataset, indexed by virtual index v = epoch * N + i.

    Item v: base item i = v % N; rng = ``sample_rng(seed, v)`` (so EDA and poisoned captions depend on
    (seed, v) only, not on workers); poisoned captions from ``poison.caption(i, caption, rng)``, and for a
    plan with ``poisoned_image(i)`` (targeted poisoning) that image, decoded as the base decodes its items
    (``decode_like``); EDA on the (possibly poisoned) caption. Returns dict(image uint8[3,S,S], text,
    text_aug, index=i, poisoned) or None for a bad base sample (never replaced). Use with ``EpochSampler``;
    the training loop masks tokens for MLM batched with ``mask_tokens``. For webdataset (iterable) bases use ``TrainPairsIterable``.
    """

    def __init__(self, base, seed: int, context_length: int = 77, poison=None, eda: bool = True):
        if isinstance(base, torch.utils.data.IterableDataset):
            raise TypeError("TrainPairs needs a map-style dataset; use TrainPairsIterable for webdataset shards")
        self.base, self.seed, self.context_length = base, seed, context_length
        self.poison, self.eda = poison, eda
        self._maker = _PairMaker(seed, context_length, poison, eda, base)
        self.n = len(base)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, v: int) -> Optional[dict]:
        i = int(v) % self.n
        return self._maker.make(self.base[i], i, int(v), self.n)


class TrainPairsIterable(torch.utils.data.IterableDataset):
    """``TrainPairs`` for an iterable (webdataset) base: streams epochs start_epoch .. +num_epochs-1.

    Sample i of epoch e uses virtual index v = e * N + i (N = len(base)), so its EDA/poison randomness is
    the same as in ``TrainPairs``. Order: a shuffle buffer of ``shuffle_buffer`` items seeded from
    (seed, epoch, worker, rank); deterministic for a given number of DataLoader workers. With ``world``
    data-parallel processes, process ``rank`` streams only its share (see ``iter_indexed``), so no
    process decodes the others' samples.
    """

    def __init__(self, base, seed: int, context_length: int = 77, poison=None, eda: bool = True,
                 start_epoch: int = 0, num_epochs: int = 1, shuffle_buffer: int = 1000,
                 rank: int = 0, world: int = 1):
        self.base, self.seed, self.context_length = base, seed, context_length
        self.poison, self.eda = poison, eda
        self.start_epoch, self.num_epochs, self.shuffle_buffer = start_epoch, num_epochs, shuffle_buffer
        self.rank, self.world = rank, world
        self._maker = _PairMaker(seed, context_length, poison, eda, base)

    def __len__(self) -> int:
        """Items this process streams: its share of each epoch."""
        return len(range(self.rank, len(self.base), self.world)) * self.num_epochs

    def __iter__(self) -> Iterator[Optional[dict]]:
        n = len(self.base)
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for epoch in range(self.start_epoch, self.start_epoch + self.num_epochs):
            rng = random.Random(_int_seed(self.seed, "buffer", epoch, w, self.rank))
            buf: list = []
            for i, item in self.base.iter_indexed(w, nw, self.rank, self.world):
                buf.append((i, item))
                if len(buf) >= max(1, self.shuffle_buffer):
                    k = rng.randrange(len(buf))
                    buf[k], buf[-1] = buf[-1], buf[k]
                    i2, it2 = buf.pop()
                    yield self._maker.make(it2, i2, epoch * n + i2, n)
            rng.shuffle(buf)
            for i2, it2 in buf:
                yield self._maker.make(it2, i2, epoch * n + i2, n)


class EpochSampler(torch.utils.data.Sampler):
    """Virtual indices for ``num_epochs`` epochs starting at ``start_epoch``: epoch e yields
    e * n + perm_e[k] for k in range(n), perm_e a permutation of range(n) seeded from (seed, e).
    ``__len__`` = n * num_epochs."""

    def __init__(self, n: int, seed: int, start_epoch: int = 0, num_epochs: int = 1):
        self.n, self.seed, self.start_epoch, self.num_epochs = n, seed, start_epoch, num_epochs

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_int_seed(self.seed, "epoch", epoch))
        return torch.randperm(self.n, generator=g)

    def __len__(self) -> int:
        return self.n * self.num_epochs

    def __iter__(self) -> Iterator[int]:
        for epoch in range(self.start_epoch, self.start_epoch + self.num_epochs):
            perm = self.permutation(epoch)
            for chunk in perm.split(1 << 16):
                yield from (chunk + epoch * self.n).tolist()


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [3,h,w] of any sizes -> (canvas [B,3,H,W] with image k at its top-left, sizes LongTensor[B,2]
    of the true (h, w)). Images of one size are simply stacked. Each image's last column and row are
    repeated once into the padding, so a bilinear read at its far edges (roi_align) sees no zeros."""
    sizes = torch.tensor([tuple(im.shape[-2:]) for im in images], dtype=torch.long).view(-1, 2)
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(list(images)), sizes
    hh, ww = (int(v) for v in sizes.max(dim=0).values)
    canvas = torch.zeros(len(images), images[0].shape[0], hh, ww, dtype=images[0].dtype, device=images[0].device)
    for k, im in enumerate(images):
        h, w = im.shape[-2:]
        canvas[k, :, :h, :w] = im
        if w < ww:
            canvas[k, :, :h, w] = im[:, :, w - 1]
        if h < hh:
            canvas[k, :, h, :w + 1] = canvas[k, :, h - 1, :w + 1]
    return canvas, sizes


def collate_pairs(items: Sequence[Optional[dict]], context_length: int = 77) -> dict:
    """Batch training items: drop None (counted in ``n_bad``), pad the uint8 images into one canvas
    (``pad_images``), tokenize both texts.

    Returns dict(images uint8[B,3,H,W], sizes LongTensor[B,2] (each image's true h, w), tokens, tokens_aug
    LongTensor[B,L] (L: the longest caption rounded up to 8, ``trim_padding``), index LongTensor, epoch
    LongTensor (each item's pass over the data), poisoned BoolTensor, n_bad int, first_epoch int (the first
    item's pass)). A batch of only bad samples has
    B = 0 (images shape [0,3,0,0]).
    """
    good = [it for it in items if it is not None]
    n_bad = len(items) - len(good)
    if not good:
        return dict(images=torch.empty(0, 3, 0, 0, dtype=torch.uint8), sizes=torch.empty(0, 2, dtype=torch.long),
                    tokens=torch.empty(0, context_length, dtype=torch.long),
                    tokens_aug=torch.empty(0, context_length, dtype=torch.long),
                    index=torch.empty(0, dtype=torch.long), epoch=torch.empty(0, dtype=torch.long),
                    poisoned=torch.empty(0, dtype=torch.bool), n_bad=n_bad, first_epoch=0)
    images, sizes = pad_images([it["image"] for it in good])
    tokens, tokens_aug = trim_padding(tokenize([it["text"] for it in good], context_length),
                                      tokenize([it["text_aug"] for it in good], context_length))
    return dict(images=images, sizes=sizes, tokens=tokens, tokens_aug=tokens_aug,
                index=torch.tensor([it["index"] for it in good], dtype=torch.long),
                epoch=torch.tensor([it.get("epoch", 0) for it in good], dtype=torch.long),
                poisoned=torch.tensor([bool(it["poisoned"]) for it in good], dtype=torch.bool),
                n_bad=n_bad, first_epoch=int(good[0].get("epoch", 0)))  # a host int: no device read per step


# --------------------------------------------------------------------------------------------------
# Batched image views on the device
# --------------------------------------------------------------------------------------------------

_GRAY = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0:1] * _GRAY[0] + x[:, 1:2] * _GRAY[1] + x[:, 2:3] * _GRAY[2])


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] RGB in [0,1] -> HSV (hue in [0,1))."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    flat = delta == 0
    safe = torch.where(flat, torch.ones_like(delta), delta)
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0, 1.0)
    return torch.stack([h, s, maxc], dim=1)


def device_constant(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """A small constant on like's device and dtype. A plain torch.tensor(..., device=cuda) copies
    synchronously, which makes the host wait for every queued GPU kernel."""
    return torch.tensor(values, dtype=like.dtype).to(like.device, non_blocking=True)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel (x - mean) / std of float [B,3,H,W] images."""
    return (x - device_constant(tuple(mean), x).view(1, 3, 1, 1)) / device_constant(tuple(std), x).view(1, 3, 1, 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] HSV -> RGB, via c = v - v*s*clamp(min(k, 4-k), 0, 1) with k = (n + 6h) mod 6."""
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = device_constant([5.0, 3.0, 1.0], x).view(1, 3, 1, 1)
    k = torch.remainder(n + h * 6.0, 6.0)
    return v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (ratio * a + (1.0 - ratio) * b).clamp_(0.0, 1.0)


def _jitter_op(op: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """One ColorJitter op on x [n,3,H,W] with per-row factors f [n,1,1,1]."""
    if op == 0:  # brightness
        return (x * f).clamp_(0.0, 1.0)
    if op == 1:  # contrast: blend with the mean grey level
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)
    if op == 2:  # saturation: blend with the grey image
        return _blend(x, _gray(x), f)
    hsv = rgb_to_hsv(x)  # hue shift
    hsv = torch.cat([torch.remainder(hsv[:, :1] + f, 1.0), hsv[:, 1:]], dim=1)
    return hsv_to_rgb(hsv)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per row (reflect padding), as shifted weighted sums."""
    offs = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    w = torch.exp(-0.5 * (offs[None, :] / sigma[:, None]) ** 2)
    w = w / w.sum(dim=1, keepdim=True)  # [n, 2r+1]
    size = x.shape[-1]
    out = x
    for dim in (3, 2):
        pad = (radius, radius, 0, 0) if dim == 3 else (0, 0, radius, radius)
        p = F.pad(out, pad, mode="reflect")
        acc = torch.zeros_like(out)
        for k in range(2 * radius + 1):
            sl = p.narrow(dim, k, size if dim == 3 else out.shape[2])
            acc.add_(sl * w[:, k].view(-1, 1, 1, 1))
        out = acc
    return out


# RoCLIP's and SafeCLIP's image view (their utils/augment_image.py): RandomResizedCrop at its default scale,
# stronger jitter, Gaussian blur always; the GpuAugment arguments that give it
ROCLIP_VIEW = dict(scale=(0.08, 1.0), jitter=(0.5, 0.5, 0.5, 0.1), blur_p=1.0)


class GpuAugment:
    """Batched MoCo-v2 views (spec 4.3 scaled to ``image_size``) on the images' device.

    ``__call__(images_uint8[B,3,H,W], generator, trigger=None, poison_mask=None, sizes=None) -> float[B,3,s,s]``
    (``sizes`` [B,2]: each image's true (h, w) in a padded canvas, as collate_pairs makes; None: all H x W):
    RandomResizedCrop of each whole image (scale 0.2-1, ratio 3/4-4/3; bilinear, area-averaged when
    shrinking, via roi_align)
    -> trigger on rows where poison_mask is true (float [0,1] in and out) -> ColorJitter(0.4, 0.4, 0.4, 0.1)
    with p=0.8 (ops in a random order per image, as torchvision) -> grayscale p=0.2 -> Gaussian blur p=0.5
    (sigma U(0.1, 2.0) * s/224) -> hflip p=0.5 -> normalize(mean, std).
    ``mocov2=False`` keeps only the random resized crop, the trigger, the flip and normalize; ``scale``,
    ``jitter`` and ``blur_p`` change the crop scale, the jitter strengths and the blur probability.
    All random numbers are drawn from ``generator`` on its own device, then moved to the images' device:
    the same generator state gives the same views on CPU and GPU (up to float rounding).
    """

    def __init__(self, image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 mocov2: bool = True, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), jitter: tuple = (0.4, 0.4, 0.4, 0.1),
                 blur_p: float = 0.5):
        self.size, self.mocov2 = int(image_size), mocov2
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.scale, self.ratio = scale, ratio
        self.jitter, self.blur_p = tuple(jitter), blur_p
        self.sigma = (0.1 * self.size / 224, 2.0 * self.size / 224)
        self.blur_radius = max(1, math.ceil(3 * self.sigma[1]))

    def crop_boxes(self, b: int, height, width, generator: torch.Generator) -> torch.Tensor:
        """torchvision RandomResizedCrop.get_params for b images at once -> boxes [b,4] (x1, y1, x2, y2).

        ``height``/``width``: one image size (ints) or each image's own (tensors [b]). The draws are the
        same either way, so images of one size get the same boxes as before per-image sizes existed."""
        gdev = generator.device
        def per_image(v):  # a fill for one size: no host-to-device copy
            if torch.is_tensor(v):
                return v.to(gdev, torch.float64).expand(b)
            return torch.full((b,), float(v), dtype=torch.float64, device=gdev)

        hgt, wid = per_image(height), per_image(width)
        area = (hgt * wid)[:, None]
        u = torch.rand(b, 10, 2, generator=generator, device=gdev, dtype=torch.float64)
        target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[..., 0])
        lr = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(lr[0] + (lr[1] - lr[0]) * u[..., 1])
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        ok = (w > 0) & (w <= wid[:, None]) & (h > 0) & (h <= hgt[:, None])
        first = ok.int().argmax(dim=1)
        any_ok = ok.any(dim=1)
        w = w.gather(1, first[:, None])[:, 0]
        h = h.gather(1, first[:, None])[:, 0]
        # fallback: central crop with the ratio clamped to range
        in_ratio = wid / hgt
        narrow, wide = in_ratio < self.ratio[0], in_ratio > self.ratio[1]
        fw = torch.where(wide, torch.round(hgt * self.ratio[1]), wid)
        fh = torch.where(narrow, torch.round(wid / self.ratio[0]), hgt)
        w = torch.where(any_ok, w, fw)
        h = torch.where(any_ok, h, fh)
        pos = torch.rand(b, 2, generator=generator, device=gdev, dtype=torch.float64)
        top = torch.minimum(torch.floor(pos[:, 0] * (hgt - h + 1)), hgt - h)
        left = torch.minimum(torch.floor(pos[:, 1] * (wid - w + 1)), wid - w)
        top = torch.where(any_ok, top, torch.div(hgt - fh, 2, rounding_mode="floor"))
        left = torch.where(any_ok, left, torch.div(wid - fw, 2, rounding_mode="floor"))
        return torch.stack([left, top, left + w, top + h], dim=1)

    def crop(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Crop boxes [B,4] of float images and resize each to size x size (roi_align, aligned)."""
        from torchvision.ops import roi_align
        rois = torch.cat([torch.arange(x.shape[0], device=x.device, dtype=x.dtype)[:, None],
                          boxes.to(device=x.device, dtype=x.dtype, non_blocking=True)], dim=1)
        return roi_align(x, rois, (self.size, self.size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, generator: torch.Generator, trigger: Optional[Callable] = None,
                 poison_mask: Optional[torch.Tensor] = None, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, _, height, width = images.shape
        dev, gdev = images.device, generator.device
        if b == 0:  # e.g. a batch of only bad samples
            return torch.empty(0, 3, self.size, self.size, device=dev)
        if sizes is not None:  # a padded canvas (collate_pairs): each box drawn in its own image
            sizes = sizes.cpu() if gdev.type == "cpu" else sizes.to(gdev)
            height, width = sizes[:, 0], sizes[:, 1]
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        x = self.crop(x, self.crop_boxes(b, height, width, generator)).clamp_(0.0, 1.0)
        # Which rows get an operation is decided where the draws (and the poison mask) live: with a CPU
        # generator and mask, selecting them costs the GPU no synchronisation, only index copies.
        if trigger is not None and poison_mask is not None:
            rows = poison_mask.bool().nonzero()[:, 0]
            if rows.numel():
                rows = rows.to(dev, non_blocking=True)
                x[rows] = trigger(x[rows])

        def draw(*shape):
            return torch.rand(*shape, generator=generator, device=gdev)

        if self.mocov2:
            apply_j = draw(b) < 0.8
            order = torch.argsort(draw(b, 4), dim=1)  # random op order per image
            u = draw(b, 4)
            bri, con, sat, hue = self.jitter
            factors = torch.stack([1 - bri + 2 * bri * u[:, 0], 1 - con + 2 * con * u[:, 1],
                                   1 - sat + 2 * sat * u[:, 2], -hue + 2 * hue * u[:, 3]], dim=1)
            apply_g = draw(b) < 0.2
            apply_b = draw(b) < self.blur_p
            sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * draw(b)
            for pos in range(4):
                for op in range(4):
                    rows = (apply_j & (order[:, pos] == op)).nonzero()[:, 0]
                    if rows.numel():
                        f = factors[rows, op].to(dev, non_blocking=True).view(-1, 1, 1, 1)
                        rows = rows.to(dev, non_blocking=True)
                        x[rows] = _jitter_op(op, x[rows], f)
            x = torch.where(apply_g.to(dev, non_blocking=True).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
            rows = apply_b.nonzero()[:, 0]
            if rows.numel():
                s = sigma[rows].to(dev, non_blocking=True)
                rows = rows.to(dev, non_blocking=True)
                x[rows] = _gaussian_blur(x[rows], s, self.blur_radius)
        flip = draw(b).to(dev, non_blocking=True) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return normalize(x, self.mean, self.std)


@torch.no_grad()
def eval_transform(images: torch.Tensor, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, trigger: Optional[Callable] = None) -> torch.Tensor:
    """Evaluation view: resize the shorter side to image_size (bilinear, antialiased) -> center crop ->
    trigger (float [0,1]) -> normalize. uint8 or float [0,1] [B,3,H,W] in, float [B,3,s,s] out."""
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    h, w = x.shape[-2:]
    if min(h, w) != image_size:
        scale = image_size / min(h, w)
        nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        h, w = nh, nw
    top, left = (h - image_size) // 2, (w - image_size) // 2
    x = x[..., top:top + image_size, left:left + image_size].clamp(0.0, 1.0)
    if trigger is not None:
        x = trigger(x.contiguous())
    return normalize(x, mean, std)
