"""Train Mini-Omni2 with transformers' Trainer: one stage of the paper's three-stage recipe (SPEC §9).

Runs offline on a tiny random model with synthetic data:

    python examples/train.py --model tiny-random --stage 3 --max-steps 20 --output-dir runs/tiny-stage3

With a converted checkpoint and your own data (JSON lines in the example format of docs/training.md):

    python examples/train.py --model ./mini-omni2-hf --stage 2 --train-file data.jsonl --output-dir runs/stage2

On several GPUs (or CPU processes), launch it with accelerate; Trainer runs DDP, or FSDP / DeepSpeed through its own
integrations (``--fsdp``, ``--deepspeed``; commands in docs/training.md):

    accelerate launch --multi_gpu --num_processes 8 examples/train.py --model ./mini-omni2-hf --stage 3 ...
    accelerate launch --cpu --num_processes 2 examples/train.py --model tiny-random --max-steps 4 --output-dir runs/ddp

Stage 1 trains the adapters, stage 2 the language model on text answers, stage 3 everything but the encoders.
Defaults follow the paper: cosine schedule to the stage's final rate, 1,500 warm-up steps, global batch 192,
peak learning rate 1e-3 (stage 1) or 2e-4 (stages 2, 3). With ``--model tiny-random`` the warm-up defaults to 0
and the global batch to 8. The trained model and processor are saved to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys

logger = logging.getLogger("mini_omni2.train")

TINY = "tiny-random"
STAGE_TASKS = {
    1: ("A1T2", "A1T1"),  # adapters: audio (and image) inputs, text answers
    2: ("T1T2", "A1T2", "A1T1"),  # language model: text answers only
    3: ("T1A2", "A1A2", "A1T2", "A1T1", "T1T2"),  # everything: speech answers too
}
VISION_TASKS = {1: ("VA1T2",), 2: ("VA1T2",), 3: ("VA1A2", "VA1T2")}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=TINY, help=f"a saved Mini-Omni2 folder, or {TINY!r} (random, offline)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--train-file", help="JSON / JSON lines in the example format; default: synthetic examples")
    parser.add_argument("--num-synthetic", type=int, default=32, help="synthetic examples when no --train-file")
    parser.add_argument("--tasks", help="comma-separated tasks of the synthetic examples (default: per stage)")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (default: --num-train-epochs)")
    parser.add_argument("--num-train-epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, help="peak learning rate (default: per stage)")
    parser.add_argument("--warmup-steps", type=int, help="default 1500 (the paper), 0 for tiny-random")
    parser.add_argument("--global-batch-size", type=int, help="default 192 (the paper), 8 for tiny-random")
    parser.add_argument("--per-device-train-batch-size", type=int, default=8)
    parser.add_argument(
        "--batch-parallel-twins",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train the text-out twin row of each speech answer (for batch parallel decoding)",
    )
    parser.add_argument("--audio-mode", choices=("features", "waveform"), default="waveform",
                        help="precompute Whisper features, or keep 16 kHz waveforms and compute them per batch")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP (Trainer's integration; docs/training.md)")
    parser.add_argument("--fsdp-config", default=None, help="Trainer's fsdp_config: a JSON file (version, wrapping ...)")
    parser.add_argument("--deepspeed", default=None, help="Trainer's DeepSpeed integration: a DeepSpeed JSON config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), default=3)
    parser.add_argument("--adapter-learning-rate", type=float, help="stage 3: a separate peak rate for the adapters")
    parser.add_argument("--train-encoders", action="store_true", help="also train the Whisper and CLIP encoders")
    parser.add_argument(
        "--report-ranks",
        action="store_true",
        help="each process writes rank<N>.json: world size, backend, a digest of its batches and of the trained "
        "parameters (the replicas of a DDP run must end equal)",
    )
    return parser


def load_model_and_processor(name: str):
    """The tiny random model (``tiny-random``) or a saved folder, with its processor."""
    import mini_omni2  # noqa: F401  (registers the Auto classes)
    from mini_omni2 import MiniOmni2ForConditionalGeneration, MiniOmni2Processor

    if name == TINY:
        from mini_omni2.tiny import tiny_model, tiny_processor

        logger.warning("--model tiny-random: a tiny model with random weights, for trying the pipeline out")
        return tiny_model(), tiny_processor()
    return MiniOmni2ForConditionalGeneration.from_pretrained(name), MiniOmni2Processor.from_pretrained(name)


def synthetic_tasks(args, stage: int, processor) -> tuple[str, ...]:
    """The tasks of the synthetic examples: ``--tasks``, else those of the stage (with images if the model sees)."""
    if args.tasks:
        return tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    return STAGE_TASKS[stage] + (VISION_TASKS[stage] if processor.has_vision else ())


def build_dataset(args, model, processor, tasks):
    """The training set (``--train-file`` or synthetic examples of ``tasks``), preprocessed with ``datasets``."""
    import datasets

    from mini_omni2.training.data import MiniOmni2Preprocessor, synthetic_examples

    if args.train_file:
        raw = datasets.load_dataset("json", data_files=args.train_file, split="train")
    else:
        raw = datasets.Dataset.from_list(
            synthetic_examples(processor, args.num_synthetic, tasks=tasks, seed=args.seed)
        )
    prep = MiniOmni2Preprocessor(processor, codec=model, audio=args.audio_mode)
    return raw.map(prep, batched=True, batch_size=16, remove_columns=prep.removable_columns(raw.column_names))


def trainer_arguments(args, stage: int, learning_rate: float | None):
    """TrainingArguments from the command line, on top of the stage defaults of mini_omni2.training."""
    import torch

    from mini_omni2.training import GLOBAL_BATCH_SIZE, WARMUP_STEPS, training_arguments

    tiny = args.model == TINY
    warmup = args.warmup_steps if args.warmup_steps is not None else (0 if tiny else WARMUP_STEPS)
    if args.max_steps > 0 and warmup >= args.max_steps:
        logger.warning("warm-up (%d steps) >= --max-steps (%d): the rate never peaks", warmup, args.max_steps)
    global_batch = args.global_batch_size or (8 if tiny else GLOBAL_BATCH_SIZE)
    # devices that each take a per-device batch: the processes of a distributed launch, else DataParallel's GPUs
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else max(torch.cuda.device_count(), 1)
    per_device = min(args.per_device_train_batch_size, global_batch)
    accumulation = max(global_batch // (per_device * world), 1)
    overrides = dict(
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        warmup_steps=warmup,
        max_steps=args.max_steps,
        num_train_epochs=args.num_train_epochs,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=args.save_steps if args.save_steps > 0 else 500,
        activation_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
        seed=args.seed,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        fsdp=args.fsdp or None,
        fsdp_config=args.fsdp_config,
        deepspeed=args.deepspeed,
    )
    if learning_rate is not None:
        overrides["learning_rate"] = learning_rate
    return training_arguments(stage, args.output_dir, **overrides)


class BatchDigest:
    """Wraps a collator and hashes the input ids of every batch it makes (what this process trained on)."""

    def __init__(self, collator):
        self.collator = collator
        self.sha256 = hashlib.sha256()
        self.batches = 0

    def __call__(self, examples):
        batch = self.collator(examples)
        self.sha256.update(batch["input_ids"].numpy().tobytes())
        self.batches += 1
        return batch


def parameter_digest(model) -> str:
    """sha256 of every parameter's bytes, in name order."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def write_rank_report(output_dir: str, trainer, model, batches: BatchDigest) -> dict:
    """``rank<N>.json``: this process's world size, backend, batch digest and trained-parameter digest."""
    import torch.distributed as dist

    state = trainer.accelerator.state
    report = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "distributed_type": str(state.distributed_type).split(".")[-1],
        "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        "fsdp": bool(trainer.is_fsdp_enabled),
        "deepspeed": bool(trainer.is_deepspeed_enabled),
        "batches": batches.batches,
        "batches_sha256": batches.sha256.hexdigest(),
        "parameters_sha256": parameter_digest(model),
        "steps": trainer.state.global_step,
    }
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"rank{report['rank']}.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch
    from transformers import Trainer

    from mini_omni2.token_layout import OUTPUT_SPEECH, TASKS
    from mini_omni2.training import MiniOmni2DataCollator, configure_stage, stage_parameter_groups

    torch.manual_seed(args.seed)
    model, processor = load_model_and_processor(args.model)
    report = configure_stage(model, args.stage, train_encoders=args.train_encoders)
    logger.info("stage %d trainable parameters: %s", args.stage, json.dumps(report))

    tasks = synthetic_tasks(args, args.stage, processor)
    train_dataset = build_dataset(args, model, processor, tasks)
    if args.stage == 2 and any(TASKS[t][1] == OUTPUT_SPEECH for t in set(train_dataset["task"])):
        logger.warning("stage 2 trains on text answers in the paper; this data has speech answers")
    collator = MiniOmni2DataCollator(processor, codec=model.codec, batch_parallel_twins=args.batch_parallel_twins)
    if args.report_ranks:
        collator = BatchDigest(collator)
    training_args = trainer_arguments(args, args.stage, args.learning_rate)

    optimizers = (None, None)
    if args.adapter_learning_rate is not None:
        groups = stage_parameter_groups(
            model, training_args.learning_rate, args.adapter_learning_rate, training_args.weight_decay
        )
        optimizers = (torch.optim.AdamW(groups, lr=training_args.learning_rate), None)
    model.train()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,  # no processing_class: Trainer would copy the tokenizer's eos/pad ids into the config
        optimizers=optimizers,
    )
    result = trainer.train()
    trainer.save_model(args.output_dir)  # the main process writes (FSDP/DeepSpeed gather the weights first)
    summary = {"stage": args.stage, "train_loss": result.training_loss, "steps": result.global_step, **report}
    if args.report_ranks:
        summary["rank"] = write_rank_report(args.output_dir, trainer, model, collator)
    if trainer.is_world_process_zero():
        processor.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        logger.info("saved to %s: %s", args.output_dir, json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
