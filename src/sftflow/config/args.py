"""The typed configuration of a run. Each field's docstring is its documentation (`sftflow train --help`).

Training keys (learning rate, batch size, epochs, ...) are those of HF `Seq2SeqTrainingArguments`;
the four dataclasses here hold everything else. Field names are unique across all five classes, so a
flat `key: value` config maps to exactly one field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sftflow.errors import SftflowError


@dataclass
class ModelArguments:
    """Which model to load and how."""

    model_name_or_path: str | None = None
    """Local HF model dir, hub id (when online), a .gguf file, or a bundled name (smollm2-135m-instruct)."""

    adapter_name_or_path: str | None = None
    """PEFT adapter dir(s) to load on top of the model, comma-separated to stack several (continue training the last one, chat with them, or merge them with sftflow export)."""

    gguf_file: str | None = None
    """A .gguf file inside the model_name_or_path dir to load (dequantized once into cache_dir); a .gguf path in model_name_or_path works too."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype. auto: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU (bf16 is ~100x slower on CPU)."""

    quantization_bit: int | None = None
    """Load the base model in 4 or 8 bits with bitsandbytes (QLoRA). Needs finetuning_type: lora."""

    quantization_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type for quantization_bit: 4 (nf4 = NormalFloat4, as in QLoRA; or fp4)."""

    double_quantization: bool = True
    """With quantization_bit: 4, also quantize the quantization constants (saves ~0.4 bit per weight)."""

    quantization_method: Literal["bnb", "hqq"] = "bnb"
    """Library for quantization_bit: bnb (bitsandbytes). hqq is refused (transformers 5.24's HqqConfig raises NotImplementedError)."""

    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to from_pretrained."""

    trust_remote_code: bool = False
    """Allow model code from the model dir/hub repo to run. Only enable for sources you trust."""

    use_safetensors: bool = True
    """Load weights (model and adapters) from .safetensors files only. false also allows pickle (.bin/.pt) checkpoints, which can run code when loaded: only for sources you trust."""

    new_special_tokens: list[str] | None = None
    """Special tokens to add to the tokenizer, comma-separated. The embeddings are resized; with LoRA only the new rows train (PEFT trainable_token_indices)."""

    cache_dir: str | None = None
    """Where bundled/GGUF models are converted once to safetensors (default: $SFTFLOW_CACHE or ~/.cache/sftflow)."""

    export_dir: str | None = None
    """sftflow export: the dir to write the merged model to (safetensors, tokenizer with its chat template, generation config)."""

    export_size: float = 5
    """sftflow export: max size of one safetensors shard, in GB."""

    export_format: Literal["hf", "gguf"] = "hf"
    """sftflow export: hf writes the merged HF dir; gguf also writes model-<export_quantization>.gguf and an Ollama Modelfile beside it (Llama-architecture models)."""

    export_quantization: Literal["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"] = "f16"
    """sftflow export with export_format: gguf: the GGUF tensor type (norms stay f32; under q4_*/q5_* the output head stays q8_0)."""

    image_max_pixels: int = 768 * 768
    """Models that see: an image larger than this many pixels (width x height) is scaled down, aspect kept, before the model's image processor (LLaMA-Factory's key and default)."""

    image_min_pixels: int = 32 * 32
    """Models that see: an image smaller than this many pixels is scaled up, aspect kept, before the model's image processor."""

    export_hub_model_id: str | None = None
    """sftflow export: also upload export_dir to this Hugging Face hub repo (needs network and a login; same key as LLaMA-Factory)."""

    def __post_init__(self) -> None:
        if self.quantization_bit not in (None, 4, 8):
            raise SftflowError(f"quantization_bit must be 4, 8 or unset, got {self.quantization_bit}.")
        if self.export_size <= 0:
            raise SftflowError(f"export_size must be > 0 (GB per shard), got {self.export_size}.")
        if self.new_special_tokens is not None and not all(t.strip() for t in self.new_special_tokens):
            raise SftflowError(f"new_special_tokens holds an empty token: {self.new_special_tokens}.")


