import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from cli import app
from server.config import (
    EngineSettings,
    GatewaySettings,
    Settings,
    StorageSettings,
    TrainerSettings,
    unknown_variables,
)

# The settings page: README links to it; its Configuration section has a table per section.
REPO = Path(__file__).resolve().parents[2]
CONFIGURATION = REPO / "docs" / "configuration.md"
README = REPO / "README.md"
SECTIONS = {
    "Storage": StorageSettings,
    "Gateway": GatewaySettings,
    "Engine": EngineSettings,
    "Trainer": TrainerSettings,
}


def test_the_sections_make_up_the_settings() -> None:
    fields = [name for section in SECTIONS.values() for name in section.model_fields]
    assert sorted(fields) == sorted(Settings.model_fields)


@pytest.mark.parametrize(
    ("title", "field"),
    [(title, field) for title, section in SECTIONS.items() for field in section.model_fields],
)
def test_every_setting_is_documented_in_its_section(title: str, field: str) -> None:
    configuration = CONFIGURATION.read_text().partition("\n## Configuration\n")[2]
    table = configuration.partition("\n## ")[0].partition(f"\n### {title}\n")[2]
    assert f"\n| `REASONREC_{field.upper()}` | " in table.partition("\n### ")[0]


@pytest.mark.parametrize("title", sorted(SECTIONS))
def test_the_readme_names_every_setting_of_a_section(title: str) -> None:
    settings = README.read_text().partition("\n## Settings\n")[2].partition("\n## ")[0]
    line = " ".join(settings.partition(f"- **{title}**: ")[2].partition("\n- ")[0].split())
    named = [name.strip("`.") for name in line.split(", ")]
    assert named == [f"REASONREC_{field.upper()}" for field in SECTIONS[title].model_fields]


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


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("REASONREC_GATE_NDCG_TOLERANCE", "nan", "gate_ndcg_tolerance"),
        ("REASONREC_REDIS_TIMEOUT_SECONDS", "inf", "redis_timeout_seconds"),
        ("REASONREC_LOG_LEVEL", "verbose", "log_level"),
        # What vLLM would refuse only when the engine starts, the gateway serving the fallback.
        ("REASONREC_ENGINE_DTYPE", "fp32", "engine_dtype"),
        ("REASONREC_ENGINE_CPU_THREADS", "cores 0-1", "engine_cpu_threads"),
        ("REASONREC_ENGINE_CPU_THREADS", "0-1|2-3", "engine_cpu_threads"),
    ],
)
def test_numbers_must_be_finite_and_levels_known(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=field):
        Settings()


def test_an_empty_path_is_unset_where_a_setting_may_be_and_refused_for_the_data_dir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("REASONREC_REGISTRY_DIR", "REASONREC_POLICY_FILE"):
        monkeypatch.setenv(name, "")
    settings = Settings()
    assert settings.registry_dir is None and settings.policy_file is None  # not the working dir
    monkeypatch.setenv("REASONREC_DATA_DIR", "")
    with pytest.raises(ValidationError, match="data_dir"):
        Settings()


