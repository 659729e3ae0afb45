"""examples/train.py under `accelerate launch` (issue 11): DDP over 2 CPU processes (gloo) trains one model on both
ranks, from different batches, equal to one process that accumulates the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mini_omni2.tiny import tiny_model

from test_training import load_example

REPO = Path(__file__).resolve().parent.parent
TRAIN_ARGS = ["--model", "tiny-random", "--stage", "3", "--max-steps", "2", "--num-synthetic", "4", "--tasks",
              "T1A2,A1T2", "--global-batch-size", "4", "--per-device-train-batch-size", "2", "--report-ranks"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_with_two_cpu_processes_trains_one_model(tmp_path):
    out = tmp_path / "ddp"
    # accelerate's multi-process launcher (torchrun); without GPUs the processes train on the CPU over gloo
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(REPO / "examples" / "train.py"), *TRAIN_ARGS,
               "--output-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, report in enumerate(ranks):
        assert (report["rank"], report["world_size"], report["backend"]) == (rank, 2, "gloo")
        assert report["distributed_type"] == "MULTI_CPU" and report["steps"] == 2
        assert not report["fsdp"] and not report["deepspeed"]  # plain DDP
    assert ranks[0]["batches_sha256"] != ranks[1]["batches_sha256"]  # each rank trained on its own batches
    assert ranks[0]["parameters_sha256"] == ranks[1]["parameters_sha256"]  # ... into the same model
    train = load_example("train")
    assert ranks[0]["parameters_sha256"] != train.parameter_digest(tiny_model())  # trained: not the initial weights

    # one process accumulating the same global batch (2 micro-batches of 2) trains the same model
    alone = tmp_path / "alone"
    summary = train.main([*TRAIN_ARGS, "--output-dir", str(alone)])
    assert summary["steps"] == 2 and summary["rank"]["world_size"] == 1
    ddp_weights, alone_weights = load_file(out / "model.safetensors"), load_file(alone / "model.safetensors")
    assert ddp_weights.keys() == alone_weights.keys()
    for name, value in alone_weights.items():
        torch.testing.assert_close(ddp_weights[name], value, atol=1e-6, rtol=0, msg=name)
    # the main process alone wrote the folder, with the model card and the pipeline
    assert json.loads((out / "train_summary.json").read_text())["rank"]["rank"] == 0
    assert (out / "README.md").is_file() and (out / "processor_config.json").is_file()