@dataclass
class DataArguments:
    """Which data to train on and how to turn it into tokens."""

    dataset: list[str] | None = None
    """Training dataset names from dataset_dir/dataset_info.json, comma-separated."""

    eval_dataset: list[str] | None = None
    """Held-out dataset names used for eval and predict (instead of splitting off val_size)."""

    dataset_dir: str = "data"
    """Folder holding dataset_info.json and the data files it names (relative to the working dir)."""

    template: str | None = None
    """Chat template: unset uses the tokenizer's own; or a built-in (alpaca, default, plain, vicuna, chatml, qwen, qwen3, llama2, mistral, llama3, gemma, phi), or a name from template_file."""

    template_file: str | None = None
    """A YAML file of your own templates (name -> format_user/format_assistant/... or chat_template); pick one with template."""

    default_system: str | None = None
    """The system message of every conversation that has none, in place of the template's own default (written into the chat template, so chat, serving and export use it too); refused with a template that takes no system message."""

    tool_format: str | None = None
    """LLaMA-Factory's tool call format: sftflow writes tools with the chat template itself, so only the format the template writes is taken (qwen: <tool_call> blocks; llama3: bare JSON calls)."""

    cutoff_len: int = 1024
    """Max tokens per example. Longer examples are shortened prompt side first (oldest turns, then the end of the last user message) and never lose their whole answer; see cutoff_policy."""

    cutoff_policy: Literal["truncate", "drop"] = "truncate"
    """What happens to examples longer than cutoff_len: truncate (as above) or drop them. Either way they are counted in the log."""

    train_on_prompt: bool = False
    """Also compute the loss on prompt tokens (default: only on assistant responses)."""

    mask_history: bool = False
    """Train only the last assistant answer of each conversation (earlier answers become context)."""

    enable_thinking: bool | None = True
    """Reasoning templates (e.g. template: qwen3): true trains thoughts, and answers without one get an empty <think> block inside the loss; false removes every thought and puts the empty block at the end of the prompt, untrained; null trains thoughts where present and puts the empty block in the prompt of answers without one. Thoughts come inline (<think>...</think> at the start of an answer) or from reasoning_content / a reasoning column."""

    preserve_thinking: bool = False
    """With mask_history: keep the thoughts of the earlier answers (default: they are dropped, as the model sees its history at inference)."""

    packing: bool = False
    """Pack several examples into each cutoff_len row (no padding; position_ids restart per example and examples never attend to each other)."""

    max_samples: int | None = None
    """Use at most this many examples from each dataset (for quick runs)."""

    val_size: float = 0.0
    """Held-out share of the training data: a fraction in (0, 1) or a number of examples (>= 1)."""

    preview_rows: int = 2
    """How many converted and tokenized examples to print before training."""

    preprocessing_num_workers: int | None = None
    """Processes for converting and tokenizing (datasets.map num_proc); unset = one process."""

    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = "concat"
    """How several datasets are mixed: concat (one after another, then shuffled), interleave_under (sample from each until the first runs out), interleave_over (until the last runs out, repeating the others)."""

    interleave_probs: list[float] | None = None
    """With interleave_*: the probability of drawing from each dataset, comma-separated, one per dataset (default: equal)."""

    streaming: bool = False
    """Read the data as a stream (for data larger than memory): no tokenized cache, val_size must be a count, and training needs max_steps."""

    buffer_size: int = 16384
    """With streaming: size of the shuffle buffer."""

    skip_bad_rows: bool = False
    """Skip malformed rows (bad JSON lines, wrong types, empty answers, odd role order) with a counted warning instead of stopping."""

    overwrite_cache: bool = False
    """Rebuild the tokenized-data cache even when a matching entry exists."""

    tokenized_cache_dir: str | None = None
    """Where tokenized datasets are cached, keyed by data content, tokenizer, template, cutoff_len, stage and masking/packing flags (default: $SFTFLOW_CACHE/tokenized or ~/.cache/sftflow/tokenized)."""

    def __post_init__(self) -> None:
        if self.interleave_probs is not None:
            if not self.mix_strategy.startswith("interleave"):
                raise SftflowError(
                    "interleave_probs needs mix_strategy: interleave_under or interleave_over."
                )
            if self.dataset and len(self.interleave_probs) != len(self.dataset):
                raise SftflowError(
                    f"interleave_probs has {len(self.interleave_probs)} values for {len(self.dataset)} datasets; "
                    "give one probability per dataset."
                )
            if any(p < 0 for p in self.interleave_probs) or abs(sum(self.interleave_probs) - 1) > 1e-6:
                raise SftflowError(
                    f"interleave_probs must be >= 0 and sum to 1, got {self.interleave_probs}."
                )
        if self.packing and self.streaming:
            raise SftflowError(
                "packing needs the whole dataset in memory; set packing: false or streaming: false."
            )
        if self.streaming and 0 < self.val_size < 1:
            raise SftflowError("with streaming, val_size must be a number of examples (e.g. val_size: 100).")
        if self.cutoff_len < 8:
            raise SftflowError(f"cutoff_len must be at least 8, got {self.cutoff_len}.")
        if self.val_size < 0 or (self.val_size >= 1 and not float(self.val_size).is_integer()):
            raise SftflowError(
                f"val_size must be a fraction in [0, 1) or a whole number of examples, got {self.val_size}."
            )
        if self.max_samples is not None and self.max_samples < 1:
            raise SftflowError(f"max_samples must be a positive number, got {self.max_samples}.")


