"""The item index: vectors from interactions and text, faiss search, versioned files on disk.

Most tests use a handmade catalog of two taste clusters (space films and love stories) whose
items only co-occur within their cluster, plus one new item per cluster with no interactions.
The last test measures retrieval on MovieLens 100K against popularity.
"""

import asyncio
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from server import index_files, item_index
from server import serving as serving_module
from server.config import Settings
from server.index_files import current_version, index_dir, load_current, publish
from server.item_index import ItemIndex
from server.loaders.movielens import read_ml100k
from server.schemas import ItemUpsert
from server.serving import Serving
from server.store import open_store
from trainer import index_build
from trainer.evaluation.split import load_split
from trainer.index_build import build_index

PER_CLUSTER = 45  # 90 items + 2 new: more than dim + oversampling, so the randomized path runs
SPACE_WORDS = ["Orbit", "Galaxy", "Nova", "Comet", "Nebula", "Rocket", "Pulsar", "Quasar", "Moon"]
LOVE_WORDS = ["Kiss", "Letters", "Promise", "Hearts", "Wedding", "Roses", "Valentine", "Darling"]


def _items() -> list[ItemUpsert]:
    items = []
    for k in range(PER_CLUSTER):
        word = SPACE_WORDS[k % len(SPACE_WORDS)]
        items.append(
            ItemUpsert(
                item_id=f"a{k}",
                title=f"Star {word} {k}",
                categories=["sci-fi", "space"],
                description="A crew travels among the stars.",
                attributes={"mood": "epic"},
            )
        )
        word = LOVE_WORDS[k % len(LOVE_WORDS)]
        items.append(
            ItemUpsert(
                item_id=f"b{k}",
                title=f"Love {word} {k}",
                categories=["romance"],
                description="Two people fall in love.",
                attributes={"mood": "tender"},
            )
        )
    # New items: no interactions, only texts like their clusters'.
    items.append(ItemUpsert(item_id="a-new", title="Star Comet Returns", categories=["sci-fi"]))
    items.append(ItemUpsert(item_id="b-new", title="Love Letters Again", categories=["romance"]))
    return items


def _sequences(seed: int = 0, users: int = 200, length: int = 12) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    sequences = []
    for user in range(users):
        cluster = "a" if user % 2 == 0 else "b"
        picks = rng.choice(PER_CLUSTER, size=length, replace=False)
        sequences.append([f"{cluster}{k}" for k in picks])
    return sequences


@pytest.fixture(scope="module")
def index() -> ItemIndex:
    return build_index(_items(), _sequences(), dim=8, seed=0)


def _ids(results: list[tuple[str, float]]) -> list[str]:
    return [item_id for item_id, _ in results]


# Search ---------------------------------------------------------------------------------------


def test_a_history_retrieves_its_own_cluster_first(index: ItemIndex) -> None:
    # Every other space film (the new one included) ranks above every love story.
    results = index.search(["a1", "a2", "a3"], n=PER_CLUSTER - 2)
    assert len(results) == PER_CLUSTER - 2
    assert all(item_id.startswith("a") for item_id in _ids(results)), results
    scores = [score for _, score in results]
    assert scores == sorted(scores, reverse=True)
    # cosine + popularity prior
    assert -1.0 - 1e-5 <= scores[-1] <= scores[0] <= 1.0 + item_index.POPULARITY_WEIGHT + 1e-5


@pytest.mark.parametrize("n", [1, 7, 50, 500])
def test_history_and_excluded_items_are_never_returned_and_n_is_respected(
    index: ItemIndex, n: int
) -> None:
    history = ["a1", "a2", "a3"]
    # Excluding every other space film forces the search past the whole first cluster.
    exclude = {f"a{k}" for k in range(4, PER_CLUSTER)} | {"a-new", "not-in-catalog"}
    results = index.search(history, n=n, exclude=exclude)
    available = len(index) - len(history) - (len(exclude) - 1)
    assert len(results) == min(n, available)
    assert not set(_ids(results)) & (set(history) | exclude)
    assert len(set(_ids(results))) == len(results)


