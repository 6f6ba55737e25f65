"""What a model can be asked to do. Each task has its own route, prompt and answer; a model's
manifest lists the tasks it was trained for, and the gateway asks a model only for those."""

from enum import StrEnum


class Task(StrEnum):
    rank = "rank"
    """RecLLM-R1: choose and order k of the candidates (`POST /v1/recommend`)."""
    rate = "rate"
    """RecZero / RecOne: predict a user's rating of each of a few items (`POST /v1/rate`)."""
    search = "search"
    """Rec-R1: write a query for the fixed retriever (`POST /v1/search`)."""
