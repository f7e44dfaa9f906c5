import pytest
from pydantic import ValidationError

from imgclust.config import RunConfig, load_config_file


def cfg(**kw):
    return RunConfig(source="/data/in", output="/data/out", **kw)


@pytest.mark.parametrize("given, expected", [(16, (16, 16)), ("24x32", (24, 32)), ([20, 30], (20, 30)),
                                             ("40", (40, 40)), (None, (32, 32))])
def test_image_size_forms(given, expected):
    assert cfg(image_size=given).resolved_image_size == expected


def test_preset_fixes_its_own_size():
    assert cfg(preset="seed-house").resolved_image_size == (240, 320)
    from imgclust.presets import auto_epochs
    assert auto_epochs("seed-mnist", 50_000, 256) == 10
    assert auto_epochs("cae-refine", 1797, 256) == 63 and auto_epochs("cae-refine", 70_000, 256) == 6
    assert auto_epochs("default", 1797, 256) == 235 and auto_epochs("default", 70_000, 256) == 28  # 1,875 / 7,500 steps
    assert auto_epochs("default", 10_000, 256) == 94
    # The conv VAE presets reach at least 1,500 optimiser steps: 30 epochs of 1,797 images are 240.
    assert auto_epochs("seed-vae", 1797, 256) == 188 and auto_epochs("seed-vae", 60_000, 128) == 30


@pytest.mark.parametrize("kw, field", [({"image_size": "big"}, "image_size"), ({"image_size": 4}, "image_size"),
                                       ({"preset": "x"}, "preset"), ({"n_clusters": 1}, "n_clusters"),
                                       ({"seed": -1}, "seed"), ({"colour": "rgb"}, "colour")])
def test_invalid_values_name_the_field(kw, field):
    with pytest.raises(ValidationError) as err:
        cfg(**kw)
    assert field in str(err.value)


def test_output_inside_source_refused():
    with pytest.raises(ValidationError, match="must not be the source or lie inside it"):
        RunConfig(source="/data/in", output="/data/in/out")
    RunConfig(source="/data/in", output="/data/input-results")  # a sibling with a common prefix is fine


def test_schema_accepts_shorthand_sizes_for_deployments():
    schema = RunConfig.model_json_schema()["properties"]["image_size"]
    kinds = {t.get("type") for t in schema["anyOf"]}
    assert {"array", "integer", "string"} <= kinds


def test_credentials_are_never_flow_parameters():
    """Prefect stores flow parameters in clear: credentials there are refused; the CLI attaches them
    to the config for its own process only, and they never appear in what is serialised."""
    with pytest.raises(ValidationError, match="credentials \\(key, secret\\) must not be flow parameters"):
        cfg(storage_options={"key": "AKIA", "secret": "shh"})
    with pytest.raises(ValidationError, match="aws_secret_access_key"):
        cfg(storage_options={"client_kwargs": {"aws_secret_access_key": "shh"}})
    c = cfg(storage_options={"endpoint_url": "http://x"}).with_credentials({"key": "AKIA", "secret": "shh"})
    assert c.store.storage_options == {"endpoint_url": "http://x", "key": "AKIA", "secret": "shh"}
    assert "shh" not in c.model_dump_json() and "shh" not in str(c.public_dict())
    assert c.public_dict()["storage_options"] == {"endpoint_url": "***"}


def test_dask_address_from_environment(monkeypatch):
    monkeypatch.setenv("IMGCLUST_DASK_ADDRESS", "tcp://10.1.2.3:8786")
    assert cfg().dask_address == "tcp://10.1.2.3:8786"


def test_config_files(tmp_path):
    (tmp_path / "a.toml").write_text('n-clusters = 4\nimage_size = "28x28"\n')
    assert load_config_file(tmp_path / "a.toml") == {"n_clusters": 4, "image_size": "28x28"}
    (tmp_path / "b.yaml").write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config_file(tmp_path / "b.yaml")


def test_cluster_class_must_be_importable():
    assert cfg(dask_cluster_class="distributed.LocalCluster").dask_cluster_class == "distributed.LocalCluster"
    with pytest.raises(ValidationError, match="cannot import dask_jobqueue_missing.SLURMCluster"):
        cfg(dask_cluster_class="dask_jobqueue_missing.SLURMCluster")


def test_cluster_class_starts_the_named_cluster():
    from imgclust.dask_cluster import dask_client

    with dask_client(cluster_class="distributed.LocalCluster",
                     cluster_kwargs={"n_workers": 1, "processes": False, "dashboard_address": ":0"}) as client:
        assert client.submit(lambda: 41 + 1).result() == 42
        assert len(client.scheduler_info()["workers"]) == 1


def test_cli_help_states_the_config_defaults(capsys):
    """The CLI passes only what the user gives, so its help must repeat RunConfig's defaults."""
    from imgclust.cli import build_parser
    from imgclust.presets import PRESETS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"batch size (default {RunConfig.model_fields['batch_size'].default})" in text
    assert f"(default {RunConfig.model_fields['seed'].default})" in text
    lo, hi = PRESETS["default"].step_range
    assert f"{lo:,}-{hi:,}" in text  # the default preset's step budget
