"""A tiny ML-100K folder written to tmp_path, so split rules can be checked by hand."""

from collections.abc import Callable
from pathlib import Path

import pytest

GENRES = ["unknown", "Action", "Comedy", "Drama"]
# item id -> genres; item 5 has none, item 6 is never rated
ITEMS = {
    "1": ["Action"],
    "2": ["Comedy"],
    "3": ["Drama", "Comedy"],
    "4": ["Action", "Drama"],
    "5": [],
    "6": ["Drama"],
}

Rows = list[tuple[str, str, int, int]]  # user, item, rating, timestamp


def write_folder(folder: Path, rows: Rows, items: dict[str, list[str]] = ITEMS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    users = sorted({row[0] for row in rows}, key=int)
    (folder / "u.user").write_text("".join(f"{u}|30|F|writer|10001\n" for u in users))
    (folder / "u.genre").write_text("".join(f"{g}|{n}\n" for n, g in enumerate(GENRES)) + "\n")
    lines = []
    for item, genres in items.items():
        flags = "|".join("1" if genre in genres else "0" for genre in GENRES)
        # a Latin-1 title: the files are not UTF-8
        lines.append(f"{item}|Café {item} (1995)|01-Jan-1995||http://x|{flags}\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))
    return folder


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[[Rows], Path]:
    return lambda rows: write_folder(tmp_path / "ml-tiny", rows)
