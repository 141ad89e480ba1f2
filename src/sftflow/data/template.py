"""Chat templates. The tokenizer's own `chat_template` is the default and the reference; the built-ins
here are for tokenizers without one, and user templates come from a YAML file (`template_file`).

Every template, built-in or user, is a Jinja chat template installed as the tokenizer's
`chat_template`: rendering goes through `tokenizer.apply_chat_template` whatever the source, the
template is saved with the tokenizer, and chat/serving later use exactly what training used.

LLaMA-Factory's template names (LLAMAFACTORY_TEMPLATES) are accepted: the built-in of that name, else the
tokenizer's own template when the tokenizer is of the name's model family (logged), else an error.

Built-ins and YAML templates are written as format strings (LLaMA-Factory's `format_user`,
`format_assistant`, ... with `{content}`, `{bos_token}`, `{eos_token}` placeholders) and compiled to
Jinja by `compile_template`. A YAML file maps names to either such a spec or a raw `chat_template`:

```yaml
my_template:
  format_system: "<<SYS>> {content} <</SYS>>\\n"
  format_user: "Q: {content}\\n"
  generation_prompt: "A:"          # written before each answer and by add_generation_prompt
  format_assistant: " {content}{eos_token}\\n"
  default_system: ""               # used when a conversation has no system message
my_jinja:
  chat_template: "{% for m in messages %}...{% endfor %}"
```
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


logger = logging.getLogger(__name__)

# The templates LLaMA-Factory registers (src/llamafactory/data/template.py). Those with a sftflow built-in
# of the same name use it; the others use the tokenizer's own chat template when the tokenizer is of the
# same model family (the name's leading word: qwen3_nothink -> qwen), else they are refused.
_LLAMAFACTORY_NAMES = (
    "alpaca bailing bailing_v2 breeze chatglm3 chatml chatml_de cohere cpm4 dbrx deepseek deepseek3 "
    "deepseekr1 hy3 deepseekcoder default dots_ocr empty ernie ernie_nothink ernie_vl exaone falcon "
    "falcon_h1 fewshot gemma gemma2 gemma3 gemma3n gemma4 gemma4n glm4 glm4_moe glm4v glm4_5v glm_ocr glm4_7 "
    "glmz1 gpt_oss granite3 granite3_vision granite4 index hunyuan hunyuan_small hy_dense_1_8b hy_dense_7b "
    "intern2 intern_vl intern_s1 keye_vl kimi_vl lfm2 lfm2_vl llama2 llama2_zh llama3 llama4 mllama "
    "moonlight moss_vl llava llava_next llava_next_llama3 llava_next_mistral llava_next_qwen llava_next_yi "
    "llava_next_video llava_next_video_mistral llava_next_video_yi mimo mimo_v2 mimo_vl minicpm_v "
    "minicpm_v_4_6 minicpm_o minimax1 minimax2 ministral mistral mistral_small ministral3 olmo openchat "
    "openchat-3.6 opencoder paligemma paligemma_chat phi phi_small phi4 phi4_mini pixtral qwen qwen3 "
    "qwen3_nothink qwen2_audio qwen2_omni qwen3_omni qwen3_omni_nothink qwen2_vl qwen3_vl qwen3_vl_nothink "
    "qwen3_5 qwen3_5_nothink qwen3_6 sailor seed_coder seed_oss smollm smollm2 solar starchat telechat2 "
    "vicuna video_llava xuanyuan yi yi_vl youtu youtu_vl yuan zephyr aeva"
)
LLAMAFACTORY_TEMPLATES = tuple(_LLAMAFACTORY_NAMES.split())


# LLaMA-Factory's reasoning templates (its ReasoningTemplate class: enable_thinking applies). Those whose text
# is Qwen3's resolve to the qwen3 built-in, deepseekr1 is a built-in, the rest are refused (sftflow does not
# have their formats). Its `*_nothink` names are plain templates (data trained as written): qwen3_nothink is a
# built-in; the others (multimodal Qwen3 ones, ernie_nothink) are refused.
_REASONING_NAMES = (
    "deepseekr1 hy3 ernie_vl gemma4 gemma4n glm4_moe glm4v glm4_5v glm4_7 glmz1 gpt_oss keye_vl kimi_vl mimo "
    "mimo_v2 mimo_vl minimax2 qwen3 qwen3_omni qwen3_vl qwen3_5 qwen3_6 seed_oss youtu aeva"
)
LLAMAFACTORY_REASONING = tuple(_REASONING_NAMES.split())
LLAMAFACTORY_ALIASES = {"qwen3_5": "qwen3", "qwen3_6": "qwen3", "qwen3_vl": "qwen3", "qwen3_omni": "qwen3"}


def template_family(name: str) -> str:
    """The model family a LLaMA-Factory template name is for: its leading letters.

    >>> template_family("qwen3_nothink"), template_family("deepseekr1"), template_family("llava_next_qwen")
    ('qwen', 'deepseek', 'llava')
    """
    if name in _FAMILIES:
        return _FAMILIES[name]
    match = re.match(r"[a-z]+", name.lower())
    return match.group(0) if match else name.lower()


# names whose leading letters are not the model type's
_FAMILIES = {
    "deepseekr1": "deepseek",
    "deepseekcoder": "deepseek",
    "chatglm3": "glm",
    "glmz1": "glm",
    "gpt_oss": "gpt_oss",
    "hy3": "hunyuan",
    "hy_dense_1_8b": "hunyuan",
    "hy_dense_7b": "hunyuan",
    "seed_coder": "seed",
    "seed_oss": "seed_oss",
}


def tokenizer_family(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the tokenizer says about its model: the model_type of the config.json beside it, and its name."""
    source = str(getattr(tokenizer, "name_or_path", "") or "")
    config = Path(source) / "config.json"
    model_type = ""
    if config.is_file():
        try:
            model_type = str(json.loads(config.read_text(encoding="utf-8")).get("model_type", ""))
        except (OSError, json.JSONDecodeError):
            model_type = ""
    return f"{model_type} {Path(source).name}".lower()


