"""`reasonrec models import-gguf`: a GGUF file becomes an ordinary Hugging Face version with the
same weights, tokenizer and chat template (a tiny GGUF written here; SmolLM2's own import is in
tests/integration/test_pretrained.py)."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from cli import app
from contract.prompt import chat_prompt
from server.registry import Registry, RegistryError
from tests.trainer.gguf_files import CHAT_TEMPLATE, TinyPretrained, tiny_pretrained
from trainer import gguf_import
from trainer.gguf_import import import_gguf, packaged_version, resolve_gguf

TEXT = "<|im_start|>user\n#12 | Toy Story (1995) | wörds the tokenizer never saw<|im_end|>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyPretrained:
    return tiny_pretrained(tmp_path_factory.mktemp("gguf"))


def test_an_imported_version_has_the_files_weights_tokenizer_and_chat_template(
    tiny: TinyPretrained, tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "models")
    manifest = import_gguf(registry, tiny.gguf_path)

    assert registry.manifest(manifest.version) == manifest
    assert manifest.kind == "full" and manifest.rendering == "rich" and manifest.chat_template
    assert manifest.training == {
        "method": "imported",
        "format": "gguf",
        "source": str(tiny.gguf_path),
    }
    folder = registry.path(manifest.version)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tiny.tokenizer(TEXT)["input_ids"]
    assert tokenizer(TEXT)["input_ids"] == ids
    specials = ("bos_token", "eos_token", "pad_token")
    assert [getattr(tokenizer, name) for name in specials] == [
        getattr(tiny.tokenizer, name) for name in specials
    ]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert chat_prompt(tokenizer, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        expected = tiny.model(torch.tensor([ids])).logits
        assert torch.equal(model(torch.tensor([ids])).logits, expected)


@pytest.mark.parametrize("content", [b"not a gguf file", b"GGUF\x03\x00\x00\x00"])
def test_a_file_that_is_not_gguf_is_refused_and_leaves_nothing(
    tmp_path: Path, content: bytes
) -> None:
    registry = Registry(tmp_path / "models")
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)  # not one, or one cut short after its magic and version
    with pytest.raises(RegistryError, match="could not be read as a GGUF causal LM"):
        import_gguf(registry, bad)
    assert list(registry.root.iterdir()) == []  # the staging folder was removed


def test_sources_are_a_gguf_path_or_a_packaged_models_name(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(RegistryError, match=r"neither a \.gguf file nor a packaged model"):
        resolve_gguf(str(tmp_path / "missing.gguf"))
    monkeypatch.setitem(gguf_import.PACKAGED, "absent", ("no-such-distribution", "x.gguf"))
    with pytest.raises(RegistryError, match=r"install the extra \(pip install 'reasonrec\[absent"):
        resolve_gguf("absent")


def test_the_command_prints_the_version_and_can_activate_it(
    tiny: TinyPretrained, env, monkeypatch
) -> None:
    result = CliRunner().invoke(app, ["models", "import-gguf", str(tiny.gguf_path), "--activate"])
    assert result.exit_code == 0, result.output
    version = result.stdout.strip().splitlines()[-1]
    assert Registry(env.registry_path).manifest(version).chat_template
    listed = CliRunner().invoke(app, ["models", "list"])
    assert f"* {version}" in listed.stdout

    missing = CliRunner().invoke(app, ["models", "import-gguf", "nothing-here"])
    assert missing.exit_code == 1 and "neither a .gguf file" in missing.output


def test_a_packaged_model_is_imported_once_per_prompt_history(
    tiny: TinyPretrained, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(gguf_import, "packaged_gguf", lambda name: tiny.gguf_path)
    registry = Registry(tmp_path / "models")

    first = packaged_version(registry, "smollm2", prompt_history=5)

    assert registry.manifest(first).training["source"] == str(tiny.gguf_path)
    assert packaged_version(registry, "smollm2", prompt_history=5) == first
    other = packaged_version(registry, "smollm2", prompt_history=20)
    assert other != first and registry.manifest(other).prompt_history == 20
    assert len(registry.versions()) == 2
