"""Keep loaded models warm across jobs in a long-running worker.

Loading a deep-learning model (reading and hashing the weights, building the
network, moving it to the device) costs seconds; a worker that segments one
study after another should pay it once.  :class:`ModelCache` keeps the most
recently used models loaded, keyed by what makes a loaded model reusable:
the backend, the hash of its weights, the device and the profile's options for
that backend.  A backend may offer a cheap ``cache_key(profile, settings)``
(reading the weights manifest, not the weights); without one, the key is the
backend name and the profile, so a model is never shared across profiles it
was not loaded for.

The cache is bounded (``max_models``); the least recently used model is
dropped first.  It is safe to call from several threads: a model is loaded
once even if two jobs ask for it at the same time.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from segnode.models.base import LoadedModel, RunSettings
from segnode.models.registry import get_backend
from segnode.profiles.schema import Backend, Profile

logger = logging.getLogger(__name__)


@dataclass
class CacheStats:
    """Counters for the benchmark and the worker's status page."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


class ModelCache:
    """A bounded, thread-safe LRU of loaded models.

    Parameters
    ----------
    max_models:
        How many loaded models to keep at most (each may hold gigabytes).
    """

    def __init__(self, max_models: int = 2) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be at least 1, got {max_models}")
        self.max_models = max_models
        self.stats = CacheStats()
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, backend_name: str | Backend, profile: Profile, settings: RunSettings) -> LoadedModel:
        """Return a loaded model for ``profile`` on ``backend_name``, loading it if needed.

        Errors of ``load`` (``WeightsError``, ``DependencyMissingError``,
        ``BackendError``) propagate unchanged and nothing is cached.
        """
        backend = get_backend(backend_name)
        key = cache_key(backend, profile, settings)
        with self._lock:
            model = self._hit(key)
            if model is not None:
                return model
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:  # one loader per key; others wait and then hit
            with self._lock:
                model = self._hit(key)
                if model is not None:
                    return model
            started = time.perf_counter()
            model = backend.load(profile, settings)
            elapsed = time.perf_counter() - started
            with self._lock:
                self.stats.misses += 1
                self.stats.load_seconds += elapsed
                self._models[key] = model
                self._evict()
                self._loading.pop(key, None)
            logger.info("loaded %s model for %s in %.2f s", backend.name.value, profile.organ, elapsed)
            return model

    def _hit(self, key: str) -> LoadedModel | None:
        model = self._models.get(key)
        if model is not None:
            self._models.move_to_end(key)
            self.stats.hits += 1
        return model

    def _evict(self) -> None:
        while len(self._models) > self.max_models:
            key, _ = self._models.popitem(last=False)
            self.stats.evictions += 1
            logger.info("dropped warm model %s", key)
        gc.collect()

    def __len__(self) -> int:
        return len(self._models)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def clear(self) -> None:
        """Drop every loaded model (e.g. before a memory-hungry job)."""
        with self._lock:
            self._models.clear()
        gc.collect()


def cache_key(backend: object, profile: Profile, settings: RunSettings) -> str:
    """The key under which a loaded model is reusable.

    Uses the backend's own ``cache_key`` (weights hash, device, options) when
    it has one; otherwise the backend name, the profile and the settings.
    """
    own = getattr(backend, "cache_key", None)
    if callable(own):
        return str(own(profile, settings))
    name = getattr(getattr(backend, "name", None), "value", str(backend))
    return f"{name}|{profile.organ}|{profile.model_dump_json()}|{settings.device}|{settings.weights_dir}"
