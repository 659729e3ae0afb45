"""Shared fixtures: tiny random models, the tiny processor, and synthetic audio and images (all offline)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from mini_omni2.tiny import tiny_model, tiny_processor, tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def processor():
    return tiny_processor()


@pytest.fixture(scope="session")
def processor_no_vision():
    return tiny_processor(vision=False)


#: The session's shared models, checked after every test by :func:`_session_models_stay_float32`.
SESSION_MODELS: list = []


@pytest.fixture(scope="session")
def model():
    SESSION_MODELS.append(tiny_model(seed=0))
    return SESSION_MODELS[-1]


@pytest.fixture(scope="session")
def model_no_vision():
    SESSION_MODELS.append(tiny_model(vision=False, seed=1))
    return SESSION_MODELS[-1]


@pytest.fixture(autouse=True)
def _session_models_stay_float32(request):
    """Exactness tests compare against the shared models in float32; a test that casts one in place (a pipeline in
    the auto dtype does, on a CPU with AVX512_BF16) fails here, naming itself, instead of a later test failing."""
    yield
    for shared in SESSION_MODELS:
        assert shared.dtype == torch.float32, f"{request.node.nodeid} left a session model in {shared.dtype}"


def sine(seconds: float, sampling_rate: int = 16000, freq: float = 220.0, channels: int = 1) -> np.ndarray:
    """A sine tone; (samples,) mono or (samples, channels)."""
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return wave if channels == 1 else np.stack([wave] * channels, axis=1)


def espeak_wav(text: str, path, speed: int | None = None) -> str:
    """Speech synthesised with espeak-ng into a wav file (installed by .ci/run); ``speed`` in words per minute."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.fail("espeak-ng is not installed; .ci/run installs it (apt-get install espeak-ng)")
    rate = ["-s", str(speed)] if speed is not None else []
    subprocess.run([exe, *rate, "-w", str(path), text], check=True, capture_output=True)
    return str(path)


def color_image(color=(255, 0, 0), size=(320, 240)):
    from PIL import Image

    return Image.new("RGB", size, color)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread: the tiny models' ops are small, and with 2 threads on a busy 2-core machine every op's
    barrier can wait for a descheduled partner (runs were seen to take 10-70x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def install_in_hub_cache(folder, repo_id: str, hf_home) -> str:
    """Put a saved folder into a Hugging Face cache under ``repo_id``, as a download would, so that with
    ``HF_HOME=hf_home`` and ``HF_HUB_OFFLINE=1`` the repo id loads offline. Returns the snapshot folder."""
    from pathlib import Path

    commit = "0" * 40
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return str(snapshot)
