"""Train the listening row of duplex interruption ("stop omni" -> irq) with transformers' Trainer (docs/duplex.md).

Runs offline on a tiny random model with synthetic clips (espeak-ng voices over speech, noise and music):

    python examples/train_duplex.py --output-dir runs/duplex --train-clips 2000 --max-steps 1500

Add duplex to a converted checkpoint (a new, randomly initialised listening adapter for the features input: the
recipe's GRU), mixed with stage-3 data of the example format (docs/training.md):

    python examples/train_duplex.py --model ./mini-omni2-hf --listen-input features --listen-adapter gru \
        --train-file stage3.jsonl --output-dir runs/duplex

The clips come from ``mini_omni2.training.duplex_data.duplex_generator`` through ``datasets.Dataset.from_generator``
and the model's own listening front end; every row is a listening row whose labels are its frames' states. Then the
decision rule (P(irq) >= threshold on N consecutive frames) is chosen on ``--val-clips`` unseen clips of the train
split and kept as the model's ``config.listen_rule``, which ``DuplexSession`` and ``mini-omni2 serve --duplex`` use.
The trained model and processor are saved to ``--output-dir`` with ``train_summary.json``.

Distil trained listening models into one row (docs/duplex.md): ``--teacher runs/a --teacher runs/b`` trains toward
each frame's label mixed with the teachers' mean P(irq) (``--distillation-weight``, its share).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

logger = logging.getLogger("mini_omni2.train_duplex")
TINY = "tiny-random"


def build_parser() -> argparse.ArgumentParser:
    from mini_omni2.training.duplex import (
        LISTEN_BATCH_SIZE,
        add_listen_adapter_argument,
        add_listen_training_arguments,
        argument_type,
        parse_count,
        parse_width,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY, help=f"a saved Mini-Omni2 folder, or {TINY!r} (tiny, random, offline)")
    parser.add_argument("--listen-input", choices=("features", "codec"),
                        help="what the listening row hears (default: the model's config; features for tiny-random)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--train-clips", type=int, default=2000, help="synthetic clips of the train split")
    parser.add_argument("--val-clips", type=argument_type(parse_count), default=300,
                        help="unseen clips of the train split to choose the decision rule on (0: keep the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-file", help="also train on these examples (JSON lines, docs/training.md): the stage-3 mix")
    parser.add_argument("--num-synthetic", type=int, default=0,
                        help="also train on this many synthetic stage-3 examples (the mix, offline)")
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--per-device-train-batch-size", type=int, default=LISTEN_BATCH_SIZE,
                        help=f"clips a step (the recipe: {LISTEN_BATCH_SIZE} in all)")
    parser.add_argument("--gradient-accumulation-steps", type=argument_type(parse_width), default=1,
                        help="batches summed into one step: the step's clips are the batch size times this (e.g. 8 x 4 "
                             f"for the recipe's {LISTEN_BATCH_SIZE} where {LISTEN_BATCH_SIZE} rows do not fit)")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="2e-3 for the tiny model; ~2e-4 for 0.5 B")
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--logging-steps", type=int, default=50)
    parser.add_argument("--teacher", action="append", default=[], metavar="DIR",
                        help="a trained listening model to distil (repeat for several: their mean P(irq) is the "
                             "soft target, --distillation-weight its share)")
    add_listen_adapter_argument(parser, None)
    add_listen_training_arguments(parser)  # --tail-seconds, --weight-averaging, --train-kinds, ...
    return parser


def load_model_and_processor(args):
    import mini_omni2  # noqa: F401  (registers the Auto classes)
    from mini_omni2 import MiniOmni2ForConditionalGeneration, MiniOmni2Processor

    overrides = {k: v for k, v in (("listen_input", args.listen_input), ("listen_adapter", args.listen_adapter)) if v}
    if args.model == TINY:
        from mini_omni2.tiny import tiny_processor
        from mini_omni2.training.duplex import duplex_tiny_config

        config = duplex_tiny_config(**overrides)  # features input unless told otherwise
        return MiniOmni2ForConditionalGeneration(config), tiny_processor(vision=False)
    model = MiniOmni2ForConditionalGeneration.from_pretrained(args.model, **overrides)
    return model, MiniOmni2Processor.from_pretrained(args.model)


def build_dataset(args, model, processor):
    """Listening clips through the model's front end (``datasets``), plus the stage-3 examples if asked."""
    import datasets
    import torch

    from mini_omni2.training.duplex import clip_kwargs
    from mini_omni2.training.duplex_data import DuplexPreprocessor, duplex_generator

    clips = datasets.Dataset.from_generator(
        duplex_generator,
        gen_kwargs={"split": "train", "num_examples": args.train_clips, "seed": args.seed, **clip_kwargs(args)},
    )
    listen = clips.map(DuplexPreprocessor(model.listen_front_end()), batched=True, batch_size=32,
                       remove_columns=clips.column_names).with_format("numpy")
    parts = [listen]
    if args.train_file or args.num_synthetic:
        from mini_omni2.training.data import MiniOmni2Preprocessor, synthetic_examples

        if args.train_file:
            raw = datasets.load_dataset("json", data_files=args.train_file, split="train")
        else:
            raw = datasets.Dataset.from_list(synthetic_examples(processor, args.num_synthetic, seed=args.seed))
        prep = MiniOmni2Preprocessor(processor, codec=model if model.codec is not None else None, audio="waveform")
        parts.append(raw.map(prep, batched=True, batch_size=16, remove_columns=prep.removable_columns(raw.column_names)))
    return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)


