"""Model cards (issue 11): every save of a Mini-Omni2 model (converted, fine-tuned, LoRA-merged) and push_to_hub
write the real card, with the evaluation results of `mini-omni2 eval` when given."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from mini_omni2.hub_mini_omni2 import CARD_MARKER, HANDLER_SOURCE, add_eval_results
from mini_omni2.tiny import tiny_model

ASR_RESULT = {
    "task": "asr", "model": "me/tiny", "dataset": "openslr/librispeech_asr", "config": "clean", "split": "test",
    "num_examples": 2620, "metrics": {"wer": 0.0481},
}
QA_RESULT = {
    "task": "spoken-qa", "model": "me/tiny", "dataset": "me/spoken-questions", "config": None, "split": "test",
    "num_examples": 4, "metrics": {"speech_text_wer": 0.125, "accuracy": 0.75},
}


def card_of(folder: Path) -> ModelCard:
    return ModelCard((folder / "README.md").read_text())


def model_index(card: ModelCard) -> dict:
    return {(r.dataset_type, r.dataset_config, r.metric_type): r.metric_value for r in card.data.eval_results or []}


def test_save_pretrained_writes_the_card_the_handler_and_the_pipeline(model, tmp_path):
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    card = card_of(folder)
    meta = card.data
    assert meta.license == "mit" and meta.pipeline_tag == "any-to-any" and meta.library_name == "transformers"
    assert meta.base_model == "gpt-omni/mini-omni2"  # built here, not loaded from the Hub: its family's release
    assert {"mini-omni2", "any-to-any", "vision", "custom_code"} <= set(meta.tags)
    assert [w["example_title"] for w in meta.widget]
    assert meta.eval_results is None and "## Evaluation" not in card.text
    assert f'pipeline(model="{folder.resolve()}", trust_remote_code=True)' in card.text  # no repo id yet: the folder
    assert card.text.lstrip().startswith(CARD_MARKER)
    assert (folder / "handler.py").read_text() == HANDLER_SOURCE
    assert "snac>=1.2" in (folder / "requirements.txt").read_text().split()
    assert json.loads((folder / "config.json").read_text())["custom_pipelines"]["any-to-any"]["impl"] == (
        "pipeline_mini_omni2.MiniOmni2Pipeline")
    assert (folder / "pipeline_mini_omni2.py").is_file() and (folder / "hub_mini_omni2.py").is_file()


def test_a_card_of_the_users_own_is_kept(model, tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "README.md").write_text("# my own card\n")
    model.save_pretrained(folder, repo_id="me/tiny")
    assert (folder / "README.md").read_text() == "# my own card\n"
    (folder / "README.md").unlink()
    model.save_pretrained(folder, model_card=False)
    assert not (folder / "README.md").exists() and (folder / "handler.py").is_file()


def test_a_fine_tuned_model_names_the_repo_it_was_loaded_from(model_no_vision, tmp_path):
    from mini_omni2 import MiniOmni2ForConditionalGeneration

    model_no_vision.save_pretrained(tmp_path / "base")
    loaded = MiniOmni2ForConditionalGeneration.from_pretrained(tmp_path / "base")
    loaded.config._name_or_path = "me/mini-omni-hf"  # as from_pretrained("me/mini-omni-hf") records it
    loaded.save_pretrained(tmp_path / "tuned", repo_id="me/mini-omni-tuned")
    card = card_of(tmp_path / "tuned")
    assert card.data.base_model == "me/mini-omni-hf"
    assert "vision" not in card.data.tags and '"image"' not in card.text  # Mini-Omni: no vision example
    assert "# mini-omni-tuned (Mini-Omni, transformers)" in card.text
    assert card_of(tmp_path / "base").data.base_model == "gpt-omni/mini-omni"


def test_a_lora_merged_model_gets_the_card(tmp_path):
    from mini_omni2.training import apply_lora

    merged = apply_lora(tiny_model(seed=4, codec=False), r=2, lora_alpha=4).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged", repo_id="me/merged")
    card = card_of(tmp_path / "merged")
    assert card.data.pipeline_tag == "any-to-any" and 'pipeline(model="me/merged"' in card.text
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["custom_pipelines"]


class FakeApi:
    """huggingface_hub.HfApi that records what would be uploaded (a copy of the folder)."""

    uploads: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, folder_path, repo_id, commit_message=None, **kwargs):
        copy = Path(self.target) / f"upload{len(FakeApi.uploads)}"
        shutil.copytree(folder_path, copy)
        FakeApi.uploads.append((repo_id, commit_message, copy))
        return f"https://huggingface.co/{repo_id}/commit/0"


def test_push_to_hub_uploads_the_real_card(model, tmp_path, monkeypatch):
    import huggingface_hub

    FakeApi.uploads = []
    FakeApi.target = str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model.push_to_hub("me/tiny-pushed", eval_results=[ASR_RESULT])
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/tiny-saved")
    (first, message, pushed), (second, _, saved) = FakeApi.uploads
    assert (first, second) == ("me/tiny-pushed", "me/tiny-saved") and message == "Upload Mini-Omni2 model"
    card = card_of(pushed)
    assert 'pipeline(model="me/tiny-pushed", trust_remote_code=True)' in card.text  # the repo id, not a path
    assert str(tmp_path) not in card.text
    assert model_index(card) == {("openslr/librispeech_asr", "clean", "wer"): 4.81}
    assert (pushed / "handler.py").is_file() and (pushed / "model.safetensors").is_file()
    assert 'pipeline(model="me/tiny-saved"' in card_of(saved).text


def test_evaluation_results_fill_the_model_index(model, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(ASR_RESULT))
    folder = tmp_path / "saved"
    model.save_pretrained(folder, repo_id="me/tiny", eval_results=[results, QA_RESULT])
    card = card_of(folder)
    assert card.data.model_name == "me/tiny"
    assert model_index(card) == {
        ("openslr/librispeech_asr", "clean", "wer"): 4.81,
        ("me/spoken-questions", None, "wer"): 12.5,
        ("me/spoken-questions", None, "accuracy"): 75.0,
    }
    assert re.search(r"\| asr \| openslr/librispeech_asr \| clean \| test \| 2620 \| WER % \| 4\.81 \|", card.text)

    # later results: the same split replaces, another split is added, the rest of the card is kept
    other = dict(ASR_RESULT, config="other", metrics={"wer": 0.1})
    better = dict(ASR_RESULT, metrics={"wer": 0.04})
    add_eval_results(folder, [better, other])
    card = card_of(folder)
    assert model_index(card) == {
        ("openslr/librispeech_asr", "clean", "wer"): 4.0,
        ("me/spoken-questions", None, "wer"): 12.5,
        ("me/spoken-questions", None, "accuracy"): 75.0,
        ("openslr/librispeech_asr", "other", "wer"): 10.0,
    }
    assert len(card.data.eval_results) == 4 and card.text.count("## Evaluation") == 1
    assert 'pipeline(model="me/tiny"' in card.text and "## Facts kept from the release" in card.text

    # new weights saved there: the results of the old ones are gone
    model.save_pretrained(folder, repo_id="me/tiny")
    assert card_of(folder).data.eval_results is None and not (folder / "eval_results.json").exists()
    with pytest.raises(ValueError, match="must be the JSON written by `mini-omni2 eval`"):
        model.save_pretrained(folder, eval_results=[{"wer": 0.1}])
    with pytest.raises(ValueError, match="evaluation results file not found"):
        model.save_pretrained(folder, eval_results=[tmp_path / "missing.json"])
