"""`sftflow export CONFIG [key=value ...]`: merge LoRA adapter(s) into the base and write a model dir."""

from __future__ import annotations

from sftflow.cli import command_parser, parse, setup_logging
from sftflow.config.parser import load_args, parse_overrides, read_config_file
from sftflow.errors import SftflowError
from sftflow.model.export import export_model

KEYS = """keys:
  model_name_or_path    the base model (HF dir, hub id, .gguf file or bundled name); not quantized
  adapter_name_or_path  adapter dir(s) to merge, comma-separated to stack several (in that order)
  export_dir            where to write the merged model (required)
  export_size           max GB per safetensors shard (default 5)
  dtype                 dtype of the written weights (default auto: the base checkpoint's own dtype)
  template              chat template to save with the tokenizer (default: the adapter's tokenizer, else the base's)
  new_special_tokens    tokens added at training time, if the adapter dir has no tokenizer
  overwrite_output_dir  allow writing into a non-empty export_dir
  export_format         hf (default) or gguf: also write model-<export_quantization>.gguf and an Ollama Modelfile
  export_quantization   GGUF tensor type: f16 (default), bf16, q8_0, q4_0, q4_1, q5_0, q5_1
  export_hub_model_id   upload export_dir to this hub repo after the export (needs network)
  enable_thinking       the chat template's default thinking mode (default: the run's, from its sftflow_args.yaml)
  default_system        the system message of conversations without one (default: the run's)
  dataset, dataset_dir  training data, read for the Modelfile's SYSTEM (a system prompt every row shares)"""


def main(argv: list[str]) -> int:
    import argparse

    parser = command_parser(
        "export",
        "Merge LoRA adapter(s) into the base model and write a standard Hugging Face model dir.",
        "CONFIG",
        "a config with model_name_or_path, adapter_name_or_path and export_dir",
    )
    parser.epilog = KEYS + "\n\n`sftflow train --help` lists every key."
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    ns = parse(parser, argv)

    args = load_args(ns.target, ns.overrides, require_output_dir=False)
    if not args.model.export_dir:
        raise SftflowError("export_dir is required (e.g. export_dir: saves/merged).")
    setup_logging()
    given = {**(read_config_file(ns.target) if ns.target else {}), **parse_overrides(ns.overrides)}
    thinking = args.data.enable_thinking if "enable_thinking" in given else "trained"
    export_dir = export_model(
        args.model, args.data, overwrite=args.finetuning.overwrite_output_dir, enable_thinking=thinking
    )
    print(f"sftflow: exported the merged model to {export_dir.resolve()}", flush=True)
    print(f"  load it with AutoModelForCausalLM.from_pretrained({str(export_dir)!r})", flush=True)
    if args.model.export_format == "gguf":
        from sftflow.model.gguf import gguf_file_name

        gguf = export_dir / gguf_file_name(args.model.export_quantization)
        print(f"  GGUF: {gguf.resolve()} (llama.cpp: llama-cli -m {gguf})", flush=True)
        if (export_dir / "Modelfile").is_file():
            print(f"  Ollama: ollama create NAME -f {(export_dir / 'Modelfile').resolve()}", flush=True)
    return 0
