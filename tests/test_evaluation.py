"""`mini-omni2 eval` (issue 11): WER with evaluate/jiwer on Whisper-normalized text, and spoken QA, on a
LibriSpeech-style dataset made here (espeak-ng speech in a datasets Audio column, saved to disk), scored on a tiny
model trained here to transcribe it and to answer spoken questions, so the asserted numbers are checked ones."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import soundfile
import torch
from huggingface_hub import ModelCard
from transformers import WhisperFeatureExtractor

from mini_omni2 import MiniOmni2ForConditionalGeneration, MiniOmni2Processor
from mini_omni2.cli import main
from mini_omni2.evaluation import contains_answer, whisper_normalizer, word_error_rate
from mini_omni2.evaluation.metrics import load_wer_metric
from mini_omni2.tiny import tiny_config, tiny_tokenizer
from mini_omni2.training import configure_stage

from conftest import espeak_wav
from test_training import SMALL_AUDIO, fit

#: (spoken text, what the model learns to transcribe, the dataset's reference: LibriSpeech style, upper case); the
#: lengths differ (0.35 to 0.93 s), which the tiny model tells apart easily
UTTERANCES = [
    ("yes", "Yes!", "YES"),  # punctuation and case are normalized away
    ("the color", "the color", "THE COLOUR"),  # British spelling: the spelling table maps it
    ("hello world", "hello world", "HELLO WORLD"),
    ("the quick brown fox", "the quick brown fox", "THE QUICK RED FOX"),  # one word differs from what was learned
]
REFERENCE_WORDS = 9
#: spoken question, the answer learned (text, and speech of `frames` random codec frames), what the model learns to
#: hear in that speech of its own, the dataset's reference answers
QUESTIONS = [
    ("what is your name", "omni", 2, "omni", ["Omni"]),
    ("what is green", "grass", 5, "green grass", ["trees"]),  # the voice says more than the text; a wrong answer
]


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """espeak-ng wav files (22,050 Hz, under 1 s at 260 words per minute) of the utterances and questions."""
    folder = tmp_path_factory.mktemp("speech")
    spoken = [text for text, _, _ in UTTERANCES] + [q for q, *_ in QUESTIONS]
    return {text: espeak_wav(text, folder / f"s{k}.wav", speed=260) for k, text in enumerate(spoken)}


@pytest.fixture(scope="module")
def trained_folder(speech, tmp_path_factory):
    """A tiny model (1 s audio window, with a codec) trained to transcribe the utterances, to answer the questions in
    text and speech, and to transcribe its own spoken answers; saved with its processor."""
    torch.manual_seed(0)
    config = tiny_config(vision=False, codec=True, audio_config=SMALL_AUDIO)
    model = MiniOmni2ForConditionalGeneration(config).eval()
    processor = MiniOmni2Processor.from_config(
        config, tokenizer=tiny_tokenizer(), feature_extractor=WhisperFeatureExtractor(feature_size=80, chunk_length=1)
    )
    rng = np.random.default_rng(0)

    def wav(text):  # one Arrow type for the audio column: decoded {"array", "sampling_rate"} values
        samples, rate = soundfile.read(speech[text], dtype="float32")
        return {"array": samples, "sampling_rate": rate}

    examples = [{"task": "A1T1", "audio": wav(spoken), "answer_text": learned} for spoken, learned, _ in UTTERANCES]
    for question, answer, frames, heard, _ in QUESTIONS:
        codes = rng.integers(0, config.audio_codebook_size, size=(frames, 7))
        examples.append({"task": "A1A2", "audio": wav(question), "answer_text": answer, "answer_codes": codes.tolist()})
        # the model's own voice, as generate decodes it (no codec noise), is transcribed as `heard`
        voice = model.codec.decode(torch.tensor(codes)[None], noise=False)[0].numpy()
        examples.append({"task": "A1T1", "audio": {"array": voice, "sampling_rate": 24000}, "answer_text": heard})
    keys = sorted({k for e in examples for k in e})
    examples = [{k: e.get(k) for k in keys} for e in examples]
    configure_stage(model, 3)
    fit(model, processor, examples, max_steps=160, learning_rate=1e-2, lr_scheduler_type="linear",
        output_dir=tmp_path_factory.mktemp("trainer"))
    folder = tmp_path_factory.mktemp("model") / "tiny-asr"
    model.save_pretrained(folder, repo_id="me/tiny-asr")
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def spelling(tmp_path_factory):
    path = tmp_path_factory.mktemp("normalizer") / "normalizer.json"
    path.write_text(json.dumps({"colour": "color"}))
    return str(path)


@pytest.fixture(scope="module")
def librispeech_style(speech, tmp_path_factory):
    """A DatasetDict saved to disk like LibriSpeech's: id, audio (an Audio column of the wav files), text."""
    rows = {
        "id": [f"1-2-{k:04d}" for k in range(len(UTTERANCES))],
        "audio": [speech[spoken] for spoken, _, _ in UTTERANCES],
        "text": [reference for _, _, reference in UTTERANCES],
    }
    test = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio(sampling_rate=16000))
    folder = tmp_path_factory.mktemp("data") / "librispeech-tiny"
    datasets.DatasetDict({"test": test}).save_to_disk(str(folder))
    return str(folder)


