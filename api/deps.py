"""What routes receive through ``Depends``: the service objects and the caller.

The lifespan of :func:`sitiancal.api.app.create_app` builds one
:class:`ServiceState` and keeps it in ``app.state.sitiancal``; routes declare
what they need with the ``Annotated`` aliases below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials

from sitiancal.api.auth import Principal, TokenAuth
from sitiancal.api.metrics import Metrics
from sitiancal.service.datasets import DatasetRegistry
from sitiancal.service.runner import JobRunner
from sitiancal.service.settings import Settings
from sitiancal.storage.catalog import Catalog
from sitiancal.storage.store import ProductStore


@dataclass
class ServiceState:
    """The objects one service instance owns."""

    settings: Settings
    catalog: Catalog
    store: ProductStore
    runner: JobRunner
    datasets: DatasetRegistry
    metrics: Metrics
    auth: TokenAuth


def service(request: Request) -> ServiceState:
    """The service state of the running app."""
    return request.app.state.sitiancal


async def _catalog(request: Request) -> Catalog:
    return request.app.state.sitiancal.catalog


async def _store(request: Request) -> ProductStore:
    return request.app.state.sitiancal.store


async def _runner(request: Request) -> JobRunner:
    return request.app.state.sitiancal.runner


async def _datasets(request: Request) -> DatasetRegistry:
    return request.app.state.sitiancal.datasets


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def _settings(request: Request) -> Settings:
    return request.app.state.sitiancal.settings


async def _reader(request: Request,
            _credentials: Annotated[HTTPAuthorizationCredentials | None,
                                    Depends(TokenAuth.scheme)]) -> Principal:
    return request.app.state.auth.reader(request)


async def _operator(request: Request,
              _credentials: Annotated[HTTPAuthorizationCredentials | None,
                                      Depends(TokenAuth.scheme)]) -> Principal:
    return request.app.state.auth.operator(request)


CatalogDep = Annotated[Catalog, Depends(_catalog)]
StoreDep = Annotated[ProductStore, Depends(_store)]
RunnerDep = Annotated[JobRunner, Depends(_runner)]
DatasetsDep = Annotated[DatasetRegistry, Depends(_datasets)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
SettingsDep = Annotated[Settings, Depends(_settings)]
#: A caller allowed to read (anyone when no reader tokens are configured).
Reader = Annotated[Principal, Depends(_reader)]
#: A caller with an operator token.
Operator = Annotated[Principal, Depends(_operator)]
