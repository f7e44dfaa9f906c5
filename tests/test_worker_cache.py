from imgclust.worker_cache import worker_cached


def test_loads_once_per_key_and_replaces_the_old_version():
    loads: list[str] = []

    def loader(name: str):
        def load():
            loads.append(name)
            return object()
        return load

    a = worker_cached("test-slot", "v1", loader("v1"))
    assert worker_cached("test-slot", "v1", loader("v1")) is a
    b = worker_cached("test-slot", "v2", loader("v2"))
    assert b is not a and loads == ["v1", "v2"]
    other = worker_cached("test-other-slot", "v1", loader("other"))
    assert worker_cached("test-slot", "v2", loader("v2")) is b and other is not b
    assert loads == ["v1", "v2", "other"]