@dataclass
class FinetuningArguments:
    """What to train and what to write besides the model."""

    stage: Literal["pt", "sft", "rm", "dpo", "kto", "grpo"] = "sft"
    """Training stage. pt: continued pre-training on plain text; sft: supervised fine-tuning on conversations; rm: a pairwise reward model; dpo: preference tuning (DPO / IPO / hinge / ORPO / SimPO, see pref_loss); kto: KTO on answers tagged good or bad (kto_tag); grpo: reinforcement with verifiable rewards on prompts (reward_funcs). rm and dpo read ranking: true datasets."""

    finetuning_type: Literal["lora", "oft", "full", "freeze"] = "lora"
    """lora: train low-rank adapters; oft: orthogonal fine-tuning adapters (PEFT OFT); full: train every weight; freeze: train only the last layers."""

    lora_rank: int = 8
    """LoRA rank r."""

    lora_alpha: int | None = None
    """LoRA scaling alpha (default: 2 * lora_rank)."""

    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""

    lora_target: list[str] = field(default_factory=lambda: ["all"])
    """Module names to adapt, comma-separated (e.g. q_proj,v_proj), or all = every linear layer but the output head."""

    use_dora: bool = False
    """LoRA: weight-decomposed low-rank adaptation (DoRA)."""

    use_rslora: bool = False
    """LoRA: rank-stabilized scaling lora_alpha / sqrt(lora_rank) instead of lora_alpha / lora_rank."""

    additional_target: list[str] | None = None
    """LoRA: modules to train fully and save with the adapter besides the LoRA layers, comma-separated (PEFT modules_to_save, e.g. norm)."""

    create_new_adapter: bool = False
    """LoRA with adapter_name_or_path: merge the given adapters into the base and train a new one (default: continue training the last one)."""

    freeze_trainable_layers: int = 2
    """freeze: train the last n decoder layers (the first n with a negative number)."""

    freeze_trainable_modules: list[str] = field(default_factory=lambda: ["all"])
    """freeze: which modules of the chosen layers train, comma-separated (e.g. mlp,self_attn), or all."""

    freeze_extra_modules: list[str] | None = None
    """freeze: modules outside the decoder layers that also train, comma-separated (e.g. embed_tokens,norm)."""

    plot_loss: bool = True
    """Write training_loss.png (and training_eval_loss.png when there is eval loss)."""

    compare_base: bool = True
    """With LoRA, also run predict with the adapter disabled and write generated_predictions_base.jsonl."""

    overwrite_output_dir: bool = False
    """Allow writing into an output_dir that already holds files (else the run stops before loading anything)."""

    skip_nan: bool = False
    """Skip a training batch whose loss is NaN/inf (its gradients are dropped, a warning names the step) instead of stopping the run."""

    freeze_vision_tower: bool = True
    """Models that see: keep the vision tower frozen (no LoRA in it; not trained with finetuning_type: full)."""

    freeze_multi_modal_projector: bool = True
    """Models that see: keep the projector from image features to the language model frozen."""

    freeze_language_model: bool = False
    """Models that see: keep the language model frozen (train only the unfrozen vision parts)."""

    fast_loss: bool = True
    """Training loss on a padding-free row with logits only at trained (label != -100) positions, each example attending only within itself (sdpa models) and the output head fused into the cross-entropy: same loss and gradients as the model's own loss, less time and memory. false: the model's own loss on the padded batch."""

    pref_beta: float = 0.1
    """dpo: the beta of the preference loss (how far the policy may move from the reference; higher = stay closer). For orpo, the weight of the odds-ratio term."""

    pref_loss: Literal["sigmoid", "ipo", "hinge", "orpo", "simpo"] = "sigmoid"
    """dpo: sigmoid (DPO), ipo, hinge (SLiC), all through TRL's DPOTrainer; orpo (no reference model) through TRL's experimental ORPOTrainer; simpo (no reference model, length-normalised, margin simpo_gamma) through TRL's experimental CPOTrainer."""

    pref_ftx: float = 0.0
    """dpo: weight of an extra supervised (NLL) loss on the chosen answers, added to the sigmoid/ipo/hinge loss (0 = none)."""

    simpo_gamma: float = 0.5
    """dpo with pref_loss: simpo: the target reward margin gamma between chosen and rejected answers."""

    kto_chosen_weight: float = 1.0
    """kto: weight of the loss on desirable answers (kto_tag: true)."""

    kto_rejected_weight: float = 1.0
    """kto: weight of the loss on undesirable answers (kto_tag: false)."""

    reward_funcs: list[str] | None = None
    """grpo: the reward functions, comma-separated: built-ins (answer_match, normalized_match, regex_match, think_format, overlong_penalty, length_target, concise) or your own as module:function or path/to/file.py:function. Each gets prompts, completions (text) and the data's extra columns (e.g. answer) and returns one number (or None) per completion."""

    reward_weights: list[float] | None = None
    """grpo: the weight of each reward function, comma-separated, one per reward_funcs entry (default: all 1). The reward of a completion is the weighted sum."""

    reward_kwargs: dict | None = None
    """grpo: settings of the built-in rewards, e.g. {"regex": "^[0-9]+$", "answer_column": "answer", "target_words": 6, "max_words": 26, "overlong_buffer": 16}; see docs/stages.md."""

    num_generations: int = 4
    """grpo: completions sampled per prompt (G, TRL's num_generations); the advantage of each is its reward against its group's. The global batch (per_device_train_batch_size x gradient_accumulation_steps x processes) must be a multiple of it."""

    max_completion_length: int = 256
    """grpo: max new tokens per sampled completion (TRL's max_completion_length)."""

    beta: float = 0.0
    """grpo: weight of the KL penalty to the reference (TRL's beta; 0 = no reference model is used or loaded). With LoRA the reference is the base with the adapter disabled; otherwise a frozen copy of the starting model."""

    epsilon: float = 0.2
    """grpo: clipping range of the importance ratio (TRL's epsilon, the lower bound with epsilon_high)."""

    epsilon_high: float | None = None
    """grpo: upper clipping range (DAPO's clip-higher, e.g. 0.28; default: epsilon)."""

    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """grpo: how token losses are averaged (TRL's loss_type): grpo = per completion then per batch; dr_grpo = sum over a fixed max_completion_length (no length bias); dapo (default) = over all tokens of the global batch; bnpo = over the tokens of the local batch."""

    scale_rewards: Literal["group", "batch", "none"] = "group"
    """grpo: divide advantages by the reward std of the group (GRPO), of the whole batch, or not at all (none, as in Dr. GRPO)."""

    importance_sampling_level: Literal["token", "sequence"] = "token"
    """grpo: importance ratios per token (GRPO) or one per completion (GSPO)."""

    mask_truncated_completions: bool = False
    """grpo: leave completions cut at max_completion_length out of the loss (DAPO)."""

    num_iterations: int = 1
    """grpo: optimisation passes over each generated batch (TRL's num_iterations, GRPO's mu); above 1 the clipped ratio matters."""

    loraplus_lr_ratio: float | None = None
    """LoRA+: the LoRA B matrices learn at loraplus_lr_ratio x learning_rate (PEFT create_loraplus_optimizer; 16 is the paper's choice)."""

    loraplus_lr_embedding: float = 1e-6
    """LoRA+: learning rate of LoRA embedding layers."""

    pissa_init: bool = False
    """LoRA: initialise the adapter from the principal singular vectors of each weight (PiSSA; the base keeps the residual)."""

    pissa_iter: int = 16
    """PiSSA: iterations of fast (randomised) SVD; -1 = exact SVD (slow on big weights)."""

    pissa_convert: bool = False
    """PiSSA: also save the adapter converted to a plain LoRA on the original base (adapter dir pissa_converted/)."""

    oft_rank: int = 0
    """OFT: number of orthogonal blocks per layer (0 = set by oft_block_size; give one of the two)."""

    oft_block_size: int = 32
    """OFT: size of each orthogonal block (0 = set by oft_rank)."""

    oft_target: list[str] = field(default_factory=lambda: ["all"])
    """OFT: module names to adapt, comma-separated, or all = every linear layer but the output head."""

    module_dropout: float = 0.0
    """OFT: probability of dropping a whole orthogonal block in training."""

    use_llama_pro: bool = False
    """LLaMA Pro: train only the expanded (identity-initialised) blocks, every n_layers / freeze_trainable_layers-th layer, with freeze or lora tuning."""

    use_galore: bool = False
    """GaLore: AdamW with gradients projected to rank galore_rank on the target linear weights (galore-torch; full or freeze tuning)."""

    galore_target: list[str] = field(default_factory=lambda: ["all"])
    """GaLore: linear module names to project, comma-separated, or all = every linear layer but the output head."""

    galore_rank: int = 16
    """GaLore: rank of the gradient projection."""

    galore_update_interval: int = 200
    """GaLore: steps between recomputing the projection (SVD of the gradient)."""

    galore_scale: float = 2.0
    """GaLore: scale of the projected update."""

    galore_proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std"
    """GaLore: which side(s) of the gradient are projected."""

    galore_layerwise: bool = False
    """GaLore: one optimizer per weight, stepped in its backward hook (saves gradient memory; needs gradient_accumulation_steps: 1)."""

    use_apollo: bool = False
    """APOLLO: AdamW-like updates with channel-wise scales from a random low-rank projection (apollo-torch; full or freeze tuning)."""

    apollo_target: list[str] = field(default_factory=lambda: ["all"])
    """APOLLO: linear module names to project, comma-separated, or all = every linear layer but the output head."""

    apollo_rank: int = 16
    """APOLLO: rank of the projection."""

    apollo_update_interval: int = 200
    """APOLLO: steps between redrawing the projection."""

    apollo_scale: float = 32.0
    """APOLLO: scale of the update."""

    apollo_proj: Literal["svd", "random"] = "random"
    """APOLLO: projection kind."""

    apollo_proj_type: Literal["std", "right", "left"] = "std"
    """APOLLO: which side of the gradient is projected."""

    apollo_scale_type: Literal["channel", "tensor"] = "channel"
    """APOLLO: channel-wise or tensor-wise scaling."""

    apollo_scale_front: bool = False
    """APOLLO: scale the gradient before the norm-growth limiter."""

    apollo_layerwise: bool = False
    """APOLLO: one optimizer per weight, stepped in its backward hook (saves gradient memory; needs gradient_accumulation_steps: 1)."""

    use_badam: bool = False
    """BAdam: block coordinate descent, Adam on one block of parameters at a time (badam; full tuning)."""

    badam_mode: Literal["layer", "ratio"] = "layer"
    """BAdam: layer = one decoder layer at a time; ratio = a random badam_update_ratio share of every weight."""

    badam_start_block: int | None = None
    """BAdam layer mode: index of the first block to train (default: by badam_switch_mode)."""

    badam_switch_mode: Literal["ascending", "descending", "random", "fixed"] = "ascending"
    """BAdam layer mode: the order blocks are visited in."""

    badam_switch_interval: int = 50
    """BAdam layer mode: optimizer steps before switching to the next block."""

    badam_update_ratio: float = 0.05
    """BAdam ratio mode: share of each weight updated."""

    badam_mask_mode: Literal["adjacent", "scatter"] = "adjacent"
    """BAdam ratio mode: adjacent or scattered updated entries."""

    badam_verbose: int = 0
    """BAdam: 0 quiet, 1 log block switches, 2 also the trainable parameters."""

    use_adam_mini: bool = False
    """Adam-mini: one second-moment value per block (head, neuron) instead of per weight (adam-mini; full or freeze tuning)."""

    use_muon: bool = False
    """Muon (torch.optim.Muon) on the 2-D weights of the decoder layers, AdamW on embeddings, output head, norms and biases."""

    use_dft_loss: bool = False
    """sft: Dynamic Fine-Tuning loss, each trained token's cross-entropy weighted by its (detached) probability (needs fast_loss)."""

    def __post_init__(self) -> None:
        if self.lora_rank < 1:
            raise SftflowError(f"lora_rank must be >= 1, got {self.lora_rank}.")
        if not 0 <= self.lora_dropout < 1:
            raise SftflowError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank
        if self.pref_beta <= 0:
            raise SftflowError(f"pref_beta must be > 0, got {self.pref_beta}.")
        if self.pref_ftx < 0:
            raise SftflowError(f"pref_ftx must be >= 0, got {self.pref_ftx}.")
        if self.pref_ftx and self.pref_loss == "orpo":
            raise SftflowError(
                "pref_ftx does not apply to pref_loss: orpo (its loss already holds the NLL term)."
            )