GREEDY = '{"do_sample": false, "codec_noise": false}'


# ----- the metric ----------------------------------------------------------------------------------------------------
def test_word_error_rate_counts_the_edits():
    references = ["the cat sat on the mat", "hello world"]
    predictions = ["the cat sit on mat", "hello big world"]  # 1 substitution, 1 deletion, 1 insertion; 8 words
    errors = word_error_rate(references, predictions, backend="jiwer")
    assert (errors.substitutions, errors.deletions, errors.insertions, errors.reference_words) == (1, 1, 1, 8)
    assert errors.wer == pytest.approx(3 / 8) and errors.backend == "jiwer"
    assert word_error_rate(references, references).wer == 0.0
    with pytest.raises(ValueError, match="references must not be empty"):
        word_error_rate(["a b", " "], ["a b", "c"])
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        word_error_rate(references, predictions[:1])


def test_evaluate_and_jiwer_give_the_same_number():
    references = ["the cat sat on the mat", "hello world", "one two three four"]
    predictions = ["the cat sit on mat", "hello big world", "one three four five six"]
    jiwer_wer = word_error_rate(references, predictions, backend="jiwer").wer
    metric = load_wer_metric()  # evaluate's metric is fetched from the Hub: offline it does not load
    auto = word_error_rate(references, predictions)
    if metric is None:
        assert auto.backend == "jiwer" and auto.wer == jiwer_wer
        with pytest.raises(RuntimeError, match="does not load here"):
            word_error_rate(references, predictions, backend="evaluate")
    else:
        assert metric.compute(references=references, predictions=predictions) == pytest.approx(jiwer_wer, rel=1e-12)
        assert auto.backend == "evaluate" and auto.wer == pytest.approx(jiwer_wer, rel=1e-12)


def test_whisper_normalizer(spelling):
    normalize, info = whisper_normalizer(spelling)
    assert normalize("The COLOUR, Mr. Smith!") == "the color mister smith"
    assert info == {"name": "whisper_english", "spelling_mapping": spelling, "spelling_entries": 1}
    plain, info = whisper_normalizer("none")
    assert plain("The colour") == "the colour" and info["spelling_mapping"] is None
    with pytest.raises(ValueError, match="spelling mapping file not found"):
        whisper_normalizer("/nowhere/normalizer.json")
    assert contains_answer("it is light blue", ["blue"]) and not contains_answer("bluebird", ["blue"])


