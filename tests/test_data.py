import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from transfer.data import parquet
from transfer.data.pipeline import BadRecords, decode_image, make_dataset
from transfer.data.plan import plan_dataset
from transfer.errors import DataError


def encode(image: np.ndarray, fmt: str) -> bytes:
    return (tf.io.encode_png(image) if fmt == "png" else tf.io.encode_jpeg(image)).numpy()


@pytest.fixture
def dataset(tmp_path):
    """12 rows: the label is the image's brightness class; mixed JPEG, grayscale PNG and RGBA PNG of any size."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(12):
        label = ["dark", "mid", "light"][i % 3]
        value = {"dark": 20, "mid": 128, "light": 235}[label]
        h, w = rng.integers(20, 90, 2)
        if i % 4 == 1:
            image, fmt = np.full((h, w, 1), value, np.uint8), "png"
        elif i % 4 == 2:
            image, fmt = np.full((h, w, 4), value, np.uint8), "png"
        else:
            image, fmt = np.full((h, w, 3), value, np.uint8), "jpeg"
        images.append(encode(image, fmt))
        labels.append(label)
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"img": images, "cls": labels}), path, row_group_size=5)
    return str(path), labels


def test_scan_reads_row_groups_and_labels(dataset):
    path, labels = dataset
    index = parquet.scan(path, "img", "cls")
    assert [g.num_rows for g in index.row_groups] == [5, 5, 2]
    assert index.labels == labels


def test_validation_pipeline_yields_rgb_at_image_size_with_the_right_class(dataset):
    path, labels = dataset
    index = parquet.scan(path, "img", "cls")
    plan = plan_dataset(index, None, 0.5, 1, seed=0)
    assert plan.classes == ["dark", "light", "mid"]
    ds = make_dataset(
        plan.validation.shards[0], plan.validation.rows_per_worker, plan.classes, "img", "cls", (32, 32), 4, False
    )
    seen = 0
    for images, classes in ds:
        assert images.shape[1:] == (32, 32, 3)
        for image, c in zip(images.numpy(), classes.numpy(), strict=True):
            brightness = {"dark": 20, "mid": 128, "light": 235}[plan.classes[c]]
            assert abs(image.mean() - brightness) < 6
            seen += 1
    assert seen == plan.validation.rows_per_worker == 6


def test_training_pipeline_repeats_whole_batches(dataset):
    path, _ = dataset
    plan = plan_dataset(parquet.scan(path, "img", "cls"), None, 0.25, 1, seed=0)
    ds = make_dataset(plan.train.shards[0], plan.train.rows_per_worker, plan.classes, "img", "cls", (32, 32), 4, True)
    batches = list(ds.take(10))  # 9 rows, batch 4: endless whole batches
    assert len(batches) == 10 and all(b[0].shape[0] == 4 for b in batches)


def test_scan_names_a_missing_column_and_the_file(dataset):
    path, _ = dataset
    with pytest.raises(DataError, match=r"data.label_column: .*data.parquet: no column 'label' \(columns: img, cls\)"):
        parquet.scan(path, "img", "label")


def test_null_labels_are_left_out_or_stop_the_run(tmp_path):
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"image": [b"x"] * 9, "label": ["a", None, "b"] * 3}), path)
    index = parquet.scan(str(path), "image", "label", bad_records="skip")
    assert index.left_out == [f"{path}: row {r}: label is null" for r in (1, 4, 7)]
    plan = plan_dataset(index, None, 0.3, 1, seed=0)
    assert plan.train.rows_per_worker + plan.validation.rows_per_worker == 6
    with pytest.raises(DataError, match="data.train: .*nulls.parquet: row 1: label is null"):
        parquet.scan(str(path), "image", "label", bad_records="fail")


def test_scan_rejects_empty_locations(tmp_path):
    with pytest.raises(DataError, match="data.train: .*: no Parquet files found"):
        parquet.scan(str(tmp_path / "empty"), "image", "label")


def test_bad_records_are_skipped_counted_and_named(tmp_path):
    from tests.conftest import write_bad_parquet

    path = str(tmp_path / "bad.parquet")
    expected = write_bad_parquet(path)
    index = parquet.scan(path, "image", "label")
    plan = plan_dataset(index, index, 0.0, 1, seed=0)  # every labelled row in training and validation
    bad = BadRecords("skip")
    ds = make_dataset(
        plan.validation.shards[0], 3, plan.classes, "image", "label", (32, 32), 3, training=False, bad=bad
    )
    images, classes = next(iter(ds))
    assert images.shape == (3, 32, 32, 3)  # grayscale, RGBA and palette PNGs all became RGB
    assert sorted(plan.classes[c] for c in classes.numpy()) == ["cross", "diamond", "dots"]
    assert len(bad.found) == expected["unreadable"]
    assert [e.split(": ", 1)[1] for e in bad.examples] == [
        "empty image",
        "not a decodable image (truncated or not JPEG/PNG/GIF/BMP)",
        "not a decodable image (truncated or not JPEG/PNG/GIF/BMP)",
    ]
    assert bad.examples[0].startswith(f"{path} row group 0 row 0")


def test_bad_records_are_counted_once_however_often_they_are_read(tmp_path):
    from tests.conftest import write_bad_parquet

    path = str(tmp_path / "bad.parquet")
    write_bad_parquet(path)
    index = parquet.scan(path, "image", "label")
    plan = plan_dataset(index, index, 0.0, 1, seed=0)
    bad = BadRecords("skip")
    training = make_dataset(plan.train.shards[0], 6, plan.classes, "image", "label", (32, 32), 2, True, bad=bad)
    assert len(list(training.take(12))) == 12  # 24 images: each usable row read several times, and each bad one
    assert len(bad.found) == len(bad.examples) == 3


def photo(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Smooth structure at several scales plus grain: decodes like a photo, unlike a flat drawing."""
    rng = np.random.default_rng(seed)
    image = np.zeros((*size, 3), np.float32)
    for cells in (4, 16, 64):
        field = rng.uniform(0, 255, (cells, cells, 3)).astype(np.float32)
        image += tf.image.resize(field[None], size).numpy()[0] / 3
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("source", [(1024, 768), (700, 1400), (500, 300), (64, 48)])
def test_a_large_jpeg_decoded_at_reduced_scale_matches_a_full_decode_and_resize(source):
    data = tf.io.encode_jpeg(photo(source), quality=92)
    full = tf.image.resize(tf.io.decode_jpeg(data, channels=3), (224, 224)).numpy()
    reduced = decode_image(data, (224, 224))
    assert reduced.shape == (224, 224, 3) and reduced.dtype == tf.uint8
    difference = np.abs(reduced.numpy().astype(np.float32) - full)
    assert difference.mean() < 3.0  # of 255: the same picture, filtered a little differently


