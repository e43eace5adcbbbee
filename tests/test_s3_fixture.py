import pytest


@pytest.mark.slow
def test_seaweedfs_roundtrip(s3_server):
    fs = s3_server.filesystem()
    s3_server.make_bucket("fixture-check")
    fs.pipe("fixture-check/a/b.bin", b"hello")
    assert fs.cat("fixture-check/a/b.bin") == b"hello"
    assert fs.ls("fixture-check/a") == ["fixture-check/a/b.bin"]
