from pathlib import Path

import pytest
from pydantic import ValidationError

from server.config import Settings

# The settings page: README links to it; its Configuration table lists every setting.
CONFIGURATION = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_documented(field: str) -> None:
    table = CONFIGURATION.read_text().partition("\n## Configuration\n")[2].partition("\n## ")[0]
    assert f"\n| `REASONREC_{field.upper()}` | " in table


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REASONREC_API_KEYS", " k1, k2 ,,")
    monkeypatch.setenv("REASONREC_HISTORY_SIZE", "7")
    monkeypatch.delenv("REASONREC_REDIS_URL", raising=False)
    settings = Settings()
    assert settings.api_keys == ["k1", "k2"]
    assert settings.history_size == 7
    assert settings.redis_url is None  # unset: embedded Redis


def test_bad_values_are_refused_with_the_field_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REASONREC_PORT", "99999")
    with pytest.raises(ValidationError, match="port"):
        Settings()
