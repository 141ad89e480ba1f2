"""The keys sftflow refuses (LLaMA-Factory's and removed transformers keys with no sftflow equivalent),
each with the reason and what to write instead (`compat.resolve_compat` applies them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Refused:
    """`key` has no sftflow equivalent: refused with `reason`, except the `accepted` values, which are what
    sftflow does anyway (LLaMA-Factory's default, usually) and so are taken without effect."""

    reason: str
    accepted: tuple[Any, ...] = ()


_ISSUE_18 = "not supported yet (issue 18)"
_ASFT = "the ASFT loss is out of scope (use use_dft_loss, the DFT loss it builds on, or the plain loss)"
_EAFT = "the EAFT loss is out of scope (use use_dft_loss or the plain loss)"
_STAGES = (
    "sftflow's stages are pt, sft, rm, dpo and kto (simpo is pref_loss: simpo); ppo and bco are not supported"
)
_MEDIA = "sftflow trains on text and images (docs/images.md); video and audio inputs are not supported"
_IMAGE_FAMILIES = "image fine-tuning feeds llava and qwen2_vl models, which take no such option"
_VLLM = "chat, api and predict run on transformers (infer_backend: huggingface); vLLM is not supported"
_SGLANG = "chat, api and predict run on transformers (infer_backend: huggingface); SGLang is not supported"
_KT = "KTransformers is not supported"
_LAUNCH = "launch with torchrun or accelerate (see docs/scaling.md); Ray/Megatron are not supported"
_PROFILER = "the torch profiler is not wired in; sftflow logs tokens/s, MFU and peak memory"
_FP8 = "FP8 training is not supported; use bf16 or fp16"
_EVAL = (
    "LLaMA-Factory's benchmark evaluation (llamafactory-cli eval: MMLU, C-Eval, CMMLU) is not part of sftflow; "
    "use do_eval (loss, perplexity) and do_predict (generated answers with BLEU/ROUGE)"
)
_GPTQ = "quantized export (GPTQ) is not supported; use export_format: gguf with export_quantization"
_SWANLAB = "use report_to: swanlab (transformers' integration, configured by SWANLAB_* environment variables)"
_TOKENS = "sftflow always reports train_tokens_per_second (non-padding tokens)"

REFUSED: dict[str, Refused] = {
    # model
    "adapter_folder": Refused("give the adapter dirs in adapter_name_or_path (comma-separated)"),
    "use_fast_tokenizer": Refused("sftflow uses fast tokenizers only", (True,)),
    "resize_vocab": Refused("the embeddings are resized when new_special_tokens adds tokens", (False,)),
    "split_special_tokens": Refused("special tokens are never split (fast tokenizers)", (False,)),
    "add_tokens": Refused("non-special added tokens are not supported yet; use new_special_tokens"),
    "new_special_tokens_config": Refused(
        "description-based init of new tokens is not supported yet; use new_special_tokens"
    ),
    "init_special_tokens": Refused(
        "new token embeddings are initialised by transformers' resize (noise_init)", ("noise_init",)
    ),
    "model_revision": Refused(
        "a hub revision other than main is not supported; download it to a local dir for model_name_or_path",
        ("main",),
    ),
    "low_cpu_mem_usage": Refused("transformers 5 always loads with low CPU memory", (True,)),
    "rope_scaling": Refused("RoPE scaling is not supported yet; raise cutoff_len within the model's context"),
    "shift_attn": Refused("LongLoRA shift attention is not supported", (False,)),
    "mixture_of_depths": Refused("mixture-of-depths is not supported", (None,)),
    "use_unsloth": Refused("Unsloth is not supported (sftflow patches no model code)", (False,)),
    "use_unsloth_gc": Refused("Unsloth is not supported (sftflow patches no model code)", (False,)),
    "moe_aux_loss_coef": Refused("not supported yet; the model config's own router loss coefficient applies"),
    "upcast_layernorm": Refused("not supported; use dtype: float32 for full-precision norms", (False,)),
    "upcast_lmhead_output": Refused(
        "sftflow's loss already computes the cross-entropy in float32 (fast_loss)", (False,)
    ),
    "train_from_scratch": Refused("training from random weights is not supported", (False,)),
    "infer_backend": Refused(_VLLM, ("huggingface",)),
    "offload_folder": Refused("weight offloading is not supported", ("offload",)),
    "use_kv_cache": Refused("generation always uses the KV cache", (True,)),
    "use_v1_kernels": Refused("LLaMA-Factory's kernels are not supported", (False, None)),
    "hf_hub_token": Refused("set HF_TOKEN in the environment (or run `hf auth login`)"),
    "ms_hub_token": Refused("the ModelScope hub is not supported"),
    "om_hub_token": Refused("the Modelers hub is not supported"),
    "print_param_status": Refused("sftflow logs the trainable parameter count, not each parameter", (False,)),
    "quantization_device_map": Refused("the quantized model is placed on this process's device", (None,)),
    "compute_dtype": Refused("use dtype (auto, float32, bfloat16, float16)"),
    "device_map": Refused("sftflow places the model on this process's device (one per process)"),
    "model_max_length": Refused("use cutoff_len"),
    "block_diag_attn": Refused("packing: true always keeps packed examples apart", (False,)),
    **{
        key: Refused(_MEDIA, (default,))
        for key, default in {
            "video_max_pixels": 256 * 256,
            "video_min_pixels": 16 * 16,
            "video_fps": 2.0,
            "video_maxlen": 128,
            "use_audio_in_video": False,
            "audio_sampling_rate": 16000,
        }.items()
    },
    "image_do_pan_and_scan": Refused(_IMAGE_FAMILIES, (False,)),
    "crop_to_patches": Refused(_IMAGE_FAMILIES, (False,)),
    "media_dir": Refused(
        "relative image paths are read from dataset_dir, then the data file's folder; give absolute paths "
        "for images elsewhere",
        (None,),
    ),
    # export
    "export_device": Refused("sftflow export merges on the CPU (export_device: cpu)", ("cpu",)),
    "export_quantization_bit": Refused(_GPTQ, (None,)),
    "export_quantization_dataset": Refused(_GPTQ, (None,)),
    "export_quantization_nsamples": Refused(_GPTQ, (128,)),
    "export_quantization_maxlen": Refused(_GPTQ, (1024,)),
    "export_legacy_format": Refused(
        "sftflow export writes safetensors only (export_legacy_format: false)", (False,)
    ),
    # inference engines
    **{
        key: Refused(_VLLM, (default,))
        for key, default in {
            "vllm_maxlen": 4096,
            "vllm_gpu_util": 0.7,
            "vllm_enforce_eager": False,
            "vllm_max_lora_rank": 32,
            "vllm_config": None,
        }.items()
    },
    **{
        key: Refused(_SGLANG, (default,))
        for key, default in {
            "sglang_maxlen": 4096,
            "sglang_mem_fraction": 0.7,
            "sglang_tp_size": -1,
            "sglang_config": None,
            "sglang_lora_backend": "triton",
        }.items()
    },
    **{
        key: Refused(_KT, (default,))
        for key, default in {
            "use_kt": False,
            "kt_cpu_activation": None,
            "kt_weight_path": None,
            "kt_non_expert_weight_path": None,
            "kt_expert_checkpoint_path": None,
            "kt_use_lora_experts": None,
            "kt_lora_expert_num": None,
            "kt_lora_expert_intermediate_size": None,
        }.items()
    },
    # data
    "preprocessing_batch_size": Refused("sftflow sets the datasets.map batch size itself", (1000,)),
    "ignore_pad_token_for_loss": Refused("padding never counts in the loss", (True,)),
    "eval_on_each_dataset": Refused("not supported yet; the eval datasets are evaluated together", (False,)),
    "data_shared_file_system": Refused(
        "the main process tokenizes first and the others read tokenized_cache_dir", (False,)
    ),
    # methods sftflow does not have yet
    **{
        key: Refused(_ISSUE_18, (default,))
        for key, default in {
            "compute_accuracy": False,
            "disable_shuffling": False,
            "early_stopping_steps": None,
        }.items()
    },
    # preference stages
    **{
        key: Refused(_STAGES, (default,))
        for key, default in {
            "pref_bco_weight": 0.0,
            "ppo_buffer_size": 1,
            "ppo_epochs": 4,
            "ppo_score_norm": False,
            "ppo_target": 6.0,
            "ppo_whiten_rewards": False,
            "reward_model": None,
            "reward_model_adapters": None,
            "reward_model_quantization_bit": None,
            "reward_model_type": "lora",
        }.items()
    },
    "use_asft_loss": Refused(_ASFT, (False,)),
    "asft_alpha": Refused(_ASFT, (0.1,)),
    "use_eaft_loss": Refused(_EAFT, (False,)),
    "eaft_alpha": Refused(_EAFT, (1.0,)),
    "dpo_label_smoothing": Refused(_ISSUE_18, (0.0,)),
    "ld_alpha": Refused(_ISSUE_18, (None,)),
    "ref_model": Refused(
        "dpo's reference is the base model (the adapter disabled, or a frozen copy for full tuning); a separate "
        "ref_model is not supported yet",
        (None,),
    ),
    "ref_model_adapters": Refused("a separate ref_model is not supported yet", (None,)),
    "ref_model_quantization_bit": Refused("a separate ref_model is not supported yet", (None,)),
    # logging and trackers
    **{
        key: Refused(_SWANLAB, (default,))
        for key, default in {
            "use_swanlab": False,
            "swanlab_project": "llamafactory",
            "swanlab_workspace": None,
            "swanlab_run_name": None,
            "swanlab_mode": "cloud",
            "swanlab_api_key": None,
            "swanlab_logdir": None,
            "swanlab_lark_webhook_url": None,
            "swanlab_lark_secret": None,
        }.items()
    },
    "include_effective_tokens_per_second": Refused(_TOKENS, (True, False)),
    # launchers and parallelism
    **{
        key: Refused(_LAUNCH, (default,))
        for key, default in {
            "use_mca": False,
            "use_megatron_bridge": False,
            "megatron_bridge_args": None,
            "use_hyper_parallel": False,
            "hyper_parallel_args": None,
            "hyper_parallel_cp_size": 1,
            "ray_num_workers": 1,
            "ray_init_kwargs": None,
        }.items()
    },
    # Megatron-Core keys of LLaMA-Factory's examples/megatron* configs (mcore_adapter's training arguments)
    **{
        key: Refused(_LAUNCH)
        for key in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "expert_model_parallel_size",
            "context_parallel_size",
            "sequence_parallel",
            "use_distributed_optimizer",
            "overlap_param_gather",
            "overlap_grad_reduce",
            "bias_activation_fusion",
            "apply_rope_fusion",
            "moe_grouped_gemm",
            "moe_token_dispatcher_type",
            "recompute_granularity",
            "use_packed_sequences",
            "mixed_precision",
            "export_hf_on_finish",
        )
    },
    "kt_config": Refused(_KT),
    "master_addr": Refused("set MASTER_ADDR in the environment (torchrun --master_addr)", (None,)),
    "master_port": Refused("set MASTER_PORT in the environment (torchrun --master_port)", (None,)),
    **{
        key: Refused(_PROFILER, (default,))
        for key, default in {
            "enable_torch_profiler": False,
            "profiler_output_dir": None,
            "profiler_wait_steps": 1,
            "profiler_warmup_steps": 1,
            "profiler_active_steps": 1,
            "profiler_repeat": 1,
            "profiler_record_shapes": True,
            "profiler_profile_memory": True,
            "profiler_with_stack": True,
            "profile_modules": None,
        }.items()
    },
    **{
        key: Refused(_FP8, (default,))
        for key, default in {
            "fp8": False,
            "fp8_backend": "auto",
            "fp8_enable_fsdp_float8_all_gather": False,
        }.items()
    },
    # generation
    "max_length": Refused("use max_new_tokens (the answer's length; the prompt is cut to cutoff_len)"),
    "length_penalty": Refused("not supported yet; beam search uses transformers' length penalty 1.0", (1.0,)),
    "skip_special_tokens": Refused("answers are always decoded without special tokens", (True,)),
    # LLaMA-Factory's benchmark evaluation (`llamafactory-cli eval`)
    **{
        key: Refused(_EVAL, (default,))
        for key, default in {
            "task": None,
            "task_dir": "evaluation",
            "batch_size": 4,
            "lang": "en",
            "n_shot": 5,
            "save_dir": None,
            "download_mode": "reuse_dataset_if_exists",
        }.items()
    },
    # transformers keys dropped by later releases
    "logging_dir": Refused(
        "transformers 5.15 removed it; trainer_log.jsonl and tracker logs (report_to) go under output_dir"
    ),
    "include_tokens_per_second": Refused(_TOKENS, (True, False)),
    "include_num_input_tokens_seen_per_device": Refused("use include_num_input_tokens_seen"),
    "save_safetensors": Refused("transformers 5 always saves safetensors", (True,)),
    "half_precision_backend": Refused(
        "transformers 5 removed it: mixed precision always uses torch amp", ("auto", "amp")
    ),
    "fp16_backend": Refused(
        "transformers 5 removed it: mixed precision always uses torch amp", ("auto", "amp")
    ),
    "fp16_opt_level": Refused("transformers 5 removed apex; mixed precision always uses torch amp"),
    "use_mps_device": Refused("transformers uses an Apple GPU by itself; use_cpu: true forces the CPU"),
    "use_ipex": Refused("transformers 5 removed the Intel extension switch", (False,)),
    "jit_mode_eval": Refused("transformers 5 removed it; use torch_compile", (False,)),
    "tpu_num_cores": Refused("TPUs are not supported", (None,)),
    "tpu_metrics_debug": Refused("TPUs are not supported", (False,)),
    "past_index": Refused("transformers 5 removed it (no model of sftflow's uses past states)", (-1,)),
    "mp_parameters": Refused("transformers 5 removed it (SageMaker model parallelism)"),
    "ray_scope": Refused("hyperparameter search is not part of sftflow", ("last",)),
    "use_legacy_prediction_loop": Refused("transformers 5 removed the legacy loop", (False,)),
    "push_to_hub_organization": Refused("give the organisation in hub_model_id (org/name)"),
    "fsdp_min_num_params": Refused("put min_num_params in fsdp_config"),
    "fsdp_transformer_layer_cls_to_wrap": Refused("put transformer_layer_cls_to_wrap in fsdp_config"),
    "dispatch_batches": Refused("put dispatch_batches in accelerator_config"),
    "split_batches": Refused("put split_batches in accelerator_config"),
    "include_inputs_for_metrics": Refused("use include_for_metrics: inputs"),
}