def test_png_and_grayscale_jpeg_decode_to_rgb_at_the_target_size():
    gray = np.full((300, 200, 1), 77, np.uint8)
    for data in (tf.io.encode_png(gray), tf.io.encode_jpeg(gray)):
        image = decode_image(data, (64, 32)).numpy()
        assert image.shape == (64, 32, 3) and abs(image.mean() - 77) < 2


def test_bad_records_fail_names_the_first_and_a_shard_of_only_bad_records_ends(tmp_path):
    from tests.conftest import write_bad_parquet

    path = str(tmp_path / "bad.parquet")
    write_bad_parquet(path)
    index = parquet.scan(path, "image", "label")
    plan = plan_dataset(index, index, 0.0, 1, seed=0)
    units = [u for u in plan.train.shards[0] if u.row_group == 0]
    ds = make_dataset(units, 3, plan.classes, "image", "label", (32, 32), 2, True, bad=BadRecords("fail"))
    with pytest.raises(tf.errors.OpError, match="data.bad_records is fail: .*row group 0 row 0: empty image"):
        next(iter(ds))
    only_bad = [type(u)(u.file, 0, tuple(r for r in u.rows if r < 3)) for u in units]
    with pytest.raises(tf.errors.OpError, match="none of the 3 rows of a worker's shard is usable; last: .*row 2"):
        next(iter(make_dataset(only_bad, 3, plan.classes, "image", "label", (32, 32), 2, True, bad=BadRecords("skip"))))


def test_scan_reads_a_glob_of_files(tmp_path):
    for i in range(3):
        pq.write_table(pa.table({"image": [b"x"] * (i + 1), "label": [i] * (i + 1)}), tmp_path / f"p{i}.parquet")
    index = parquet.scan(str(tmp_path / "p[01].parquet"), "image", "label")
    assert index.labels == [0, 1, 1]


