"""`pagoda show MODEL`: what a model is (architecture, size, context, chat template,
generation defaults), from its config and headers; no weight is read."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("show", help="a model's architecture, size, context, template "
                                           "and parameters")
    p.add_argument("model", help="pulled name, checkpoint directory or .gguf file")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--template", action="store_true", help="print the whole chat template")
    what.add_argument("--config", action="store_true", help="print the config as pagoda reads it")
    what.add_argument("--parameters", action="store_true",
                      help="print the generation defaults (generation_config.json)")
    what.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pagoda.models.source import resolve_model
    source = resolve_model(args.model)
    if args.config:
        print(json.dumps(source.hf_config.to_dict(), indent=2, sort_keys=True, default=str))
        return 0
    if args.parameters:
        print(json.dumps(generation_defaults(source.path), indent=2))
        return 0
    template = chat_template(source)
    if args.template:
        print(template or "(no chat template)")
        return 0
    summary = model_summary(source, template)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def chat_template(source: Any) -> str | None:
    from pagoda.errors import ModelNotFoundError
    from pagoda.models.loader.tokenizer import load_tokenizer
    try:
        template = load_tokenizer(source).chat_template
    except ModelNotFoundError:  # a checkpoint without tokenizer files
        return None
    return template if isinstance(template, str) else None


def generation_defaults(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}


def model_summary(source: Any, template: str | None) -> dict[str, Any]:
    from pagoda.models.estimate import count_parameters
    from pagoda.models.registry import arch_spec
    config = source.hf_config
    params, counted_from = count_parameters(source, arch_spec(config))
    files = [source.gguf_file] if source.gguf_file else sorted(source.path.glob("*.safetensors"))
    return {
        "name": source.name, "path": str(source.path), "format": source.format,
        "architecture": (getattr(config, "architectures", None) or ["?"])[0],
        "parameters": params, "parameters_from": counted_from,
        "size_bytes": sum(f.stat().st_size for f in files if f.exists()),
        "context_length": getattr(config, "max_position_embeddings", None),
        "layers": getattr(config, "num_hidden_layers", None),
        "attention_heads": getattr(config, "num_attention_heads", None),
        "kv_heads": getattr(config, "num_key_value_heads", None),
        "head_dim": getattr(config, "head_dim", None),
        "sliding_window": getattr(config, "sliding_window", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "dtype": getattr(config, "dtype", None),
        "chat_template": template is not None,
        "template_preview": "\n".join((template or "").splitlines()[:6]),
        "generation_defaults": generation_defaults(source.path),
    }


def format_summary(s: dict[str, Any]) -> str:
    heads = f"{s['attention_heads']} heads ({s['kv_heads']} KV), head dim {s['head_dim']}"
    lines = ["  Model",
             f"    name              {s['name']}",
             f"    path              {s['path']}",
             f"    architecture      {s['architecture']}",
             (f"    parameters        {s['parameters'] / 1e9:.2f} B (from the "
              f"{s['parameters_from']})"),
             f"    format            {s['format']}, {s['size_bytes'] / 1e6:.0f} MB on disk",
             f"    context length    {s['context_length']}",
             f"    layers            {s['layers']}, {heads}",
             f"    sliding window    {s['sliding_window'] or '-'}",
             f"    vocabulary        {s['vocab_size']}",
             "", "  Template" + ("" if s["chat_template"] else "  (none: text prompts only)")]
    if s["chat_template"]:
        lines += ["    " + line for line in s["template_preview"].splitlines()]
        lines.append("    ... (`pagoda show --template` prints it all)")
    if s["generation_defaults"]:
        lines += ["", "  Parameters (generation_config.json; requests set their own)"]
        lines += [f"    {key:<18}{value}" for key, value in s["generation_defaults"].items()]
    return "\n".join(lines)
