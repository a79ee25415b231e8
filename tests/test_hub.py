"""Push patched checkpoints to a Hub and load them back patched, over real HTTP (``tests/hub_server.py``)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from conftest import padded_batch, tiny_model
from hub_server import HubServer, use_as_hub
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

import hf_sparse_attn
from hf_sparse_attn.commands import cli
from hf_sparse_attn.publishing import hub

# huggingface_hub's LFS upload passes a file object as `data=`, which its HTTP client deprecates: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN, OTHER_TOKEN = "hf_test_token_me", "hf_test_token_other"
BASE_MODEL = "google-bert/bert-base-uncased"


@pytest.fixture(scope="module")
def hub_server() -> HubServer:
    # files of 100 kB and more go through LFS whatever their name, so a small file exercises that rule too
    with HubServer(tokens={TOKEN: "me", OTHER_TOKEN: "other"}, lfs_min_size=100_000) as server:
        yield server


@pytest.fixture
def fake_hub(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> HubServer:
    """The test server as huggingface_hub's and transformers' Hub, an empty HF cache, and $HF_TOKEN of user "me"."""
    hub_server.reset()
    use_as_hub(monkeypatch, hub_server.url, tmp_path / "hf_home")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub_server


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub retries uploads 5 times with 1-8 s waits; keep the retries, drop the waits."""
    for module in (huggingface_hub.lfs, huggingface_hub._commit_api):
        fast = functools.partial(module.http_backoff, base_wait_time=0.0, max_wait_time=0.0)
        monkeypatch.setattr(module, "http_backoff", fast)


def bert_classifier() -> transformers.BertForSequenceClassification:
    model = tiny_model(transformers.BertForSequenceClassification, num_labels=2)
    model.config._name_or_path = BASE_MODEL  # as after from_pretrained(BASE_MODEL)
    return hf_sparse_attn.patch_model(model, sparsity=0.5)


def gpt2_moss() -> transformers.GPT2LMHeadModel:
    model = hf_sparse_attn.patch_model(
        tiny_model(transformers.GPT2LMHeadModel), sparsity=0.3, head="moss", num_mixtures=2
    )
    with torch.no_grad():  # move the head away from its near-identity init, so that a dropped parameter shows
        for name, param in model.named_parameters():
            if ".extra." in name:
                param.add_(0.5 * torch.randn_like(param))
    return model


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**padded_batch()).logits


def push_command(*argv: str) -> int:
    """``hf-sparse-attn push ARGV...`` through the real command line (``REPO_ID FOLDER``, as ``hf upload``)."""
    return cli.main(["push", *argv])


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")}


def remote_card(server: HubServer, repo_id: str) -> ModelCard:
    return ModelCard(server.files(repo_id)["README.md"].decode())


# -- the server itself, with plain huggingface_hub / transformers -------------------------------------------------


