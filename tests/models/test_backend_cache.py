"""ModelCache: warm models, bounded size, one load per key under concurrency."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from segnode.errors import WeightsError
from segnode.models import hu_based
from segnode.models.base import RunSettings
from segnode.models.cache import ModelCache, cache_key
from segnode.models.registry import get_backend
from segnode.profiles import load_profile


def test_same_profile_and_settings_reuse_the_loaded_model() -> None:
    cache = ModelCache(max_models=2)
    lungs, bone = load_profile("lungs"), load_profile("bone")
    settings = RunSettings(device="cpu")
    model = cache.get("hu_based", lungs, settings)
    assert cache.get("hu_based", lungs, settings) is model
    assert cache.get("hu_based", bone, settings) is not model
    assert (cache.stats.hits, cache.stats.misses, len(cache)) == (1, 2, 2)
    cache.get("hu_based", load_profile("brain"), settings)  # a third model evicts the least recently used
    assert len(cache) == 2 and cache.stats.evictions == 1
    assert cache.get("hu_based", lungs, settings) is not model  # lungs was evicted: loaded again
    cache.clear()
    assert len(cache) == 0


def test_key_without_backend_cache_key_covers_profile_and_settings() -> None:
    backend = get_backend("hu_based")
    lungs = load_profile("lungs")
    a = cache_key(backend, lungs, RunSettings(device="cpu"))
    assert a == cache_key(backend, lungs, RunSettings(device="cpu"))
    assert a != cache_key(backend, lungs, RunSettings(device="cuda"))
    assert a != cache_key(backend, load_profile("bone"), RunSettings(device="cpu"))


def test_concurrent_gets_load_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_load = hu_based.BACKEND.load

    def slow_load(profile, settings):  # the real load, made slow enough for the threads to overlap
        calls.append(profile.organ)
        time.sleep(0.2)
        return real_load(profile, settings)

    monkeypatch.setattr(hu_based.BACKEND, "load", slow_load)
    cache = ModelCache()
    lungs = load_profile("lungs")
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("hu_based", lungs, RunSettings())))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["lungs"] and len({id(r) for r in results}) == 1 and cache.stats.hits == 3


def test_load_errors_propagate_and_nothing_is_cached(tmp_path: Path) -> None:
    cache = ModelCache()
    with pytest.raises(WeightsError, match="not installed"):
        cache.get("totalsegmentator", load_profile("liver"), RunSettings(device="cpu", weights_dir=tmp_path))
    assert len(cache) == 0 and cache.stats.misses == 0


def test_bound_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ModelCache(max_models=0)
