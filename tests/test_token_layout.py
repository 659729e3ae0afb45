"""SPEC §2-4 and §6-7, read against the release's numbers."""

import pytest
import torch

from mini_omni2.token_layout import TASKS, TokenLayout

R = TokenLayout()  # the released sizes


def audio_row(local_ids, layer):
    return [c + 152000 + 4160 * layer for c in local_ids]


def test_release_vocabulary_numbers():
    assert R.total_vocab_size == 181120
    assert (R.eot, R.pad_t, R.input_t, R.answer_t, R.asr) == (151936, 151937, 151938, 151939, 151940)
    assert (R.eoa, R.pad_a, R.input_a, R.answer_a, R.image, R.eoimage) == (4096, 4097, 4098, 4099, 4101, 4102)
    assert R.audio_special("split") == 4100
    assert R.layershift(5, 3) == 5 + 152000 + 4160 * 3
    assert R.stream_offsets().tolist() == [152000 + 4160 * i for i in range(7)] + [0]
    assert R.pad_ids().tolist() == [4097 + 152000 + 4160 * i for i in range(7)] + [151937]


def test_layout_sizes_round_trip_through_a_config_and_a_processor():
    from mini_omni2.tiny import tiny_config

    config = tiny_config()
    layout = config.token_layout
    assert layout.sizes()["text_vocab_size"] == 512 and layout.sizes()["audio_vocab_size"] == 128
    assert TokenLayout.of(config) == layout == TokenLayout(**layout.sizes())


def test_split_logits_slices_the_head():
    logits = torch.arange(R.total_vocab_size).float()[None]
    text, audio = R.split_logits(logits)
    assert text.shape[-1] == 152000 and text[0, -1] == 151999
    assert audio.shape[-2:] == (7, 4160)
    for i in range(7):
        assert audio[0, i, 0] == 152000 + 4160 * i and audio[0, i, -1] == 152000 + 4160 * (i + 1) - 1


EOA, PAD_A, IN_A, ANS_A, IMG, EOIMG = 4096, 4097, 4098, 4099, 4101, 4102
EOT, PAD_T, IN_T, ANS_T, ASR = 151936, 151937, 151938, 151939, 151940
L = 5
TOKENS = [11, 22, 33]


@pytest.mark.parametrize(
    "task, audio, text, audio_pos, image_pos",
    [
        ("A1A2", [IN_A] + [PAD_A] * L + [EOA, ANS_A], [IN_T] + [PAD_T] * L + [EOT, ANS_T], range(1, L + 1), []),
        ("A1T2", [IN_A] + [PAD_A] * L + [EOA, PAD_A], [IN_T] + [PAD_T] * L + [EOT, ANS_T], range(1, L + 1), []),
        ("A1T1", [IN_A] + [PAD_A] * L + [EOA, PAD_A], [IN_T] + [PAD_T] * L + [EOT, ASR], range(1, L + 1), []),
        ("T1A2", [PAD_A] * 5 + [ANS_A], [IN_T] + TOKENS + [EOT, ANS_T], [], []),
        ("T1T2", [PAD_A] * 6, [IN_T] + TOKENS + [EOT, ANS_T], [], []),
        (
            "VA1A2",
            [IMG] + [PAD_A] * 50 + [EOIMG, IN_A] + [PAD_A] * L + [EOA, ANS_A],
            [PAD_T] * (L + 54) + [ANS_T],
            range(52, 52 + L),
            range(1, 51),
        ),
        (
            "VA1T2",
            [IMG] + [PAD_A] * 50 + [EOIMG, IN_A] + [PAD_A] * L + [EOA, PAD_A],
            [PAD_T] * (L + 54) + [ANS_T],
            range(52, 52 + L),
            range(1, 51),
        ),
        # (extension) image alone and image + text, in the same spirit
        ("VT2", [IMG] + [PAD_A] * 50 + [EOIMG, PAD_A], [PAD_T] * 52 + [ANS_T], [], range(1, 51)),
        ("VA2", [IMG] + [PAD_A] * 50 + [EOIMG, ANS_A], [PAD_T] * 52 + [ANS_T], [], range(1, 51)),
        (
            "VT1T2",
            [IMG] + [PAD_A] * 50 + [EOIMG] + [PAD_A] * 6,
            [PAD_T] * 52 + [IN_T] + TOKENS + [EOT, ANS_T],
            [],
            range(1, 51),
        ),
    ],
)
def test_prompt_layouts_match_spec_table(task, audio, text, audio_pos, image_pos):
    inputs, _ = TASKS[task]
    prompt = R.build_prompt(
        task,
        text_ids=TOKENS if "text" in inputs else None,
        num_audio_frames=L if "audio" in inputs else None,
    )
    assert len(prompt.streams) == 8
    for i in range(7):
        assert prompt.streams[i] == audio_row(audio, i), f"audio stream {i}"
    assert prompt.streams[7] == text
    assert prompt.audio_positions == list(audio_pos)
    assert prompt.image_positions == list(image_pos)