def test_zero_or_negative_n_returns_nothing(index: ItemIndex) -> None:
    assert index.search(["a1"], n=0) == []
    assert index.search(["a1"], n=-3) == []


def test_unknown_history_ids_are_ignored(index: ItemIndex) -> None:
    assert index.search(["nope", "never-seen"], n=10) == []
    assert index.search([], n=10) == []
    assert index.search(["nope", "a1", "gone"], n=10) == index.search(["a1"], n=10)


def test_the_newest_history_items_weigh_most(index: ItemIndex) -> None:
    # History is newest last. Two films of each cluster: only their order tells which cluster
    # the user is in now.
    towards_love = index.search(["a1", "a2", "b1", "b2"], n=5)
    towards_space = index.search(["b1", "b2", "a1", "a2"], n=5)
    assert len(towards_love) == len(towards_space) == 5
    assert all(item_id.startswith("b") for item_id in _ids(towards_love)), towards_love
    assert all(item_id.startswith("a") for item_id in _ids(towards_space)), towards_space


def test_a_new_item_lands_near_the_items_its_text_resembles(index: ItemIndex) -> None:
    assert {"a-new", "b-new"} <= set(index.item_ids)
    space = _ids(index.search(["a1", "a2", "a3"], n=PER_CLUSTER - 2))  # every other space item
    love = _ids(index.search(["b1", "b2", "b3"], n=PER_CLUSTER - 2))
    assert "a-new" in space and "b-new" not in space
    assert "b-new" in love and "a-new" not in love
    vector = index.vector("a-new")
    assert vector @ index.vector("a5") > vector @ index.vector("b5")
    assert index.manifest["text_mapped_items"] == 2


def test_without_interactions_items_are_placed_by_text_alone() -> None:
    index = build_index(_items(), [], dim=8)
    assert index.manifest["warm_items"] == 0
    results = _ids(index.search(["a1"], n=10))
    assert len(results) == 10
    assert all(item_id.startswith("a") for item_id in results), results


def test_any_object_with_id_title_and_categories_can_be_indexed() -> None:
    @dataclass
    class Product:
        item_id: str
        title: str
        categories: list[str]

    products = [Product(f"p{k}", f"Trail shoe {k}", ["shoes"]) for k in range(5)]
    index = build_index(products, [["p0", "p1", "p2"], ["p1", "p2", "p3", "ghost"]], dim=4)
    assert len(index) == 5 and "p4" in index and "ghost" not in index
    assert set(_ids(index.search(["p1"], n=10))) == {"p0", "p2", "p3", "p4"}
    with pytest.raises(KeyError):
        index.vector("ghost")


def test_popularity_breaks_ties_between_equally_similar_items() -> None:
    @dataclass
    class Film:
        item_id: str
        title: str
        categories: list[str]

    films = [Film(item_id, item_id, []) for item_id in ("seen", "rare", "hit")]
    # "rare" and "hit" each follow "seen" once; "hit" is also watched alone three more times.
    sequences = [["seen", "rare"], ["seen", "hit"], ["hit"], ["hit"], ["hit"]]
    index = build_index(films, sequences, dim=4)
    np.testing.assert_allclose(index.vector("rare"), index.vector("hit"), atol=1e-6)
    (first, first_score), (second, second_score) = index.search(["seen"], n=2)
    assert (first, second) == ("hit", "rare")
    assert first_score > second_score


def test_priors_grow_with_interactions_and_new_items_get_the_median() -> None:
    priors = index_build._priors([np.array([0, 1, 1]), np.array([2, 2, 2, 2])], 4)
    assert priors[0] < priors[1] < priors[2] == pytest.approx(item_index.POPULARITY_WEIGHT)
    assert priors[3] == pytest.approx(priors[1])  # the median of the three others
    assert not index_build._priors([], 3).any()


