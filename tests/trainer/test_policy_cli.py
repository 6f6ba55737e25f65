"""`reasonrec policy check FILE`: a summary for a valid file, FILE:LINE: message per problem."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["default.yaml", "promote.yaml"])
def test_shipped_policies_are_valid(name: str) -> None:
    path = ROOT / "policies" / name
    result = CliRunner().invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1  # one line
    assert result.stdout.startswith(f"{path}: ok: weights format=1 accuracy=1")


def test_promotion_policy_summary_names_its_rules() -> None:
    result = CliRunner().invoke(app, ["policy", "check", str(ROOT / "policies/promote.yaml")])
    assert "promotion=1" in result.stdout
    assert "max_per_category=3 boost promoted=+0.5" in result.stdout


def test_the_summary_names_rating_weights_and_attribute_names_that_differ(tmp_path: Path) -> None:
    path = tmp_path / "shop.yaml"
    path.write_text("rating_weights: {rating_accuracy: 1}\nattributes: {available: in_stock}\n")
    result = CliRunner().invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert "rating weights rating_accuracy=1" in result.stdout
    assert "attributes promoted=promoted available=in_stock" in result.stdout
    default = CliRunner().invoke(app, ["policy", "check", str(ROOT / "policies/default.yaml")])
    assert "rating weights" not in default.stdout and "attributes" not in default.stdout


def test_each_problem_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "# a policy with three mistakes\n"
        "weights:\n"
        "  format: 1\n"
        "  promo: 0.3\n"
        "constraints:\n"
        "  max_per_category: 0\n"
        "  boost: {promoted: -1}\n"
    )
    result = CliRunner().invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [f"{path}:4", f"{path}:6", f"{path}:7"]
    assert "unknown rank term 'promo'" in lines[0]
    assert "constraints.max_per_category" in lines[1]
    assert "constraints.boost.promoted" in lines[2]


def test_yaml_syntax_error_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("weights:\n  format: [1\n")
    result = CliRunner().invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{path}:3: not valid YAML")


@pytest.mark.parametrize("name", ["nope.yaml", "."])
def test_a_file_that_cannot_be_read_is_a_problem_with_its_name(tmp_path: Path, name: str) -> None:
    path = tmp_path / name  # missing, or a folder: what serve would refuse, said the same way
    result = CliRunner().invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{path}:1: cannot be read")
