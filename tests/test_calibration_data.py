"""Calibration data sources (calibrate/data.py, calibrate/images.py): text with a real
tokenizer.json, .npz/.npy, iterables and CalibrationDataReaders, image folders; batching with
padding, length buckets and the held-out split."""
import numpy as np
import pytest
from PIL import Image

from mfconvert.calibrate.data import DataError, Examples, load_examples
from mfconvert.calibrate.images import image_spec
from mfconvert.zoo.minilm import INPUT_NAMES, model_dir

TOKENIZER = model_dir() / "tokenizer.json"


def test_text_file_with_tokenizer_and_padded_batches(tmp_path):
    path = tmp_path / "sentences.txt"
    path.write_text("A short sentence.\n\n   \nThis one is quite a lot longer than the first sentence was.\n")
    examples = load_examples(str(path), list(INPUT_NAMES), tokenizer=str(TOKENIZER))
    assert len(examples) == 2                                  # blank lines skipped
    first, second = examples.items
    assert first["input_ids"][0] == 101 and first["input_ids"][-1] == 102     # [CLS] … [SEP]
    assert len(second["input_ids"]) > len(first["input_ids"])
    (batch,) = examples.batches(8)
    n = len(first["input_ids"])
    assert batch["input_ids"].shape == (2, len(second["input_ids"]))
    assert np.all(batch["input_ids"][0, n:] == 0) and np.all(batch["attention_mask"][0, n:] == 0)
    assert np.all(batch["attention_mask"][0, :n] == 1) and np.all(batch["attention_mask"][1] == 1)
    with pytest.raises(DataError, match="sentences.txt: text data needs --tokenizer"):
        load_examples(str(path), list(INPUT_NAMES))
    with pytest.raises(DataError, match="not a readable tokenizer.json"):
        load_examples(str(path), list(INPUT_NAMES), tokenizer=str(path))


def test_arrays_keyed_by_input_name(tmp_path):
    rng = np.random.default_rng(0)
    x, m = rng.normal(size=(5, 3)).astype(np.float32), rng.integers(0, 2, size=(5, 3))
    np.savez(tmp_path / "d.npz", x=x, m=m)
    examples = load_examples(str(tmp_path / "d.npz"), ["x", "m"])
    assert len(examples) == 5 and np.array_equal(examples.items[3]["x"], x[3])
    (batch,) = examples.batches(5)
    assert np.array_equal(batch["x"], x) and np.array_equal(batch["m"], m)
    np.save(tmp_path / "x.npy", x)
    assert np.array_equal(load_examples(str(tmp_path / "x.npy"), ["x"]).items[4]["x"], x[4])
    np.savez(tmp_path / "uneven.npz", x=x, m=m[:4])
    for path, names, message in [("d.npz", ["x", "y"], r"d.npz: no arrays for inputs \['y'\]"),
                                 ("x.npy", ["x", "m"], "x.npy: a .npy file feeds one input"),
                                 ("uneven.npz", ["x", "m"], "uneven.npz: inputs have different numbers"),
                                 ("missing.npz", ["x"], "missing.npz: no such file")]:
        with pytest.raises(DataError, match=message):
            load_examples(str(tmp_path / path), names)


def test_iterables_and_calibration_data_readers():
    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(size=(4, 2)).astype(np.float32)} for _ in range(3)]

    class Reader:       # ONNX Runtime's CalibrationDataReader protocol: get_next() until None
        def __init__(self):
            self.left = list(batches)

        def get_next(self):
            return self.left.pop(0) if self.left else None

    for source in (batches, Reader()):
        examples = load_examples(source, ["x"])
        assert len(examples) == 12
        np.testing.assert_array_equal(examples.items[5]["x"], batches[1]["x"][1])
    with pytest.raises(DataError, match=r"data record lacks inputs \['y'\]"):
        load_examples(batches, ["x", "y"])


def test_held_out_split_is_seeded_and_disjoint():
    examples = Examples([{"x": np.array([i])} for i in range(50)])
    train, held = examples.split(0.2, seed=3)
    ids = lambda e: [int(item["x"][0]) for item in e.items]  # noqa: E731
    assert len(held) == 10 and sorted(ids(train) + ids(held)) == list(range(50))
    assert ids(examples.split(0.2, seed=3)[1]) == ids(held) != ids(examples.split(0.2, seed=4)[1])
    with pytest.raises(DataError, match=r"held-out fraction must be in \[0, 1\)"):
        examples.split(1.0)


def test_length_buckets_keep_every_example_and_cut_padding():
    rng = np.random.default_rng(2)
    lengths = rng.integers(5, 60, size=1000)
    examples = Examples([{"ids": np.full(n, i + 1, np.int64)} for i, n in enumerate(lengths)])

    def seen_and_cells(by_length):
        seen, cells = [], 0
        for batch in examples.batches(32, shuffle=True, seed=0, by_length=by_length):
            cells += batch["ids"].size
            seen += [int(row[0]) - 1 for row in batch["ids"]]
            for row in batch["ids"]:            # each row is its example, then zeros
                n = lengths[int(row[0]) - 1]
                assert np.all(row[:n] == row[0]) and np.all(row[n:] == 0)
        return seen, cells

    shuffled, padded_cells = seen_and_cells(False)
    bucketed, bucketed_cells = seen_and_cells(True)
    assert sorted(bucketed) == sorted(shuffled) == list(range(1000))
    # 1,000 examples sit in one window (64 batches of 32), sorted: each batch pads to at most the
    # next batch's shortest length, so cells exceed the real tokens by a few percent.
    assert bucketed_cells < 1.05 * lengths.sum() < padded_cells


def test_image_folder_preprocessing(tmp_path):
    """Pixels/255, normalised per channel, centre crop, both layouts: checked against the formula
    on images whose shorter side already equals `resize` (so no resampling is involved)."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)        # H=10, W=14
    gray = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(gray).save(tmp_path / "sub" / "b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    spec = image_spec("vit", resize=10, crop=6)
    a = load_examples(str(tmp_path), ["img"], image_spec=spec).items[0]        # a.png sorts first
    expected = (rgb[2:8, 4:10].astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(a["img"], expected.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)
    nhwc = image_spec("vit", resize=10, crop=6, layout="NHWC")
    np.testing.assert_allclose(load_examples(str(tmp_path), ["img"], image_spec=nhwc).items[0]["img"], expected,
                               rtol=1e-6, atol=1e-6)
    digits = image_spec("digits", resize=8, crop=8)
    b = load_examples(str(tmp_path / "sub"), ["img"], image_spec=digits).items[0]["img"]
    np.testing.assert_allclose(b[0], (gray / 255 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="unknown image preset 'resnet'"):
        image_spec("resnet")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty: no PNG or JPEG images"):
        load_examples(str(empty), ["img"])
