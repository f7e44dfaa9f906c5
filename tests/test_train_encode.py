import numpy as np
import torch

from imgclust.io.arrays import create_array, open_array
from imgclust.models.batches import iter_batches
from imgclust.models.encoding import encode_array
from imgclust.models.refiner import random_shift
from imgclust.models.training import TrainPlan
from imgclust.runmodel import RunModel
from imgclust.runstore import Location, RunStore
from imgclust.stages.encode import encode
from imgclust.stages.train import train


def make_images(url: str, n: int = 100, chunk: int = 32) -> None:
    rng = np.random.default_rng(0)
    arr = create_array(url, (n, 1, 16, 16), chunk, "uint8")
    base = np.zeros((n, 1, 16, 16), np.uint8)
    for i in range(n):
        r = i % 4
        base[i, 0, r * 4:(r + 1) * 4, :] = 255
    arr[:] = np.clip(base.astype(int) + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8)


def train_at(folder, preset, epochs, batch_size, learning_rate, seed, ingest_key="", train_sample=None, n=100):
    """The train stage on a run store at ``folder`` holding ``make_images``'s images."""
    store = RunStore(str(folder))
    if not store.exists("images.zarr"):
        make_images(store.images, n=n)
    steps = epochs * -(-min(n, train_sample or n) // batch_size)
    return store, train(store, TrainPlan(preset, steps, batch_size, learning_rate, seed, "cpu", train_sample),
                        ingest_key)


def saved_spec(store):
    return RunModel.load(Location(store.model)).spec


def test_batches_cover_each_image_once_per_epoch(tmp_path):
    url = str(tmp_path / "im.zarr")
    arr = create_array(url, (103, 1, 2, 2), 10, "uint8")
    arr[:] = (np.arange(103)[:, None, None, None] % 256).astype(np.uint8) * np.ones((1, 1, 2, 2), np.uint8)
    seen = np.concatenate([b[:, 0, 0, 0] for b in iter_batches(open_array(url), 16, np.random.default_rng(0))])
    assert sorted(seen.tolist()) == list(range(103))
    assert seen.tolist() != list(range(103))  # shuffled


def test_a_corpus_that_fits_the_buffer_is_shuffled_as_a_whole(tmp_path):
    """Archives come in path order (folders group alike images): batches must still mix them all."""
    url = str(tmp_path / "im.zarr")
    arr = create_array(url, (400, 1, 2, 2), 10, "uint8")
    arr[:] = (np.arange(400)[:, None, None, None] // 2).astype(np.uint8) * np.ones((1, 1, 2, 2), np.uint8)
    whole = next(iter_batches(open_array(url), 32, np.random.default_rng(0)))[:, 0, 0, 0]
    few = next(iter_batches(open_array(url), 32, np.random.default_rng(0), buffer_bytes=0))[:, 0, 0, 0]
    assert len(np.unique(whole // 5)) > 20  # rows from more than 20 of the 40 chunks
    assert len(np.unique(few // 5)) <= 4  # the bounded buffer: 4 chunks


def test_random_shift_moves_content():
    x = torch.zeros(4, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1
    y = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.allclose(y.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))
    assert not torch.equal(x, y)


def test_train_is_reproducible_and_loss_falls(tmp_path, client):
    store, a = train_at(tmp_path / "a", "cae-refine", 4, 16, 1e-3, 7)
    _, b = train_at(tmp_path / "b", "cae-refine", 4, 16, 1e-3, 7)
    assert a.weights_sha256 == b.weights_sha256
    assert a.losses[-1] < a.losses[0]
    model = RunModel.load(Location(store.model)).autoencoder
    assert model.encode(torch.rand(3, 1, 16, 16)).shape == (3, a.code_dim)
    url = store.images

    enc = encode(store, a.ref, 16, client)
    codes = open_array(store.codes)[:]
    assert codes.shape == (100, 32) and np.isfinite(codes).all()
    direct = model.encode(torch.from_numpy(open_array(url)[:5]).float() / 255).detach().numpy()
    np.testing.assert_allclose(codes[:5], direct, rtol=1e-4, atol=1e-4)
    assert 0 < enc.reconstruction_mse < 0.2


def test_reconstruction_error_on_every_kth_row_keeps_every_code():
    torch.manual_seed(0)
    from imgclust.models.autoencoders import build_model

    model = build_model({"architecture": "conv-dense", "channels": 1, "image_size": [16, 16], "code_dim": 8}).eval()
    pixels = np.random.default_rng(0).integers(0, 255, (23, 1, 16, 16), dtype=np.uint8)
    codes, sq, n = encode_array(model, pixels, 5)
    sampled, sq3, n3 = encode_array(model, pixels, 5, every=3, first=1)
    np.testing.assert_array_equal(codes, sampled)
    x = torch.from_numpy(pixels).float() / 255
    with torch.no_grad():
        per_row = ((model.decode(model.encode(x)) - x) ** 2).mean(dim=(1, 2, 3)).numpy()
    rows = [i for i in range(23) if (1 + i) % 3 == 0]
    assert (n, n3) == (23, len(rows)) == (23, 7)
    np.testing.assert_allclose([sq, sq3], [per_row.sum(), per_row[rows].sum()], rtol=1e-5)


def test_train_sample_trains_on_a_fixed_subset_and_a_finished_training_is_reused(tmp_path, caplog):
    import logging

    from imgclust.models.training import training_rows

    rows = training_rows(100, 30, 3)
    assert len(rows) == 30 and (np.diff(rows) > 0).all() and (rows == training_rows(100, 30, 3)).all()
    assert training_rows(100, 200, 3) is None
    store, a = train_at(tmp_path / "a", "default", 2, 16, 1e-3, 7, "k", train_sample=30)
    spec = saved_spec(store)
    assert spec["train_sample"] == 30
    _, full = train_at(tmp_path / "b", "default", 2, 16, 1e-3, 7, "k")
    assert full.weights_sha256 != a.weights_sha256
    with caplog.at_level(logging.INFO, logger="imgclust"):
        _, again = train_at(tmp_path / "a", "default", 2, 16, 1e-3, 7, "k", train_sample=30)
    assert again.weights_sha256 == a.weights_sha256 and "already done" in caplog.text


def test_weights_do_not_depend_on_torch_threads_set_earlier_in_the_process(tmp_path):
    """A test process or a notebook may have changed torch's thread count; training pins its own."""
    from imgclust.threads import local_cores

    if local_cores() < 2:
        import pytest

        pytest.skip("needs 2 cores to differ from a 1-thread setting")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, a = train_at(tmp_path / "a", "default", 3, 32, 1e-3, 3, n=200)
        assert torch.get_num_threads() == 1  # put back afterwards
        torch.set_num_threads(local_cores())
        _, b = train_at(tmp_path / "b", "default", 3, 32, 1e-3, 3, n=200)
    finally:
        torch.set_num_threads(before)
    assert a.weights_sha256 == b.weights_sha256


def test_cuda_is_checked_where_training_will_run():
    """A cluster whose GPU workers have no CUDA fails before any work, naming them; so does a
    cluster without GPU workers on a machine without CUDA (training then runs in this process)."""
    import pytest
    from distributed import Client, LocalCluster

    from imgclust.stages.train import check_training_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, resources={"GPU": 1},
                      dashboard_address=None) as cluster, Client(cluster, set_as_default=False) as client:
        check_training_device(client, "auto")
        with pytest.raises(ValueError, match=r"workers that declare a GPU resource \(.+\) have no CUDA device"):
            check_training_device(client, "cuda")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client, pytest.raises(ValueError, match="no worker declares a GPU resource"):
        check_training_device(client, "cuda")


def test_a_stream_resumed_at_a_buffer_boundary_yields_the_uninterrupted_batches(tmp_path):
    from imgclust.models.batches import BatchStream

    url = str(tmp_path / "im.zarr")
    arr = create_array(url, (230, 1, 2, 2), 10, "uint8")
    arr[:] = np.arange(230, dtype=np.uint8).reshape(-1, 1, 1, 1).repeat(4, 1).reshape(230, 1, 2, 2)
    array = open_array(url)
    whole, states = [], {}
    stream = BatchStream(array, 16, np.random.default_rng(5), buffer_chunks=3, buffer_bytes=0)
    for batch in stream:
        whole.append(batch[:, 0, 0, 0].copy())
        if stream.boundary is not None:
            rng_state = stream.rng.bit_generator.state
            states[len(whole)] = ({**stream.boundary, "remainder": stream.boundary["remainder"].copy()}, rng_state)
    assert len(whole) == -(-230 // 16) and len(states) >= 3
    assert sorted(np.concatenate(whole).tolist()) == list(range(230))
    for done, (position, rng_state) in states.items():
        rng = np.random.default_rng()
        rng.bit_generator.state = rng_state
        rest = [b[:, 0, 0, 0] for b in BatchStream(array, 16, rng, buffer_chunks=3, buffer_bytes=0, resume=position)]
        assert len(rest) == len(whole) - done
        for a, b in zip(rest, whole[done:]):
            np.testing.assert_array_equal(a, b)


def test_training_resumed_inside_a_pass_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch):
    """Fewer steps than one pass, over several shuffle buffers: checkpoints come at buffer ends,
    and training resumed from any of them gives the same weights."""
    import imgclust.models.batches as batches
    import imgclust.models.training as training
    from imgclust.models.training import read_checkpoint, train_autoencoder

    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(batches, "BUFFER_BYTES", 0)  # 4 chunks of 32 per buffer
    url = str(tmp_path / "im.zarr")
    make_images(url, n=400, chunk=32)
    images = open_array(url)
    plan = TrainPlan("cae-refine", 20, 16, 1e-3, 3, "cpu")  # a pass is 25 steps
    saved: list[bytes] = []
    full = train_autoencoder(images, plan, save_checkpoint=saved.append)
    mid = [c for c in saved if read_checkpoint(c)["stream"] is not None]
    assert mid and all(0 < read_checkpoint(c)["step"] < 20 for c in mid)
    assert full.spec["train_steps"] == 20 and full.spec["round_steps"] == 1 and len(full.losses) == 20
    for checkpoint in (mid[0], mid[-1]):
        again = train_autoencoder(images, plan, load_checkpoint=lambda c=checkpoint: c)
        assert again.resumed_from_step == read_checkpoint(checkpoint)["step"]
        for (name, a), b in zip(full.model.state_dict().items(), again.model.state_dict().values()):
            assert torch.equal(a, b), name
        assert again.losses == full.losses


def test_a_train_sample_is_copied_once_and_training_reads_only_the_copy(tmp_path, client, monkeypatch):
    import imgclust.stages.train as stage
    from imgclust.stages.train import train_where_best

    store = RunStore(str(tmp_path))
    make_images(store.images, n=100, chunk=32)
    seen = []
    real = stage.train_autoencoder

    def spy(images, plan, *args, **kwargs):
        seen.append((images.store_path, images.shape[0]))
        return real(images, plan, *args, **kwargs)

    monkeypatch.setattr(stage, "train_autoencoder", spy)
    plan = TrainPlan("cae-refine", 4, 16, 1e-3, 7, "cpu", train_sample=30)
    trained = train_where_best(store, plan, "k", client)
    assert len(seen) == 1 and seen[0][1] == 30 and "train-sample.zarr" in str(seen[0][0])
    assert saved_spec(store)["train_sample"] == 30 and trained.code_dim > 0
    assert not store.exists("_work/train-sample.zarr")  # removed once the model is saved
    # The copy holds exactly the sampled rows, in order.
    from imgclust.models.training import training_rows

    url = stage.sampled_copy(store, plan, "k", client)
    np.testing.assert_array_equal(open_array(url)[:], open_array(store.images)[:][training_rows(100, 30, 7)])