PLACEHOLDER = re.compile(r"\{(content|bos_token|eos_token)\}")


@dataclass(frozen=True)
class TemplateSpec:
    """A chat format written as format strings; `compile_template` turns it into a Jinja chat template.

    Attributes:
        format_user: a user turn; `{content}` is the message text.
        format_assistant: an assistant answer; must write the end-of-turn token (e.g. `{eos_token}`).
        generation_prompt: the text before every answer (and what add_generation_prompt appends).
        format_system: the system message; with `system_style: first_user` it is put in front of the
            first user message's content instead of standing alone.
        format_tool: a tool (function result) turn; default: format_user.
        default_system: the system message used when a conversation has none ("" = none).
        prefix: written once at the start (e.g. `{bos_token}`).
        system_style: `separate` (a turn of its own) or `first_user` (inside the first user turn).
        special_tokens: tokens the tokenizer must have as single tokens for this template.
        chat_template: a raw Jinja chat template; when set, every format field is ignored.
    """

    format_user: str = "{content}"
    format_assistant: str = "{content}{eos_token}"
    generation_prompt: str = ""
    format_system: str = "{content}"
    format_tool: str | None = None
    default_system: str = ""
    prefix: str = ""
    system_style: Literal["separate", "first_user"] = "separate"
    special_tokens: tuple[str, ...] = field(default_factory=tuple)
    chat_template: str | None = None


CHATML_SPEC = TemplateSpec(
    format_system="<|im_start|>system\n{content}<|im_end|>\n",
    format_user="<|im_start|>user\n{content}<|im_end|>\n",
    format_tool="<|im_start|>tool\n{content}<|im_end|>\n",
    generation_prompt="<|im_start|>assistant\n",
    format_assistant="{content}<|im_end|>\n",
    special_tokens=("<|im_start|>", "<|im_end|>"),
)

