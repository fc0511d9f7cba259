"""Tests of data_declip.py: tokenizer, text views, datasets in every format, pairs/sampler/collate, views."""

import csv
import io
import json
import os
import random
import tarfile

import pytest
import torch
from PIL import Image

import data_declip as D

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS80 = "/work/shared/reference/imagenet_prompts80.txt"


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0)]


def png_bytes(color, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_images(tmp_path, n=4):
    """n solid-colour PNGs img{k}.png plus a corrupt file bad.png; returns the file names."""
    names = []
    for k in range(n):
        name = f"img{k}.png"
        (tmp_path / name).write_bytes(png_bytes(COLORS[k % len(COLORS)]))
        names.append(name)
    (tmp_path / "bad.png").write_bytes(b"this is not an image")
    return names


def assert_color(img, color, size):
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, size, size)
    assert img.float().mean(dim=(1, 2)).tolist() == pytest.approx([float(c) for c in color], abs=1.0)


class StubPoison:
    """Poisons even indices; the caption becomes a fixed target sentence plus an rng draw."""

    def is_poisoned(self, i):
        return i % 2 == 0

    def caption(self, i, caption, rng):
        return f"a photo of a tiger cat number {rng.randrange(1000)}"


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------

def varied_captions(n=300):
    rng = random.Random(0)
    words = ("a the photo of dog cat on white background running jumping red blue nice small big "
             "tiger car skyscraper isn't don't we'll you're it's night city 2019 42 3.14 $100 #tbt @user "
             "café naïve résumé über straße 東京 日本語 😀 👍🏽 &amp; &lt;b&gt; &#39; &quot;hi&quot; "
             "e-mail t-shirt rock'n'roll ??? !!! ... --- (wow) [x] {y} <z> 1st 2nd 10,000 50% a/b "
             "HELLO MiXeD ÉCOLE ﬁne ＡＢＣ ½ x² Ⅻ").split()
    caps = []
    for k in range(n):
        m = rng.randint(1, 12) if k % 10 else rng.randint(60, 120)  # every 10th caption is too long
        sep = rng.choice([" ", "  ", "\t", " \n "])
        caps.append(sep.join(rng.choice(words) for _ in range(m)))
    caps += ["", "   ", "A Photo Of A Dog.", "&amp;amp;", "don't stop", "a" * 200, "x" * 1000,
             "mañana\u00a0tarde", "zero\u200bwidth", "multiple     spaces\n\nand\r\nlines"]
    return caps


def test_tokenize_ids_equal_open_clip_for_varied_captions():
    from open_clip.tokenizer import SimpleTokenizer
    ref = SimpleTokenizer()
    caps = varied_captions()
    ours = D.tokenize(caps, context_length=77)
    theirs = ref(caps, context_length=77)
    expected = theirs.clone()
    expected[theirs == 49406] = D.SOT_ID  # OpenAI SOT -> DeCLIP SOT
    expected[theirs == 49407] = D.EOT_ID  # OpenAI EOT -> DeCLIP EOT
    assert ours.shape == (len(caps), 77) and ours.dtype == torch.long
    mismatch = [caps[r] for r in range(len(caps)) if not torch.equal(ours[r], expected[r])]
    assert mismatch == []
    assert int((theirs[:, -1] == 49407).sum()) >= 30  # the long captions really were truncated
    assert int(ours.max()) == D.EOT_ID and int((ours == D.MASK_ID).sum()) == 0


def test_tokenize_ascii_fast_path_equals_ftfy_cleaning():
    from open_clip.tokenizer import _clean_lower
    rng = random.Random(1)
    alphabet = [chr(c) for c in range(0x20, 0x7f) if c != 0x26] + ["\t", "\n", "\r"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(500)]
    assert [D._clean(t) for t in texts] == [_clean_lower(t) for t in texts]


def test_tokenize_truncation_keeps_sot_first_ids_and_eot():
    cap = "one two three four five six seven eight nine ten eleven twelve"
    ids = D.encode(cap)
    assert len(ids) == 12
    row = D.tokenize(cap, context_length=8)[0].tolist()
    assert row == [D.SOT_ID] + ids[:6] + [D.EOT_ID]
    short = D.tokenize(["hi there"], context_length=8)[0].tolist()
    assert len(D.encode("hi there")) == 2
    assert short == [D.SOT_ID] + D.encode("hi there") + [D.EOT_ID] + [0] * 4


def test_tokenize_special_ids_and_vocab_layout():
    assert (D.VOCAB_SIZE, D.MASK_ID, D.SOT_ID, D.EOT_ID, D.PAD_ID) == (49409, 49406, 49407, 49408, 0)
    bpe = D._bpe()
    assert len(bpe.encoder) == 49406  # 256 bytes + 256 bytes</w> + 48894 merges
    assert bpe.encoder["!"] == 0 and bpe.encoder["!</w>"] == 256
    assert D.decode(D.tokenize("A Photo of a  dog!")[0]) == "a photo of a dog !"


