"""cluster.storage: the one helper that makes driver paths visible to Ray workers."""

from __future__ import annotations

import pytest

from cluster.storage import worker_visible_uri


def test_relative_paths_become_absolute_from_the_driver_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path.resolve()
    assert worker_visible_uri("ckpt/run", key="k") == str(root / "ckpt" / "run")
    assert not (root / "ckpt").exists()  # only created when asked
    assert worker_visible_uri("ckpt/run", key="k", create=True) == str(root / "ckpt" / "run")
    assert (root / "ckpt" / "run").is_dir()
    assert worker_visible_uri("file://wh", key="k", file_uri=True) == (root / "wh").as_uri()
    assert worker_visible_uri("wh", key="k", file_uri=True).startswith("file:///")


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert worker_visible_uri("~/x", key="k") == str(tmp_path.resolve() / "x")


def test_sqlite_uris_get_an_absolute_file_and_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = worker_visible_uri("sqlite:///state/mlflow.db?timeout=5", key="registry.tracking_uri")
    assert uri == f"sqlite:///{tmp_path.resolve()}/state/mlflow.db?timeout=5"
    assert (tmp_path / "state").is_dir()
    with pytest.raises(ValueError, match=r"registry\.tracking_uri='sqlite:///:memory:'"):
        worker_visible_uri("sqlite:///:memory:", key="registry.tracking_uri")


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/checkpoints",
        "gs://bucket/wh",
        "abfs://container@account/wh",
        "postgresql://db/iceberg",
        "models:/ticket-router@production",
        "models:/ticket-router/3",
        "runs:/abc123/checkpoint",
    ],
)
def test_remote_and_registry_uris_are_unchanged(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert worker_visible_uri(uri, key="k", create=True) == uri
    assert list(tmp_path.iterdir()) == []  # nothing created for a remote location