# Vectors --------------------------------------------------------------------------------------


def test_popularity_is_relative_log_popularity_for_indexed_items_only() -> None:
    items = [
        ItemUpsert(item_id=f"p{k}", title=f"Trail shoe {k}", categories=["shoes"]) for k in range(4)
    ]
    index = build_index(items, [["p0", "p1"], ["p1"], ["p1", "p2"], ["p1"]], dim=2)

    popularity = index.popularity(["p0", "p1", "p2", "p3", "ghost"])

    assert popularity["p1"] == pytest.approx(1.0)  # the most popular item
    assert popularity["p0"] == pytest.approx(np.log(2) / np.log(5))  # 1 interaction of 4
    assert 0 < popularity["p3"] < 1  # never seen: the median of the others
    assert "ghost" not in popularity


def test_build_is_deterministic_and_vectors_are_unit_length(index: ItemIndex) -> None:
    again = build_index(_items(), _sequences(), dim=8, seed=0)
    for item_id in index.item_ids:
        np.testing.assert_array_equal(again.vector(item_id), index.vector(item_id))
        assert np.linalg.norm(index.vector(item_id)) == pytest.approx(1.0, abs=1e-5)
    assert again.manifest["content_sha256"] == index.manifest["content_sha256"]


def test_version_differs_when_contents_differ(index: ItemIndex) -> None:
    other = build_index(_items(), _sequences(seed=1), dim=8, seed=0)
    assert other.version != index.version
    assert other.manifest["content_sha256"] != index.manifest["content_sha256"]
    assert index_files._VERSION.match(index.version)


def test_sparse_products_match_dense_numpy() -> None:
    rng = np.random.default_rng(0)
    dense = rng.random((300, 200)) * (rng.random((300, 200)) < 0.05)
    rows, cols = np.nonzero(dense)
    sparse = index_build._Sparse.from_triplets(rows, cols, dense[rows, cols], dense.shape)
    block = rng.standard_normal((200, 7))
    # Both product strategies, whatever the fill threshold would pick.
    np.testing.assert_allclose(sparse._blocked_product(block), dense @ block, atol=1e-10)
    np.testing.assert_allclose(sparse._sparse_product(block), dense @ block, atol=1e-10)
    other = rng.standard_normal((300, 3))
    np.testing.assert_allclose(sparse.T @ other, dense.T @ other, atol=1e-10)


def test_randomized_eigenvectors_reconstruct_a_low_rank_matrix() -> None:
    rng = np.random.default_rng(0)
    factors = rng.standard_normal((200, 6))
    matrix = factors @ factors.T  # positive semi-definite, rank 6
    vectors = index_build._top_eigen(lambda q: matrix @ q, 200, dim=6, seed=0)
    np.testing.assert_allclose(vectors @ vectors.T, matrix, atol=1e-6 * np.abs(matrix).max())


# Files and published versions -----------------------------------------------------------------