def test_server_upload_regular_and_lfs_then_download(fake_hub: HubServer, tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    files = {
        "config.json": b'{"a": 1}',  # regular, inline base64 in the commit
        "weights.safetensors": b"\x01" * 1000,  # LFS by name
        "big.txt": bytes(range(256)) * 400,  # LFS by size (102400 bytes)
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    api = HfApi()
    api.create_repo("me/raw")
    commit = api.upload_folder(repo_id="me/raw", folder_path=folder)

    puts = sorted(path for method, path, status in fake_hub.requests if method == "PUT" and status == 200)
    lfs_oids = sorted(hashlib.sha256(files[name]).hexdigest() for name in ("weights.safetensors", "big.txt"))
    assert puts == [f"/lfs/{oid}" for oid in lfs_oids]
    assert {p: d for p, d in fake_hub.files("me/raw").items() if p != ".gitattributes"} == files
    for name, data in files.items():
        assert Path(hf_hub_download("me/raw", name)).read_bytes() == data
    meta = huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url("me/raw", "big.txt"))
    assert (meta.commit_hash, meta.size, meta.etag) == (commit.oid, len(files["big.txt"]), lfs_oids[0])
    assert sorted(huggingface_hub.list_repo_files("me/raw")) == sorted([".gitattributes", *files])


def test_plain_transformers_push_and_load(fake_hub: HubServer) -> None:
    model = tiny_model(transformers.GPT2LMHeadModel)
    model.push_to_hub("me/plain-gpt2")
    again = transformers.AutoModelForCausalLM.from_pretrained("me/plain-gpt2").eval()
    assert torch.equal(outputs(again), outputs(model))
    assert ("POST", "/me/plain-gpt2.git/info/lfs/objects/batch", 200) in fake_hub.requests


# -- round trips of patched models ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, repo_id",
    [(bert_classifier, "me/bert-rsoftmax-s0.5"), (gpt2_moss, "me/gpt2-moss-k2-s0.3")],
    ids=["bert-cls-s0.5", "gpt2-moss-k2-s0.3"],
)
def test_push_then_from_pretrained_is_identical(fake_hub: HubServer, make, repo_id: str) -> None:
    model = make()
    model.push_to_hub(repo_id)  # the plain transformers call

    again = hf_sparse_attn.from_pretrained(repo_id).eval()
    assert type(again) is type(model)
    assert hf_sparse_attn.get_patch_config(again) == hf_sparse_attn.get_patch_config(model)
    assert torch.equal(outputs(again), outputs(model))
    assert {"config.json", "model.safetensors", "README.md"} <= set(fake_hub.files(repo_id))
    # transformers writes its own card; patch_model's tags (model.add_model_tags) are on it
    card = remote_card(fake_hub, repo_id)
    assert {"hf-sparse-attn", "r-softmax"} <= set(card.data.tags)
    assert "push_to_hub" not in vars(model), "patch_model must not rebind push_to_hub on the instance"


def test_hub_push_to_hub_adds_our_card_section(fake_hub: HubServer) -> None:
    model = gpt2_moss()
    hub.push_to_hub(model, "me/with-card")
    card = remote_card(fake_hub, "me/with-card")
    assert card.data.library_name == "hf-sparse-attn"
    assert {"hf-sparse-attn", "r-softmax", "moss"} <= set(card.data.tags)
    assert 'hf_sparse_attn.from_pretrained("me/with-card")' in card.text
    assert torch.equal(outputs(hf_sparse_attn.from_pretrained("me/with-card").eval()), outputs(model))


def test_unpatch_removes_only_our_tags() -> None:
    model = tiny_model(transformers.GPT2LMHeadModel)
    model.add_model_tags(["mine"])
    hf_sparse_attn.patch_model(model, sparsity=0.5, head="moss", num_mixtures=2)
    assert model.model_tags == ["mine", "hf-sparse-attn", "r-softmax", "sparse-attention", "moss"]
    hf_sparse_attn.unpatch_model(model)
    assert model.model_tags == ["mine"]


def test_without_the_package_the_checkpoint_loads_unpatched(fake_hub: HubServer) -> None:
    model = gpt2_moss()
    model.push_to_hub("me/gpt2-moss")
    plain, info = transformers.AutoModelForCausalLM.from_pretrained("me/gpt2-moss", output_loading_info=True)
    head_keys = sorted(name for name in model.state_dict() if ".extra." in name)
    assert head_keys and sorted(info["unexpected_keys"]) == head_keys
    assert plain.config._attn_implementation != "hf_sparse_attn"
    assert not torch.allclose(outputs(plain.eval()), outputs(model), atol=1e-3)


# -- the model card -----------------------------------------------------------------------------------------------


