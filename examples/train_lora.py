"""Fine-tune Mini-Omni2 with LoRA (PEFT) on the language model's projections, with transformers' Trainer.

Runs offline on a tiny random model with synthetic data (``--train-head`` because a random, frozen head cannot fit
anything; a real checkpoint does not need it):

    python examples/train_lora.py --model tiny-random --max-steps 20 --train-head --merge --output-dir runs/tiny-lora

With a converted checkpoint and your own data (JSON lines in the example format of docs/training.md):

    python examples/train_lora.py --model ./mini-omni2-hf --train-file data.jsonl --output-dir runs/lora

LoRA adapts q/k/v/o/gate/up/down of the language model's layers only (not the Whisper/CLIP projections); the audio
and vision adapters are trained in full and saved with it unless ``--no-train-projectors``. The adapter is saved
to ``--output-dir`` (load it with ``peft.PeftModel.from_pretrained(base_model, output_dir)``); ``--merge`` also saves
the merged model to ``<output-dir>/merged``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train import add_common_arguments, build_dataset, load_model_and_processor, synthetic_tasks, trainer_arguments  # noqa: E402

logger = logging.getLogger("mini_omni2.train_lora")

LORA_LEARNING_RATE = 2e-4  # the top of the paper's language-model range


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--train-projectors", action=argparse.BooleanOptionalAction, default=True,
                        help="train the audio/vision adapters in full (PEFT modules_to_save)")
    parser.add_argument("--train-head", action="store_true", help="also train the LM head in full (modules_to_save)")
    parser.add_argument("--merge", action="store_true", help="also save the merged model to <output-dir>/merged")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch
    from transformers import Trainer

    from mini_omni2.training import MiniOmni2DataCollator, apply_lora, parameter_counts

    torch.manual_seed(args.seed)
    model, processor = load_model_and_processor(args.model)
    model.requires_grad_(False)
    peft_model = apply_lora(
        model,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        train_projectors=args.train_projectors,
        modules_to_save=["lm_head"] if args.train_head else None,
    )
    report = {part: c["trainable"] for part, c in parameter_counts(peft_model).items()}
    logger.info("LoRA trainable parameters: %s", json.dumps(report))

    tasks = synthetic_tasks(args, 3, processor)
    train_dataset = build_dataset(args, model, processor, tasks)
    collator = MiniOmni2DataCollator(processor, codec=model.codec, batch_parallel_twins=args.batch_parallel_twins)
    training_args = trainer_arguments(args, 3, args.learning_rate if args.learning_rate is not None else LORA_LEARNING_RATE)
    peft_model.train()
    trainer = Trainer(model=peft_model, args=training_args, train_dataset=train_dataset, data_collator=collator)
    result = trainer.train()
    trainer.save_model(args.output_dir)  # the LoRA adapter (and the modules_to_save copies); the main process writes
    summary = {"train_loss": result.training_loss, "steps": result.global_step, "trainable": report}
    if not trainer.is_world_process_zero():  # under a distributed launch only the main process writes the rest
        return summary
    processor.save_pretrained(args.output_dir)
    if args.merge:
        merged = peft_model.merge_and_unload()
        merged_dir = os.path.join(args.output_dir, "merged")
        merged.save_pretrained(merged_dir)  # with the model card, the pipeline and the endpoint handler
        processor.save_pretrained(merged_dir)
        summary["merged"] = merged_dir
    with open(os.path.join(args.output_dir, "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("saved to %s: %s", args.output_dir, json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
