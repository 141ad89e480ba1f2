"""The supervised fine-tuning recipe, top to bottom:
args -> tokenizer/template -> datasets -> model (+LoRA) -> collator -> trainer -> train/eval/predict -> report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import GenerationConfig

from sftflow.data.collator import PackedCollator, SftCollator
from sftflow.data.encode import stop_token_ids
from sftflow.data.packing import pack_dataset
from sftflow.data.prepare import tokenize_prompts
from sftflow.data.thinking import resolve_thinking
from sftflow.data.vision import VisionCollator
from sftflow.infer.predict import generate_predictions, sample_answers
from sftflow.model.adapter import method_callbacks
from sftflow.model.loader import load_chat_tokenizer
from sftflow.model.vision import load_run_vision
from sftflow.tools.report import write_report
from sftflow.train.callbacks import JsonlLogCallback
from sftflow.train.optim import build_optimizer
from sftflow.train.steps import (
    RunResult,
    build_model,
    evaluate,
    format_summary,
    owns_output_dir,
    prepare_data,
    record,
    start_run,
    train_and_save,
)
from sftflow.train.trainer import SftflowTrainer

if TYPE_CHECKING:
    from sftflow.config.parser import RunArgs


@owns_output_dir
def run_sft(args: RunArgs, callbacks: list[Any] | None = None) -> RunResult:
    """Run the sft recipe described by `args` and write everything under `output_dir`.

    `callbacks` are extra `transformers.TrainerCallback`s, added after sftflow's own.
    """
    training = args.training
    output_dir, resume = start_run(args)

    # 1. Tokenizer and chat template (the tokenizer's own unless `template` names a built-in).
    tokenizer = load_chat_tokenizer(args.model, args.data)
    stop_ids = stop_token_ids(tokenizer)
    # A model that sees: its image processor and image tokens (None for a text model; data/vision.py).
    vision = load_run_vision(args, tokenizer)

    # 2. Datasets: load, convert to messages, hold out eval data, tokenize (main process first), count.
    prepared = prepare_data(args, tokenizer, vision)
    train_set, eval_set = prepared.train, prepared.eval
    if training.do_predict:
        thinking = resolve_thinking(tokenizer, args.data.enable_thinking, args.data.preserve_thinking)
        predict_set, predict_rows = tokenize_prompts(
            prepared.held_out, tokenizer, args.data.cutoff_len, thinking, vision
        )
    if args.data.packing:  # after the logged preview, which shows the examples one by one
        train_set, eval_set = (
            pack_dataset(d, args.data.cutoff_len) if d is not None else None for d in (train_set, eval_set)
        )

    # 3. Model (embeddings resized for new_special_tokens), with LoRA / freeze / full tuning applied
    #    and, when asked, gradient checkpointing with the input-grad hook frozen embeddings need.
    model = build_model(args, tokenizer, head="image" if vision else "lm")
    if vision is not None:  # the rows' `images` column feeds the collator, not the model's forward
        training.remove_unused_columns = False
    if args.data.packing:  # with a KV cache transformers ignores position_ids when building the mask
        model.config.use_cache = False

    # 4. Trainer: right-padded batches for training and eval loss.
    generation_config = GenerationConfig(
        **args.generating.to_generation_kwargs(),
        eos_token_id=sorted(stop_ids),
        pad_token_id=tokenizer.pad_token_id,
    )
    trainer = SftflowTrainer(
        model=model,
        args=training,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=(
            VisionCollator(tokenizer.pad_token_id, vision)
            if vision is not None
            else (PackedCollator if args.data.packing else SftCollator)(tokenizer.pad_token_id)
        ),
        processing_class=tokenizer,
        callbacks=[
            JsonlLogCallback(output_dir),
            *method_callbacks(args.finetuning, output_dir),
            *(callbacks or []),
        ],
        generation_config=generation_config,
        skip_nan=args.finetuning.skip_nan,
        fast_loss=args.finetuning.fast_loss,
        dft_loss=args.finetuning.use_dft_loss,
        optimizers=(build_optimizer(model, args.finetuning, training), None),  # None: the Trainer's own
    )
    result = RunResult(output_dir)

    # 5. Train, then save the adapter/model, the tokenizer (with the template used) and the arguments.
    if training.do_train:
        train_and_save(trainer, args, tokenizer, resume, result, vision.processor if vision else None)

    # 6. Eval: loss and perplexity on the held-out set.
    if training.do_eval:
        evaluate(trainer, args, result, perplexity=True)

    # 7. Predict: generate answers from prompts only (left-padded), tuned and, with LoRA, base model.
    if training.do_predict:
        trainer.data_collator = (
            VisionCollator(tokenizer.pad_token_id, vision, padding_side="left")
            if vision is not None
            else SftCollator(tokenizer.pad_token_id, padding_side="left")
        )
        metrics = generate_predictions(
            trainer, predict_set, predict_rows, tokenizer, output_dir, "predict", thinking
        )
        if args.finetuning.compare_base and args.finetuning.finetuning_type == "lora":
            with trainer.accelerator.unwrap_model(model).disable_adapter():
                metrics |= generate_predictions(
                    trainer, predict_set, predict_rows, tokenizer, output_dir, "predict_base", thinking
                )
            result.sample = sample_answers(output_dir)
        record(trainer, "predict", metrics, result)

    # 8. report.html (config, data statistics, curves, metrics, answers) and the summary.
    if trainer.is_world_process_zero():
        result.report = write_report(output_dir)
        print(format_summary(result), flush=True)
    return result
