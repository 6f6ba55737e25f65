"""What a published manifest records of its validation: the figures and what it chose to serve."""

from server.registry import Manifest
from trainer.publish import validated


def test_the_manifest_records_what_validation_chose_for_each_task() -> None:
    metrics = {"retrieval_prior": 2.0, "popularity_penalty": 4.0, "rating_weight": 0.5}
    manifest = validated(Manifest(version="v1"), metrics | {"ndcg@10": 0.1})

    assert manifest.metrics["ndcg@10"] == 0.1
    contract = manifest.contract
    assert (contract.blend.retrieval_prior, contract.blend.popularity_penalty) == (2.0, 4.0)
    assert contract.rating_weight == 0.5


def test_a_task_it_was_not_validated_on_keeps_its_default() -> None:
    rate_only = validated(Manifest(version="v1"), {"rate_rmse": 1.0, "rating_weight": 0.75})
    assert rate_only.retrieval_prior == 0.0 and rate_only.rating_weight == 0.75
    rank_only = validated(Manifest(version="v1"), {"retrieval_prior": 1.0})
    assert rank_only.rating_weight == 1.0