@pytest.mark.parametrize("variable", ["REASONREC_DATA_DIR", "REASONREC_REGISTRY_DIR"])
def test_a_folder_setting_that_names_a_file_ends_a_command_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str
) -> None:
    # A registry that is a file listed no versions (exit 0); a data dir that is one failed with
    # "[Errno 17] File exists" when something was first written under it.
    file = tmp_path / "state"
    file.write_text("")
    monkeypatch.setenv("REASONREC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv(variable, str(file))
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 2
    assert f"{variable}: Value error, {file} is a file, not a folder" in result.output
    file.unlink()
    file.mkdir()
    assert Settings()  # a folder is what it asks for
    # A path that cannot be looked at is left to the first write to report (it raised OSError).
    monkeypatch.setenv(variable, str(tmp_path / ("x" * 300)))
    assert Settings()


@pytest.mark.parametrize("prefix", ["", "shop a", "shop*", "shop[1]", "shop\udce9"])
def test_a_key_prefix_that_is_no_plain_text_is_refused(prefix: str) -> None:
    # "shop\udce9": a Latin-1 byte in the environment; written, it would read as "shop?".
    with pytest.raises(ValidationError, match="key_prefix"):
        Settings(key_prefix=prefix)


@pytest.mark.parametrize("value", ["auto", "nobind", "0-1", "0,2-3", "7"])
def test_cpu_bindings_vllm_reads_are_accepted(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("REASONREC_ENGINE_CPU_THREADS", value)
    assert Settings().engine_cpu_threads == value


def test_a_refresh_minimum_above_what_a_refresh_trains_on_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every ranking refresh would be skipped, for good."""
    monkeypatch.setenv("REASONREC_REFRESH_LOGGED_EXAMPLES", "50")
    monkeypatch.setenv("REASONREC_REFRESH_MIN_LISTS", "51")
    with pytest.raises(ValidationError, match="refresh_min_lists"):
        Settings()
    monkeypatch.setenv("REASONREC_REFRESH_MIN_LISTS", "50")
    assert Settings().refresh_min_lists == 50


def test_a_level_in_capitals_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REASONREC_LOG_LEVEL", "WARNING")
    assert Settings().log_level == "warning"


def test_a_command_names_each_bad_variable_and_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REASONREC_REFRESH_SECONDS", "abc")
    monkeypatch.setenv("REASONREC_LOG_LEVEL", "verbose")
    monkeypatch.setenv("REASONREC_MERGE_ADAPTERS", "maybe")  # a bool or "auto": two errors
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "REASONREC_REFRESH_SECONDS: Input should be a valid integer" in output
    assert "REASONREC_LOG_LEVEL: Input should be 'debug', 'info', 'warning' or 'error'" in output
    assert output.count("REASONREC_MERGE_ADAPTERS:") == 1 and "_BOOL" not in output
    assert "Traceback" not in result.output


def test_a_variable_no_setting_reads_is_refused_with_what_was_meant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A misspelled REASONREC_API_KEYS would start a service that asks no key."""
    monkeypatch.setenv("REASONREC_API_KEY", "secret")
    monkeypatch.setenv("REASONREC_NO_SUCH_THING", "1")
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "REASONREC_API_KEY: no such setting (did you mean REASONREC_API_KEYS?)" in output
    assert "REASONREC_NO_SUCH_THING: no such setting" in output
    assert "did you mean" not in output.partition("REASONREC_NO_SUCH_THING")[2]


def test_variables_a_setting_reads_or_that_are_not_ours_are_allowed() -> None:
    environ = {
        "REASONREC_TEST_ML100K": "x",  # the test suite's own
        "REASONREC_API_KEYS": "k",
        "REASONREC_log_level": "info",  # pydantic-settings reads names in any case
        "PATH": "/bin",
        # Kubernetes' service links for a Service named reasonrec-gateway
        "REASONREC_GATEWAY_SERVICE_HOST": "10.0.0.1",
        "REASONREC_GATEWAY_SERVICE_PORT_HTTP": "8000",
        "REASONREC_GATEWAY_PORT": "tcp://10.0.0.1:8000",
        "REASONREC_GATEWAY_PORT_8000_TCP_ADDR": "10.0.0.1",
    }
    assert unknown_variables(environ) == {}


def test_a_misspelled_port_setting_is_not_taken_for_a_service_link() -> None:
    """Kubernetes' <NAME>_PORT holds an address; a port setting a number."""
    environ = {"REASONREC_TRAINER_METRIC_PORT": "9200", "REASONREC_METRICS_PORT": "tcp://x:1"}
    assert unknown_variables(environ) == {
        "REASONREC_TRAINER_METRIC_PORT": "REASONREC_TRAINER_METRICS_PORT"
    }


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("vllm:8000", "starts with http:// or https://"),
        ("http://vllm:8000/v1", "without /v1"),
        ("http://vllm:8000/v1/", "without /v1"),
        ("http://vllm:8000", None),
        ("https://vllm.example/engine", None),
    ],
)
def test_an_engine_url_the_client_cannot_use_is_refused(url: str, refused: str | None) -> None:
    """Accepted, it left every answer to the fallback while /healthz stayed green."""
    if refused is None:
        assert Settings(engine_url=url).engine_url == url
        return
    with pytest.raises(ValidationError, match=refused):
        Settings(engine_url=url)


@pytest.mark.parametrize(
    ("command", "variable", "meant"),
    [
        (["-c", "import server.asgi"], "REASONREC_API_KEY", "REASONREC_API_KEYS"),
        # The image's vLLM launcher: misspelled, vLLM would have started in float32.
        (
            [str(REPO / "docker" / "serve_vllm.py")],
            "REASONREC_ENGINE_DTYP",
            "REASONREC_ENGINE_DTYPE",
        ),
    ],
)
def test_entry_points_without_the_cli_refuse_an_unknown_variable_too(
    command: list[str], variable: str, meant: str
) -> None:
    """`uvicorn server.asgi:app` and `python /app/serve_vllm.py` start without the CLI's check."""
    env = {**os.environ, variable: "bfloat16", "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, *command], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1
    assert f"{variable}: no such setting (did you mean {meant}?)" in run.stderr


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("redis://:se/cret@redis:6379/0", "the port in a Redis URL is a number"),  # "/": unencoded
        ("redis://:secret@redis:99999/0", "the port in a Redis URL is a number"),
        ("redis://:secret@redis:6379/0?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
    ],
)
def test_a_bad_redis_url_is_refused_without_quoting_its_password(url: str, said: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(redis_url=url)
    assert said in str(refused.value) and "cret" not in str(refused.value)
