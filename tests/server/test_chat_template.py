"""A version whose manifest says `chat_template` is prompted inside its tokenizer's chat template,
by every engine kind; other versions get the prompt as written."""

from pathlib import Path

from server.active_model import open_engine
from server.config import Settings
from server.registry import Manifest, Registry
from tests.server.helpers import write_model
from tests.trainer.gguf_files import tiny_tokenizer

PROMPT = "You are a recommender.\nUser: age 24\n"


def publish_tokenizer(registry: Registry, version: str, chat: bool) -> None:
    staging = registry.staging()
    write_model(staging)
    tiny_tokenizer().save_pretrained(staging)
    registry.publish(staging, Manifest(version=version, chat_template=chat))


async def test_a_chat_version_is_prompted_through_its_template(tmp_path: Path) -> None:
    settings = Settings(registry_dir=tmp_path, engine_url="http://127.0.0.1:9")
    registry = Registry(tmp_path)
    publish_tokenizer(registry, "chat", chat=True)
    publish_tokenizer(registry, "plain", chat=False)

    chat, plain = open_engine(settings, "chat"), open_engine(settings, "plain")
    try:
        assert chat.contract.chat and not plain.contract.chat
        assert chat.text(PROMPT) == (
            f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
        )
        assert plain.text(PROMPT) == PROMPT
    finally:
        await chat.close()
        await plain.close()
