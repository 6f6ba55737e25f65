"""Fixtures for the HTTP API tests: apps over the test's Redis prefix, a client to inspect it."""

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def make_client(settings: Settings) -> Iterator[Callable[..., TestClient]]:
    """Start an app on a copy of `settings` with some fields changed; closed after the test."""
    with ExitStack() as stack:

        def make(**update: Any) -> TestClient:
            app = create_app(settings.model_copy(update=update))
            return stack.enter_context(TestClient(app))

        yield make
