"""The base checkpoint every branch starts from carries the tokenizer the preflight rendered with:
a `model.chat_template` file is saved into it, so workers (and `python -m hft_ray.train`) train and
ask in that template without the pipeline file."""

from hft_ray.config.preflight import prepare
from hft_ray.config.spec import parse_spec
from hft_ray.run.base import initial_checkpoint
from hft_ray.storage import Location
from hft_ray.train.checkpoints import load_checkpoint

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def test_a_template_file_is_saved_with_the_base_checkpoint(tmp_path):
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    spec = parse_spec({"name": "t", "model": {"source": "builtin:tiny-llama", "chat_template": "chat.jinja"},
                       "domains": {"copy": {"source": "builtin:copy", "eval_size": 8, "train_size": 16}},
                       "stages": [{"domain": "copy", "steps": 1}], "methods": {"fft": {"kind": "fft"}},
                       "output": {"dir": str(tmp_path / "runs")}}, "test")
    prepared = prepare(spec, tmp_path)  # the file is named relative to the pipeline's folder
    assert prepared.spec.model.chat_template == str(tmp_path / "chat.jinja")
    _, tokenizer = load_checkpoint(initial_checkpoint(prepared.spec, Location(tmp_path / "out")))
    assert tokenizer.chat_template == TEMPLATE
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"


def test_a_bf16_model_folder_becomes_a_bf16_base_without_being_loaded(tmp_path):
    """The base of a model folder is its own safetensors, linked (the same file, no copy on the same
    file system), in its dtype: an 8B model in bf16 stays 16 GB on disk and is never read here."""
    import os

    import torch
    import transformers
    from safetensors import safe_open

    from hft_ray.train.models import char_tokenizer

    source = tmp_path / "model"
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=104, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(source)
    char_tokenizer().save_pretrained(source)
    spec = parse_spec({"name": "t", "model": {"source": str(source)},
                       "domains": {"copy": {"source": "builtin:copy", "eval_size": 8, "train_size": 16}},
                       "stages": [{"domain": "copy", "steps": 1}], "methods": {"fft": {"kind": "fft"}}}, "test")
    base = initial_checkpoint(spec, Location(tmp_path / "out"))
    weights = f"{base}/model.safetensors"
    assert os.path.samefile(weights, source / "model.safetensors")
    with safe_open(weights, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model, _ = load_checkpoint(base, "auto")
    assert model.dtype == torch.bfloat16
