"""One publish path for bootstrap and refresh: a version's files, then its manifest, in one rename.

A LoRA model is published as its adapters alone (`kind: lora`, on its base's tokenizer); anything
else as full weights with its tokenizer. The manifest records what validation chose for serving
(`Blend`) and what it measured, under the same names for every version, so that
`GET /v1/models` shows each one's NDCG beside the retrieval order's.
"""

from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from server.registry import Manifest, Registry


def validated(manifest: Manifest, metrics: dict[str, float]) -> Manifest:
    """`manifest` with validation's figures and what it chose for serving: the served order's blend
    and the served rating's weight (a model not trained for a task keeps that task's default)."""
    chosen = ("retrieval_prior", "popularity_penalty", "rating_weight")
    return manifest.model_copy(
        update={"metrics": metrics, **{key: metrics[key] for key in chosen if key in metrics}}
    )


def publish_model(
    registry: Registry,
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    manifest: Manifest,
) -> Path:
    """Save and publish; complete or absent (`Registry.publish`)."""
    with registry.staged() as staging:
        model.save_pretrained(staging)
        if not isinstance(model, PeftModel):
            tokenizer.save_pretrained(staging)
        return registry.publish(staging, manifest)
