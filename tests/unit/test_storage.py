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


# --- this node's download cache: base models and checkpoints from object storage -------------


def _slow_fetch(uri: str, target) -> None:
    """A download that takes a while and counts itself (in the source folder's `fetches`)."""
    import time
    from pathlib import Path

    from cluster.storage import download_folder

    source = Path(uri.removeprefix("file://"))
    with (source.parent / "fetches").open("a") as count:
        count.write("1\n")
    time.sleep(0.5)  # the other process asks meanwhile
    download_folder(uri, target)


def _cached_in_a_process(uri: str, cache: str) -> str:
    import os

    from cluster.storage import cached_folder

    os.environ["RAYLIFT_CACHE_DIR"] = cache
    return str(cached_folder(uri, "models", key="model.base", fetch=_slow_fetch))


def _model_folder(path):
    (path / "sub").mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "sub" / "weights.safetensors").write_bytes(b"w" * 1000)
    return path


def test_cached_folder_downloads_once_into_place_and_leaves_nothing_half_written(
    tmp_path, monkeypatch
):
    import shutil

    from cluster import storage

    monkeypatch.setenv("RAYLIFT_CACHE_DIR", str(tmp_path / "cache"))
    uri = _model_folder(tmp_path / "src" / "minilm").as_uri()
    fetched = []

    def fetch(source, target):
        fetched.append(source)
        storage.download_folder(source, target)

    first = storage.cached_folder(uri, "models", key="model.base", fetch=fetch)
    again = storage.cached_folder(uri, "models", key="model.base", fetch=fetch)
    assert first == again and fetched == [uri]  # downloaded once, then reused
    assert first.name == "minilm" and first.parent.parent == tmp_path / "cache" / "models"
    assert (first / "sub" / "weights.safetensors").stat().st_size == 1000
    assert (first.parent / "source.txt").read_text() == f"{uri}\n"
    assert storage.cached_folder(uri, "models", key="k", version="v2") != first  # a new copy
    shutil.rmtree(first)  # a copy emptied by hand is downloaded again, not returned missing
    assert storage.cached_folder(uri, "models", key="model.base", fetch=fetch) == first
    assert first.is_dir() and fetched == [uri, uri]

    def broken(source, target):
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        raise OSError("connection reset")

    other = _model_folder(tmp_path / "src" / "other").as_uri()
    with pytest.raises(OSError, match="connection reset"):
        storage.cached_folder(other, "models", key="model.base", fetch=broken)
    entries = sorted(p.name for p in (tmp_path / "cache" / "models").iterdir())
    assert not [e for e in entries if e.startswith(".")]  # the half download is gone
    assert len([e for e in entries if not e.endswith(".lock")]) == 2  # the two complete ones
    copy = storage.cached_folder(other, "models", key="model.base", fetch=fetch)
    assert (copy / "config.json").is_file() and fetched == [uri, uri, other]


def test_new_downloads_evict_the_least_recently_used_idle_entries_over_the_cap(
    tmp_path, monkeypatch
):
    import os
    import time

    from cluster import storage

    monkeypatch.setenv("RAYLIFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RAYLIFT_CACHE_MAX_GB", str(2500 / 1e9))  # room for two 1,000-byte models
    uris = [_model_folder(tmp_path / "src" / f"v{i}").as_uri() for i in range(4)]
    day = 24 * 3600
    v0 = storage.cached_folder(uris[0], "checkpoints", key="k")
    v1 = storage.cached_folder(uris[1], "checkpoints", key="k")
    blob = tmp_path / "cache" / "openvino-cache" / "blob"
    blob.parent.mkdir()
    blob.write_bytes(b"x" * 100)
    for path, age in ((v0.parent / "source.txt", 3 * day), (v1.parent / "source.txt", 2 * day)):
        os.utime(path, (time.time() - age,) * 2)
    os.utime(blob, (time.time() - 4 * day,) * 2)
    assert storage.cached_folder(uris[0], "checkpoints", key="k") == v0  # used again: now fresh

    v2 = storage.cached_folder(uris[2], "checkpoints", key="k")  # over the cap

    assert not blob.exists() and not v1.parent.exists()  # the two least recently used
    assert v0.is_dir() and v2.is_dir()  # then it fits: nothing more is evicted
    # entries used within the hour are never evicted, even over the cap
    v3 = storage.cached_folder(uris[3], "checkpoints", key="k")
    assert v0.is_dir() and v2.is_dir() and v3.is_dir()
    # an evicted entry downloads again when asked for
    assert storage.cached_folder(uris[1], "checkpoints", key="k") == v1 and v1.is_dir()


