"""Task: train the preset's autoencoder (``imgclust.stages.train``)."""

from __future__ import annotations

from distributed import Client
from prefect import task

from imgclust.models.training import TrainPlan
from imgclust.runstore import RunStore
from imgclust.stages.train import Trained, train_where_best


@task(name="train", retries=1, retry_delay_seconds=5)
def train_task(store: RunStore, plan: TrainPlan, ingest_key: str, address: str) -> Trained:
    with Client(address, set_as_default=False) as client:
        return train_where_best(store, plan, ingest_key, client)