def test_trim_padding_cuts_to_the_longest_caption_and_changes_no_text_feature():
    import modeling_declip as md
    caps = ["a bag", "an everyday t-shirt laid flat, seen from above", "x"]  # the longest: 13 tokens
    full = D.tokenize(caps, 32)
    t, = D.trim_padding(full)
    assert t.shape == (3, 16) and torch.equal(t, full[:, :16])
    assert torch.equal(D.tokenize(caps, 32, trim=True), t)  # what evaluation and BadCLIP's patch feed the tower
    long = D.tokenize(["one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                       "fifteen sixteen seventeen"] * 3, 32)  # 19 tokens: both views cut to 24
    a, b = D.trim_padding(full, long)
    assert a.shape == b.shape == (3, 24) and torch.equal(b, long[:, :24])
    assert D.trim_padding(D.tokenize(caps, 14))[0].shape == (3, 14)  # never beyond the context
    assert D.trim_padding(torch.zeros(0, 32, dtype=torch.long))[0].shape == (0, 8)
    # the causal text tower gives the same caption features and word states either way
    torch.manual_seed(0)
    model = md.build_model("tiny").eval()
    with torch.no_grad():
        e_full, w_full = model.text(full, return_words=True)
        e_cut, w_cut = model.text(t, return_words=True)
    assert torch.allclose(e_cut, e_full, atol=1e-5)
    assert torch.allclose(w_cut, w_full[:, :16], atol=1e-5)


def test_mask_tokens_selects_15_percent_of_eligible_with_80_10_10_split():
    rng = random.Random(0)
    words = "a photo of the red dress cat dog on white background big small".split()
    caps = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(2000)]
    tokens = D.tokenize(caps)
    g = torch.Generator().manual_seed(0)
    masked, labels = D.mask_tokens(tokens, g, prob=0.15)
    eot_pos = (tokens == D.EOT_ID).int().argmax(dim=1)
    pos = torch.arange(tokens.shape[1])[None]
    eligible = (pos > 0) & (pos < eot_pos[:, None])
    sel = labels != -100
    assert not (sel & ~eligible).any()  # never pad, SOT or EOT
    frac = sel.sum().item() / eligible.sum().item()
    assert 0.14 < frac < 0.16
    assert torch.equal(labels[sel], tokens[sel])
    assert torch.equal(masked[~sel], tokens[~sel])  # unselected untouched (SOT/EOT/pad included)
    n = sel.sum().item()
    to_mask = (masked[sel] == D.MASK_ID).sum().item() / n
    kept = (masked[sel] == tokens[sel]).sum().item() / n
    assert 0.77 < to_mask < 0.83 and 0.08 < kept < 0.12
    rand = masked[sel & (masked != D.MASK_ID) & (masked != tokens)]
    assert 0.08 < rand.numel() / n < 0.12
    assert int(rand.max()) < D.MASK_ID  # random replacement never a special id
    assert (masked == D.SOT_ID).sum() == tokens.shape[0] and (masked == D.EOT_ID).sum() == tokens.shape[0]


def test_mask_tokens_is_deterministic_and_handles_empty_selection_and_id_zero():
    tokens = torch.tensor([[D.SOT_ID, 0, 5, D.EOT_ID, 0, 0], [D.SOT_ID, 7, D.EOT_ID, 0, 0, 0]])
    m1, l1 = D.mask_tokens(tokens, torch.Generator().manual_seed(3), prob=1.0)
    m2, l2 = D.mask_tokens(tokens, torch.Generator().manual_seed(3), prob=1.0)
    assert torch.equal(m1, m2) and torch.equal(l1, l2)
    # id 0 inside the caption ("!" byte) is a real token; the zeros after EOT are padding
    assert l1.tolist() == [[-100, 0, 5, -100, -100, -100], [-100, 7, -100, -100, -100, -100]]
    m0, l0 = D.mask_tokens(tokens, torch.Generator().manual_seed(3), prob=0.0)
    assert torch.equal(m0, tokens) and bool((l0 == -100).all())


# ------------------------------------------------------------------------------------------------
# EDA
# ------------------------------------------------------------------------------------------------

def test_eda_is_deterministic_given_the_rng():
    cap = "a stylish red dress on a white background"
    outs = [D.eda(cap, random.Random(s)) for s in range(30)]
    assert outs == [D.eda(cap, random.Random(s)) for s in range(30)]
    assert len(set(outs)) > 5


def test_eda_random_swap_swaps_exactly_two_words():
    words = "one two three four five".split()
    out = D.eda_random_swap(words, random.Random(0))
    diff = [k for k in range(5) if out[k] != words[k]]
    assert sorted(out) == sorted(words) and len(diff) == 2
    assert out[diff[0]] == words[diff[1]] and out[diff[1]] == words[diff[0]]
    assert D.eda_random_swap(["single"], random.Random(0)) == ["single"]


def test_eda_random_deletion_keeps_order_and_never_empties():
    words = [f"w{k}" for k in range(200)]
    out = D.eda_random_deletion(words, random.Random(0), p=0.1)
    assert out == [w for w in words if w in set(out)]  # a subsequence
    assert 160 < len(out) < 195
    everything = D.eda_random_deletion(["a", "b", "c"], random.Random(0), p=1.0)
    assert len(everything) == 1 and everything[0] in "abc"
    assert D.eda_random_deletion(["alone"], random.Random(0), p=1.0) == ["alone"]


@pytest.mark.skipif(D._wordnet() is None, reason="WordNet (wordnet-base) not installed")
def test_eda_synonym_replacement_uses_wordnet_for_every_occurrence():
    assert "frock" in D.wordnet_synonyms("dress")
    assert "frock" in D.wordnet_synonyms("dresses")  # morphy: plural -> base form
    words = "the dress and the dress.".split()
    out = D.eda_synonym_replacement(words, random.Random(0))
    assert out[0] == "the" and out[2] == "and" and out[3] == "the"  # stop words untouched
    assert out[1] in D.wordnet_synonyms("dress") and out[4] == out[1] + "."  # both, punctuation kept
    assert D.eda_synonym_replacement("the of and".split(), random.Random(0)) == ["the", "of", "and"]


def test_eda_chooses_each_op_and_falls_back_to_swap_without_wordnet(monkeypatch):
    cap = "zqx wvy kjh plm"  # no synonyms: synonym replacement leaves it unchanged
    counts = {"same": 0, "swap": 0, "del": 0}
    for s in range(600):
        out = D.eda(cap, random.Random(s)).split()
        kind = "same" if out == cap.split() else ("swap" if len(out) == 4 else "del")
        counts[kind] += 1
    # synonym (unchanged) ~1/3 plus deletions that drop nothing (0.9^4 of 1/3); swaps ~1/3
    assert 160 < counts["swap"] < 240 and counts["del"] > 50
    monkeypatch.setattr(D, "_wordnet", lambda: None)
    swapped = sum(len(D.eda(cap, random.Random(s)).split()) == 4 and D.eda(cap, random.Random(s)) != cap
                  for s in range(600))
    assert swapped > 340  # synonym choice becomes a swap: ~2/3 swaps


# ------------------------------------------------------------------------------------------------
# image decoding and caption datasets in every format
# ------------------------------------------------------------------------------------------------

def test_load_image_resizes_shorter_side_and_center_crops(tmp_path):
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (32, 0, 64, 32))  # left half red, right half blue
    out = D.load_image(img, 16)
    assert tuple(out.shape) == (3, 16, 16) and out.dtype == torch.uint8
    assert out[:, :, :7].float().mean(dim=(1, 2)).tolist() == pytest.approx([255, 0, 0], abs=2)
    assert out[:, :, 9:].float().mean(dim=(1, 2)).tolist() == pytest.approx([0, 0, 255], abs=2)
    assert D.load_image(b"garbage", 16) is None
    assert D.load_image(str(tmp_path / "missing.png"), 16) is None


