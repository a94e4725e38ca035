"""What one command needs: settings, a database and the Celery app, each made on first use."""

from __future__ import annotations

from functools import cached_property

from celery import Celery
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from lorabatch.schemas.settings import Settings
from lorabatch.store import broker, db
from lorabatch.store.deployment import Deployment, deployment_of


class Context:
    """Holds the settings and lazily opens connections, so `--help` or a validation error touches nothing."""

    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def engine(self) -> Engine:
        return db.make_engine(self.settings)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return db.make_sessionmaker(self.engine)

    @cached_property
    def deployment(self) -> Deployment:
        """The deployment these settings describe: jobs submitted here are tied to it."""
        return deployment_of(self.settings)

    @cached_property
    def celery(self) -> Celery:
        return broker.make_celery(self.settings)

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()
