"""Feature files hold fp32 tables whatever dtype they were written from."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import torch.nn.functional as F

from fma_fast.io.features import (
    FeatureSet,
    check_same_origin,
    class_table_sha256,
    data_record,
    load_features,
    save_features,
    table_mismatch,
)


def _header(path) -> dict:
    """The safetensors header as written, read without fma_fast or safetensors."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_a_feature_file_written_from_another_dtype_holds_fp32(tmp_path, dtype):
    """Guards a writer that stores the caller's dtype: the file's header says F32 for features
    and class table, the values are the input rounded to fp32 (exact for the half types),
    the class-table digest is the one of the table given, and the bytes equal a file written
    from fp32 tensors."""
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(7, 10, generator=generator, dtype=torch.float64).to(dtype)
    table = F.normalize(torch.randn(3, 10, generator=generator, dtype=torch.float64),
                        dim=-1).to(dtype)
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    path = save_features(tmp_path / "other.safetensors", features, table, labels, ["a", "b", "c"])
    header = _header(path)
    assert header["features"]["dtype"] == "F32", header["features"]
    assert header["class_features"]["dtype"] == "F32", header["class_features"]
    loaded = load_features(path)
    assert loaded.features.dtype == loaded.class_features.dtype == torch.float32
    assert torch.equal(loaded.features, features.float())
    assert torch.equal(loaded.class_features, table.float())
    assert class_table_sha256(loaded.class_features) == class_table_sha256(table)
    fp32 = save_features(tmp_path / "fp32.safetensors", features.float(), table.float(), labels,
                         ["a", "b", "c"])
    assert path.read_bytes() == fp32.read_bytes()


def test_values_beyond_fp32_are_refused_not_written_as_inf(tmp_path):
    features = torch.randn(4, 6, dtype=torch.float64)
    features[2, 3] = 1e300
    with pytest.raises(ValueError, match=r"features.*NaN or Inf"):
        save_features(tmp_path / "big.safetensors", features, torch.eye(2, 6))
    assert not (tmp_path / "big.safetensors").exists()


def test_class_names_compare_in_nfc_and_differences_are_readable():
    """Guards refusing "café" (NFC) against "café" (NFD: e + combining accent), the same name
    a macOS file name gives, with a message showing two identical-looking names: names are
    compared in NFC; names that still differ (a zero-width space) are shown as ascii()."""
    table = F.normalize(torch.randn(2, 4, generator=torch.Generator().manual_seed(0)), dim=-1)

    def record(names):
        return data_record(FeatureSet(table, None, table, names))

    nfc, nfd = "caf\u00e9", "cafe\u0301"
    assert table_mismatch(record(["dog", nfc]), record(["dog", nfd])) is None
    check_same_origin({"model": record(["dog", nfc]), "test.safetensors": record(["dog", nfd])})
    found = table_mismatch(record(["dog", nfc]), record(["dog", "caf\u200b\u00e9"]))
    assert found == ("different class names (class 1: 'caf\\xe9' vs 'caf\\u200b\\xe9'; "
                     "compared in Unicode NFC, shown as ascii())"), found
