"""Activation shards: size cap, round trip, byte-identical rewrites."""

import numpy as np
import pytest

from osx.calibration.shards import ShardReader, ShardWriter, iter_samples
from osx.errors import OsxError


def _samples(n):
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((2, 4, 3, 5)).astype(np.float32), "t": np.full((2,), 10.0 * i, np.float32),
             "ids": rng.integers(0, 100, (2, 7))} for i in range(n)]


def _write(root, samples, cap):
    w = ShardWriter(root, "denoiser", cap)
    for s in samples:
        w.add(s)
    return w.close()


def test_shards_respect_the_cap_and_round_trip(tmp_path):
    samples = _samples(23)
    cap = 8000  # bytes: a sample is 0.6 KB of data + <= 1.5 KB of headers, so 3 fit a shard
    records = _write(tmp_path, samples, cap)
    assert len(records) > 3
    for r in records:
        assert (tmp_path / r["file"]).stat().st_size == r["bytes"] <= cap
    assert sum(r["samples"] for r in records) == len(samples)
    back = list(iter_samples([tmp_path / r["file"] for r in records]))
    assert len(back) == len(samples)
    for got, want in zip(back, samples):
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
            assert got[k].dtype == want[k].dtype


def test_shards_are_byte_identical_for_the_same_samples(tmp_path):
    a = _write(tmp_path / "a", _samples(7), 5000)
    b = _write(tmp_path / "b", _samples(7), 5000)
    assert a == b
    for r in a:
        assert (tmp_path / "a" / r["file"]).read_bytes() == (tmp_path / "b" / r["file"]).read_bytes()


def test_a_sample_larger_than_the_cap_is_refused(tmp_path):
    w = ShardWriter(tmp_path, "denoiser", 1000)
    with pytest.raises(OsxError, match="shard cap"):
        w.add({"x": np.zeros(1000, np.float32)})


def test_reader_selects_and_casts_inputs_rewinds_and_limits(tmp_path):
    samples = _samples(5)
    records = _write(tmp_path, samples, 4000)
    reader = ShardReader([tmp_path / r["file"] for r in records], inputs={"x": "float16", "t": "float32"}, limit=4)
    first = [reader.get_next() for _ in range(5)]
    assert first[-1] is None and all(set(s) == {"x", "t"} for s in first[:4])
    assert first[0]["x"].dtype == np.float16  # an fp16 graph's input
    np.testing.assert_array_equal(first[0]["x"], samples[0]["x"].astype(np.float16))
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["t"], first[0]["t"])
    np.testing.assert_array_equal(reader.get_first()["x"], first[0]["x"])
