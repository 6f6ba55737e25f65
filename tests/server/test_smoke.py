def test_item_roundtrip(client):
    r = client.put("/v1/items/a", json={"title": "A", "categories": ["x"]})
    assert r.status_code == 200, r.text
    r = client.post(
        "/v1/feedback", json={"events": [{"user_id": "u", "item_id": "a", "type": "click"}]}
    )
    assert r.json() == {"accepted": 1, "duplicates": 0}, r.text
    r = client.get("/v1/users/u")
    assert r.json()["history"][0]["item_id"] == "a", r.text