def choose_rule(args, model) -> dict:
    """Choose the decision rule on ``--val-clips`` clips after the training ones and keep it in the model's config;
    what was chosen and what it scored there."""
    from mini_omni2.training.duplex import (
        MAX_FALSE_PER_10MIN,
        choose_listen_rule,
        clip_kwargs,
        evaluation_examples,
        sweep_listen_rules,
    )

    validation = evaluation_examples(model.listen_front_end(), args.val_clips, seed=args.seed, start=args.train_clips,
                                     **clip_kwargs(args))
    sweep = sweep_listen_rules(model, validation)
    rule = choose_listen_rule(sweep, MAX_FALSE_PER_10MIN)
    model.config.listen_rule = rule.as_config()
    scored = next(r for r in sweep if (r["threshold"], r["min_frames"]) == (rule.threshold, rule.min_frames))
    return {"listen_rule": model.config.listen_rule, "validation": scored}


def main(argv: list[str] | None = None) -> dict:
    from mini_omni2.training.duplex import check_listen_training_arguments

    parser = build_parser()
    args = parser.parse_args(argv)
    check_listen_training_arguments(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from mini_omni2 import MiniOmni2ForConditionalGeneration
    from mini_omni2.training.duplex import listen_training_kwargs, train_listener

    torch.manual_seed(args.seed)
    model, processor = load_model_and_processor(args)
    dataset = build_dataset(args, model, processor)
    teachers = [MiniOmni2ForConditionalGeneration.from_pretrained(folder) for folder in args.teacher]
    result = train_listener(
        model, processor, dataset, args.output_dir, max_steps=args.max_steps,
        batch_size=args.per_device_train_batch_size, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, seed=args.seed, logging_steps=args.logging_steps, teachers=teachers,
        gradient_accumulation_steps=args.gradient_accumulation_steps, **listen_training_kwargs(args),
    )
    chosen = choose_rule(args, model) if args.val_clips else {"listen_rule": model.config.listen_rule}
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    summary = {"train_loss": result.training_loss, "steps": result.global_step, "examples": len(dataset),
               "listen_input": model.config.listen_input, "teachers": args.teacher, **chosen}
    with open(os.path.join(args.output_dir, "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("saved to %s: %s", args.output_dir, json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