def test_card_metadata_on_the_hub(fake_hub: HubServer) -> None:
    model = bert_classifier()
    measured = hf_sparse_attn.measure_sparsity(model, padded_batch())
    evaluate = {"eval_loss": 0.5, "eval_accuracy": 0.75, "eval_runtime": 0.1, "epoch": 1.0}  # trainer.evaluate()
    hub.push_to_hub(model, "me/bert-card", dataset="glue", eval_results=evaluate, measured_sparsity=measured)
    card = remote_card(fake_hub, "me/bert-card")
    assert card.data.library_name == "hf-sparse-attn"
    assert card.data.base_model == BASE_MODEL
    assert card.data.pipeline_tag == "text-classification"
    assert {"hf-sparse-attn", "r-softmax", "bert", "transformers"} <= set(card.data.tags)
    assert card.data.datasets == ["glue"]
    results = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert results == {"loss": 0.5, "accuracy": 0.75}
    assert {result.dataset_type for result in card.data.eval_results} == {"glue"}
    assert card.data.to_dict()["model-index"][0]["name"] == "me/bert-card"
    assert f"| 0 | r-softmax | 0.5 | {measured[0]:.3f} |" in card.text
    assert "arXiv:2304.05243" in card.text and "arXiv:1711.03953" not in card.text


def test_pushing_twice_updates_the_single_card_section(fake_hub: HubServer) -> None:
    model = bert_classifier()
    hub.push_to_hub(model, "me/twice", dataset="glue", eval_results={"accuracy": 0.5})
    # someone edits the card on the Hub: their text must survive our next push
    edited = remote_card(fake_hub, "me/twice")
    edited.text += "\n## Intended uses\n\nSentiment of movie reviews.\n"
    HfApi().upload_file(path_or_fileobj=str(edited).encode(), path_in_repo="README.md", repo_id="me/twice")

    hf_sparse_attn.set_sparsity(model, 0.25)
    hub.push_to_hub(model, "me/twice", dataset="glue", eval_results={"accuracy": 0.875})
    text = fake_hub.files("me/twice")["README.md"].decode()
    assert text.count(hub.SECTION_START) == 1 and text.count(hub.SECTION_END) == 1
    assert text.count("### How to load") == 1
    assert "| 1 | r-softmax | 0.25 |" in text and "| 1 | r-softmax | 0.5 |" not in text
    assert "Sentiment of movie reviews." in text
    (result,) = ModelCard(text).data.eval_results
    assert result.metric_value == 0.875


@pytest.mark.parametrize(
    "head, cited, not_cited",
    [
        ("sigsoftmax", ["arXiv:2304.05243", "arXiv:1805.10829"], ["arXiv:1711.03953", "arXiv:1902.08077"]),
        ("mos", ["arXiv:1711.03953"], ["arXiv:1805.10829", "arXiv:1902.08077"]),
        ("moss", ["arXiv:1711.03953", "arXiv:1805.10829"], ["arXiv:1902.08077"]),
        ("plif", ["arXiv:1902.08077"], ["arXiv:1711.03953", "arXiv:1805.10829"]),
    ],
    ids=["sigsoftmax", "mos", "moss", "plif"],
)
def test_card_cites_what_was_patched(head: str, cited: list[str], not_cited: list[str]) -> None:
    model = hf_sparse_attn.patch_model(tiny_model(transformers.GPT2LMHeadModel), sparsity=0.1, head=head, num_knots=8)
    text = hub.create_model_card(model).text
    assert all(ref in text for ref in cited) and not any(ref in text for ref in not_cited)
    assert head in hub.create_model_card(model).data.tags


def test_card_reads_metrics_and_sparsity_from_trainer_logs() -> None:
    model = hf_sparse_attn.patch_model(tiny_model(transformers.GPT2LMHeadModel), sparsity=[None, 0.4])
    logs = [
        {"loss": 4.0, "step": 5, "sparsity/layer_1": 0.1},
        {"eval_loss": 3.5, "eval_accuracy": 0.25, "eval_runtime": 0.1, "eval_sparsity/layer_1": 0.39, "step": 10},
    ]
    card = hub.create_model_card(model, log_history=logs, dataset="wikitext")
    assert "| 0 | softmax | – | – |" in card.text and "| 1 | r-softmax | 0.4 | 0.390 |" in card.text
    assert "from the training logs at step 10" in card.text
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {"loss": 3.5, "accuracy": 0.25}


