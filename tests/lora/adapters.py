"""Random non-zero PEFT LoRA adapters for tests (PEFT is the oracle)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_random_adapter(base_dir: Path, out: Path, rank: int, targets: list[str],
                        seed: int, alpha: float = 16.0, use_rslora: bool = False) -> Path:
    """A LoRA of `rank` on `targets` of the checkpoint in base_dir, with every A and B
    random (PEFT initialises B to zero: such an adapter would change nothing)."""
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return _save_adapter(base, out, rank, targets, seed, alpha, use_rslora)


def save_adapter_for_config(config, out: Path, rank: int, targets: list[str], seed: int
                            ) -> Path:
    """The same for a model of `config` (random base weights: only the shapes matter)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return _save_adapter(AutoModelForCausalLM.from_config(config, dtype=torch.float32), out,
                         rank, targets, seed, 16.0, False)


def _save_adapter(base, out: Path, rank: int, targets: list[str], seed: int, alpha: float,
                  use_rslora: bool) -> Path:
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                        use_rslora=use_rslora, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    model.save_pretrained(out)
    return out


def peft_model(base_dir: Path, adapter_dir: Path):
    """transformers + PEFT with the adapter applied (the oracle)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def greedy(model, ids: list[int], n: int) -> list[int]:
    """n argmax tokens, EOS included (pagoda's ignore_eos: it neither stops nor is banned,
    whereas transformers' min_new_tokens bans it)."""
    tokens, past, step = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            out = model(step, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            step = torch.tensor([[tokens[-1]]])
    return tokens
