"""Where the node's dataset store is: the one rule harvest and the ops API both follow.

``dataset_store`` in ``node.yaml``, else ``$SEGNODE_DATASET_STORE`` (the
variable ``segnode dataset`` reads too), else ``<state_dir>/datasets``.
Harvesting (the job spec a worker gets, the label of a rejected job) and
``/api/v1/datasets`` ask :func:`dataset_store_root`, so they never disagree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol



class HasDatasetStore(Protocol):
    """The part of the node configuration the rule reads."""

    @property
    def dataset_store(self) -> Path | None: ...

    @property
    def state_dir(self) -> Path: ...


def dataset_store_root(config: HasDatasetStore) -> Path:
    """The dataset store's folder for ``config``: configured, else from the environment, else the default."""
    if config.dataset_store is not None:
        return Path(config.dataset_store)
    from segnode.storage.dataset import STORE_ENV  # the store's own module, loaded when asked

    from_env = os.environ.get(STORE_ENV)
    return Path(from_env) if from_env else config.state_dir / "datasets"