def test_rendering_onto_our_own_card_changes_nothing() -> None:
    model = bert_classifier()
    card = hub.create_model_card(model, repo_id="me/x", dataset="glue", eval_results={"accuracy": 0.5})
    text = str(card)
    again = hub.create_model_card(
        model, card=ModelCard(text), repo_id="me/x", dataset="glue", eval_results={"accuracy": 0.5}
    )
    assert str(again) == text


def test_card_of_an_unpatched_model_is_refused() -> None:
    with pytest.raises(ValueError, match="not patched"):
        hub.create_model_card(tiny_model(transformers.GPT2LMHeadModel))


# -- Trainer and CLI ------------------------------------------------------------------------------------------------


def tiny_trainer(output_dir: Path, repo_id: str) -> transformers.Trainer:
    """A one-step Trainer of the patched tiny BERT classifier with ``push_to_hub=True`` (pushes at the end only)."""
    batch = padded_batch(batch_size=4)
    data = [{**{k: v[i] for k, v in batch.items()}, "labels": i % 2} for i in range(4)]
    args = transformers.TrainingArguments(
        output_dir, max_steps=1, per_device_train_batch_size=2, report_to=[], push_to_hub=True,
        hub_model_id=repo_id, hub_strategy="end", use_cpu=True, save_strategy="no",
    )  # fmt: skip
    return transformers.Trainer(model=bert_classifier(), args=args, train_dataset=data)


def test_trainer_push_merges_our_section_into_its_card(fake_hub: HubServer, tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path / "out", "me/trainer-run")
    hub.bind_trainer_card(trainer)
    trainer.train()
    trainer.push_to_hub()

    card = remote_card(fake_hub, "me/trainer-run")
    assert "### Training hyperparameters" in card.text  # the Trainer's
    assert card.text.count(hub.SECTION_START) == 1 and card.text.count("Training hyper-parameters") == 0
    assert card.data.library_name == "hf-sparse-attn" and "generated_from_trainer" in card.data.tags
    again = hf_sparse_attn.from_pretrained("me/trainer-run").eval()
    assert torch.equal(outputs(again), outputs(trainer.model.eval()))


def test_trainer_save_model_with_push_to_hub_pushes_our_section(fake_hub: HubServer, tmp_path: Path) -> None:
    # the recipes' --push_to_hub: TrainingArguments(push_to_hub=True), then trainer.save_model() pushes
    trainer = tiny_trainer(tmp_path / "out", "me/recipe-run")
    hub.bind_trainer_card(trainer)
    trainer.train()
    trainer.save_model()

    card = remote_card(fake_hub, "me/recipe-run")
    assert card.text.count(hub.SECTION_START) == 1
    assert "| 0 | r-softmax | 0.5 |" in card.text
    assert (tmp_path / "out" / "README.md").read_text().count(hub.SECTION_START) == 1


def test_trainer_push_without_binding_carries_our_tags_only(fake_hub: HubServer, tmp_path: Path) -> None:
    # what transformers 5.23 does by itself: Trainer.push_to_hub writes its card after saving, with
    # model.model_tags (added by patch_model) among its tags; our section needs bind_trainer_card
    trainer = tiny_trainer(tmp_path / "out", "me/unbound-run")
    trainer.train()
    trainer.push_to_hub()

    card = remote_card(fake_hub, "me/unbound-run")
    assert {"hf-sparse-attn", "r-softmax", "generated_from_trainer"} <= set(card.data.tags)
    assert hub.SECTION_START not in card.text


