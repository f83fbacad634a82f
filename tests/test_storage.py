"""hft_ray/storage.py against a real S3-compatible server (moto, IAM authentication on): writes
whole or not at all, checkpoints that load back bit for bit, local copies that go away, and a
store that refuses a write named before anything starts."""

import tempfile

import pytest
import torch

from hft_ray.errors import UserError
from hft_ray.storage import Location, check_writable, credentials_in
from hft_ray.train.checkpoints import is_whole, load_checkpoint, write_checkpoint
from hft_ray.train.models import char_tokenizer, load_model


@pytest.fixture
def aws(s3, monkeypatch):
    """This process as a user with the store's variables set."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3


def test_names_join_before_the_query_and_folders_are_made_absolute(tmp_path, monkeypatch):
    uri = Location("s3://bucket/runs/?endpoint_override=127.0.0.1:9000&scheme=http") / "hft" / "stage-1"
    assert str(uri) == "s3://bucket/runs/hft/stage-1?endpoint_override=127.0.0.1:9000&scheme=http"
    assert uri.remote and uri.name == "stage-1"
    monkeypatch.chdir(tmp_path)
    local = Location("runs") / "base"
    assert not local.remote and local.path == tmp_path / "runs" / "base" and str(local) == str(tmp_path / "runs/base")


@pytest.mark.parametrize("uri,carried", [("s3://key:secret@bucket/p", "a user name or password before the bucket"),
                                         ("s3://bucket/p?access_key=a&secret_key=b", "?access_key="),
                                         ("s3://bucket/p?endpoint_override=h:1", None)])
def test_credentials_in_a_uri_are_found(uri, carried):
    assert credentials_in(uri) == carried


def test_text_round_trips_whole_and_remove_takes_the_prefix(aws):
    folder = Location(f"s3://{aws.bucket}/text")
    (folder / "a" / "manifest.json").write_text('{"x": 1}')
    (folder / "b.json").write_text("{}")
    assert (folder / "a" / "manifest.json").read_text() == '{"x": 1}'
    assert (folder / "a" / "manifest.json").is_file() and (folder / "a").exists() and not (folder / "c").exists()
    assert aws.keys("text/") == ["text/a/manifest.json", "text/b.json"]
    (folder / "a").remove()
    assert aws.keys("text/") == ["text/b.json"]


def test_a_checkpoint_in_the_store_loads_back_bit_for_bit_and_leaves_no_local_copy(aws, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where local copies go, to watch them go
    model = load_model("builtin:tiny-llama", seed=4)
    where = write_checkpoint(f"s3://{aws.bucket}/ckpt/base", model, char_tokenizer(), {"plan.json": {"a": 1}})
    assert where == f"s3://{aws.bucket}/ckpt/base" and is_whole(where)
    assert {"ckpt/base/model.safetensors", "ckpt/base/config.json", "ckpt/base/plan.json"} <= set(aws.keys("ckpt/"))
    loaded, _ = load_checkpoint(where)
    expected, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)  # every tensor, none missing or extra
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("hft-ray-")], "local copies are removed"


def test_a_checkpoint_without_its_marker_is_not_whole(aws):
    folder = Location(f"s3://{aws.bucket}/partial/stage-1")
    (folder / "model.safetensors").write_text("half an upload")
    assert not is_whole(folder), "config.json goes up last: without it the upload did not finish"


def test_a_missing_bucket_and_a_refused_key_are_named(aws, monkeypatch):
    with pytest.raises(UserError, match=r"output.dir s3://no-such-bucket/runs: cannot write there: .*NO_SUCH_BUCKET"
                                        r".*Create the bucket first"):
        check_writable(Location("s3://no-such-bucket/runs"), "output.dir")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(UserError, match="The store refused the credentials: set AWS_ACCESS_KEY_ID"):
        check_writable(Location(f"s3://{aws.bucket}/runs"), "output.dir")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws.env["AWS_SECRET_ACCESS_KEY"])
    check_writable(Location(f"s3://{aws.bucket}/runs"), "output.dir")
    assert aws.keys("runs/") == [], "the probe object is deleted"


def test_a_token_folder_in_the_store_is_found_again_and_read_from_a_node_cache(aws, tmp_path):
    from hft_ray.data.batching import Part, Pool
    from hft_ray.data.domains import Example
    from hft_ray.data.encoding import encode_example
    from hft_ray.data.tokens import tokenized

    rows = [Example(f"Q{i}=", f" a{i}") for i in range(30)]
    store = Location(f"s3://{aws.bucket}/tokens-test")
    where, meta = tokenized(rows, char_tokenizer(), store, max_length=32, chat=False)
    assert where.startswith("s3://") and (Location(where) / "meta.json").is_file() and "reused" not in meta
    assert tokenized(rows, char_tokenizer(), store, max_length=32, chat=False)[1]["reused"]
    pool = Pool([Part(where)])
    assert [ids for ids, _ in pool.read(range(30))] == [encode_example(e, char_tokenizer())[0] for e in rows]
    Location(where).remove()


def test_a_copy_without_the_weights_fetches_the_config_and_tokenizer_only(aws, tmp_path):
    """What a sharded rank that holds only the model's structure downloads of a checkpoint."""
    from hft_ray.train.checkpoints import write_checkpoint
    from hft_ray.train.models import char_tokenizer, load_model

    where = write_checkpoint(f"s3://{aws.bucket}/slim/base", load_model("builtin:tiny-llama"), char_tokenizer())
    with Location(where).local_copy(without=(".safetensors",)) as folder:
        names = {p.name for p in folder.rglob("*") if p.is_file()}
    assert "config.json" in names and "tokenizer.json" in names and "model.safetensors" not in names, names
    with Location(where).local_copy() as folder:
        assert (folder / "model.safetensors").is_file()