def test_jsonl_meta_reads_images_captions_labels_and_marks_bad_samples(tmp_path):
    names = write_images(tmp_path)
    rows = [dict(filename=names[0], caption="a red square", label=3, label_name="red"),
            dict(filename=names[1], caption=["a green square", "second caption ignored"]),
            dict(filename="bad.png", caption="corrupt image"),
            dict(filename=names[2], caption="   "),
            dict(filename="sub/missing.png", caption="missing file")]
    meta = tmp_path / "meta.jsonl"
    meta.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = D.build_caption_dataset(str(meta), image_size=16)
    assert len(ds) == 5
    assert_color(ds[0]["image"], COLORS[0], 16)
    assert (ds[0]["caption"], ds[0]["label"]) == ("a red square", 3)
    assert (ds[1]["caption"], ds[1]["label"]) == ("a green square", -1)
    assert ds[2]["image"] is None and ds[2]["caption"] == "corrupt image"
    assert ds[3]["image"] is not None and ds[3]["caption"] is None
    assert ds[4]["image"] is None
    # a separate image root
    other = tmp_path / "meta_dir"
    other.mkdir()
    (other / "m.jsonl").write_text(json.dumps(dict(filename=names[3], caption="yellow")) + "\n")
    ds2 = D.build_caption_dataset(str(other / "m.jsonl"), image_size=8, root=str(tmp_path))
    assert_color(ds2[0]["image"], COLORS[3], 8)


@pytest.mark.parametrize("ext,sep", [("csv", ","), ("tsv", "\t")])
def test_csv_and_tsv_read_configurable_columns(tmp_path, ext, sep):
    names = write_images(tmp_path)
    path = tmp_path / f"data.{ext}"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(["filepath", "title"])
        w.writerow([names[0], "red, with a comma"])
        w.writerow([names[2], "blue"])
        w.writerow(["bad.png", "broken"])
    ds = D.build_caption_dataset(str(path), image_size=12)
    assert len(ds) == 3
    assert_color(ds[0]["image"], COLORS[0], 12)
    assert ds[0]["caption"] == "red, with a comma" and ds[1]["caption"] == "blue"
    assert ds[2]["image"] is None
    custom = tmp_path / f"custom.{ext}"
    with open(custom, "w", newline="") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(["pic", "words"])
        w.writerow([names[1], "green"])
    ds = D.build_caption_dataset(str(custom), image_size=12, image_column="pic", caption_column="words")
    assert_color(ds[0]["image"], COLORS[1], 12)
    assert ds[0]["caption"] == "green"
    semi = tmp_path / "semi.txt.csv"
    semi.write_text(f"filepath;title\n{names[3]};yellow; really\n")
    ds = D.build_caption_dataset(str(semi), image_size=12, separator=";")
    assert ds[0]["caption"] == "yellow"
    assert_color(ds[0]["image"], COLORS[3], 12)


def write_shard(path, items):
    """items: list of (key, {ext: bytes})"""
    with tarfile.open(path, "w") as tf:
        for key, files in items:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def make_shards(tmp_path):
    write_shard(tmp_path / "shard-000.tar", [
        ("s0", {"png": png_bytes(COLORS[0]), "txt": b"red"}),
        ("s1", {"png": png_bytes(COLORS[1]), "txt": b"green"}),
        ("s2", {"png": b"corrupt", "txt": b"broken image"})])
    write_shard(tmp_path / "shard-001.tar", [
        ("s3", {"jpg": png_bytes(COLORS[2]), "txt": b"blue", "cls": b"2"}),  # ext lies, PIL still reads it
        ("s4", {"png": png_bytes(COLORS[3]), "txt": b""}),
        ("s5", {"png": png_bytes(COLORS[0]), "txt": "rouge caf\u00e9".encode()})])
    return str(tmp_path / "shard-{000..001}.tar")


def test_webdataset_shards_stream_items_with_stable_indices(tmp_path):
    spec = make_shards(tmp_path)
    ds = D.build_caption_dataset(spec, image_size=8)
    assert isinstance(ds, torch.utils.data.IterableDataset)
    assert len(ds) == 6 and ds.shard_sizes == [3, 3]
    items = list(ds)
    assert [it["index"] for it in items] == list(range(6))
    assert [it["caption"] for it in items] == ["red", "green", "broken image", "blue", None, "rouge caf\u00e9"]
    assert_color(items[0]["image"], COLORS[0], 8)
    assert_color(items[3]["image"], COLORS[2], 8)
    assert items[3]["label"] == 2
    assert items[2]["image"] is None
    # worker split: disjoint shares covering everything, same indices whatever the worker count
    for nw in (2, 4):
        got = sorted(i for w in range(nw) for i, _ in ds.iter_indexed(w, nw))
        assert got == list(range(6))
    # process split (by sample, so shares stay balanced), then each process's workers
    for world, nw in ((2, 1), (2, 2), (4, 3)):
        shares = [[i for w in range(nw) for i, _ in ds.iter_indexed(w, nw, r, world)] for r in range(world)]
        assert sorted(sum(shares, [])) == list(range(6))
        assert [sorted(sh) for sh in shares] == [list(range(r, 6, world)) for r in range(world)]
    # a directory of shards is detected too
    assert len(D.build_caption_dataset(str(tmp_path), image_size=8)) == 6


def test_train_pairs_iterable_streams_every_sample_once_per_epoch(tmp_path):
    ds = D.build_caption_dataset(make_shards(tmp_path), image_size=8)
    tp = D.TrainPairsIterable(ds, seed=0, poison=StubPoison(), num_epochs=2, shuffle_buffer=4)
    out = list(tp)
    assert len(out) == 12 and len(tp) == 12
    good = [o for o in out if o is not None]
    assert len(good) == 8  # 2 bad samples x 2 epochs
    assert sorted(o["index"] for o in good) == sorted([0, 1, 3, 5] * 2)
    assert all(o["poisoned"] == (o["index"] % 2 == 0) for o in good)
    assert [o and o["index"] for o in out] == [o and o["index"] for o in tp]  # deterministic
    batch = D.collate_pairs(out[:6], 16)
    assert batch["n_bad"] == sum(o is None for o in out[:6])
    # a data-parallel process streams its share of each epoch (indices 1, 3, 5; none is bad)
    tp1 = D.TrainPairsIterable(ds, seed=0, poison=StubPoison(), num_epochs=2, shuffle_buffer=4, rank=1, world=2)
    out1 = list(tp1)
    assert len(out1) == len(tp1) == 6 and sorted(o["index"] for o in out1) == [1, 1, 3, 3, 5, 5]