@pytest.mark.parametrize("task", [t for t, (_, out) in TASKS.items() if out == "speech"])
def test_batch_parallel_twin_differs_only_in_last_audio_token(task):
    inputs, _ = TASKS[task]
    kwargs = dict(
        text_ids=TOKENS if "text" in inputs else None, num_audio_frames=L if "audio" in inputs else None
    )
    speech = R.build_prompt(task, **kwargs)
    twin = R.build_prompt(R.text_output_task(task), **kwargs)
    assert speech.streams[7] == twin.streams[7]
    for i in range(7):
        assert speech.streams[i][:-1] == twin.streams[i][:-1]
        assert (speech.streams[i][-1], twin.streams[i][-1]) == (R.layershift(ANS_A, i), R.layershift(PAD_A, i))


def test_bad_prompts_are_refused():
    with pytest.raises(ValueError, match="Unknown task"):
        R.build_prompt("A2A1", num_audio_frames=3)
    with pytest.raises(ValueError, match="num_audio_frames"):
        R.build_prompt("A1A2")
    with pytest.raises(ValueError, match="non-empty text"):
        R.build_prompt("T1T2", text_ids=[])
    with pytest.raises(ValueError, match="tokenizer ids"):
        R.build_prompt("T1T2", text_ids=[151936])
    with pytest.raises(ValueError, match="takes no text"):
        R.build_prompt("A1T2", num_audio_frames=3, text_ids=[1])


def test_delay_and_undelay_round_trip():
    frames = torch.randint(0, 4096, (6, 7))
    streams, learned = R.delay_answer([7, 8], frames)
    assert len(streams[0]) == 6 + 8  # T + 7 delays + the final eoa of layer 7
    local = torch.tensor([[t - R.audio_offset(i) for t in streams[i]] for i in range(7)])
    for i in range(7):
        assert local[i, : i + 1].tolist() == [PAD_A] * (i + 1)
        assert local[i, i + 1 : i + 7].tolist() == frames[:, i].tolist()
        assert local[i, i + 7] == EOA
    assert streams[7][:3] == [7, 8, EOT] and set(streams[7][3:]) == {PAD_T}
    # generation stops at layer 7's eoa and does not keep that step
    assert torch.equal(R.undelay(local[:, :-1]), frames)
    assert all(all(row) for row in learned)


def test_text_answer_streams():
    streams, learned = R.delay_answer([7, 8, 9], None)
    assert streams[7] == [7, 8, 9, EOT]
    assert all(streams[i] == [R.layershift(PAD_A, i)] * 4 for i in range(7))
    assert learned[7] == [True] * 4 and not any(any(row) for row in learned[:7])


def test_snac_level_mapping_spec7():
    frames = torch.arange(3 * 7).view(3, 7)
    level0, level1, level2 = R.frames_to_snac(frames)
    assert level0.tolist() == [0, 7, 14]
    assert level1.tolist() == [1, 4, 8, 11, 15, 18]
    assert level2.tolist() == [2, 3, 5, 6, 9, 10, 12, 13, 16, 17, 19, 20]
    assert torch.equal(R.snac_to_frames([level0, level1, level2]), frames)


def test_sanitize_frames_replaces_specials_with_previous_code():
    frames = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [EOA, 2, 3, 4, 5, 6, PAD_A]])
    fixed, replaced = R.sanitize_frames(frames)
    assert fixed[1].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert replaced[1].tolist() == [True, False, False, False, False, False, True]
    start, _ = R.sanitize_frames(torch.tensor([[EOA] * 7]))
    assert start.tolist() == [[0] * 7]
