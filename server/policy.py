"""The policy step: the business policy's hard constraints on every served list.

The policy file (`REASONREC_POLICY_FILE`, or the built-in default) is the one the trainer rewards
with: `reward_rules.policy` holds both the constraints applied here and the reward terms.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

from reward_rules.policy import DEFAULT_POLICY, Policy, apply_constraints, item_facts, load_policy
from server.schemas import Item, Listed


def read_policy(path: Path | None) -> Policy:
    """The policy in `path`; the default policy when no file is configured.

    A configured file that is missing or invalid raises (`PolicyError` lists every problem with
    its line): serving under a policy other than the one the operator wrote would be silent harm.
    """
    return DEFAULT_POLICY if path is None else load_policy(path)


def servable(policy: Policy, item: Item | Listed) -> bool:
    """Whether the policy would serve the item at all: with `exclude_unavailable`, not an item
    whose facts say unavailable (its `available` field, or the policy's availability attribute)."""
    return not policy.constraints.exclude_unavailable or item_facts(item, policy).available


def enforce(
    policy: Policy, picked: Sequence[str], order: Sequence[str], items: Mapping[str, Item], k: int
) -> list[str]:
    """The served ids: `picked` (the ranker's list) then the retrieval order as reserve, with the
    policy's constraints applied, so that items the policy drops are replaced, not lost."""
    ranked = list(dict.fromkeys([*picked, *order]))
    facts = {item_id: item_facts(items[item_id], policy) for item_id in ranked}
    return apply_constraints(ranked, facts, k, policy)