def test_save_and_load_give_the_same_index(index: ItemIndex, tmp_path: Path) -> None:
    index_files.save(index, tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted(index_files.FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temporary folder left
    loaded = index_files.load(tmp_path / "saved")
    assert loaded.version == index.version
    assert loaded.manifest == index.manifest
    assert loaded.item_ids == index.item_ids
    for history in (["a1", "a2"], ["b7"], ["a3", "b1", "b2"]):
        assert loaded.search(history, n=20, exclude={"a4"}) == index.search(
            history, n=20, exclude={"a4"}
        )
    manifest = json.loads((tmp_path / "saved" / "manifest.json").read_text())
    assert manifest["dim"] == 8 and manifest["items"] == 2 * PER_CLUSTER + 2
    assert manifest["params"]["window"] == 5


def test_a_saved_index_is_never_overwritten(index: ItemIndex, tmp_path: Path) -> None:
    index_files.save(index, tmp_path / "saved")
    with pytest.raises(FileExistsError):
        index_files.save(index, tmp_path / "saved")


def test_load_refuses_files_that_do_not_match_the_manifest(
    index: ItemIndex, tmp_path: Path
) -> None:
    index_files.save(index, tmp_path / "saved")
    vectors = np.load(tmp_path / "saved" / "vectors.npy")
    np.save(tmp_path / "saved" / "vectors.npy", vectors[::-1])
    with pytest.raises(ValueError, match="do not match"):
        index_files.load(tmp_path / "saved")


def test_publish_makes_a_version_current(index: ItemIndex, tmp_path: Path) -> None:
    assert load_current(tmp_path) is None and current_version(tmp_path) is None
    folder = publish(index, tmp_path)
    assert folder == index_dir(tmp_path) / index.version == tmp_path / "indexes" / index.version
    assert current_version(tmp_path) == index.version
    assert (index_dir(tmp_path) / "current").read_text().strip() == index.version
    current = load_current(tmp_path)
    assert current is not None and current.version == index.version
    assert publish(index, tmp_path) == folder  # publishing the same version again is harmless
    newer = build_index(_items(), _sequences(seed=1), dim=8)
    publish(newer, tmp_path)
    current = load_current(tmp_path)
    assert current is not None and current.version == newer.version


def test_publish_replacing_a_version_refuses_when_another_became_current(
    index: ItemIndex, tmp_path: Path
) -> None:
    """A refresh rebuilds the index it read: one published meanwhile (`reasonrec index`, a
    bootstrap) is newer and stays."""
    publish(index, tmp_path)
    theirs = build_index(_items(), _sequences(seed=1), dim=8)
    publish(theirs, tmp_path)
    ours = build_index(_items(), _sequences(seed=2), dim=8)
    with pytest.raises(index_files.IndexChanged):
        publish(ours, tmp_path, replacing=index.version)
    assert current_version(tmp_path) == theirs.version
    publish(ours, tmp_path, replacing=theirs.version)
    assert current_version(tmp_path) == ours.version


def test_a_gateway_keeps_the_index_it_holds_when_the_current_one_cannot_be_read(
    index: ItemIndex, settings: Settings, tmp_path: Path
) -> None:
    """Dropping it would serve every user as a cold start."""
    serving = Serving(settings.model_copy(update={"data_dir": tmp_path}), store=None)
    serving.index = index
    assert serving._current_index() is index  # no pointer at all
    index_dir(tmp_path).mkdir(parents=True)
    (index_dir(tmp_path) / "current").write_text("v20260101-000000-abcdef\n")
    assert serving._current_index() is index  # a pointer to a folder that is not there


def test_a_gateway_loads_an_index_made_current_while_it_serves(
    index: ItemIndex, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`reasonrec index` after items were added: the new items reached the candidates only
    after a restart or a model swap."""
    monkeypatch.setattr(serving_module, "RECHECK_SECONDS", 0.1)
    publish(index, tmp_path)
    newer = build_index(
        [*_items(), ItemUpsert(item_id="fresh", title="Fresh")], _sequences(), dim=8
    )

    async def served_index() -> tuple[str, str]:
        async with open_store(settings) as store:
            serving = Serving(settings.model_copy(update={"data_dir": tmp_path}), store)
            await serving.start()
            try:
                first = serving.index.version
                publish(newer, tmp_path)
                for _ in range(100):
                    if serving.index.version != first:
                        break
                    await asyncio.sleep(0.05)
                return first, serving.index.version
            finally:
                await serving.stop()

    assert asyncio.run(served_index()) == (index.version, newer.version)


def test_publish_keeps_only_the_newest_versions(tmp_path: Path) -> None:
    root = index_dir(tmp_path)
    root.mkdir(parents=True)
    # Leftovers of writers killed mid-save: removed once old enough that no writer is alive.
    stale, fresh = root / ".v1.tmp-dead", root / ".v2.tmp-busy"
    stale.mkdir()
    fresh.mkdir()
    long_ago = time.time() - index_files.STALE_TEMP_SECONDS - 60
    os.utime(stale, (long_ago, long_ago))
    versions = []
    for seed in range(4):
        built = build_index(_items(), _sequences(seed=seed, users=10), dim=4)
        publish(built, tmp_path, keep=2)
        versions.append(built.version)
    expected = [*versions[-2:], "current", ".lock", fresh.name]
    assert sorted(p.name for p in root.iterdir()) == sorted(expected)
    assert current_version(tmp_path) == versions[-1]


def test_a_version_built_earlier_but_published_later_is_kept_as_the_previous(
    tmp_path: Path,
) -> None:
    """A bootstrap publishes the index it built before training, after a `reasonrec index`
    published a newer build: the next publish must keep it, the one gateways just read."""
    older, newer, newest = (
        build_index(_items(), _sequences(seed=seed, users=10), dim=4) for seed in range(3)
    )
    publish(newer, tmp_path, keep=2)
    publish(older, tmp_path, keep=2)
    publish(newest, tmp_path, keep=2)
    kept = {p.name for p in index_dir(tmp_path).iterdir() if not p.name.startswith(".")}
    assert kept == {older.version, newest.version, "current"}


def test_a_crash_while_saving_leaves_the_previous_version_current(
    index: ItemIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(index, tmp_path)
    newer = build_index(_items(), _sequences(seed=1), dim=8)

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    # The process dies after vectors.npy is written, before it can clean up.
    monkeypatch.setattr(index_files.faiss, "write_index", disk_full)
    monkeypatch.setattr(index_files.shutil, "rmtree", lambda *args, **kwargs: None)
    with pytest.raises(OSError, match="No space left"):
        publish(newer, tmp_path)
    monkeypatch.undo()

    root = index_dir(tmp_path)
    visible = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    assert visible == sorted([index.version, "current"])
    assert any(p.name.startswith(".") for p in root.iterdir())  # the partial write, hidden
    current = load_current(tmp_path)
    assert current is not None and current.version == index.version
    assert current.search(["a1"], n=5) == index.search(["a1"], n=5)


def test_a_failed_save_removes_its_partial_files(
    index: ItemIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_files.faiss, "write_index", disk_full)
    with pytest.raises(OSError, match="No space left"):
        index_files.save(index, tmp_path / "saved")
    assert list(tmp_path.iterdir()) == []


# MovieLens 100K -------------------------------------------------------------------------------


def test_retrieval_on_movielens_beats_popularity(ml100k: Path) -> None:
    split = load_split(ml100k)
    train, validation, test = split.train, split.validation, split.test
    started = time.perf_counter()
    index = build_index(read_ml100k(ml100k).items, list(train.values()))
    build_seconds = time.perf_counter() - started
    counts = Counter(item for items in train.values() for item in items)
    popular = [item for item, _ in counts.most_common()]
    retrieval_hits = popularity_hits = 0
    for user, items in train.items():
        # Ranked over the catalog minus the user's training and validation items.
        exclude = {*items, validation[user]}
        retrieved = _ids(index.search(list(items)[-50:], n=50, exclude=exclude))
        assert len(retrieved) == 50
        retrieval_hits += test[user] in retrieved
        popularity_hits += test[user] in [item for item in popular if item not in exclude][:50]
    users = len(train)
    hr, baseline = retrieval_hits / users, popularity_hits / users
    report = f"HR@50 over {users} users: retrieval {hr:.3f}, popularity {baseline:.3f}"
    print(f"{report}; build {build_seconds:.2f} s")
    assert users == 943 and len(index) == 1682
    assert hr >= 1.75 * baseline, report
