"""Redis key layout. Every key and channel of a deployment starts with its prefix.

``item:{id}`` hash · ``items`` set of ids · ``hidden`` set of hidden ids · ``user:{id}`` hash ·
``users`` set · ``user:{id}:hist`` sorted set (item -> event time, capped; events at exactly one
time a microsecond apart in arrival order; ``user:{id}:hist:ties`` sorted set: each time still in
it -> the score of the last event numbered there) · ``user:{id}:seen`` set
· ``pop`` sorted set (item -> positive events) · ``events`` stream (feedback) ·
``eventid:{user_id}:{event_id}`` de-duplication marker (event ids are per user; it holds the token
of the call that stored the event) ·
``items:created`` sorted set (item -> created time) · ``items:version``
counter of item writes · ``impressions`` stream (every served list) · ``shown:{request_id}`` the
user and the version it served (expires; ``served:`` held the version alone, before) ·
``model:active`` version string · ``model-updates`` pub/sub channel · ``user:{id}:ratings``
hash (item -> the user's latest rating) · ``user:{id}:rated`` sorted set (item -> rating time,
capped, ties as in hist, with ``user:{id}:rated:ties``) ·
``user:{id}:rated_at`` hash (item -> rating time) · ``ratings:sum`` and ``ratings:count``
hashes (item -> sum and number of its ratings) · ``ratings:total`` hash (sum, count over every
rating) · ``load:unfinished`` set while a dataset load runs.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def item(self, item_id: str) -> str:
        return self._k("item", item_id)

    def user(self, user_id: str) -> str:
        return self._k("user", user_id)

    def history(self, user_id: str) -> str:
        return self._k("user", user_id, "hist")

    def seen(self, user_id: str) -> str:
        return self._k("user", user_id, "seen")

    def ratings(self, user_id: str) -> str:
        return self._k("user", user_id, "ratings")

    def rated(self, user_id: str) -> str:
        return self._k("user", user_id, "rated")

    @property
    def rating_sums(self) -> str:
        return self._k("ratings", "sum")

    @property
    def rating_counts(self) -> str:
        return self._k("ratings", "count")

    @property
    def rating_total(self) -> str:
        return self._k("ratings", "total")

    @property
    def items(self) -> str:
        return self._k("items")

    @property
    def hidden(self) -> str:
        return self._k("hidden")

    @property
    def users(self) -> str:
        return self._k("users")

    @property
    def popularity(self) -> str:
        return self._k("pop")

    @property
    def events(self) -> str:
        return self._k("events")

    @property
    def created(self) -> str:
        return self._k("items", "created")

    @property
    def catalog_version(self) -> str:
        return self._k("items", "version")

    @property
    def impressions(self) -> str:
        return self._k("impressions")

    def served(self, request_id: str) -> str:
        """Before 2026-12-06: the version alone; read until those keys expire."""
        return self._k("served", request_id)

    def shown(self, request_id: str) -> str:
        return self._k("shown", request_id)

    @property
    def active_model(self) -> str:
        return self._k("model", "active")

    @property
    def previous_model(self) -> str:
        return self._k("model", "previous")

    @property
    def pruning(self) -> str:
        return self._k("model", "pruning")

    @property
    def prune_lock(self) -> str:
        return self._k("model", "prune-lock")

    @property
    def loading(self) -> str:
        return self._k("load", "unfinished")

    @property
    def trainer_lock(self) -> str:
        return self._k("trainer", "lock")

    @property
    def model_updates(self) -> str:
        return self._k("model-updates")