def test_a_row_group_that_cannot_be_read_stops_the_pipeline_instead_of_being_skipped(dataset):
    path, _ = dataset
    plan = plan_dataset(parquet.scan(path, "img", "cls"), None, 0.25, 1, seed=0)
    with open(path, "r+b") as f:  # truncated after planning, as a file rewritten while the job runs
        f.truncate(200)
    ds = make_dataset(plan.train.shards[0], plan.train.rows_per_worker, plan.classes, "img", "cls", (32, 32), 4, True)
    with pytest.raises(tf.errors.OpError):
        list(ds.take(3))


def class_sorted(tmp_path, classes: int, rows_per_class: int, row_group: int) -> str:
    """A file per class, as data written a class at a time: tiny JPEGs, the label in the file name too."""
    image = tf.io.encode_jpeg(np.zeros((8, 8, 3), np.uint8)).numpy()
    for c in range(classes):
        table = pa.table({"image": [image] * rows_per_class, "label": [f"c{c:02d}"] * rows_per_class})
        pq.write_table(table, tmp_path / f"class{c:02d}.parquet", row_group_size=row_group)
    return str(tmp_path)


def test_batches_of_class_sorted_data_mix_classes_like_a_shuffle(tmp_path):
    index = parquet.scan(class_sorted(tmp_path, classes=20, rows_per_class=40, row_group=40), "image", "label")
    plan = plan_dataset(index, index, 0.0, 1, seed=0)
    # A shuffle buffer far smaller than the shard, as on real data: the reader's interleave must do the mixing.
    ds = make_dataset(
        plan.train.shards[0], plan.train.rows_per_worker, plan.classes, "image", "label", (8, 8), 16, True,
        shuffle_buffer=16,
    )  # fmt: skip
    distinct = [len(set(labels.numpy())) for _, labels in ds.take(50)]
    iid = 20 * (1 - (19 / 20) ** 16)  # expected distinct classes in 16 draws from 20 equal classes: 11.2
    assert np.mean(distinct) >= 0.9 * iid


def test_a_worker_reads_just_its_rows_of_a_row_group_wherever_they_fall(tmp_path):
    images = [tf.io.encode_jpeg(np.full((8, 8, 3), 5 * i, np.uint8)).numpy() for i in range(50)]
    path = str(tmp_path / "one-group.parquet")
    pq.write_table(pa.table({"image": images, "label": [str(i) for i in range(50)]}), path)  # one row group
    rows = (0, 1, 2, 20, 21, 47, 49)  # slices with all, none and some of the unit's rows
    index = parquet.scan(path, "image", "label")
    plan = plan_dataset(index, index, 0.0, 1, seed=0)
    unit = type(plan.train.shards[0][0])(path, 0, rows)
    ds = make_dataset([unit], len(rows), plan.classes, "image", "label", (8, 8), 8, training=False)
    (batch, labels), *rest = list(ds)
    assert not rest and sorted(int(plan.classes[c]) for c in labels.numpy()) == list(rows)
    assert [round(float(b.mean()) / 5) for b in batch.numpy()] == [int(plan.classes[c]) for c in labels.numpy()]


def test_the_row_groups_open_at_once_stay_within_the_read_buffer(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from transfer.data.pipeline import Parallelism, ShardGuard, UnitReader, interleaved

    index = parquet.scan(class_sorted(tmp_path, classes=6, rows_per_class=40, row_group=40), "image", "label")
    plan = plan_dataset(index, index, 0.0, 1, seed=0)
    units = plan.train.shards[0]
    assert all(u.open_bytes > 0 for u in units)
    with ThreadPoolExecutor(4) as pool:
        reader = UnitReader(
            "image", "label", {c: i for i, c in enumerate(plan.classes)}, ShardGuard(BadRecords("skip"), 240), pool
        )

        def classes_in_first_chunk(parallel: Parallelism) -> int:
            return len({label for _, label, _ in next(interleaved(units, reader, parallel, pool))})

        assert classes_in_first_chunk(Parallelism(1, 32, 4, open_bytes=10 << 20)) == 6
        assert classes_in_first_chunk(Parallelism(1, 32, 4, open_bytes=1)) == 2  # two open at least
        assert classes_in_first_chunk(Parallelism(1, 3, 4, open_bytes=10 << 20)) == 3
