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

    from imgclust.presets import train_steps
    assert train_steps("seed-mnist", 50_000, 256) == 10 * 196
    assert train_steps("cae-refine", 1797, 256) == 63 * 8 and train_steps("cae-refine", 70_000, 256) == 1_500
    assert train_steps("default", 1797, 256) == 235 * 8 and train_steps("default", 70_000, 256) == 28 * 274
    assert train_steps("default", 10_000, 256) == 94 * 40
    # The conv VAE presets reach at least 1,500 optimiser steps: 30 epochs of 1,797 images are 240.
    assert train_steps("seed-vae", 1797, 256) == 188 * 8 and train_steps("seed-vae", 60_000, 128) == 30 * 469
    assert train_steps("default", 1797, 256, epochs=3) == 24 and train_steps("default", 1797, 256, 3, 100) == 100


def test_the_step_budget_at_ten_million_images():
    """10M images are 39,063 batches a pass: the default trains its 7,500-step budget, a fifth of
    a pass, and its decoder still gets a fifth of those steps; the loss is recorded 20 times."""
    from imgclust.models.training import loss_round, pretext_steps
    from imgclust.presets import train_steps

    steps = train_steps("default", 10_000_000, 256)
    assert steps == 7_500
    pretext = pretext_steps("default", steps, 39_063)
    assert pretext == 6_000 and steps - pretext == 1_500
    assert loss_round(steps, 39_063) == 375
    # One whole pass is split by steps too: the decoder is never left without training.
    assert pretext_steps("default", 100, 100) == 80 and pretext_steps("default", 10 * 8, 8) == 8 * 8
    assert pretext_steps("cae-refine", 7_500, 39_063) == 0


def test_epochs_and_train_steps_exclude_each_other():
    with pytest.raises(ValidationError, match="not both"):
        cfg(epochs=3, train_steps=100)


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
