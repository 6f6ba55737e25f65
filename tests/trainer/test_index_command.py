"""`reasonrec index`: rebuild the candidate index on demand from the store."""

from typer.testing import CliRunner

from cli import app
from server.config import Settings
from server.index_files import current_version, load_current


def test_index_rebuilds_from_the_store_and_becomes_current(env: Settings) -> None:
    runner = CliRunner()
    loaded = runner.invoke(app, ["load", "--format", "synthetic", "--users", "40", "--items", "80"])
    assert loaded.exit_code == 0, loaded.output
    first = runner.invoke(app, ["index", "--dim", "8"])
    assert first.exit_code == 0, first.output
    version = first.output.strip().splitlines()[-1]
    assert current_version(env.data_dir) == version
    index = load_current(env.data_dir)
    assert len(index) == 80 and index.dim <= 8
    # Built from interactions: a user's history retrieves other catalog items.
    assert index.search(["i00001"], n=5)
    second = runner.invoke(app, ["index", "--dim", "8"])
    assert current_version(env.data_dir) == second.output.strip().splitlines()[-1] != version