# ----- the commands ----------------------------------------------------------------------------------------------------
def test_eval_asr_on_a_librispeech_style_dataset(trained_folder, librispeech_style, spelling, tmp_path, capsys):
    output = tmp_path / "results.json"
    code = main(["eval", "asr", "--model", str(trained_folder), "--dataset", librispeech_style, "--split", "test",
                 "--batch-size", "4", "--max-new-tokens", "12", "--generate-kwargs", GREEDY,
                 "--spelling-mapping", spelling, "--output", str(output), "--card", str(trained_folder),
                 "--no-progress"])
    assert code == 0
    results = json.loads(output.read_text())
    # the model transcribes every utterance as learned: the only error is the reference's own different word
    predictions = [e["prediction_normalized"] for e in results["examples"]]
    assert predictions == ["yes", "the color", "hello world", "the quick brown fox"]
    assert [e["id"] for e in results["examples"]] == ["1-2-0000", "1-2-0001", "1-2-0002", "1-2-0003"]
    assert results["counts"] == {"substitutions": 1, "deletions": 0, "insertions": 0, "hits": REFERENCE_WORDS - 1,
                                 "reference_words": REFERENCE_WORDS}
    assert results["metrics"]["wer"] == pytest.approx(1 / REFERENCE_WORDS)  # 11.11 %
    assert results["metric_backend"] == ("jiwer" if load_wer_metric() is None else "evaluate")
    assert (results["task"], results["dataset"], results["split"], results["num_examples"]) == (
        "asr", librispeech_style, "test", len(UTTERANCES))
    assert results["normalizer"]["spelling_entries"] == 1 and results["generate_kwargs"]["max_new_tokens"] == 12
    table = output.with_suffix(".md").read_text()
    assert "| 11.11 | 1 | 0 | 0 | 9 |" in table and table in capsys.readouterr().out
    card = ModelCard((trained_folder / "README.md").read_text())
    (entry,) = card.data.eval_results
    assert (entry.task_type, entry.metric_type, entry.metric_value, entry.dataset_split) == (
        "automatic-speech-recognition", "wer", 11.11, "test")

    # streamed, the first 3 examples only (no error among them)
    code = main(["eval", "asr", "--model", str(trained_folder), "--dataset", librispeech_style, "--streaming",
                 "--limit", "3", "--batch-size", "2", "--max-new-tokens", "12", "--generate-kwargs", GREEDY,
                 "--spelling-mapping", spelling, "--output", str(output), "--no-progress"])
    assert code == 0
    streamed = json.loads(output.read_text())
    assert streamed["num_examples"] == 3 and streamed["streaming"] and streamed["metrics"]["wer"] == 0.0


def test_eval_spoken_qa(trained_folder, speech, spelling, tmp_path):
    rows = {"id": ["q0", "q1"], "audio": [speech[q] for q, *_ in QUESTIONS], "answers": [r for *_, r in QUESTIONS]}
    folder = tmp_path / "questions"
    datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio()).save_to_disk(str(folder))
    output = tmp_path / "qa.json"
    code = main(["eval", "spoken-qa", "--model", str(trained_folder), "--dataset", str(folder), "--batch-size", "2",
                 "--max-new-tokens", "16", "--generate-kwargs", GREEDY, "--spelling-mapping", spelling,
                 "--output", str(output), "--no-progress"])
    assert code == 0
    results = json.loads(output.read_text())
    examples = results["examples"]
    assert [e["answer"] for e in examples] == ["omni", "grass"]
    assert [e["transcript_normalized"] for e in examples] == ["omni", "green grass"]  # the model hears its own voice
    assert [e["speech_seconds"] for e in examples] == pytest.approx([2 * 2048 / 24000, 5 * 2048 / 24000])
    # the voice says what the text says, but for one extra word: 1 insertion over 2 words of text answers
    assert results["metrics"]["speech_text_wer"] == pytest.approx(1 / 2)
    assert results["counts"]["insertions"] == 1 and results["counts"]["reference_words"] == 2
    assert [e["correct"] for e in examples] == [True, False] and results["metrics"]["accuracy"] == pytest.approx(1 / 2)
    assert "| 50.00 | 50.00 | 0 |" in output.with_suffix(".md").read_text()


def test_eval_reports_bad_arguments(trained_folder, librispeech_style, capsys):
    code = main(["eval", "asr", "--model", str(trained_folder), "--dataset", librispeech_style, "--split", "dev",
                 "--no-progress"])
    assert code == 1 and "has no split 'dev'; its splits: ['test']" in capsys.readouterr().err
    code = main(["eval", "asr", "--model", str(trained_folder), "--dataset", librispeech_style, "--text-column",
                 "sentence", "--spelling-mapping", "none", "--no-progress"])
    assert code == 1 and "has no column 'sentence'" in capsys.readouterr().err
