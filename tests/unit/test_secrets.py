"""Credentials never go in a URI or a config: every URI-valued key refuses them (overrides
included), catalog.properties refuses secret properties, and whatever echoes a URI redacts it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.storage import credentials_in_uri, redact_credentials
from jobs.config import ConfigError, LifecycleConfig, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "banking77" / "minilm_lora.yaml"
SECRET = "wJalrXUtn/FEMI+K7MDENG"  # an AWS-style secret key: it may hold `/`
S3_KEYS = f"s3://AKIAEXAMPLE:{SECRET}@bucket/folder"
TOKEN = "ghp_t0kenSECRET"  # a bare token as the user of an https URI
AWS_FIX = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
MLFLOW_FIX = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
PG_FIX = "PGPASSWORD"


def _refusal(*overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, parse_overrides(list(overrides)))
    return err.value


@pytest.mark.parametrize(
    ("key", "uri", "shown", "fix"),
    [
        (
            "catalog.uri",
            f"postgresql+psycopg2://ice:{SECRET}@db/iceberg",
            "postgresql+psycopg2://***@db/iceberg",
            PG_FIX,
        ),
        (
            "catalog.uri",
            f"https://client:{SECRET}@iceberg-rest:8181",
            "https://***@iceberg-rest:8181",
            "PYICEBERG_CATALOG__",
        ),
        ("catalog.warehouse", S3_KEYS, "s3://***@bucket/folder", AWS_FIX),
        ("data.source", f"{S3_KEYS}/x.parquet", "s3://***@bucket/folder/x.parquet", AWS_FIX),
        ("train.checkpoint_dir", S3_KEYS, "s3://***@bucket/folder", AWS_FIX),
        (
            "registry.tracking_uri",
            f"https://alice:{SECRET}@mlflow.internal",
            "https://***@mlflow.internal",
            MLFLOW_FIX,
        ),
        (
            "registry.tracking_uri",
            f"https://{TOKEN}@mlflow.internal",
            "https://***@mlflow.internal",
            MLFLOW_FIX,
        ),
        (
            "registry.tracking_uri",
            f"postgresql://mlflow:{SECRET}@db/mlflow",
            "postgresql://***@db/mlflow",
            PG_FIX,
        ),
        ("registry.artifact_location", S3_KEYS, "s3://***@bucket/folder", AWS_FIX),
        ("model.base", f"{S3_KEYS}/minilm", "s3://***@bucket/folder/minilm", AWS_FIX),
        (
            "serve.model_uri",
            f"https://alice:{SECRET}@mlflow/models/m",
            "https://***@mlflow/models/m",
            MLFLOW_FIX,
        ),
        (
            "score.model_uri",
            f"gs://key:{SECRET}@bucket/m",
            "gs://***@bucket/m",
            "GOOGLE_APPLICATION_CREDENTIALS",
        ),
        (
            "catalog.properties.s3.endpoint",
            f"http://minio:{SECRET}@minio:9000",
            "http://***@minio:9000",
            MLFLOW_FIX,
        ),
    ],
)
def test_credentials_in_a_uri_key_are_refused_naming_the_key_and_the_fix(key, uri, shown, fix):
    if key.startswith("catalog.properties."):
        override = f'catalog.properties={{"{key.removeprefix("catalog.properties.")}": "{uri}"}}'
    else:
        override = f"{key}={uri}"
    err = _refusal(override)
    assert len(err.errors) == 1
    assert err.errors[0].startswith(f"  {key}: {shown} holds credentials; remove them"), err
    assert fix in str(err)
    for secret in (SECRET, TOKEN):
        assert secret not in str(err) and secret not in repr(err.errors)


def test_every_refused_key_is_reported_at_once():
    err = _refusal(
        f"train.checkpoint_dir={S3_KEYS}",
        f"registry.tracking_uri=https://alice:{SECRET}@mlflow",
        f"promote.allowed_base_models=[all-MiniLM-L6-v2, '{S3_KEYS}']",
    )
    keys = sorted(line.split(":")[0].strip() for line in err.errors)
    assert keys == [
        "promote.allowed_base_models.1",
        "registry.tracking_uri",
        "train.checkpoint_dir",
    ]
    assert SECRET not in str(err)


def test_a_search_space_that_could_sample_credentials_is_refused_without_echoing_them():
    err = _refusal(
        "tune.search_space={model.base: {type: choice, values: "
        f"[all-MiniLM-L6-v2, '{S3_KEYS}']}}}}"
    )
    assert "tune.search_space.model.base" in str(err) and "s3://***@bucket" in str(err)
    assert SECRET not in str(err)


@pytest.mark.parametrize(
    "override",
    [
        "registry.tracking_uri=postgresql://mlflow@db/mlflow",  # password from PGPASSWORD
        "catalog.uri=postgresql+psycopg2://iceberg@db:5432/iceberg",
        "registry.tracking_uri=http://mlflow:5000",
        "registry.tracking_uri=databricks",
        "train.checkpoint_dir=s3://bucket/runs/ckpt@v2",
        "train.checkpoint_dir=/mnt/team@lab/checkpoints",  # a local folder with an @
        "data.source=file:///data/a:b@c/x.parquet",
        "catalog.warehouse=abfss://lake@account.dfs.core.windows.net/wh",  # container@account
        "serve.model_uri=models:/ticket-router@production",
        "score.model_uri=models://scope:prefix@databricks/ticket-router/3",  # a secret scope
        "registry.artifact_location=http://mlflow:5000/api@v2/artifacts",  # a port, then a path
    ],
)
def test_look_alikes_without_credentials_stay_allowed(override):
    key, _, value = override.partition("=")
    config = load_config(CONFIG, parse_overrides([override]))
    section, _, leaf = key.partition(".")
    assert getattr(getattr(config, section), leaf) == value


@pytest.mark.parametrize(
    ("prop", "env"),
    [
        ("s3.secret-access-key", "AWS_SECRET_ACCESS_KEY"),
        ("s3.access-key-id", "AWS_ACCESS_KEY_ID"),
        ("s3.session-token", "AWS_SESSION_TOKEN"),
        ("client.secret-access-key", "AWS_SECRET_ACCESS_KEY"),
        ("glue.secret-access-key", "AWS_SECRET_ACCESS_KEY"),
        ("token", "PYICEBERG_CATALOG__RAYLIFT__TOKEN"),
        ("credential", "PYICEBERG_CATALOG__RAYLIFT__CREDENTIAL"),
        ("adls.account-key", "PYICEBERG_CATALOG__RAYLIFT__ADLS__ACCOUNT_KEY"),
        ("adls.sas-token", "PYICEBERG_CATALOG__RAYLIFT__ADLS__SAS_TOKEN"),
        ("gcs.oauth2.token", "PYICEBERG_CATALOG__RAYLIFT__GCS__OAUTH2__TOKEN"),
        ("header.authorization", "PYICEBERG_CATALOG__RAYLIFT__HEADER__AUTHORIZATION"),
    ],
)
def test_secret_catalog_properties_are_refused_with_the_variable_to_set(prop, env, monkeypatch):
    err = _refusal(f'catalog.properties={{"{prop}": "{SECRET}", "s3.region": "eu-west-1"}}')
    assert err.errors == [
        f"  catalog.properties: {prop} is a secret: remove it and set {env} on every node instead"
    ]
    if env.startswith("PYICEBERG_"):  # the name pyiceberg reads back as that property
        from pyiceberg.utils.config import Config

        monkeypatch.setenv(env, SECRET)
        assert Config().get_catalog_config("raylift")[prop] == SECRET


def test_plain_catalog_properties_stay_allowed():
    props = {
        "s3.endpoint": "http://minio:9000",
        "s3.region": "eu-west-1",
        "s3.force-virtual-addressing": "false",
        "s3.sse-kms-key-id": "arn:aws:kms:eu-west-1:111122223333:key/abc",
        "oauth2-server-uri": "https://auth.internal/token",
        "warehouse": "lake",
    }
    body = ", ".join(f'"{k}": "{v}"' for k, v in props.items())
    config = load_config(CONFIG, parse_overrides([f"catalog.properties={{{body}}}"]))
    assert config.catalog.properties == props


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (S3_KEYS, "s3://***@bucket/folder"),
        ("https://tok3n@mlflow/x", "https://***@mlflow/x"),
        ("http://u:@h", "http://***@h"),
        ("postgresql://u:1234@db/x", "postgresql://***@db/x"),
        ("s3://k:p@ss@bucket/x", "s3://***@bucket/x"),  # an unescaped @ in the password
        ("postgresql://mlflow@db/mlflow", "postgresql://mlflow@db/mlflow"),
        ("models:/m@production", "models:/m@production"),
        ("http://mlflow:5000/a@b", "http://mlflow:5000/a@b"),
        ("/home/a@b/c and x@y", "/home/a@b/c and x@y"),
        (
            "uri='https://a:b@h/x' <code>s3://k:s@b/p</code> \"gs://k:s@b\"",
            "uri='https://***@h/x' <code>s3://***@b/p</code> \"gs://***@b\"",
        ),
    ],
)
def test_redaction_hides_the_userinfo_of_uris_with_credentials_only(text, redacted):
    assert redact_credentials(text) == redacted
    if " " not in text:  # a URI: refused exactly when redaction changes it
        assert (credentials_in_uri(text) is None) == (redacted == text)


def test_shipped_configs_hold_no_credentials():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        text = path.read_text()
        assert redact_credentials(text) == text, path


def _unchecked(tracking_uri: str) -> LifecycleConfig:
    """A config whose tracking URI skipped validation (model_copy does not validate)."""
    config = LifecycleConfig(name="t")
    registry = config.registry.model_copy(update={"tracking_uri": tracking_uri})
    return config.model_copy(update={"registry": registry})


def test_ui_and_report_redact_the_tracking_uri_they_echo():
    from jobs import report, ui

    config = _unchecked(f"https://alice:{SECRET}@mlflow.internal")
    with pytest.raises(ValueError, match=r"https://\*\*\*@mlflow\.internal is already") as err:
        ui.server_command(config, 5000)
    assert SECRET not in str(err.value)

    run = SimpleNamespace(
        info=SimpleNamespace(run_id="r1", status="FINISHED", start_time=0, end_time=0)
    )
    search = SimpleNamespace(run=run, kind="tune", metric="m", mode="max", trials=[], max_epochs=1)
    page = report._header(config, search, "t")
    assert "https://***@mlflow.internal" in page and SECRET not in page

    class _NoRuns:
        def get_run(self, run_id):
            from mlflow.exceptions import MlflowException

            raise MlflowException("not found")

    with pytest.raises(LookupError) as err:
        report._get_run(_NoRuns(), config, "r1")
    assert "https://***@mlflow.internal" in str(err.value) and SECRET not in str(err.value)


def test_report_refuses_credentials_in_its_out_uri():
    from jobs import report

    with pytest.raises(
        ValueError, match=r"--out=s3://\*\*\*@bucket/folder holds credentials"
    ) as err:
        report.main(LifecycleConfig(name="t"), "r1", out=S3_KEYS)
    assert SECRET not in str(err.value)


def test_serve_config_never_writes_credentials_into_a_manifest():
    from cluster import kuberay_gen

    with pytest.raises(ConfigError) as err:
        kuberay_gen.serve_config(
            str(CONFIG), [f"registry.tracking_uri=https://alice:{SECRET}@mlflow"]
        )
    assert "registry.tracking_uri: https://***@mlflow" in str(err.value)
    assert SECRET not in str(err.value)
    with pytest.raises(ConfigError) as err:  # its own check, for a config that skipped validation
        kuberay_gen._require_shared_registry(_unchecked(f"https://alice:{SECRET}@mlflow:5000"))
    assert "https://***@mlflow:5000 holds credentials" in str(err.value)
    assert SECRET not in str(err.value)