# A Qwen3-style reasoning template (written for sftflow, ChatML tokens): the answers after the last user
# message get their thought as `<think>\n...\n</think>\n\n` (from `reasoning_content` or split off an
# inline thought; the last answer always gets the block, empty when it has none), earlier answers lose
# theirs, and `enable_thinking=false` appends the empty block to the generation prompt.
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}{%- set reasoning = '' %}"
    "{%- if message['reasoning_content'] is string %}{%- set reasoning = message['reasoning_content'] %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- raise_exception('unsupported role ' + message['role']) }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)

# A DeepSeek-R1-style reasoning template (written for sftflow; R1's tokens as text): `{bos}{system}`, then
# `<｜User｜>question<｜Assistant｜>answer<｜end▁of▁sentence｜>` per turn. R1's own template drops the thought of
# every answer, so a thought could never be trained; here the LAST answer keeps it as
# `<think>\n...\n</think>\n\n` (from `reasoning_content` or split off inline; empty block when it has
# none), earlier answers lose theirs as in R1, and `enable_thinking=false` appends the empty block to the
# generation prompt. The generation prompt is `<｜Assistant｜>` (LLaMA-Factory's deepseekr1), not R1's
# `<｜Assistant｜><think>\n`, so that the whole thought block is part of the answer.
R1_TOKENS = ("<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>")
DEEPSEEKR1_CHAT_TEMPLATE = (
    "{{- bos_token or '' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{{- '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}{%- set reasoning = '' %}"
    "{%- if message['reasoning_content'] is string %}{%- set reasoning = message['reasoning_content'] %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '<｜Assistant｜>' }}"
    "{%- if loop.last %}{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- content.lstrip('\\n') + '<｜end▁of▁sentence｜>' }}"
    "{%- else %}{{- raise_exception('the deepseekr1 template renders no ' + message['role'] + ' turns') }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜>' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)

BUILTIN_TEMPLATES: dict[str, TemplateSpec] = {
    "alpaca": TemplateSpec(
        default_system="Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.",
        format_system="{content}\n\n",
        format_user="### Instruction:\n{content}\n\n",
        generation_prompt="### Response:\n",
        format_assistant="{content}{eos_token}\n\n",
    ),
    "default": TemplateSpec(
        format_system="System: {content}\n",
        format_user="Human: {content}\n",
        generation_prompt="Assistant:",
        format_assistant=" {content}{eos_token}\n",
    ),
    "plain": TemplateSpec(format_system="{content}\n", format_user="{content}\n"),
    "vicuna": TemplateSpec(
        default_system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        format_system="{content} ",
        format_user="USER: {content} ",
        generation_prompt="ASSISTANT:",
        format_assistant=" {content}{eos_token}",
    ),
    "chatml": CHATML_SPEC,
    "qwen": TemplateSpec(
        **{
            **{f.name: getattr(CHATML_SPEC, f.name) for f in fields(CHATML_SPEC)},
            "default_system": "You are a helpful assistant.",
            "format_tool": "<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n",
        }
    ),
    "qwen3": TemplateSpec(chat_template=QWEN3_CHAT_TEMPLATE, special_tokens=("<|im_start|>", "<|im_end|>")),
    # LLaMA-Factory's plain (no thinking) Qwen3 template: ChatML without a default system; thoughts are answer text
    "qwen3_nothink": TemplateSpec(
        **{
            **{f.name: getattr(CHATML_SPEC, f.name) for f in fields(CHATML_SPEC)},
            "format_tool": "<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n",
        }
    ),
    "deepseekr1": TemplateSpec(chat_template=DEEPSEEKR1_CHAT_TEMPLATE, special_tokens=R1_TOKENS),
    "llama2": TemplateSpec(
        system_style="first_user",
        format_system="<<SYS>>\n{content}\n<</SYS>>\n\n",
        format_user="{bos_token}[INST] {content} [/INST]",
        format_assistant=" {content} {eos_token}",
    ),
    "mistral": TemplateSpec(
        prefix="{bos_token}",
        system_style="first_user",
        format_system="{content}\n\n",
        format_user="[INST] {content} [/INST]",
        format_assistant="{content}{eos_token}",
    ),
    "llama3": TemplateSpec(
        prefix="{bos_token}",
        format_system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        format_user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        format_tool="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
        generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
        format_assistant="{content}<|eot_id|>",
        special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "gemma": TemplateSpec(
        prefix="{bos_token}",
        system_style="first_user",
        format_system="{content}\n\n",
        format_user="<start_of_turn>user\n{content}<end_of_turn>\n",
        generation_prompt="<start_of_turn>model\n",
        format_assistant="{content}<end_of_turn>\n",
        special_tokens=("<start_of_turn>", "<end_of_turn>"),
    ),
    "phi": TemplateSpec(
        format_system="<|system|>\n{content}<|end|>\n",
        format_user="<|user|>\n{content}<|end|>\n",
        generation_prompt="<|assistant|>\n",
        format_assistant="{content}<|end|>\n",
        special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    ),
}


def _expr(fmt: str, content: str = "message['content']") -> str:
    """A Jinja expression for a format string: literals, `content`, and the tokenizer's special tokens.

    >>> print(_expr("A: {content}{eos_token}"))
    "A: " + message['content'] + (eos_token or '')
    """
    parts: list[str] = []
    pos = 0
    for match in PLACEHOLDER.finditer(fmt):
        if match.start() > pos:
            parts.append(json.dumps(fmt[pos : match.start()], ensure_ascii=False))
        name = match.group(1)
        parts.append(content if name == "content" else f"({name} or '')")
        pos = match.end()
    if pos < len(fmt):
        parts.append(json.dumps(fmt[pos:], ensure_ascii=False))
    return " + ".join(parts) if parts else "''"


def compile_template(spec: TemplateSpec) -> str:
    """The Jinja chat template (HF `apply_chat_template` conventions) that renders `spec`.

    Roles: system (first message only), user, assistant, tool. add_generation_prompt appends the
    generation prompt. The template renders incrementally: a conversation prefix renders to a prefix of
    the whole, which is what lets prompts and answers be cut apart exactly.
    """
    if spec.chat_template:
        return spec.chat_template
    tool = spec.format_tool or spec.format_user
    system = _expr(spec.format_system, "system")
    lines = [
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
        f"{{% else %}}{{% set system = {json.dumps(spec.default_system, ensure_ascii=False)} %}}"
        "{% set loop_messages = messages %}{% endif %}",
    ]
    if spec.prefix:
        lines.append("{{ " + _expr(spec.prefix) + " }}")
    if spec.system_style == "separate":
        lines.append("{% if system %}{{ " + system + " }}{% endif %}")
    user_first = (
        "{% if loop.first and system %}{{ "
        + _expr(spec.format_user, f"({system}) + message['content']")
        + " }}{% else %}{{ "
        + _expr(spec.format_user)
        + " }}{% endif %}"
        if spec.system_style == "first_user"
        else "{{ " + _expr(spec.format_user) + " }}"
    )
    gen = _expr(spec.generation_prompt) if spec.generation_prompt else None
    lines += [
        "{% for message in loop_messages %}",
        "{% if message['role'] == 'user' %}" + user_first,
        "{% elif message['role'] == 'assistant' %}"
        + ("{{ " + gen + " }}" if gen else "")
        + "{{ "
        + _expr(spec.format_assistant)
        + " }}",
        "{% elif message['role'] == 'tool' %}{{ " + _expr(tool) + " }}",
        "{% else %}{{ raise_exception('unsupported role ' + message['role']) }}{% endif %}",
        "{% endfor %}",
    ]
    if gen:
        lines.append("{% if add_generation_prompt %}{{ " + gen + " }}{% endif %}")
    return "".join(lines)


def load_template_file(path: str | Path) -> dict[str, TemplateSpec]:
    """Read user templates from a YAML file mapping names to TemplateSpec fields (or `chat_template`).

    Raises:
        SftflowError: the file is missing or not YAML, a template is not a mapping, or names an unknown
            field, or its assistant format does not contain `{content}`.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SftflowError(f"template_file {path} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SftflowError(f"template_file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise SftflowError(f"template_file {path} must map template names to their fields.")
    known = {f.name for f in fields(TemplateSpec)}
    specs: dict[str, TemplateSpec] = {}
    for name, body in raw.items():
        where = f"template_file {path}, template {name!r}"
        if not isinstance(body, dict):
            raise SftflowError(f"{where}: expected a mapping of fields ({', '.join(sorted(known))}).")
        unknown = sorted(set(body) - known)
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise SftflowError(
                f"{where}: unknown field {unknown[0]!r}.{hint} Fields: {', '.join(sorted(known))}."
            )
        bad = [k for k, v in body.items() if k != "special_tokens" and not isinstance(v, str)]
        if bad:
            raise SftflowError(f"{where}: field {bad[0]!r} must be a string.")
        if body.get("system_style", "separate") not in ("separate", "first_user"):
            raise SftflowError(f"{where}: system_style must be separate or first_user.")
        if "chat_template" not in body and "{content}" not in body.get("format_assistant", "{content}"):
            raise SftflowError(f"{where}: format_assistant must contain {{content}}.")
        specs[str(name)] = TemplateSpec(**{**body, "special_tokens": tuple(body.get("special_tokens", ()))})
    return specs


def apply_template(
    tokenizer: PreTrainedTokenizerBase, name: str | None, template_file: str | Path | None = None
) -> None:
    """Install the chosen template as the tokenizer's chat_template (None keeps the tokenizer's own).

    Args:
        tokenizer: a HF tokenizer; its `chat_template` is replaced.
        name: a built-in name, a name defined in `template_file` (those win over built-ins), or None.
        template_file: a YAML file of user templates (see the module docstring).

    Raises:
        SftflowError: unknown template name, no template at all, or a template whose special tokens the
            tokenizer lacks.
    """
    available = dict(BUILTIN_TEMPLATES)
    if template_file:
        user = load_template_file(template_file)
        available.update(user)
        if name is None:
            raise SftflowError(
                f"template_file {template_file} is set but template is not; set template to one of "
                f"{', '.join(user)}."
            )
    if name is None:
        if not getattr(tokenizer, "chat_template", None):
            raise SftflowError(
                "this tokenizer has no chat template; set template to one of "
                f"{', '.join(BUILTIN_TEMPLATES)} (e.g. template: alpaca for a base model), or define one "
                "in a YAML template_file."
            )
        return
    name = _llamafactory_name(name, available)
    if name in OWN_FIRST and available.get(name) is BUILTIN_TEMPLATES[name]:
        own = getattr(tokenizer, "chat_template", None)
        if own and template_family(name) in tokenizer_family(tokenizer):
            logger.info(
                "template: %s keeps this %s tokenizer's own chat template.", name, template_family(name)
            )
            return
    if name not in available and name in LLAMAFACTORY_TEMPLATES:
        family = template_family(name)
        if getattr(tokenizer, "chat_template", None) and family in tokenizer_family(tokenizer):
            logger.info(
                "template: %s is LLaMA-Factory's %s template; sftflow has no built-in of that name, so the "
                "tokenizer's own chat template (same family) is used.",
                name,
                family,
            )
            return
        raise SftflowError(
            f"template {name!r} is a LLaMA-Factory template sftflow has no built-in for, and this tokenizer "
            f"({getattr(tokenizer, 'name_or_path', '?')}) is not of the {family} family or has no chat template. "
            f"Built-in: {', '.join(BUILTIN_TEMPLATES)}; or leave template unset to use the tokenizer's own, or "
            "define it in a template_file."
        )
    if name not in available:
        close = difflib.get_close_matches(name, list(available), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SftflowError(
            f"unknown template {name!r}.{hint} Built-in: {', '.join(BUILTIN_TEMPLATES)}"
            + (
                f"; from {template_file}: {', '.join(sorted(set(available) - set(BUILTIN_TEMPLATES)))}"
                if template_file
                else ""
            )
            + "; leave template unset to use the tokenizer's own."
        )
    spec = available[name]
    vocab = tokenizer.get_vocab()
    missing = [t for t in spec.special_tokens if t not in vocab]
    if missing:
        raise SftflowError(
            f"template {name} needs the special tokens {missing}, which this tokenizer lacks. Use the "
            "template of this model's family, a template without special tokens (alpaca, default, plain, "
            "vicuna, llama2, mistral), or add them with new_special_tokens."
        )
    tokenizer.chat_template = compile_template(spec)


# built-ins for a model family whose own tokenizers carry a fuller template (tools): those keep theirs
OWN_FIRST = {"qwen3"}


def _llamafactory_name(name: str, available: dict[str, TemplateSpec]) -> str:
    """The template a LLaMA-Factory reasoning name stands for (LLAMAFACTORY_ALIASES), or `name` itself.

    Raises:
        SftflowError: a LLaMA-Factory reasoning or `*_nothink` name sftflow has no built-in for.
    """
    if name in available:
        return name
    if name in LLAMAFACTORY_ALIASES:
        logger.info(
            "template: %s is LLaMA-Factory's Qwen3 reasoning format; sftflow uses its qwen3 template.", name
        )
        return LLAMAFACTORY_ALIASES[name]
    thinking = sorted({"qwen3", "deepseekr1", *LLAMAFACTORY_ALIASES})
    if name in LLAMAFACTORY_REASONING:
        raise SftflowError(
            f"template {name!r} is a LLaMA-Factory reasoning template sftflow has no built-in for. Reasoning "
            f"templates: {', '.join(thinking)}; or leave template unset to use the tokenizer's own chat "
            "template (its thought tags are read off it), or define one in a template_file."
        )
    if name in LLAMAFACTORY_TEMPLATES and name.endswith("_nothink"):
        raise SftflowError(
            f"template {name!r} is LLaMA-Factory's plain (no thinking) template for a model sftflow has no "
            "built-in for (multimodal Qwen3, ERNIE). Plain: qwen3_nothink (text Qwen3); or leave template unset "
            "to use the tokenizer's own chat template with enable_thinking: false."
        )
    return name


def render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool = False
) -> str:
    """The template's text for `messages` (what the model sees), via the tokenizer's chat template."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def turn_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, for each assistant turn, (prompt_end, turn_end) character offsets.

    `full[:prompt_end]` is what the template renders for the conversation before that answer with the
    generation prompt (what inference sees); `full[prompt_end:turn_end]` is the answer with its
    end-of-turn text.

    Raises:
        SftflowError: the template does not render conversations incrementally (a prefix of the
            conversation renders differently from the start of the whole), so turns cannot be cut.
    """
    full = render(tokenizer, messages)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_end = render(tokenizer, messages[:i], add_generation_prompt=True)
        turn_end = render(tokenizer, messages[: i + 1])
        if not (full.startswith(turn_end) and turn_end.startswith(prompt_end) and len(prompt_end) >= cursor):
            raise SftflowError(
                "the chat template renders a conversation prefix differently from the whole conversation "
                f"(at turn {i}), so prompt and response cannot be separated. Use a built-in template "
                f"({', '.join(BUILTIN_TEMPLATES)}) or fix the template."
            )
        spans.append((len(prompt_end), len(turn_end)))
        cursor = len(turn_end)
    if not spans:
        raise SftflowError("the conversation has no assistant turn, so there is nothing to train on.")
    return full, spans


def split_turns(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    """Cut the rendered conversation into (prompt text, response text) pairs, one per assistant turn.

    The pieces concatenate to exactly `render(messages)`; text after the last answer joins its response.
    """
    full, spans = turn_spans(tokenizer, messages)
    pairs, cursor = [], 0
    for prompt_end, turn_end in spans:
        pairs.append((full[cursor:prompt_end], full[prompt_end:turn_end]))
        cursor = turn_end
    last_prompt, last_response = pairs[-1]
    pairs[-1] = (last_prompt, last_response + full[cursor:])
    return pairs


# LLaMA-Factory's `default_system`, written in front of any chat template (removed again on a re-install)
_SYSTEM_START, _SYSTEM_END = "{#- sftflow default_system #}", "{#- /sftflow default_system #}"


def _source(tokenizer: PreTrainedTokenizerBase, key: str) -> str:
    source = getattr(tokenizer, "chat_template", None)
    if not isinstance(source, str):
        raise SftflowError(
            f"{key} needs a single chat template, and this tokenizer has "
            f"{'several named ones' if source else 'none'}. Set template (e.g. template: chatml)."
        )
    return source


def set_default_system(tokenizer: PreTrainedTokenizerBase, system: str | None) -> None:
    """LLaMA-Factory's `default_system`: the system message of every conversation that has none, in place
    of the template's own default (Qwen's "You are Qwen...", alpaca's instruction line). It is written
    into the chat template (a conversation without a system message gets this one first), so training,
    chat, serving and export render it alike. Nothing happens for None.

    Raises:
        SftflowError: the template refuses a system message, or does not render one (the key would change
            nothing), or the tokenizer has no single chat template.
    """
    if system is None:
        return
    source = _source(tokenizer, "default_system")
    source = re.sub(re.escape(_SYSTEM_START) + ".*?" + re.escape(_SYSTEM_END), "", source, flags=re.S)
    head = (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        "{%- set messages = [{'role': 'system', 'content': "
        + json.dumps(system, ensure_ascii=False)
        + "}] + messages %}{%- endif %}"
    )
    before = tokenizer.chat_template
    tokenizer.chat_template = _SYSTEM_START + head + _SYSTEM_END + source
    probe = "sftflow-probe-user"
    try:
        text = render(tokenizer, [{"role": "user", "content": probe}], add_generation_prompt=True)
        reason = "" if system not in {"", probe} and system in text else "it does not render system messages"
        reason = "" if not system.strip() else reason
    except Exception as exc:  # a template that insists on its own roles  # noqa: BLE001
        reason = f"it refuses a system message ({exc})"
    if reason:
        tokenizer.chat_template = before
        raise SftflowError(
            f"default_system cannot be used with this chat template "
            f"({getattr(tokenizer, 'name_or_path', '?') or '?'}): {reason}. Put the instruction in the user "
            "messages, or choose a template that takes a system message."
        )


# LLaMA-Factory's tool_format names of the two call formats chat templates write (infer/toolcalls.py)
TOOL_FORMATS = {"hermes": "qwen", "json": "llama3"}


def check_tool_format(tokenizer: PreTrainedTokenizerBase, tool_format: str | None) -> None:
    """LLaMA-Factory's `tool_format` picks how its templates write tool schemas and calls; sftflow writes
    them with the chat template itself. So the key is taken when it names the format this template
    already writes (`qwen`: `<tool_call>` blocks; `llama3`: bare JSON calls) and refused otherwise.

    Raises:
        SftflowError: the template renders no tools, or writes another format than tool_format.
    """
    if tool_format is None:
        return
    source = _source(tokenizer, "tool_format")
    name = getattr(tokenizer, "name_or_path", "?") or "?"
    if not re.search(r"\btools\b", source):
        raise SftflowError(
            f"tool_format: {tool_format}: this chat template ({name}) renders no tools, so tool schemas and "
            "calls would be plain text. sftflow writes tools with the chat template itself: use a template "
            "that renders tools (e.g. a Qwen2.5/Qwen3, Llama 3.1 or SmolLM3 tokenizer's own, or a "
            "template_file chat_template) and remove tool_format."
        )
    writes = "hermes" if "<tool_call>" in source else "json"
    if TOOL_FORMATS[writes] != tool_format:
        shape = "<tool_call> blocks" if writes == "hermes" else "bare JSON calls"
        raise SftflowError(
            f"tool_format: {tool_format}: this chat template ({name}) writes tool calls as {shape} "
            f"(LLaMA-Factory's tool_format: {TOOL_FORMATS[writes]}), and sftflow writes tools with the chat "
            f"template itself. Set tool_format: {TOOL_FORMATS[writes]} or remove it, or use a template_file "
            "chat_template that writes the format you want."
        )