def test_cli_push_folder(fake_hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = gpt2_moss()
    model.save_pretrained(tmp_path / "out")
    before = file_hashes(tmp_path / "out")
    assert push_command("me/from-dir", str(tmp_path / "out"), "--private", "--commit-message", "first") == 0
    assert "me/from-dir" in capsys.readouterr().out
    assert file_hashes(tmp_path / "out") == before  # the card went to the Hub, not into the directory
    assert "hf_sparse_attn.from_pretrained" in fake_hub.files("me/from-dir")["README.md"].decode()
    assert torch.equal(outputs(hf_sparse_attn.from_pretrained("me/from-dir").eval()), outputs(model))
    with pytest.raises(RepositoryNotFoundError):  # private: anonymous reads fail
        hf_hub_download("me/from-dir", "config.json", token=False, cache_dir=tmp_path / "anonymous")


def test_cli_push_to_a_new_branch(fake_hub: HubServer, tmp_path: Path) -> None:
    bert_classifier().save_pretrained(tmp_path / "out")
    assert push_command("me/branched", str(tmp_path / "out"), "--revision", "v1") == 0
    assert "config.json" in fake_hub.files("me/branched", "v1")
    assert "config.json" not in fake_hub.files("me/branched", "main")


def test_cli_refuses_an_unpatched_folder(fake_hub: HubServer, tmp_path: Path, capsys) -> None:
    tiny_model(transformers.GPT2LMHeadModel).save_pretrained(tmp_path / "out")
    assert push_command("me/unpatched", str(tmp_path / "out")) == 2
    assert "not saved from a patched model" in capsys.readouterr().err
    assert "me/unpatched" not in fake_hub.repos


# -- failures: clear errors, nothing half-pushed, the local checkpoint untouched ------------------------------


@pytest.mark.parametrize(
    "token, message",
    [(None, "must be authenticated"), ("hf_wrong", "Invalid credentials"), (OTHER_TOKEN, "don't have the rights")],
    ids=["no-token", "invalid-token", "other-users-token"],
)
def test_push_without_a_valid_token_fails_clearly(
    fake_hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys, token: str | None, message: str
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(HfHubHTTPError, match=message):
        bert_classifier().push_to_hub("me/denied")
    bert_classifier().save_pretrained(tmp_path / "out")
    assert push_command("me/denied", str(tmp_path / "out")) == 1
    assert message in capsys.readouterr().err
    assert fake_hub.repos == {}


@pytest.mark.parametrize(
    "method, path, action, expected",
    [
        ("POST", r"/commit/", 500, ["500 Internal Server Error", "/commit/main"]),
        ("POST", r"/commit/", "drop", ["Server disconnected without sending a response"]),
        (
            "PUT",
            r"^/lfs/",
            500,
            ["Error while uploading 'model.safetensors'", "caused by", "500 Internal Server Error"],
        ),
        ("PUT", r"^/lfs/", "drop", ["Error while uploading 'model.safetensors'", "caused by", "disconnected"]),
        ("POST", r"/preupload/", 503, ["503 Service Unavailable", "/preupload/main"]),
    ],
    ids=["commit-500", "commit-dropped", "lfs-put-500", "lfs-put-dropped", "preupload-503"],
)
@pytest.mark.usefixtures("no_backoff")
def test_server_failure_is_reported_and_leaves_the_checkpoint_untouched(
    fake_hub: HubServer, tmp_path: Path, capsys, method: str, path: str, action: int | str, expected: list[str]
) -> None:
    folder = tmp_path / "out"
    gpt2_moss().save_pretrained(folder)
    before = file_hashes(folder)
    fake_hub.inject_fault(method, path, action, times=100)  # persistent: outlasts huggingface_hub's retries
    assert push_command("me/flaky", str(folder)) == 1
    err = capsys.readouterr().err
    assert f"pushing {folder} to me/flaky failed" in err
    assert all(part in err for part in expected), err
    assert file_hashes(folder) == before
    assert fake_hub.commit_count("me/flaky") == 1  # only the repo's initial commit: nothing half-pushed


@pytest.mark.usefixtures("no_backoff")
def test_a_transient_upload_failure_is_retried(fake_hub: HubServer) -> None:
    fake_hub.inject_fault("PUT", r"^/lfs/", "drop", times=1)
    model = bert_classifier()
    model.push_to_hub("me/retried")
    assert [status for method, _, status in fake_hub.requests if method == "PUT"] == ["drop", 200]
    assert torch.equal(outputs(hf_sparse_attn.from_pretrained("me/retried").eval()), outputs(model))