@dataclass
class GeneratingArguments:
    """Decoding settings for predict, chat and the API."""

    do_sample: bool = False
    """Sample instead of greedy decoding."""

    temperature: float = 0.95
    """Sampling temperature (with do_sample). stage grpo: the temperature of the sampled completions, 1.0 (TRL's) unless set."""

    top_p: float = 0.7
    """Nucleus sampling mass (with do_sample). stage grpo: of the sampled completions, 1.0 (TRL's) unless set."""

    top_k: int = 50
    """Top-k sampling (with do_sample). stage grpo: of the sampled completions, off unless set."""

    num_beams: int = 1
    """Beam search width (1 = no beam search)."""

    max_new_tokens: int = 128
    """Max tokens generated per answer."""

    repetition_penalty: float = 1.0
    """Penalty > 1 discourages repeating tokens (stage grpo: also in the sampled completions)."""

    onednn_linear: bool = True
    """chat / api on a CPU: float32 Linear layers through oneDNN (same tokens, faster)."""

    serve_max_queue: int = 64
    """`sftflow api`: requests held at once (running + waiting); more are answered 429 with Retry-After."""

    serve_batching: Literal["dynamic", "continuous"] = "dynamic"
    """`sftflow api`: dynamic, requests join/leave one batch at every step (continuous is refused: removed)."""

    serve_max_batch_tokens: int = 2048
    """`sftflow api`: tokens one batched pass may read (the prompts of the requests joining the batch)."""

    serve_memory_fraction: float = 0.1
    """`sftflow api`: share of free memory (RAM on CPU, GPU memory on CUDA) the batch's KV cache may use."""

    serve_max_body_bytes: int = 4 * 2**20
    """`sftflow api`: largest request body read (4 MiB); a larger one gets 413 before it is read."""

    def __post_init__(self) -> None:
        if self.serve_batching == "continuous":
            raise SftflowError(
                "serve_batching: continuous (transformers' continuous batching) was removed: it ran about half "
                "as fast per decode step on CPU as the dynamic path, which also lets requests join and leave "
                "at every step. Use serve_batching: dynamic (the default)."
            )
        if min(self.serve_max_queue, self.serve_max_batch_tokens, self.serve_max_body_bytes) < 1:
            raise SftflowError(
                "serve_max_queue, serve_max_batch_tokens and serve_max_body_bytes must be >= 1."
            )
        if not 0 < self.serve_memory_fraction < 1:
            raise SftflowError(f"serve_memory_fraction must be in (0, 1), got {self.serve_memory_fraction}.")
        if self.temperature <= 0:
            raise SftflowError(f"temperature must be > 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise SftflowError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise SftflowError("max_new_tokens and num_beams must be >= 1.")

    def to_generation_kwargs(self) -> dict:
        """The kwargs for `transformers.GenerationConfig` (sampling knobs only when sampling)."""
        kwargs = {
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs
