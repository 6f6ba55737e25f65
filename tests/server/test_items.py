"""Catalog: PUT/POST/GET/DELETE /v1/items."""

from datetime import UTC, datetime

from tests.server.helpers import assert_error

ITEM = {
    "title": "Heat (1995)",
    "categories": ["Action", "Crime"],
    "attributes": {"year": 1995, "director": "Michael Mann", "rating": 8.3},
    "description": "A group of professional bank robbers ...",
    "available": True,
    "promoted": True,
    "boost": 2.5,
}


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_put_creates_item_and_returns_it(client):
    before = datetime.now(UTC)
    response = client.put("/v1/items/heat", json=ITEM)
    assert response.status_code == 200, response.text
    body = response.json()
    created_at = _parse(body.pop("created_at"))
    assert body == {"item_id": "heat", **ITEM, "hidden": False}
    assert before.timestamp() - 1 <= created_at.timestamp() <= datetime.now(UTC).timestamp() + 1

    got = client.get("/v1/items/heat")
    assert got.status_code == 200
    assert got.json() == response.json()


def test_put_defaults(client):
    response = client.put("/v1/items/m1", json={"title": "Only a title"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["categories"] == []
    assert body["attributes"] == {}
    assert body["description"] == ""
    assert body["available"] is True
    assert body["promoted"] is False
    assert body["boost"] == 0.0
    assert body["hidden"] is False


def test_put_replaces_item(client):
    client.put("/v1/items/m1", json=ITEM)
    response = client.put("/v1/items/m1", json={"title": "New", "available": False})
    assert response.status_code == 200, response.text
    body = client.get("/v1/items/m1").json()
    assert body["title"] == "New"
    assert body["available"] is False
    assert body["categories"] == []
    assert body["attributes"] == {}
    assert body["promoted"] is False


def test_created_at_given_is_stored(client):
    response = client.put("/v1/items/m1", json={"title": "A", "created_at": "2020-05-01T12:00:00Z"})
    assert response.status_code == 200, response.text
    created = _parse(client.get("/v1/items/m1").json()["created_at"])
    assert created == datetime(2020, 5, 1, 12, tzinfo=UTC)


def test_created_at_kept_across_reupserts(client):
    first = client.put("/v1/items/m1", json={"title": "A"}).json()["created_at"]
    client.put("/v1/items/m1", json={"title": "B"})
    client.post("/v1/items", json={"items": [{"item_id": "m1", "title": "C"}]})
    body = client.get("/v1/items/m1").json()
    assert body["title"] == "C"
    assert body["created_at"] == first


def test_created_at_given_kept_when_later_omitted(client):
    client.put("/v1/items/m1", json={"title": "A", "created_at": "2001-01-01T00:00:00Z"})
    client.put("/v1/items/m1", json={"title": "B"})
    created = _parse(client.get("/v1/items/m1").json()["created_at"])
    assert created == datetime(2001, 1, 1, tzinfo=UTC)


def test_created_at_overwritten_when_given_again(client):
    client.put("/v1/items/m1", json={"title": "A", "created_at": "2001-01-01T00:00:00Z"})
    client.put("/v1/items/m1", json={"title": "A", "created_at": "2002-02-02T00:00:00Z"})
    created = _parse(client.get("/v1/items/m1").json()["created_at"])
    assert created == datetime(2002, 2, 2, tzinfo=UTC)


def test_post_batch_upserts_all(client):
    items = [{"item_id": f"i{n}", "title": f"T{n}", "categories": [str(n)]} for n in range(5)]
    response = client.post("/v1/items", json={"items": items})
    assert response.status_code == 200, response.text
    assert response.json() == {"upserted": 5}
    for n in range(5):
        body = client.get(f"/v1/items/i{n}").json()
        assert body["title"] == f"T{n}"
        assert body["categories"] == [str(n)]


def test_post_batch_of_1000_accepted(client, rdb, key_prefix):
    items = [{"item_id": f"i{n}", "title": f"T{n}"} for n in range(1000)]
    response = client.post("/v1/items", json={"items": items})
    assert response.status_code == 200, response.text
    assert response.json() == {"upserted": 1000}
    assert rdb.scard(f"{key_prefix}:items") == 1000
    assert client.get("/v1/items/i999").json()["title"] == "T999"


def test_post_batch_of_1001_rejected(client, rdb, key_prefix):
    items = [{"item_id": f"i{n}", "title": f"T{n}"} for n in range(1001)]
    error = assert_error(client.post("/v1/items", json={"items": items}), 422, "validation_error")
    assert error["details"][0]["loc"] == ["body", "items"]
    assert rdb.scard(f"{key_prefix}:items") == 0
    assert_error(client.get("/v1/items/i0"), 404, "not_found")


def test_post_empty_batch_rejected(client):
    assert_error(client.post("/v1/items", json={"items": []}), 422, "validation_error")


def test_post_batch_with_one_invalid_item_writes_nothing(client):
    items = [{"item_id": "ok", "title": "fine"}, {"item_id": "bad", "title": ""}]
    error = assert_error(client.post("/v1/items", json={"items": items}), 422, "validation_error")
    assert [d["loc"] for d in error["details"]] == [["body", "items", 1, "title"]]
    assert_error(client.get("/v1/items/ok"), 404, "not_found")


def test_get_unknown_item_404(client):
    error = assert_error(client.get("/v1/items/nope"), 404, "not_found")
    assert "nope" in error["message"]


def test_delete_hides_item(client, rdb, key_prefix):
    client.put("/v1/items/m1", json=ITEM)
    response = client.delete("/v1/items/m1")
    assert response.status_code == 204
    assert response.content == b""
    # Gone for clients, kept in storage (history and feedback still name it).
    assert_error(client.get("/v1/items/m1"), 404, "not_found")
    assert rdb.hget(f"{key_prefix}:item:m1", "title") == ITEM["title"]
    assert rdb.sismember(f"{key_prefix}:hidden", "m1")
    # Deleting again is fine: the item still exists, hidden.
    assert client.delete("/v1/items/m1").status_code == 204


def test_reput_unhides_item(client, rdb, key_prefix):
    created_at = client.put("/v1/items/m1", json=ITEM).json()["created_at"]
    client.delete("/v1/items/m1")
    response = client.put("/v1/items/m1", json=ITEM)
    assert response.status_code == 200
    assert response.json()["hidden"] is False
    assert response.json()["created_at"] == created_at
    assert client.get("/v1/items/m1").json()["hidden"] is False
    assert not rdb.sismember(f"{key_prefix}:hidden", "m1")


def test_batch_upsert_unhides_item(client):
    client.put("/v1/items/m1", json=ITEM)
    client.delete("/v1/items/m1")
    client.post("/v1/items", json={"items": [{"item_id": "m1", "title": "again"}]})
    assert client.get("/v1/items/m1").json()["hidden"] is False


def test_delete_unknown_item_404(client, rdb, key_prefix):
    assert_error(client.delete("/v1/items/nope"), 404, "not_found")
    assert not rdb.exists(f"{key_prefix}:item:nope")
    assert not rdb.sismember(f"{key_prefix}:hidden", "nope")


def test_invalid_item_body_422(client):
    cases = [
        {},  # no title
        {"title": ""},
        {"title": "x", "boost": 11},
        {"title": "x", "boost": -1},
        {"title": "x", "unknown_field": 1},
        {"title": "x", "attributes": {"nested": {"a": 1}}},
        {"title": "x", "categories": [""]},
        {"title": "x", "item_id": "other"},
    ]
    for body in cases:
        assert_error(client.put("/v1/items/m1", json=body), 422, "validation_error")
    assert_error(client.get("/v1/items/m1"), 404, "not_found")


def test_invalid_item_id_422(client):
    for item_id in ("a:b", "a%20b"):
        error = assert_error(client.put(f"/v1/items/{item_id}", json=ITEM), 422, "validation_error")
        assert error["details"][0]["loc"] == ["path", "item_id"]
    too_long = "x" * 257
    assert_error(client.put(f"/v1/items/{too_long}", json=ITEM), 422, "validation_error")
    items = [{"item_id": "a b", "title": "x"}]
    error = assert_error(client.post("/v1/items", json={"items": items}), 422, "validation_error")
    assert error["details"][0]["loc"] == ["body", "items", 0, "item_id"]


def test_batch_item_ids_are_addressable(client):
    response = client.post("/v1/items", json={"items": [{"item_id": "a/b", "title": "A"}]})
    if response.status_code != 422:  # rejected up front would be fine too
        assert response.status_code == 200, response.text
        assert client.get("/v1/items/a%2Fb").status_code == 200
        assert client.delete("/v1/items/a%2Fb").status_code == 204


def test_boolean_attributes_stay_booleans(client) -> None:
    body = {"title": "A", "attributes": {"in_stock": True, "count": 1, "price": 2.5, "tag": "x"}}
    item = client.put("/v1/items/b1", json=body).json()
    assert item["attributes"] == {"in_stock": True, "count": 1, "price": 2.5, "tag": "x"}


def test_time_without_zone_is_utc(client) -> None:
    item = client.put("/v1/items/t1", json={"title": "A", "created_at": "2025-03-01T12:00:00"})
    assert item.json()["created_at"] == "2025-03-01T12:00:00Z"


def test_an_id_twice_in_a_batch_is_one_item_the_last_given(client) -> None:
    batch = {"items": [{"item_id": "d", "title": "1"}, {"item_id": "d", "title": "2"}]}
    assert client.post("/v1/items", json=batch).json() == {"upserted": 1}
    assert client.get("/v1/items/d").json()["title"] == "2"