def test_a_bad_cache_cap_names_the_variable_and_the_fix(tmp_path, monkeypatch):
    from cluster import storage

    monkeypatch.setenv("RAYLIFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RAYLIFT_CACHE_MAX_GB", "lots")
    with pytest.raises(ValueError, match="RAYLIFT_CACHE_MAX_GB='lots': .* a positive number"):
        storage.evict_least_recently_used()


def test_two_processes_of_one_node_wait_for_one_download(tmp_path):
    import multiprocessing

    uri = _model_folder(tmp_path / "src" / "minilm").as_uri()
    cache = str(tmp_path / "cache")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.starmap(_cached_in_a_process, [(uri, cache), (uri, cache)])
    assert paths[0] == paths[1]
    assert (tmp_path / "src" / "fetches").read_text() == "1\n"  # one download for both
    assert (tmp_path / "cache" / "models").is_dir()


def test_credentials_in_a_uri_are_refused_and_never_echoed(tmp_path, monkeypatch):
    from cluster.storage import cached_folder

    monkeypatch.setenv("RAYLIFT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(
        ValueError, match=r"model\.base=s3://\*\*\*@bucket/m holds credentials"
    ) as e:
        cached_folder("s3://AKIAKEY:s3cr3t@bucket/m", "models", key="model.base")
    assert "s3cr3t" not in str(e.value) and "AKIAKEY" not in str(e.value)
    assert not (tmp_path / "cache").exists()


def test_the_cache_folder_comes_from_the_environment(tmp_path, monkeypatch):
    from cluster.storage import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAYLIFT_CACHE_DIR")
    assert cache_dir() == tmp_path / ".cache" / "raylift"
    monkeypatch.setenv("RAYLIFT_CACHE_DIR", "~/elsewhere")
    assert cache_dir() == tmp_path / "elsewhere"


def test_a_base_model_on_s3_is_downloaded_once_per_node_without_pickled_files(
    s3_bucket, tiny_bert, tmp_path, monkeypatch
):
    from pathlib import Path

    from cluster import storage
    from jobs import modeling

    server, bucket = s3_bucket
    monkeypatch.setenv("RAYLIFT_CACHE_DIR", str(tmp_path / "cache"))
    storage.upload_folder(tiny_bert, f"s3://{bucket}/models/tiny-bert")
    server.client().put_object(Bucket=bucket, Key="models/tiny-bert/pytorch_model.bin", Body=b"x")
    downloads = []
    real = storage.download_folder
    monkeypatch.setattr(
        modeling, "download_folder", lambda *a, **k: downloads.append(a) or real(*a, **k)
    )

    path = Path(modeling.resolve_base_model(f"s3://{bucket}/models/tiny-bert"))
    assert modeling.resolve_base_model(f"s3://{bucket}/models/tiny-bert/") == str(path)
    assert len(downloads) == 1 and path.is_relative_to(tmp_path / "cache")
    local = sorted(p.name for p in Path(tiny_bert).iterdir())
    assert sorted(p.name for p in path.iterdir()) == local  # the .bin was left behind
    assert not any(p.name.endswith(".bin") for p in path.iterdir())
    tokenizer = modeling.load_tokenizer(str(path))
    assert (
        tokenizer("card arrived")["input_ids"]
        == modeling.load_tokenizer(tiny_bert)("card arrived")["input_ids"]
    )