def test_hf_dataset_saved_to_disk_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    names = write_images(tmp_path)
    data = {"image": [str(tmp_path / n) for n in names[:3]], "caption": ["red", "green", ""],
            "label": [0, 1, 2]}
    hf = datasets.Dataset.from_dict(data).cast_column("image", datasets.Image())
    hf.save_to_disk(str(tmp_path / "hfdisk"))
    ds = D.build_caption_dataset(str(tmp_path / "hfdisk"), image_size=8)
    assert len(ds) == 3
    assert_color(ds[1]["image"], COLORS[1], 8)
    assert (ds[1]["caption"], ds[1]["label"]) == ("green", 1) and ds[2]["caption"] is None
    # parquet with raw bytes (one corrupt) and custom column names
    pq = datasets.Dataset.from_dict({"jpg_bytes": [png_bytes(COLORS[2]), b"corrupt"], "text": ["blue", "x"]})
    pq.to_parquet(str(tmp_path / "d.parquet"))
    ds = D.build_caption_dataset(str(tmp_path / "d.parquet"), image_size=8, image_column="jpg_bytes",
                                 cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 2 and ds[0]["caption"] == "blue"
    assert_color(ds[0]["image"], COLORS[2], 8)
    assert ds[1]["image"] is None


def test_missing_paths_columns_and_unknown_formats_raise_user_error(tmp_path):
    with pytest.raises(D.UserError, match="does not exist"):
        D.build_caption_dataset(str(tmp_path / "nope.jsonl"))
    path = tmp_path / "cols.csv"
    path.write_text("a,b\nx.png,y\n")
    with pytest.raises(D.UserError, match="image column"):
        D.build_caption_dataset(str(path))
    path.write_text("filepath,b\nx.png,y\n")
    with pytest.raises(D.UserError, match="caption column"):
        D.build_caption_dataset(str(path))
    with pytest.raises(D.UserError, match="'words'"):
        D.build_caption_dataset(str(path), caption_column="words")
    (tmp_path / "x.xyz").write_text("?")
    with pytest.raises(D.UserError, match="unknown format"):
        D.build_caption_dataset(str(tmp_path / "x.xyz"))
    with pytest.raises(D.UserError, match="shard"):
        D.build_caption_dataset(str(tmp_path / "s-{000..003}.tar"))
    with pytest.raises(D.UserError, match="unknown data option"):
        D.build_caption_dataset(None, colour="red")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(D.UserError, match="JSON"):
        D.build_caption_dataset(str(tmp_path / "bad.jsonl"))
    for err in (D.UserError("x"),):
        assert isinstance(err, Exception) and not isinstance(err, SystemExit)


# ------------------------------------------------------------------------------------------------
# training pairs, sampler, collate
# ------------------------------------------------------------------------------------------------

def test_train_pairs_randomness_depends_only_on_seed_and_virtual_index(tmp_path):
    names = write_images(tmp_path)
    rows = [dict(filename=names[k % 4], caption=f"a nice red dress number {k}") for k in range(6)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    base = D.build_caption_dataset(str(tmp_path / "m.jsonl"), image_size=8)
    tp = D.TrainPairs(base, seed=7, poison=StubPoison())
    forward = [tp[v]["text_aug"] for v in range(18)]
    backward = [tp[v]["text_aug"] for v in reversed(range(18))][::-1]
    assert forward == backward
    item = tp[13]  # epoch 2, i = 1
    assert item["index"] == 1 and item["epoch"] == 2 and not item["poisoned"] and item["text"] == "a nice red dress number 1"
    p = tp[6 + 2]
    assert p["index"] == 2 and p["poisoned"] and p["text"].startswith("a photo of a tiger cat number")
    assert D.TrainPairs(base, seed=8)[13]["text_aug"] != item["text_aug"] or \
        D.TrainPairs(base, seed=9)[13]["text_aug"] != item["text_aug"]
    plain = D.TrainPairs(base, seed=7, eda=False)[3]
    assert plain["text_aug"] == plain["text"] and plain["poisoned"] is False


def test_train_pairs_batches_are_identical_with_0_or_2_workers(tmp_path):
    names = write_images(tmp_path)
    rows = [dict(filename=names[k % 4], caption=f"a plain red dress in a shop window {k}") for k in range(10)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tp = D.TrainPairs(D.build_caption_dataset(str(tmp_path / "m.jsonl"), image_size=8), seed=1)

    def batches(workers):
        loader = torch.utils.data.DataLoader(tp, batch_size=4, num_workers=workers, collate_fn=D.collate_pairs,
                                             sampler=D.EpochSampler(len(tp), seed=1, num_epochs=2))
        return [(b["index"], b["tokens_aug"], b["images"], b["epoch"]) for b in loader]

    zero, two = batches(0), batches(2)
    assert len(zero) == 5 and [b[3].tolist() for b in zero[:3]] == [[0] * 4, [0] * 4, [0, 0, 1, 1]]
    assert all(torch.equal(x, y) for a, b in zip(zero, two) for x, y in zip(a, b))


def test_collate_counts_bad_samples_and_never_replaces_them(tmp_path):
    names = write_images(tmp_path)
    rows = [dict(filename=names[0], caption="red one"), dict(filename="bad.png", caption="corrupt"),
            dict(filename=names[1], caption=""), dict(filename=names[2], caption="blue one")]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    base = D.build_caption_dataset(str(tmp_path / "m.jsonl"), image_size=8)
    tp = D.TrainPairs(base, seed=0, poison=StubPoison())
    items = [tp[v] for v in range(4)]
    assert items[1] is None and items[2] is None
    batch = D.collate_pairs(items, context_length=32)
    assert batch["n_bad"] == 2
    assert batch["index"].tolist() == [0, 3] and batch["poisoned"].tolist() == [True, False]
    assert tuple(batch["images"].shape) == (2, 3, 8, 8) and batch["images"].dtype == torch.uint8
    # padding cut to the longest caption (the poisoned one's 10 tokens) rounded up to 8, both views alike
    assert tuple(batch["tokens"].shape) == (2, 16) and tuple(batch["tokens_aug"].shape) == (2, 16)
    assert torch.equal(batch["tokens"][1], D.tokenize("blue one", 32)[0, :16])
    assert_color(batch["images"][1], COLORS[2], 8)
    empty = D.collate_pairs([None, None], context_length=16)
    assert empty["n_bad"] == 2 and empty["tokens"].shape == (0, 16)
    views = D.GpuAugment(8)(empty["images"], torch.Generator().manual_seed(0))
    assert views.shape == (0, 3, 8, 8)


def test_epoch_sampler_permutations_are_seeded_and_differ_per_epoch():
    s = D.EpochSampler(50, seed=3, num_epochs=3)
    v = list(s)
    assert len(s) == 150 and len(v) == 150
    for e in range(3):
        assert sorted(v[e * 50:(e + 1) * 50]) == list(range(e * 50, (e + 1) * 50))
    assert v == list(D.EpochSampler(50, seed=3, num_epochs=3))
    assert v != list(D.EpochSampler(50, seed=4, num_epochs=3))
    assert [x % 50 for x in v[:50]] != [x % 50 for x in v[50:100]]
    assert list(D.EpochSampler(50, seed=3, start_epoch=1, num_epochs=2)) == v[50:]


def test_train_pairs_loader_yields_full_batches_of_fashion_mnist():
    if not D._is_fashion_mnist_dir(D.fashion_mnist_dir()):
        pytest.skip("Fashion-MNIST not installed")
    tp = D.TrainPairs(D.build_caption_dataset(), seed=0)
    loader = torch.utils.data.DataLoader(tp, batch_size=256, sampler=D.EpochSampler(len(tp), 0),
                                         collate_fn=lambda b: D.collate_pairs(b, 77))
    it = iter(loader)
    next(it)
    batches = [next(it) for _ in range(4)]
    assert sum(b["images"].shape[0] for b in batches) == 1024
    assert all(b["images"].dtype == torch.uint8 and b["n_bad"] == 0 for b in batches)


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST and class datasets
# ------------------------------------------------------------------------------------------------

needs_fmnist = pytest.mark.skipif(not D._is_fashion_mnist_dir(D.fashion_mnist_dir()),
                                  reason="Fashion-MNIST IDX files not installed")


@needs_fmnist
def test_fashion_mnist_loads_60000_train_10000_test_with_10_classes():
    train = D.build_caption_dataset()
    test, names = D.build_class_dataset()
    assert len(train) == 60000 and len(test) == 10000 and names == D.FASHION_MNIST_CLASSES
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    item = train[0]
    assert item["image"].dtype == torch.uint8 and tuple(item["image"].shape) == (3, 32, 32)
    img = item["image"]
    assert int(img[:, :2].max()) == 0 and int(img[:, :, -2:].max()) == 0  # 2-pixel zero border
    assert torch.equal(img[0, 2:30, 2:30], train.images[0]) and torch.equal(img[0], img[2])
    assert D.FASHION_MNIST_CLASSES[item["label"]] in item["caption"]
    big = D.build_caption_dataset("fashion-mnist", image_size=64)
    assert tuple(big[0]["image"].shape) == (3, 64, 64)
    assert test[5]["label"] == int(test.labels[5]) and "caption" not in test[5]


@needs_fmnist
def test_fashion_mnist_captions_are_varied_and_not_the_80_eval_prompts():
    prompts = set()
    if os.path.exists(PROMPTS80):
        prompts = {line.strip() for line in open(PROMPTS80) if line.strip()}
    for t in D.CAPTION_TEMPLATES:
        assert t not in prompts and t + "." not in prompts
    train = D.build_caption_dataset()
    caps = [train[i]["caption"] for i in range(600)]
    assert len(set(caps)) > 150
    for i, c in enumerate(caps):
        assert D.FASHION_MNIST_CLASSES[int(train.labels[i])] in c
        assert not any(c == p.format(D.FASHION_MNIST_CLASSES[int(train.labels[i])]) for p in prompts)
    assert "an ankle boot" in D.class_caption("ankle boot", 27) or " a ankle" not in " ".join(
        D.class_caption("ankle boot", k) for k in range(200))


def test_fashion_mnist_reads_any_directory_with_the_idx_files(tmp_path, monkeypatch):
    import gzip
    import struct
    imgs = torch.arange(5 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).view(5, 28, 28)
    for split, n in (("train", 5), ("t10k", 3)):
        with gzip.open(tmp_path / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + imgs[:n].numpy().tobytes())
        with gzip.open(tmp_path / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + bytes(range(n)))
    ds = D.build_caption_dataset(str(tmp_path))
    assert len(ds) == 5 and ds[4]["label"] == 4 and "coat" in ds[4]["caption"]
    assert torch.equal(ds[1]["image"][1, 2:30, 2:30], imgs[1])
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    test, _ = D.build_class_dataset(None)
    assert len(test) == 3


def test_class_dataset_from_image_folder_and_jsonl(tmp_path):
    for k, cls in enumerate(["red_thing", "green_thing"]):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for j in range(2):
            (tmp_path / "folder" / cls / f"{j}.png").write_bytes(png_bytes(COLORS[k]))
    ds, names = D.build_class_dataset(str(tmp_path / "folder"), image_size=8)
    assert names == ["green thing", "red thing"] and len(ds) == 4  # sorted folder names
    assert [ds[i]["label"] for i in range(4)] == [0, 0, 1, 1]
    assert_color(ds[0]["image"], COLORS[1], 8)
    assert_color(ds[2]["image"], COLORS[0], 8)
    (tmp_path / "names.txt").write_text("lime\ncrimson\n")
    _, names = D.build_class_dataset(str(tmp_path / "folder"), classnames=str(tmp_path / "names.txt"))
    assert names == ["lime", "crimson"]
    write_images(tmp_path)
    rows = [dict(filename="img0.png", caption="c", label=0, label_name="red"),
            dict(filename="img2.png", caption="c", label=2, label_name="blue"),
            dict(filename="bad.png", caption="c", label=1)]
    (tmp_path / "cls.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds, names = D.build_class_dataset(str(tmp_path / "cls.jsonl"), image_size=8)
    assert names == ["red", "class 1", "blue"] and ds[1]["label"] == 2
    assert ds[2]["image"] is None  # unreadable: the evaluation's collate drops it
    import eval_zeroshot as ez

    assert ez._collate_class([(i, ds[i]) for i in range(3)])["labels"].tolist() == [0, 2]


# ------------------------------------------------------------------------------------------------
# batched image views
# ------------------------------------------------------------------------------------------------

def random_images(b=16, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8)


def test_gpu_augment_shapes_normalisation_and_determinism():
    x = random_images()
    aug = D.GpuAugment(24, D.CLIP_MEAN, D.CLIP_STD)
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert a.shape == (16, 3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.allclose(a, c)
    lo = (0 - torch.tensor(D.CLIP_MEAN)) / torch.tensor(D.CLIP_STD)
    hi = (1 - torch.tensor(D.CLIP_MEAN)) / torch.tensor(D.CLIP_STD)
    per_c = a.transpose(0, 1).reshape(3, -1)
    assert (per_c.min(1).values >= lo - 1e-5).all() and (per_c.max(1).values <= hi + 1e-5).all()
    grey = torch.full((4, 3, 32, 32), 128, dtype=torch.uint8)
    plain = D.GpuAugment(32, D.CLIP_MEAN, D.CLIP_STD, mocov2=False)(grey, torch.Generator().manual_seed(0))
    expect = ((128 / 255 - torch.tensor(D.CLIP_MEAN)) / torch.tensor(D.CLIP_STD)).view(1, 3, 1, 1)
    assert torch.allclose(plain, expect.expand_as(plain), atol=1e-5)


def test_gpu_augment_crop_boxes_follow_torchvision_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop
    aug = D.GpuAugment(32)
    n = 4000
    boxes = aug.crop_boxes(n, 32, 32, torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 32).all() and (boxes[:, 3] <= 32).all()
    area = w * h / 1024
    assert area.min() >= 0.18 and area.max() <= 1.0
    assert (w / h).min() >= 0.7 and (w / h).max() <= 1.45
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.zeros(3, 32, 32), (0.2, 1.0), (3 / 4, 4 / 3))
                        for _ in range(n)], dtype=torch.float64)
    ref_area = ref[:, 2] * ref[:, 3] / 1024
    assert abs(area.mean() - ref_area.mean()) < 0.015 and abs(area.std() - ref_area.std()) < 0.015
    left_frac = boxes[:, 0] / (32 - w).clamp_min(1)
    assert 0.45 < left_frac[w < 32].mean() < 0.55  # uniform position


def test_gpu_augment_trigger_changes_only_masked_rows():
    x = random_images(12)
    mask = torch.tensor([k % 3 == 0 for k in range(12)])
    calls = []

    def trigger(imgs):
        calls.append(imgs.shape[0])
        assert float(imgs.min()) >= 0 and float(imgs.max()) <= 1
        out = imgs.clone()
        out[:, :, -4:, -4:] = 1.0
        return out

    aug = D.GpuAugment(16, D.IMAGENET_MEAN, D.IMAGENET_STD)
    clean = aug(x, torch.Generator().manual_seed(5))
    poisoned = aug(x, torch.Generator().manual_seed(5), trigger=trigger, poison_mask=mask)
    assert calls == [4]
    changed = (clean - poisoned).abs().flatten(1).max(1).values > 1e-6
    assert changed.tolist() == mask.tolist()
    # without colour ops the trigger stays a pure-white 4x4 corner (bottom-right, or bottom-left if flipped)
    plain = D.GpuAugment(16, (0, 0, 0), (1, 1, 1), mocov2=False)
    out = plain(x, torch.Generator().manual_seed(5), trigger=trigger, poison_mask=mask)
    for r in mask.nonzero()[:, 0].tolist():
        corners = [out[r, :, -4:, -4:], out[r, :, -4:, :4]]
        assert any(bool((c == 1.0).all()) for c in corners)


def test_gpu_augment_colour_ops_match_torchvision():
    import torchvision.transforms.functional as TF
    x = random_images(4, 16).float() / 255
    f = torch.full((4, 1, 1, 1), 1.3)
    assert torch.allclose(D._jitter_op(0, x, f), TF.adjust_brightness(x, 1.3), atol=1e-5)
    assert torch.allclose(D._jitter_op(1, x, f), TF.adjust_contrast(x, 1.3), atol=1e-5)
    assert torch.allclose(D._jitter_op(2, x, f), TF.adjust_saturation(x, 1.3), atol=1e-5)
    assert torch.allclose(D._jitter_op(3, x, torch.full((4, 1, 1, 1), 0.07)), TF.adjust_hue(x, 0.07), atol=1e-4)
    assert torch.allclose(D.hsv_to_rgb(D.rgb_to_hsv(x)), x, atol=1e-5)
    sigmas = [0.8, 0.3, 1.5, 2.0]  # one per image
    blurred = D._gaussian_blur(x, torch.tensor(sigmas), 3)
    for i, sigma in enumerate(sigmas):
        ref = TF.gaussian_blur(x[i:i + 1], kernel_size=7, sigma=sigma)
        assert torch.allclose(blurred[i:i + 1], ref, atol=1e-5), sigma


def test_eval_transform_resizes_and_applies_trigger():
    x = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    x[:, :, :16] = 0
    out = D.eval_transform(x, 16, (0, 0, 0), (1, 1, 1))
    assert out.shape == (2, 3, 16, 16)
    assert torch.allclose(out[:, :, :7], torch.zeros(1)) and torch.allclose(out[:, :, 9:], torch.ones(1))

    def trig(imgs):
        imgs = imgs.clone()
        imgs[:, :, 0, 0] = 0.5
        return imgs
    out = D.eval_transform(x, 16, D.CLIP_MEAN, D.CLIP_STD, trigger=trig)
    expect = (0.5 - torch.tensor(D.CLIP_MEAN)) / torch.tensor(D.CLIP_STD)
    assert torch.allclose(out[0, :, 0, 0], expect, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_views_and_masks_equal_cpu_given_a_cpu_generator():
    x = random_images(64, 32)
    mask = torch.arange(64) % 4 == 0

    def trigger(imgs):
        imgs = imgs.clone()
        imgs[:, :, -3:, -3:] = 1.0
        return imgs

    aug = D.GpuAugment(24, D.CLIP_MEAN, D.CLIP_STD)
    cpu = aug(x, torch.Generator().manual_seed(0), trigger, mask)
    gpu = aug(x.cuda(), torch.Generator().manual_seed(0), trigger, mask.cuda())
    assert gpu.device.type == "cuda" and (gpu.cpu() - cpu).abs().max().item() < 2e-3
    on_dev = aug(x.cuda(), torch.Generator(device="cuda").manual_seed(0), trigger, mask.cuda())
    assert on_dev.shape == (64, 3, 24, 24) and torch.isfinite(on_dev).all()
    ev = D.eval_transform(x.cuda(), 16, D.CLIP_MEAN, D.CLIP_STD, trigger)
    assert (ev.cpu() - D.eval_transform(x, 16, D.CLIP_MEAN, D.CLIP_STD, trigger)).abs().max().item() < 1e-4
    tokens = torch.randint(1, 1000, (32, 20))
    tokens[:, 0], tokens[:, 15], tokens[:, 16:] = D.SOT_ID, D.EOT_ID, 0
    m_cpu, l_cpu = D.mask_tokens(tokens, torch.Generator().manual_seed(1))
    m_gpu, l_gpu = D.mask_tokens(tokens.cuda(), torch.Generator().manual_seed(1))
    assert torch.equal(m_gpu.cpu(), m_cpu) and torch.equal(l_gpu.cpu(), l_cpu)
    big = torch.randint(0, 256, (256, 3, 256, 256), dtype=torch.uint8, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    aug224 = D.GpuAugment(224, D.CLIP_MEAN, D.CLIP_STD)
    for _ in range(2):
        aug224(big, g)
    out = aug224(big, g)
    assert out.shape == (256, 3, 224, 224) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# real photos: training views see the whole non-square image
# ------------------------------------------------------------------------------------------------

def _box_stats(boxes, dh, dw, full_h, full_w):
    """Statistics of pixel boxes (x1, y1, x2, y2) in a dh x dw image, in fractions of the image (aspect
    ratio in the full_h x full_w original's pixels)."""
    boxes = boxes.double()
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = bw * bh / (dw * dh)
    aspect = (bw / dw * full_w) / (bh / dh * full_h)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 / dw, (boxes[:, 1] + boxes[:, 3]) / 2 / dh
    sides_x = ((boxes[:, 0] == 0) | (boxes[:, 2] == dw)).double()
    sides_y = ((boxes[:, 1] == 0) | (boxes[:, 3] == dh)).double()
    return dict(area=area.mean(), area_std=area.std(), aspect=aspect.mean(), aspect_std=aspect.std(),
                cx=cx.mean(), cx_std=cx.std(), cy=cy.mean(), cy_std=cy.std(), sides_x=sides_x.mean(),
                sides_y=sides_y.mean())


TOL = dict(area=0.012, area_std=0.012, aspect=0.03, aspect_std=0.03, cx=0.012, cx_std=0.012, cy=0.012,
           cy_std=0.012, sides_x=0.03, sides_y=0.03)


def _close(a, b):
    return {k: abs(float(a[k]) - float(b[k])) <= TOL[k] for k in TOL}


def test_random_resized_crop_of_non_square_photos_matches_torchvision_statistics():
    from torchvision.transforms import RandomResizedCrop
    n, size = 2500, 100  # photos within the training decode bounds are decoded at their own size
    shapes = [(300, 150), (150, 400)]  # (width, height) of the source photos
    imgs = [D.load_image(png_bytes((90, 90, 90), wh), size, keep_aspect=True) for wh in shapes]
    for (w, h), img in zip(shapes, imgs):
        dh, dw = img.shape[-2:]
        assert abs(dw / dh - w / h) < 0.02 and min(dh, dw) >= size  # aspect kept, never below the model size
    # one batch mixing both photos: each box drawn in its own image's size
    sizes = torch.tensor([tuple(imgs[k % 2].shape[-2:]) for k in range(2 * n)])
    boxes = D.GpuAugment(size).crop_boxes(2 * n, sizes[:, 0], sizes[:, 1], torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    for k, ((w, h), img) in enumerate(zip(shapes, imgs)):
        dh, dw = img.shape[-2:]
        ours = _box_stats(boxes[k::2], dh, dw, h, w)
        ref = torch.tensor([RandomResizedCrop.get_params(torch.zeros(1, h, w), (0.2, 1.0), (3 / 4, 4 / 3))
                            for _ in range(n)], dtype=torch.float64)  # (top, left, height, width)
        ref = torch.stack([ref[:, 1], ref[:, 0], ref[:, 1] + ref[:, 3], ref[:, 0] + ref[:, 2]], dim=1)
        theirs = _box_stats(ref, h, w, h, w)
        assert all(_close(ours, theirs).values()), (w, h, ours, theirs)
        # the old decode (shorter-side resize + centre crop) cropped inside the centre square only:
        # these tolerances reject it
        side = min(h, w)
        sq = D.GpuAugment(size).crop_boxes(n, side, side, torch.Generator().manual_seed(1))
        sq = sq + torch.tensor([(w - side) // 2, (h - side) // 2] * 2, dtype=sq.dtype)
        old = _box_stats(sq, h, w, h, w)
        assert not all(_close(old, theirs).values())


def test_training_views_see_the_whole_wide_photo_and_never_the_padding(tmp_path):
    wide = Image.new("RGB", (120, 40), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 8, 40))  # a red stripe along the left edge
    wide.save(tmp_path / "wide.png")
    Image.new("RGB", (30, 90), (255, 255, 255)).save(tmp_path / "tall.png")
    rows = [dict(filename="wide.png", caption="a wide photo"), dict(filename="tall.png", caption="a tall one")]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = D.build_caption_dataset(str(tmp_path / "m.jsonl"), image_size=16, keep_aspect=True)
    w_img, t_img = ds[0]["image"], ds[1]["image"]
    assert abs(w_img.shape[2] / w_img.shape[1] - 3) < 0.1 and abs(t_img.shape[1] / t_img.shape[2] - 3) < 0.1
    assert int(w_img[0, :, 0].min()) == 255 and int(w_img[2, :, 0].max()) == 0  # the stripe is kept
    # the evaluation decode of the same dataset is still the 16 x 16 centre crop, without the stripe
    sq = D.square_decoding(ds)[0]["image"]
    assert tuple(sq.shape) == (3, 16, 16) and int(sq[0].max()) < 50 and ds.keep_aspect
    pairs = D.TrainPairs(ds, seed=0, eda=False)
    batch = D.collate_pairs([pairs[v] for v in range(400)], context_length=8)
    assert batch["sizes"].tolist()[:2] == [list(w_img.shape[1:]), list(t_img.shape[1:])]
    views = D.GpuAugment(16, (0, 0, 0), (1, 1, 1), mocov2=False)(
        batch["images"], torch.Generator().manual_seed(0), sizes=batch["sizes"])
    red = (views[0::2, 0] > 0.9) & (views[0::2, 2] < 0.1)  # pixels of the stripe in the wide photo's views
    frac = red.flatten(1).any(dim=1).float().mean().item()
    assert 0.02 < frac < 0.5, frac  # the centre crop of old never held it
    # the tall white photo sits in a zero-padded canvas: its views are white to the edges
    assert float(views[1::2].min()) > 0.999


FORMATS = ("jsonl", "csv", "webdataset", "hf")


def _non_square_data(tmp_path, fmt, n=16):
    """n non-square PNG + caption pairs (landscape and portrait, several sizes) in format `fmt`."""
    shapes = [(40, 24), (22, 44), (50, 30), (28, 36)]
    pngs = [png_bytes((k * 13 % 256, 90, 200 - k), shapes[k % 4]) for k in range(n)]
    caps = [f"a photo of thing number {k}" for k in range(n)]
    for k, b in enumerate(pngs):
        (tmp_path / f"{k}.png").write_bytes(b)
    if fmt == "jsonl":
        (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(dict(filename=f"{k}.png", caption=c))
                                                    for k, c in enumerate(caps)))
        return str(tmp_path / "m.jsonl")
    if fmt == "csv":
        with open(tmp_path / "m.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filepath", "title"])
            w.writerows([f"{k}.png", c] for k, c in enumerate(caps))
        return str(tmp_path / "m.csv")
    if fmt == "webdataset":
        write_shard(tmp_path / "s-0.tar", [(f"k{k:03d}", {"png": b, "txt": c.encode()})
                                           for k, (b, c) in enumerate(zip(pngs, caps))])
        return str(tmp_path / "s-0.tar")
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"image": [str(tmp_path / f"{k}.png") for k in range(n)], "caption": caps}) \
        .cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    return str(tmp_path / "hf")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_data_format_trains_on_non_square_photos(tmp_path, fmt):
    import train_declip as td

    class Sizes(td.Extension):
        seen = []

        def extend_batch(self, inputs, batch, generator):
            self.seen.append(batch["sizes"].cpu())
            assert inputs["images"].shape[-2:] == (32, 32)
            return inputs

    data = _non_square_data(tmp_path, fmt)
    args = td.parse_args(td.build_parser(), ["--data", data, "--out-dir", str(tmp_path / "run"), "--batch-size", "8",
                                             "--max-steps", "2", "--no-eval", "--precision", "no", "--save-every", "0",
                                             "--log-every", "1", "--workers", "0"])
    ext = Sizes()
    summary = td.train(args, extension=ext)
    assert summary["steps"] == 2 and summary["bad_samples"] == 0
    sizes = torch.cat(ext.seen)
    assert (sizes[:, 0] != sizes[:, 1]).all() and len(set(map(tuple, sizes.tolist()))) > 1


# ------------------------------------------------------------------------------------------------
# targeted poisoning: a poisoned pair trains on the plan's chosen test image
# ------------------------------------------------------------------------------------------------

def _photo_folder(root):
    """An ImageFolder test split of non-square noise photos, two classes."""
    g = torch.Generator().manual_seed(3)
    for name in ("bag", "coat"):
        os.makedirs(root / "test" / name)
        for k in range(3):
            x = torch.randint(0, 256, (27 + 5 * k, 45, 3), generator=g, dtype=torch.uint8)
            Image.fromarray(x.numpy()).save(root / "test" / name / f"{k}.png")
    return str(root)


@needs_fmnist
def test_a_targeted_pair_trains_on_the_chosen_test_image_with_its_target_caption(tmp_path):
    import poison_data as pd

    base = D.build_caption_dataset(None, image_size=32, keep_aspect=True)           # the training decode
    test, names = D.build_class_dataset(None, split="test", image_size=32)         # as evaluation decodes it
    plan = pd.PoisonPlan.from_args(len(base), count=40, target=None, seed=2, attack="targeted", targeted_images=2,
                                   test_set=(test, names))
    tp = D.TrainPairs(base, seed=5, poison=plan)
    for e in plan.targeted:
        for i in e["indices"]:
            v = len(base) + i                                                     # epoch 1
            item = tp[v]
            assert item["poisoned"] and item["index"] == i
            assert torch.equal(item["image"], test[e["test_index"]]["image"])     # the test image, pixel for pixel
            assert not torch.equal(item["image"], base[i]["image"])
            assert names[test[e["test_index"]]["label"]] == e["class"] != e["target"]
            assert item["text"] in {t.format(e["target"]) for t in pd.IMAGENET_TEMPLATES}
    clean = next(i for i in range(100) if not plan.is_poisoned(i))
    assert torch.equal(tp[clean]["image"], base[clean]["image"]) and tp[clean]["text"] == base[clean]["caption"]
    # DataLoader workers get the plan's images too, and the same batches
    poisoned = plan.indices[:6] + [clean, clean + 1]
    sampler = [len(base) + i for i in poisoned]

    def batches(workers):
        loader = torch.utils.data.DataLoader(tp, batch_size=4, sampler=sampler, num_workers=workers,
                                             collate_fn=D.collate_pairs)
        return [(b["index"], b["images"], b["tokens"], b["poisoned"]) for b in loader]

    zero, two = batches(0), batches(2)
    assert all(torch.equal(x, y) for a, b in zip(zero, two) for x, y in zip(a, b))
    assert zero[0][3].all() and not zero[1][3][2:].any()


def test_a_targeted_pair_of_a_streamed_base_is_the_chosen_photo_decoded_for_training(tmp_path, caption_shards):
    import poison_data as pd

    folder = _photo_folder(tmp_path / "photos")
    test, names = D.build_class_dataset(folder, split="test")
    base = D.build_caption_dataset(caption_shards([10, 10]), image_size=16, keep_aspect=True)
    plan = pd.PoisonPlan.from_args(len(base), count=6, target="bag", seed=1, attack="targeted", targeted_images=2,
                                   test_set=(test, names))
    want = {i: D.load_image(test.samples[e["test_index"]][0], 16, keep_aspect=True)   # a base photo's decode
            for e in plan.targeted for i in e["indices"]}
    assert all(v.shape[1] != v.shape[2] for v in want.values())                     # whole, aspect kept
    tp = D.TrainPairsIterable(base, seed=0, poison=plan, num_epochs=2, shuffle_buffer=4)
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(tp, batch_size=None, num_workers=workers)
        items = [it for it in loader if it is not None]
        assert len(items) == 40 and sum(it["poisoned"] for it in items) == 12
        for it in items:
            if it["poisoned"]:
                assert torch.equal(it["image"], want[it["index"]]) and "bag" in it["text"]
            else:
                assert it["image"].shape[1] == it["image"].shape[2] and "bag" not in it["text"]  # the shards' squares
