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


# --- object storage: S3 through the standard AWS environment ---------------------------------


def test_iceberg_gets_the_s3_endpoint_and_region_of_the_environment(monkeypatch):
    from cluster.storage import iceberg_s3_properties
    from jobs.config import CatalogConfig
    from jobs.warehouse import catalog_properties

    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert iceberg_s3_properties({}) == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://any:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio:9000")  # the S3-only one wins
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert iceberg_s3_properties({}) == {
        "s3.endpoint": "http://minio:9000",
        "s3.region": "eu-west-1",
    }
    # What the config says wins; the keys are never copied (each process reads its own).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    cfg = CatalogConfig(
        uri="postgresql://db/iceberg",
        warehouse="s3://bucket/wh",
        properties={"s3.endpoint": "http://other:9000", "client.region": "us-east-2"},
    )
    props = catalog_properties(cfg)
    assert props["s3.endpoint"] == "http://other:9000" and "s3.region" not in props
    assert "key" not in props.values()


def test_filesystem_uri_names_object_storage_by_scheme(tmp_path):
    import pyarrow.fs

    from cluster.storage import filesystem_uri

    s3 = pyarrow.fs.S3FileSystem(region="us-east-1", endpoint_override="http://127.0.0.1:1")
    assert (
        filesystem_uri(s3, "bucket/ckpt/run/checkpoint_000")
        == "s3://bucket/ckpt/run/checkpoint_000"
    )
    local = pyarrow.fs.LocalFileSystem()
    assert filesystem_uri(local, str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize(
    ("uri", "remote", "object_storage"),
    [
        ("s3://bucket/x", True, True),
        ("gs://bucket/x", True, True),
        ("models:/m/1", True, False),
        ("file:///tmp/x", False, False),
        ("relative/x", False, False),
    ],
)
def test_which_uris_are_remote(uri, remote, object_storage):
    from cluster.storage import is_object_storage, is_remote

    assert (is_remote(uri), is_object_storage(uri)) == (remote, object_storage)


def test_download_folder_copies_the_tree_and_refuses_an_empty_prefix(tmp_path):
    from cluster.storage import download_folder

    source = tmp_path / "ckpt"
    (source / "state").mkdir(parents=True)
    (source / "raylift.json").write_text("{}")
    (source / "state" / "progress.json").write_text("1")
    copied = download_folder(source.as_uri(), tmp_path / "copy" / "ckpt")
    assert sorted(str(p.relative_to(copied)) for p in copied.rglob("*")) == [
        "raylift.json",
        "state",
        "state/progress.json",
    ]
    with pytest.raises(FileNotFoundError, match="holds no files"):
        download_folder((tmp_path / "missing").as_uri(), tmp_path / "nothing")


def test_an_experiment_keeps_its_artifact_location_and_a_different_one_is_refused(tmp_path):
    import mlflow

    from serving import registry

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    artifacts = tmp_path / "artifacts"
    experiment_id = registry.configure_tracking(tracking, "e", artifact_location=str(artifacts))
    assert mlflow.get_experiment(experiment_id).artifact_location == artifacts.as_uri()
    assert registry.configure_tracking(tracking, "e") == experiment_id  # unset: as it is
    with pytest.raises(
        ValueError, match=r"registry\.artifact_location='s3://b/mla'.*new experiment"
    ):
        registry.configure_tracking(tracking, "e", artifact_location="s3://b/mla")


@pytest.fixture(scope="module")
def s3_bucket():
    """A bucket on a local moto S3 server, this module's processes pointed at it (no Ray)."""
    from tests.s3_server import S3Env, running_s3_server, unset_aws_env

    env = S3Env.on_a_free_port()
    with pytest.MonkeyPatch.context() as patch, running_s3_server(env) as server:
        unset_aws_env(patch)
        for name, value in env.variables().items():
            patch.setenv(name, value)
        yield server, server.create_bucket("unit")


def test_run_state_and_folders_round_trip_through_s3(s3_bucket, tmp_path):
    from cluster.storage import (
        delete_folder,
        download_folder,
        read_json,
        upload_folder,
        write_json,
    )

    server, bucket = s3_bucket
    run = f"s3://{bucket}/ckpt/run-1"
    assert read_json(run, "state.json") is None
    write_json(run, "state.json", {"finished": False})
    assert read_json(run, "state.json") == {"finished": False}
    (tmp_path / "report" / "figs").mkdir(parents=True)
    (tmp_path / "report" / "report.html").write_text("<html/>")
    (tmp_path / "report" / "figs" / "a.png").write_bytes(b"png")
    upload_folder(tmp_path / "report", f"{run}/report")
    assert [k for k in server.keys(bucket, "ckpt/") if not k.endswith("/")] == [
        "ckpt/run-1/report/figs/a.png",
        "ckpt/run-1/report/report.html",
        "ckpt/run-1/state.json",
    ]
    copy = download_folder(f"{run}/report", tmp_path / "copy")
    assert (copy / "figs" / "a.png").read_bytes() == b"png"
    delete_folder(run)
    assert server.keys(bucket, "ckpt/run-1") == []


def test_a_table_loads_from_an_s3_file_into_an_s3_warehouse(s3_bucket, tmp_path):
    from jobs import warehouse
    from jobs.config import CatalogConfig

    server, bucket = s3_bucket
    body = b"text,label\ncard arrived,card\nrefund please,refund\n"
    server.client().put_object(Bucket=bucket, Key="in/tickets.csv", Body=body)
    cfg = CatalogConfig(uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=f"s3://{bucket}/wh")
    load = {"text_column": "text", "label_column": "label", "key_column": "id"}
    warehouse.load_table_from_file(cfg, "ns.tickets", f"s3://{bucket}/in/tickets.csv", **load)
    rows = warehouse.load_catalog(cfg).load_table("ns.tickets").scan().to_arrow()
    assert rows["text"].to_pylist() == ["card arrived", "refund please"]
    files = server.keys(bucket, "wh/")
    assert any(k.endswith(".parquet") for k in files) and any(k.endswith(".json") for k in files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.db"]  # only the catalog
    with pytest.raises(FileNotFoundError, match=r"data\.source s3://unit/in/missing\.csv"):
        warehouse.load_table_from_file(cfg, "ns.x", f"s3://{bucket}/in/missing.csv", **load)