def test_a_base_on_s3_with_only_pickled_weights_is_refused_before_any_download(
    s3_bucket, tmp_path, monkeypatch
):
    from jobs.modeling import resolve_base_model

    server, bucket = s3_bucket
    monkeypatch.setenv("RAYLIFT_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("config.json", "pytorch_model.bin"):
        server.client().put_object(Bucket=bucket, Key=f"models/pickled/{name}", Body=b"{}")
    with pytest.raises(
        ValueError,
        match=r"model\.base='s3://unit/models/pickled' holds only "
        r"pickled weights \(pytorch_model\.bin\): raylift loads safetensors only",
    ):
        resolve_base_model(f"s3://{bucket}/models/pickled")
    with pytest.raises(FileNotFoundError, match=r"model\.base='s3://unit/models/none' holds no"):
        resolve_base_model(f"s3://{bucket}/models/none")
    cached = list((tmp_path / "cache" / "models").iterdir())
    assert [p for p in cached if not p.name.endswith(".lock")] == []  # nothing kept


def test_the_driver_checks_a_base_on_s3_without_downloading_it(
    s3_bucket, tiny_bert, tmp_path, monkeypatch
):
    """finetune's check before touching the cluster lists the folder; the training nodes
    download it."""
    from cluster.storage import upload_folder
    from jobs.modeling import check_base_model

    server, bucket = s3_bucket
    monkeypatch.setenv("RAYLIFT_CACHE_DIR", str(tmp_path / "cache"))
    upload_folder(tiny_bert, f"s3://{bucket}/models/checked")
    check_base_model(f"s3://{bucket}/models/checked")
    assert not (tmp_path / "cache").exists()
    server.client().put_object(Bucket=bucket, Key="models/ckpt-only/model.ckpt", Body=b"x")
    with pytest.raises(ValueError, match=r"only pickled weights \(model\.ckpt\)"):
        check_base_model(f"s3://{bucket}/models/ckpt-only")
    with pytest.raises(ValueError, match=r"model\.base=s3://\*\*\*@"):
        check_base_model(f"s3://KEY:SECRET@{bucket}/models/checked")
    with pytest.raises(FileNotFoundError, match=r"model\.base='nope/nothing'"):
        check_base_model("nope/nothing")


def test_a_lora_checkpoint_over_a_base_on_s3_loads_from_s3_into_the_cache_once(
    s3_bucket, tiny_bert, tmp_path, monkeypatch
):
    """meta.base_model = s3://...: what Ray Data actors and Serve replicas load (Predictor)."""
    import glob
    import shutil

    import torch

    from cluster.storage import upload_folder
    from jobs.modeling import read_checkpoint_meta, write_checkpoint_meta
    from serving.predictor import Predictor
    from serving.registry import resolve_model
    from tests.helpers import make_lora_checkpoint

    server, bucket = s3_bucket
    monkeypatch.setenv("RAYLIFT_CACHE_DIR", str(tmp_path / "cache"))
    base = f"s3://{bucket}/models/tiny-bert"
    upload_folder(tiny_bert, base)
    local = make_lora_checkpoint(tiny_bert, tmp_path / "local" / "tiny", ["a", "b", "c"])
    on_s3 = shutil.copytree(local, tmp_path / "s3copy" / "tiny")
    meta = read_checkpoint_meta(on_s3)
    write_checkpoint_meta(on_s3, meta.model_copy(update={"base_model": base}))
    upload_folder(on_s3, f"s3://{bucket}/ckpt/tiny")
    before = set(glob.glob("/tmp/raylift-model-*"))

    texts = ["card arrived late", "refund pending"]
    remote = Predictor(f"s3://{bucket}/ckpt/tiny", precision="fp32")
    expected = Predictor(local, precision="fp32")
    got, want = remote({"text": texts}), expected({"text": texts})
    assert list(got["label"]) == list(want["label"])
    assert torch.allclose(torch.tensor(got["score"]), torch.tensor(want["score"]), atol=1e-6)
    assert remote.model_name == "tiny"

    resolved = resolve_model(f"s3://{bucket}/ckpt/tiny")
    assert resolve_model(f"s3://{bucket}/ckpt/tiny").path == resolved.path  # reused
    assert resolved.path.startswith(str(tmp_path / "cache" / "checkpoints"))
    assert set(glob.glob("/tmp/raylift-model-*")) == before  # nothing left per load
    kinds = {p.name: len(list(p.glob("*/"))) for p in (tmp_path / "cache").iterdir()}
    assert kinds == {"checkpoints": 1, "models": 1}
    # A folder written again under the same URI is a new copy, not the stale one.
    server.client().put_object(Bucket=bucket, Key="ckpt/tiny/note.txt", Body=b"v2")
    assert resolve_model(f"s3://{bucket}/ckpt/tiny").path != resolved.path


def test_raylift_report_writes_its_page_and_plots_to_s3(s3_bucket, tmp_path, monkeypatch):
    """`raylift report RUN --out s3://...` end to end, on a finetune run MLflow holds."""
    import mlflow

    from jobs.cli import main as raylift

    server, bucket = s3_bucket
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(tracking)
    experiment = mlflow.create_experiment("reports", artifact_location=str(tmp_path / "mla"))
    with mlflow.start_run(experiment_id=experiment, run_name="one-run") as run:
        mlflow.log_params({"train.learning_rate": "0.001", "model.method": "lora"})
        for epoch, accuracy in enumerate([0.4, 0.7, 0.8], start=1):
            mlflow.log_metrics({"val_accuracy": accuracy, "val_loss": 1 - accuracy}, step=epoch)
    monkeypatch.chdir(tmp_path)
    out = f"s3://{bucket}/reports/{run.info.run_id}"

    code = raylift(["report", run.info.run_id, "--out", out, f"registry.tracking_uri={tracking}"])

    assert code == 0
    keys = server.keys(bucket, f"reports/{run.info.run_id}/")
    names = {key.rpartition("/")[2] for key in keys}
    assert {"report.html", "curves.png"} <= names
    body = server.client().get_object(Bucket=bucket, Key=f"reports/{run.info.run_id}/report.html")
    page = body["Body"].read().decode()
    assert "one-run" in page and 'src="curves.png"' in page
    assert "No model version was registered" in page
    png = server.client().get_object(Bucket=bucket, Key=f"reports/{run.info.run_id}/curves.png")
    assert png["Body"].read().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]  # nothing staged here
