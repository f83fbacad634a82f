"""Pipeline files: every shipped one loads; bad ones exit 2 naming every problem, start nothing."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from hft_ray.cli import main
from hft_ray.config.preflight import prepare
from hft_ray.config.spec import load_spec
from hft_ray.errors import UserError

PIPELINES = sorted((Path(__file__).parents[2] / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_every_shipped_pipeline_validates_and_its_data_loads(path):
    spec, text = load_spec(path)
    prepared = prepare(spec, path.parent)
    assert set(prepared.domains) | set(prepared.harness) == set(spec.domains)
    assert all(prepared.domains[s.domain].train for s in spec.stages)


def test_overrides_reach_nested_keys_and_list_items():
    spec, _ = load_spec(PIPELINES[0], ["train.lr=3e-4", "stages.0.steps=7", "methods.hft.ratio=0.25"])
    assert spec.train.lr == 3e-4 and spec.stages[0].steps == 7 and spec.methods["hft"].ratio == 0.25


def test_seeds_come_from_the_file_or_the_flag_and_a_bad_flag_exits_2(capsys, monkeypatch):
    spec, _ = load_spec(PIPELINES[0], ["seeds=[0, 1, 2]"])
    assert spec.run_seeds == [0, 1, 2] and spec.reference == next(iter(spec.methods))
    assert spec.for_seed(2).seed == 2 and spec.for_seed(2).seeds is None
    assert load_spec(PIPELINES[0])[0].run_seeds == [load_spec(PIPELINES[0])[0].seed], "no seeds: the one seed"
    monkeypatch.setattr("hft_ray.cli.commands.run_pipeline", lambda args: print(args.seeds) or 0)
    assert main(["run", str(PIPELINES[0]), "--seeds", "0,1,2"]) == 0 and capsys.readouterr().out == "[0, 1, 2]\n"
    with pytest.raises(SystemExit) as exited:
        main(["run", str(PIPELINES[0]), "--seeds", "0,one"])
    assert exited.value.code == 2 and "'0,one': give integers separated by commas" in capsys.readouterr().err


GOOD = {
    "name": "t", "model": {"source": "builtin:tiny-llama"},
    "domains": {"a": {"source": "builtin:upper"}, "b": {"source": {"path": "b.jsonl"}}},
    "stages": [{"domain": "a", "steps": 5}, {"domain": "b", "steps": 5}],
    "methods": {"fft": {"kind": "fft"}, "hft": {"kind": "hft"}},
}

CASES = [
    ("not yaml", "name: [unclosed", ["not valid YAML"]),
    ("not a mapping", "- a\n- b", ["expected a mapping"]),
    ("unknown top key", {"epochs": 3}, ["epochs: unknown key"]),
    ("unknown nested key", {"train": {"learning_rate": 1}}, ["train.learning_rate: unknown key"]),
    ("missing model", {"model": None}, ["model:"]),
    ("stage names unknown domain", {"stages": [{"domain": "zzz", "steps": 5}]},
     ["stages.0.domain: 'zzz' is not a domain"]),
    ("zero steps", {"stages": [{"domain": "a", "steps": 0}]}, ["stages.0.steps: Input should be greater than 0"]),
    ("ratio outside (0,1)", {"methods": {"hft": {"kind": "hft", "ratio": 1.5}}},
     ["methods.hft.ratio: Input should be less than 1"]),
    ("unknown granularity", {"methods": {"hft": {"kind": "hft", "granularity": "rows"}}},
     ["methods.hft.granularity: Input should be 'category', 'layer', 'model' or 'element'"]),
    ("unknown method kind", {"methods": {"x": {"kind": "magic"}}}, ["methods.x"]),
    ("unknown strategy", {"methods": {"hft": {"kind": "hft", "strategy": "fisher"}}},
     ["methods.hft.strategy: Input should be 'random' or 'importance'"]),
    ("importance at element level",
     {"methods": {"hft": {"kind": "hft", "granularity": "element", "strategy": "importance"}}},
     ["methods.hft: strategy: 'importance' ranks whole matrices; use granularity category, layer or model"]),
    ("importance with re-selection",
     {"methods": {"hft": {"kind": "hft", "strategy": "importance", "reselect_every": 5}}},
     ["methods.hft: strategy: 'importance' draws one plan per stage; set reselect_every: 0"]),
    ("no stages", {"stages": []}, ["stages: List should have at least 1 item"]),
    ("steps and epochs", {"stages": [{"domain": "a", "steps": 5, "epochs": 2}]},
     ["stages.0: give steps or epochs, one of them"]),
    ("batch not a multiple of the workers", {"train": {"batch_size": 30, "workers": 4}},
     ["train: batch_size 30 is not a multiple of workers (4): every worker takes an equal share of each global "
      "batch; use batch_size 28 or 32"]),
    ("micro-batch above a worker's share", {"train": {"batch_size": 8, "workers": 2, "micro_batch_size": 8}},
     ["train: micro_batch_size 8 is more than a worker's share of batch_size (8 over 2 worker(s): 4)"]),
    ("wrong type", {"train": {"batch_size": "many"}}, ["train.batch_size: Input should be a valid integer"]),
    ("missing data file", {"domains": {"a": {"source": "builtin:upper"}, "b": {"source": {"path": "nope.jsonl"}}}},
     ["nope.jsonl"]),
    ("unknown builtin domain", {"domains": {"a": {"source": "builtin:poetry"}, "b": {"source": {"path": "b.jsonl"}}}},
     ["poetry"]),
    ("model path missing", {"model": {"source": "./no/such/model"}}, ["model.source:", "no/such/model"]),
    ("unknown builtin model", {"model": {"source": "builtin:tiny-bloom"}},
     ["model.source: 'builtin:tiny-bloom' is not a built-in model"]),
    ("pretrain unknown domain", {"pretrain": {"domains": ["zzz"], "steps": 3}},
     ["pretrain.domains.0: 'zzz' is not a domain"]),
    ("harness column trained", {"domains": {"a": {"source": "builtin:upper"}, "h": {"source": {"harness": "upper_mc"}}},
                                "stages": [{"domain": "h", "steps": 5}], "pretrain": {"domains": ["h"], "steps": 3}},
     ["stages.0.domain: 'h' is an lm-evaluation-harness column, evaluated after every stage and never trained",
      "pretrain.domains.0: 'h' is an lm-evaluation-harness column"]),
    ("harness misspelled task", {"domains": {"a": {"source": "builtin:upper"}, "b": {"source": {"path": "b.jsonl"}},
                                            "h": {"source": {"harness": "upper_mcq", "include_path": "tasks"}}}},
     ["domains.h.source.harness: 'upper_mcq' is not an lm-evaluation-harness task; did you mean 'upper_mc'"]),
    ("max_length shorter than prompts", {"train": {"max_length": 3}}, ["max_length"]),
    ("bad name", {"name": "a b/c"}, ["name: String should match pattern"]),
    ("a seed twice", {"seeds": [0, 1, 0]}, ["seeds: a seed is listed twice; list each seed once"]),
    ("no seeds", {"seeds": []}, ["seeds: List should have at least 1 item"]),
    ("compare_to no method", {"compare_to": "hfft"}, ["compare_to: 'hfft' is not a method; methods: "]),
    ("a reserved method name", {"methods": {"pretrain": {"kind": "fft"}, "h@1": {"kind": "hft"}}},
     ["methods.pretrain: a name hft-ray uses itself", "methods.h@1: a name hft-ray uses itself"]),
    ("duplicate domain name", "domains:\n  a: {source: builtin:upper}\n  a: {source: builtin:caesar}\n",
     ["not valid YAML", "duplicate key 'a'"]),
    ("empty data file", {"domains": {"a": {"source": "builtin:upper"}, "b": {"source": {"path": "empty.jsonl"}}}},
     ["empty.jsonl", "is empty"]),
    ("rows without the needed fields", {"domains": {"a": {"source": "builtin:upper"},
                                                   "b": {"source": {"path": "nofields.jsonl"}}}}, ["nofields.jsonl"]),
    ("architecture with no role map", {"model": {"source": "./bloom"}}, ["model.source:", "bloom"]),
    ("model code not trusted", {"model": {"source": "./custom"}}, ["model.trust_remote_code: true"]),
    ("negative lr", {"train": {"lr": -0.1}}, ["train.lr: Input should be greater than 0"]),
    ("unknown eval metric", {"eval": {"metric": "bleu"}},
     ["eval.metric: Input should be 'exact_match', 'word_match', 'token_accuracy', 'rouge_l' or 'loss' (got 'bleu')"]),
    ("unknown domain metric", {"domains": {"a": {"source": "builtin:upper", "metric": "f1"},
                                           "b": {"source": {"path": "b.jsonl"}}}},
     ["domains.a.metric: Input should be 'exact_match', 'word_match', 'token_accuracy', 'rouge_l' or 'loss' "
      "(got 'f1')"]),
    ("metric on a harness column", {"domains": {"a": {"source": "builtin:upper"}, "b": {"source": {"path": "b.jsonl"}},
                                                "h": {"source": {"harness": "upper_mc", "include_path": "tasks"},
                                                      "metric": "rouge_l"}}},
     ["domains.h.metric: a harness column is scored by its task's metric; set domains.h.source.metric instead"]),
    ("negative checkpoint_every", {"train": {"checkpoint_every": -5}}, ["train.checkpoint_every"]),
    ("negative max_failures", {"train": {"max_failures": -1}}, ["train.max_failures"]),
    ("credentials in a storage URI", {"output": {"dir": "s3://KEY:hunter2@bucket/runs"}},
     ["output.dir: the URI carries credentials (a user name or password before the bucket)"]),
    ("a secret key in a storage URI", {"output": {"dir": "s3://bucket/runs?secret_key=hunter2"}},
     ["output.dir: the URI carries credentials (?secret_key=)", "AWS_SECRET_ACCESS_KEY"]),
    ("stages not a list", {"stages": {"domain": "a"}}, ["stages: Input should be a valid list"]),
    ("no methods", {"methods": {}}, ["methods: Dictionary should have at least 1 item"]),
    ("no domains", {"domains": {}, "stages": [{"domain": "a", "steps": 1}]},
     ["domains: Dictionary should have at least 1 item"]),
    ("ratio zero", {"methods": {"hft": {"kind": "hft", "ratio": 0}}},
     ["methods.hft.ratio: Input should be greater than 0"]),
    ("unknown tracking key", {"tracking": {"uri": "x"}}, ["tracking.uri: unknown key"]),
    ("dpo stage on an SFT domain", {"stages": [{"domain": "a", "steps": 3, "kind": "dpo"}]},
     ["stages.0.kind: 'dpo' needs preference pairs"]),
    ("sft stage on a preference domain",
     {"domains": {"a": {"source": "builtin:upper"}, "b": {"source": "builtin:prefer"}},
      "stages": [{"domain": "b", "steps": 3}]},
     ["train it with kind: dpo"]),
    ("unknown stage kind", {"stages": [{"domain": "a", "steps": 3, "kind": "ppo"}]},
     ["stages.0.kind: Input should be 'sft' or 'dpo'"]),
    ("fsdp with element masks",
     {"train": {"strategy": "fsdp"}, "methods": {"e": {"kind": "hft", "granularity": "element"}}},
     ["methods.e.granularity: 'element' trains a share of every tensor through gradient masks", "train.strategy: ddp"]),
    ("fsdp with fused slices", {"model": {"source": "builtin:tiny-gpt2"}, "train": {"strategy": "fsdp"}},
     ["methods.hft.granularity: 'category' trains slices of fused tensors (transformer.h.0.attn.c_attn"]),
    ("fsdp with lora", {"train": {"strategy": "fsdp"}, "methods": {"lora": {"kind": "lora"}}},
     ["methods.lora: kind lora cannot run with train.strategy: fsdp"]),
    ("memory that cannot fit", {"train": {"memory_gb": 0.001}},
     ["methods.hft: needs about", "GiB per worker (weights", "more than train.memory_gb 0.001 GiB"]),
    ("joint beside a dpo stage", {"domains": {"a": {"source": "builtin:upper"}, "p": {"source": "builtin:prefer"}},
                                  "stages": [{"domain": "a", "steps": 3}, {"domain": "p", "steps": 3, "kind": "dpo"}],
                                  "methods": {"mtl": {"kind": "joint"}}},
     ["methods.mtl: kind joint mixes SFT data and cannot train the DPO stages (stages 1)"]),
    ("more world facts than there are",
     {"domains": {"a": {"source": "builtin:upper"}, "b": {"source": "builtin:caesar"},
                  "w": {"source": "builtin:world-facts", "train_size": 100}}},
     ["domains.w: builtin:world-facts has 59 distinct examples; train_size 100 asks for 100; lower them"]),
    ("unknown answer match", {"domains": {"a": {"source": "builtin:upper", "match": "fuzzy"}}},
     ["domains.a.match: Input should be 'exact' or 'word'"]),
    ("unknown precision", {"train": {"precision": "fp16"}},
     ["train.precision: Input should be 'fp32', 'bf16' or 'bf16-mixed'"]),
    ("unknown strategy", {"train": {"strategy": "zero3"}}, ["train.strategy: Input should be 'ddp' or 'fsdp'"]),
    ("preference rows lacking rejected", {"domains": {"a": {"source": "builtin:upper"},
                                                     "b": {"source": {"path": "pairs.jsonl"}, "format": "preference"}}},
     ["lack 'rejected'"]),
]


def _write(tmp_path, content):
    (tmp_path / "b.jsonl").write_text('{"prompt": "x=", "completion": "y"}\n' * 20)
    shutil.copytree(Path(__file__).parents[1] / "data" / "harness", tmp_path / "tasks", dirs_exist_ok=True)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "x=", "chosen": "y"}\n' * 20)
    (tmp_path / "nofields.jsonl").write_text('{"question": "x=", "answer": "y"}\n' * 20)
    (tmp_path / "bloom").mkdir(exist_ok=True)
    (tmp_path / "bloom" / "config.json").write_text(json.dumps({"model_type": "bloom", "n_layer": 2, "n_head": 2,
                                                                "hidden_size": 16, "vocab_size": 64}))
    (tmp_path / "custom").mkdir(exist_ok=True)
    (tmp_path / "custom" / "config.json").write_text(json.dumps(
        {"model_type": "custom-x", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    # Run, it would leave a marker: the test checks it never ran.
    (tmp_path / "custom" / "configuration_x.py").write_text(
        f"open({str(tmp_path / 'code-ran')!r}, 'w').close()\nfrom transformers import PretrainedConfig\n"
        "class XConfig(PretrainedConfig):\n    model_type = 'custom-x'\n")
    path = tmp_path / "p.yaml"
    if isinstance(content, str):
        path.write_text(content)
    else:
        data = {**GOOD, **content}
        path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
    return path


@pytest.mark.parametrize("case,content,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_pipeline_exits_2_naming_the_problem_and_starts_nothing(tmp_path, monkeypatch, capsys, case, content,
                                                                     expected):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, content)
    assert main(["run", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2
    err = capsys.readouterr().err
    for fragment in expected:
        assert fragment in err, err
    assert "Traceback" not in err and "hunter2" not in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "hft_runs").exists()
    assert not (tmp_path / "code-ran").exists(), "a model's own code runs only with trust_remote_code"


def test_several_problems_are_reported_together(tmp_path):
    path = _write(tmp_path, {"train": {"lr": -1}, "stages": [{"domain": "zzz", "steps": 5}], "typo": 1})
    with pytest.raises(UserError) as caught:
        load_spec(path)
    assert len(caught.value.problems) == 3


def test_the_good_file_itself_is_accepted(tmp_path):
    spec, _ = load_spec(_write(tmp_path, {}))
    assert prepare(spec, tmp_path).domains["b"].train


@pytest.mark.parametrize("default,read", [
    (None, {"a": "exact_match", "b": "rouge_l", "w": "word_match", "m": "word_match", "e": "exact_match"}),
    ("token_accuracy", {"a": "token_accuracy", "b": "rouge_l", "w": "token_accuracy", "m": "token_accuracy",
                        "e": "token_accuracy"}),
])
def test_each_column_reads_its_own_metric_in_the_matrix(tmp_path, default, read):
    """domains.<name>.metric first; else eval.metric, where exact_match becomes word_match for a
    domain matched as words (world-facts by default, `match: word`); every cell holds every score."""
    from hft_ray.core.scores import NAMES
    from hft_ray.run.results import build_matrix

    domains = {"a": {"source": "builtin:upper"}, "b": {"source": {"path": "b.jsonl"}, "metric": "rouge_l"},
               "w": {"source": "builtin:world-facts"}, "m": {"source": "builtin:caesar", "match": "word"},
               "e": {"source": "builtin:world-facts", "match": "exact"}}
    spec, _ = load_spec(_write(tmp_path, {"domains": domains, "train": {"max_length": 512},
                                          "eval": {"metric": default} if default else None}))
    metrics = prepare(spec, tmp_path).metrics
    assert metrics == read
    rows = [{c: {name: (10 * r + i) / 100 for i, name in enumerate(NAMES)} for c in domains} for r in range(3)]
    matrix, columns = build_matrix(spec, rows, metrics), list(spec.domains)
    assert matrix.columns == tuple(columns)
    assert matrix.scores == tuple(tuple(rows[r][c][read[c]] for c in columns) for r in range(3))
    assert build_matrix(spec, rows, "loss").scores == tuple(tuple(rows[r][c]["loss"] for c in columns)
                                                            for r in range(3))


def test_epochs_become_steps_from_the_stages_own_rows_and_batching(tmp_path, capsys):
    """b.jsonl holds 20 rows: 16 train, so 2 epochs at batch 4 are 8 steps; packed (rows of 3-4
    tokens into 64) one epoch is a single batch of one sequence."""
    from hft_ray.cli.commands import _say_rows

    spec, _ = load_spec(_write(tmp_path, {"stages": [{"domain": "b", "epochs": 2}], "train": {"batch_size": 4}}))
    prepared = prepare(spec, tmp_path)
    assert prepared.spec.stages[0].steps == 8 and prepared.spec.stages[0].epochs == 2
    _say_rows(prepared)
    assert "stages.0: 2 epoch(s) of b = 8 steps (16 rows, 4 batches of 4 rows per epoch)" in capsys.readouterr().err
    packed, _ = load_spec(_write(tmp_path, {"stages": [{"domain": "b", "epochs": 3}],
                                            "train": {"batch_size": 1, "packing": True}}))
    assert prepare(packed, tmp_path).spec.stages[0].steps == 3
