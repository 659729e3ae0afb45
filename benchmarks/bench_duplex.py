"""Duplex interruption, measured: a tiny model learns to hear "stop omni" and is scored on held-out clips.

    python benchmarks/bench_duplex.py [--json FILE]                 # data, training, evaluation (~30 min, 2-core CPU)
    python benchmarks/bench_duplex.py --model DIR                    # evaluate a saved model instead of training
    python benchmarks/bench_duplex.py --teachers 4 [--teacher-dir D] # distil 4 models of the recipe into the scored one
    python benchmarks/bench_duplex.py --cost [--cost-size released]  # the listening row's cost per decoding step

The proof (docs/duplex.md): synthetic clips (mini_omni2.training.duplex_data) of the ``train`` split train a tiny model
with the features input (Trainer, stage 3); clips of the ``test`` split, whose voices, background words and noise
kinds never occur in training, are run through the listening row step by step with a KV cache, exactly as inference
runs it. Reported: the detection rate (irq between the command's start and 2 s after its end), the delay from the end
of "stop omni" to the end of the frame at which the row commits to irq, and false interrupts per 10 minutes of
command-free audio (near misses reported apart); detection and false interrupts with their counts and 95 % intervals.
Goals: detection >= 95 %, median delay <= 500 ms, <= 1 false interrupt per 10 minutes.

``--cost`` times decoding steps of the language model with and without one listening row beside a request's two
speaking rows (batch parallel decoding), at the released sizes or tiny ones, on the decoding engine
(``MiniOmni2Engine``: a ``ListenGroup`` beside the answer's ``DecodeGroup``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mini_omni2 import MiniOmni2Config  # noqa: E402
from mini_omni2.training.duplex import (  # noqa: E402
    EVALUATION_TAIL_SECONDS,
    HARD_EXAMPLE_CLIPS,
    HARD_EXAMPLE_REPEAT,
    INTERVAL_CONFIDENCE,
    LISTEN_ADAPTER,
    LISTEN_BATCH_SIZE,
    LISTEN_RULE_GRID,
    MAX_FALSE_PER_10MIN,
    add_listen_adapter_argument,
    add_listen_training_arguments,
    argument_type,
    check_listen_training_arguments,
    clip_kwargs,
    listen_training_kwargs,
    parse_count,
    parse_width,
)

GOALS = {"detection": 0.95, "median_delay_ms": 500.0, "false_per_10min": MAX_FALSE_PER_10MIN}


def machine() -> dict:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": load,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def _examples_chunk(job: tuple) -> list[dict]:
    from mini_omni2.training.duplex import EVALUATION_FIELDS, prepare_listen_examples
    from mini_omni2.training.duplex_data import make_clip

    split, indices, front_end, seed, half, clip_kwargs = job
    out = prepare_listen_examples([make_clip(split, i, seed=seed, **clip_kwargs) for i in indices], front_end,
                                  EVALUATION_FIELDS)
    if half:  # training features are stored at half precision (memory); the collator feeds them as float32
        for example in out:
            example["listen_features"] = example["listen_features"].astype("float16")
    return out


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@functools.lru_cache(maxsize=1)
def _example_code_digest() -> str:
    """The digest of the source of the code that makes the examples (the clip generator and the front end): read
    once per process, not once per chunk."""
    import mini_omni2.duplex_mini_omni2 as front_end_code
    import mini_omni2.training.duplex_data as data_code

    digest = hashlib.sha256()
    for path in (data_code.__file__, front_end_code.__file__):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _cache_file(cache: str, key: dict, job: tuple) -> str:
    """The file of one chunk of examples in ``--cache``: named by everything the examples depend on (the clip's
    split, indices, seed and options, the front end's settings, and the source of the code that makes them), so a
    changed generator or front end never reads stale examples."""
    split, indices, _, seed, half, clip_options = job
    digest = hashlib.sha256(_example_code_digest().encode())
    digest.update(json.dumps([key, split, indices, seed, half, clip_options], sort_keys=True, default=str).encode())
    return os.path.join(cache, f"{split}-{indices[0]}-{indices[-1]}-{digest.hexdigest()[:16]}.pkl")


def _cached_chunk(job: tuple) -> list[dict]:
    """:func:`_examples_chunk`, read from or written to the cache when one is given."""
    import pickle

    cache, key, job = job
    if cache is None:
        return _examples_chunk(job)
    path = _cache_file(cache, key, job)
    if os.path.exists(path):
        with open(path, "rb") as f:
            return pickle.load(f)
    examples = _examples_chunk(job)
    with open(path + ".part", "wb") as f:
        pickle.dump(examples, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(path + ".part", path)
    return examples


def make_examples(split: str, count: int, front_end, seed: int, start: int = 0, workers: int = 1, half: bool = False,
                  cache: str | None = None, cache_key: dict | None = None, **clip_kwargs) -> list[dict]:
    """Clips ``start .. start + count - 1`` of ``split`` through ``front_end`` (``workers`` processes, same result).
    ``cache``: a folder that keeps them between runs (``cache_key``: the front end's settings)."""
    if cache is not None:
        os.makedirs(cache, exist_ok=True)
    chunks = [range(i, min(i + 50, start + count)) for i in range(start, start + count, 50)]
    jobs = [(cache, cache_key, (split, list(chunk), front_end, seed, half, clip_kwargs)) for chunk in chunks]
    if workers <= 1:
        return [e for job in jobs for e in _cached_chunk(job)]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread) as pool:
        return [e for part in pool.imap(_cached_chunk, jobs) for e in part]


def choose_rule(model, validation, probabilities, args) -> tuple[float, int, list]:
    """The decision rule, chosen on validation clips (train split, unseen; ``choose_listen_rule``): the most
    detections with at most ``GOALS["false_per_10min"]`` false interrupts per 10 minutes, else the fewest false
    interrupts. ``--threshold`` / ``--min-frames`` fix it instead."""
    from mini_omni2.training.duplex import choose_listen_rule, sweep_listen_rules

    sweep = sweep_listen_rules(model, validation, probabilities)
    if args.threshold is not None:
        return args.threshold, args.min_frames or 1, sweep
    rule = choose_listen_rule(sweep, GOALS["false_per_10min"])
    return rule.threshold, rule.min_frames, sweep


def new_model(args, seed: int):
    """The proof's tiny model (``duplex_tiny_config`` at the sizes of the options), initialised from ``seed``."""
    import torch

    from mini_omni2 import MiniOmni2ForConditionalGeneration
    from mini_omni2.training.duplex import duplex_tiny_config

    torch.manual_seed(seed)
    config = duplex_tiny_config(
        text={"hidden_size": args.hidden, "intermediate_size": 2 * args.hidden, "num_hidden_layers": args.layers,
              "head_dim": args.hidden // 4},
        adapter_intermediate_size=args.adapter,
        listen_adapter=args.listen_adapter,
        listen_gru_size=args.gru_size,
        listen_feature_config={"num_mel_bins": args.mel_bins},
    )
    return MiniOmni2ForConditionalGeneration(config)


def train_model(args, model, train, seed: int, teachers=()):
    """The recipe's training (``train_listener``) of ``model`` from ``seed`` (clip order), distilled from
    ``teachers`` when given, then the hard-example round when ``--hard-example-steps`` asks for one."""
    from mini_omni2.tiny import tiny_processor
    from mini_omni2.training.duplex import train_listener, train_on_hard_examples

    processor = tiny_processor(vision=False)
    common = dict(batch_size=args.batch_size, mask_bands=args.mask_bands, mask_width=args.mask_width, warp=args.warp,
                  teachers=teachers, **listen_training_kwargs(args))
    output = train_listener(model, processor, train, args.output_dir, max_steps=args.steps,
                            learning_rate=args.learning_rate, seed=seed, **common)
    if args.hard_example_steps:
        _, hard = train_on_hard_examples(model, processor, train, args.output_dir, args.hard_example_steps,
                                         args.hard_example_clips, args.hard_example_repeat, seed=seed, **common)
        print(f"hard-example round: {len(hard)} of the first {min(args.hard_example_clips, len(train))} training "
              f"clips, {args.hard_example_steps} steps", flush=True)
    return output  # the training's, not the round's


def training_seed(args) -> int:
    """The seed of the model's start and clip order: ``--train-seed``, by default the clips' ``--seed``."""
    return args.seed if args.train_seed is None else args.train_seed


def teacher_seed(seed: int, k: int) -> int:
    """Teacher ``k`` of training seed ``S`` starts from ``1000 S + k`` (at seed 0, teacher k starts where the plain
    recipe's model of training seed k does)."""
    return 1000 * seed + k


def student_seed(seed: int) -> int:
    """A distilled model of training seed ``S`` starts from ``1000 S + 100``, a start no teacher has."""
    return 1000 * seed + 100


def train_teachers(args, train, test, validation, window) -> tuple[list, list[dict], dict]:
    """``--teachers K``: K models of the recipe from their own seeds (read back from ``--teacher-dir`` when saved
    there), each scored like the proof's model, and the average of their P(irq) scored the same way."""
    import numpy as np

    from mini_omni2 import MiniOmni2ForConditionalGeneration
    from mini_omni2.training.duplex import listener_probabilities

    teachers, scores, test_p, val_p = [], [], [], []
    for k in range(args.teachers):
        folder = os.path.join(args.teacher_dir, f"teacher-{k}") if args.teacher_dir else None
        start = time.perf_counter()
        if folder and os.path.exists(os.path.join(folder, "config.json")):
            model = MiniOmni2ForConditionalGeneration.from_pretrained(folder).eval()
        else:
            model = new_model(args, teacher_seed(training_seed(args), k))
            train_model(args, model, train, teacher_seed(training_seed(args), k))
            if folder:
                model.save_pretrained(folder)
        trained_s = time.perf_counter() - start
        test_p.append(listener_probabilities(model, test, **window))
        val_p.append(listener_probabilities(model, validation, **window))
        scores.append({"seed": teacher_seed(training_seed(args), k), "train_or_load_s": trained_s,
                       **score(model, test, validation, test_p[-1], val_p[-1], args)})
        print(f"teacher {k}: " + _row(scores[-1]["metrics"]) + f"  (argmax {_row(scores[-1]['argmax_rule_metrics'])})",
              flush=True)
        teachers.append(model)
    mean = [[np.mean([p[i] for p in ps], axis=0) for i in range(len(ps[0]))] for ps in (test_p, val_p)]
    ensemble = score(teachers[0], test, validation, mean[0], mean[1], args)
    print(f"average of the {args.teachers} teachers: " + _row(ensemble["metrics"]), flush=True)
    return teachers, scores, ensemble


def score(model, test, validation, probabilities, val_probabilities, args) -> dict:
    """The test clips scored at the rule chosen on the validation clips, at the argmax, and over the whole grid."""
    from mini_omni2.training.duplex import evaluate_listener

    threshold, min_frames, val_sweep = choose_rule(model, validation, val_probabilities, args)
    sweep = [
        {k: evaluate_listener(model, test, t, m, probabilities=probabilities)[k]
         for k in ("threshold", "min_frames", "detection", "median_delay_ms", "false_per_10min", "false_per_10min_all")}
        for t, m in LISTEN_RULE_GRID
    ]
    return {"metrics": evaluate_listener(model, test, threshold, min_frames, probabilities=probabilities),
            "argmax_rule_metrics": evaluate_listener(model, test, 0.5, 1, probabilities=probabilities),
            "sweep": sweep, "validation_sweep": val_sweep}


def proof(args) -> dict:
    from mini_omni2 import MiniOmni2ForConditionalGeneration
    from mini_omni2.engine_mini_omni2 import ListenRule
    from mini_omni2.training.duplex import listener_probabilities

    timings = {}
    if args.model:
        model = MiniOmni2ForConditionalGeneration.from_pretrained(args.model).eval()
    else:
        model = new_model(args, student_seed(training_seed(args)) if args.teachers else training_seed(args))
    if model.config.listen_input != "features":
        raise SystemExit("the proof uses the features input (the codec's random weights carry nothing: docs/duplex.md)")
    front_end = model.listen_front_end()

    train_clip_options = clip_kwargs(args)
    cache = {"cache": args.cache, "cache_key": {k: getattr(model.config, k) for k in (
        "listen_input", "listen_sampling_rate", "listen_frame_samples", "listen_feature_config")}}
    start = time.perf_counter()
    test = make_examples("test", args.test_clips, front_end, args.seed, workers=args.workers,
                         tail_seconds=EVALUATION_TAIL_SECONDS, **cache)
    # validation: unseen clips of the train split (its voices, words and kinds), to choose the decision rule
    validation = make_examples("train", args.val_clips, front_end, args.seed, start=args.train_clips,
                               workers=args.workers, tail_seconds=EVALUATION_TAIL_SECONDS, **train_clip_options,
                               **cache)
    timings["test_data_s"] = time.perf_counter() - start
    window = {"window_frames": args.window, "refeed_frames": args.refeed} if args.window else {}
    result: dict = {}
    if not args.model:
        start = time.perf_counter()
        train = make_examples("train", args.train_clips, front_end, args.seed, workers=args.workers, half=True,
                              **train_clip_options, **cache)
        timings["train_data_s"] = time.perf_counter() - start
        teachers = []
        if args.teachers:
            start = time.perf_counter()
            teachers, result["teachers"], result["teachers_average"] = train_teachers(args, train, test, validation,
                                                                                      window)
            timings["teachers_s"] = time.perf_counter() - start
        start = time.perf_counter()
        output = train_model(args, model, train, student_seed(training_seed(args)) if teachers else training_seed(args),
                             teachers)
        timings["train_s"] = time.perf_counter() - start
        result["train_loss"] = output.training_loss
        del teachers
    start = time.perf_counter()
    probabilities = listener_probabilities(model, test, **window)
    timings["eval_s"] = time.perf_counter() - start
    val_probabilities = listener_probabilities(model, validation, **window)
    scored = score(model, test, validation, probabilities, val_probabilities, args)
    metrics = scored["metrics"]
    if args.save:  # the model keeps the rule it is scored with: sessions and the server use it
        model.config.listen_rule = ListenRule(metrics["threshold"], metrics["min_frames"]).as_config()
        model.save_pretrained(args.save)
    met = {
        "detection": (metrics["detection"] or 0) >= GOALS["detection"],
        "median_delay_ms": metrics["median_delay_ms"] is not None and metrics["median_delay_ms"] <= GOALS["median_delay_ms"],
        "false_per_10min": metrics["false_per_10min"] is not None and metrics["false_per_10min"] <= GOALS["false_per_10min"],
    }
    result.update(
        **scored, goals=GOALS, goals_met=met, timings=timings,
        model={"parameters": sum(p.numel() for p in model.parameters()),
               "language_model_parameters": sum(p.numel() for p in model.model.language_model.parameters()),
               "listen_projector_parameters": sum(p.numel() for p in model.model.listen_projector.parameters()),
               "text_config": {k: getattr(model.config.text_config, k) for k in ("hidden_size", "num_hidden_layers")},
               "listen_adapter": model.config.listen_adapter, "listen_gru_size": model.config.listen_gru_size,
               "listen_feature_config": model.config.listen_feature_config},
        settings={k: v for k, v in vars(args).items() if k not in ("json",)},
    )
    return result


def _row(r: dict) -> str:
    delay = "-" if r["median_delay_ms"] is None else f"{r['median_delay_ms']:.0f} ms"
    return f"det {r['detection']:.1%}  median delay {delay}  false {r['false_per_10min']:.2f}/10min"


def _interval(interval: tuple[float, float], spec: str) -> str:
    """An interval of ``summarize`` as printed: a run's counts are small (docs/duplex.md, The proof)."""
    return f"{INTERVAL_CONFIDENCE:.0%} interval {interval[0]:{spec}}-{interval[1]:{spec}}"


def print_proof(result: dict) -> None:
    m = result["metrics"]
    print(f"held-out clips: {m['clips']} ({m['positives']} with the command); command-free audio "
          f"{m['command_free_minutes']:.1f} min (near-miss clips apart)")
    print(f"decision rule (chosen on validation): P(irq) >= {m['threshold']} on {m['min_frames']} consecutive frame(s)")
    print(f"detection          {m['detection']:.1%}   ({_interval(m['detection_interval'], '.1%')}; "
          f"{m['detected']} of {m['positives']}; goal >= 95 %)")
    print(f"median delay       {m['median_delay_ms']:.0f} ms   (p90 {m['p90_delay_ms']:.0f} ms; goal <= 500 ms)"
          if m["median_delay_ms"] is not None else "median delay       -")
    false_interval = _interval(m["false_per_10min_interval"], ".2f")
    print(f"false interrupts   {m['false_per_10min']:.2f} per 10 min   ({false_interval}; "
          f"{m['false_interrupts']} in {m['command_free_minutes']:.1f} min; goal <= 1; with near-miss clips "
          f"{m['false_per_10min_all']:.2f})")
    print("near misses that interrupted: " + ", ".join(f"{k!r} {v:.0%}" for k, v in m["near_miss_interrupted"].items()))
    print("per background: " + ", ".join(
        f"{k}: det {v['detection']:.0%} false {v['false_per_10min']:.1f}/10min" for k, v in m["by_kind"].items()
        if v["detection"] is not None and v["false_per_10min"] is not None))
    print("argmax rule (P >= 0.5, 1 frame): " + _row(result["argmax_rule_metrics"]))
    print("test sweep (threshold x consecutive frames):")
    for r in result["sweep"]:
        print(f"  p>={r['threshold']:.2f} x{r['min_frames']}: {_row(r)}  (with near misses {r['false_per_10min_all']:.2f})")
    print("goals met:", result["goals_met"], " timings (s):", {k: round(v, 1) for k, v in result["timings"].items()})


# ----- the listening row's cost ---------------------------------------------------------------------------------------
def listen_cost(model, context: int = 256, steps: int = 20, warmup: int = 3, lag_seconds: float = 10.0) -> dict:
    """Decoding steps per second of one spoken answer (its speech row and text twin, a ``context``-position text
    prompt) on the decoding engine, without and with its duplex listening row (a frame ready at every step: features
    through the adapter, or the codec's 7 codes), with the row catching up (``LISTEN_CATCH_UP_FRAMES`` frames ready
    and read at every step, as behind the microphone), and the listening front end's time per frame. Then the
    row's lag behind a microphone that delivers its frames in real time, after ``lag_seconds`` of an answer, with
    and without catching up (0: not measured)."""
    import numpy as np
    import torch

    from mini_omni2.engine_mini_omni2 import (
        LISTEN_CATCH_UP_FRAMES, DecodeGroup, DecodeSettings, ListenGroup, ListenRule, MiniOmni2Engine,
    )

    config = model.config
    layout = config.token_layout
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(0, layout.tokenizer_vocab_size, (context,), generator=generator).tolist()
    prompt = torch.tensor(layout.build_prompt("T1A2", text_ids=text).streams, device=device)[None]
    total = warmup + steps
    rate = config.listen_sampling_rate / config.listen_frame_samples  # frames of microphone per second

    def random_frames(count: int) -> torch.Tensor:
        """Frames as the front end gives them: features, or the codec's 7 codes."""
        if config.listen_input == "features":
            return torch.randn(count, config.listen_feature_dim, generator=generator)
        return torch.randint(0, layout.audio_codebook_size, (count, 7), generator=generator)

    def prefilled(new_tokens: int, catch_up_frames: int) -> tuple:
        """An engine with the answer and (``catch_up_frames`` > 0) its listening row, after their prefill."""
        settings = DecodeSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        answer = DecodeGroup(layout, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt[:, 0])}, settings)
        engine = MiniOmni2Engine(model)
        listen = None
        if catch_up_frames:  # a rule that never commits: random weights must not end the answer
            listen = engine.add(ListenGroup(model, speaking=answer, rule=ListenRule(0.5, 10**9),
                                            catch_up_frames=catch_up_frames))
        engine.add(answer)
        engine.step()
        return engine, answer, listen

    def run(frames_per_step: int) -> float:
        """Steps per second with a listening row that reads ``frames_per_step`` frames at every step (0: none)."""
        engine, answer, listen = prefilled(total + 2, frames_per_step)
        listening = listen is not None
        if listening:
            listen.push(random_frames(frames_per_step * (total + 1)))
        times = []
        for k in range(total):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            engine.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if k >= warmup:
                times.append(time.perf_counter() - start)
        assert not answer.done and engine.num_rows == 2 + listening
        assert not listening or listen.heard == frames_per_step * total  # a frame or more at every step
        return float(len(times) / sum(times))

    def lag(catch_up_frames: int) -> dict:
        """Seconds of microphone pushed but not heard after ``lag_seconds`` of real time (frames arrive when due),
        and the answer's steps per second meanwhile."""
        engine, _answer, listen = prefilled(10**6, catch_up_frames)  # the microphone starts after the prefill
        start, pushed, steps = time.perf_counter(), 0, 0
        while (elapsed := time.perf_counter() - start) < lag_seconds:
            due = int(elapsed * rate) + 1 - pushed
            if due > 0:
                listen.push(random_frames(due))
                pushed += due
            engine.step()
            steps += 1
        return {"lag_s": listen.backlog / rate, "answer_steps_per_s": steps / (time.perf_counter() - start)}

    without = run(0)
    with_row = run(1)
    catching_up = run(LISTEN_CATCH_UP_FRAMES)
    lags = {str(n): lag(n) for n in (1, LISTEN_CATCH_UP_FRAMES)} if lag_seconds else {}
    front_end = model.listen_front_end()
    audio = np.random.default_rng(0).standard_normal(48000 * 4).astype(np.float32) * 0.1
    start = time.perf_counter()
    frames = front_end.frames(audio, 48000).shape[0]
    per_frame = (time.perf_counter() - start) / frames
    return {
        "context": context,
        "listen_input": config.listen_input,
        "listen_adapter": config.listen_adapter if config.listen_input == "features" else None,
        "steps_per_s_without": without,
        "steps_per_s_with_listening_row": with_row,
        "slowdown": without / with_row,
        "catch_up_frames": LISTEN_CATCH_UP_FRAMES,
        "steps_per_s_catching_up": catching_up,
        "frames_heard_per_s_catching_up": catching_up * LISTEN_CATCH_UP_FRAMES,
        "lag_seconds": lag_seconds,
        "lag_by_catch_up_frames": lags,
        "front_end_ms_per_frame": per_frame * 1000,
        "realtime_steps_per_s": rate,
    }


def cost(args) -> dict:
    import torch

    from mini_omni2 import MiniOmni2Config, MiniOmni2ForConditionalGeneration
    from mini_omni2.modeling_mini_omni2 import resolve_dtype
    from mini_omni2.tiny import tiny_config

    results = []
    for listen_input in ("features", "codec"):
        adapter = {"listen_adapter": args.listen_adapter} if listen_input == "features" else {}
        if args.cost_size == "released":  # vision takes no part in a step
            config = MiniOmni2Config(vision_config=None, listen_input=listen_input, **adapter)
        else:
            config = tiny_config(vision=False, listen_input=listen_input, **adapter)
        torch.manual_seed(0)
        model = MiniOmni2ForConditionalGeneration(config).eval()
        device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
        dtype = resolve_dtype(args.dtype, device)
        model.to(device)
        model.model.to(dtype)  # the language model and adapters; the codec stays float32 (as from_pretrained does)
        model.lm_head.to(dtype)
        row = listen_cost(model, context=args.cost_context, steps=args.cost_steps, lag_seconds=args.cost_lag_seconds)
        results.append({**row, "dtype": str(dtype).replace("torch.", "")})
        del model
    return {"size": args.cost_size, "results": results, "engine": "MiniOmni2Engine, one spoken answer (2 rows)"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--model", help="evaluate this saved model (features input) instead of training one")
    parser.add_argument("--save", help="save the model here, with the chosen rule as its config.listen_rule")
    parser.add_argument("--output-dir", default="/tmp/bench_duplex", help="Trainer's output directory")
    parser.add_argument("--train-clips", type=int, default=18000, help="training clips (the recipe: 18,000)")
    parser.add_argument("--test-clips", type=int, default=400)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=LISTEN_BATCH_SIZE,
                        help=f"clips a step (the recipe: {LISTEN_BATCH_SIZE})")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--adapter", type=int, default=256, help="intermediate width of the listening adapter")
    parser.add_argument("--gru-size", type=argument_type(parse_width), default=MiniOmni2Config.listen_gru_size,
                        help="width of the GRU listening adapter (--listen-adapter gru)")
    parser.add_argument("--mel-bins", type=int, default=64, help="log-mel bins of the listening features")
    parser.add_argument("--mask-bands", type=int, default=0, help="mel bands masked per training row (SpecAugment)")
    parser.add_argument("--mask-width", type=int, default=8, help="widest masked band, in mel bins")
    parser.add_argument("--warp", type=float, default=0.0, help="stretch each training row's mel axis by 1 +- warp")
    add_listen_adapter_argument(parser, LISTEN_ADAPTER)
    add_listen_training_arguments(parser)
    parser.add_argument("--teachers", type=argument_type(parse_count), default=0,
                        help="train this many models of the recipe first and distil their average into the scored one")
    parser.add_argument("--teacher-dir", help="save the teachers here and read them back in later runs")
    parser.add_argument("--hard-example-steps", type=argument_type(parse_count), default=0,
                        help="after training, this many steps more with the training clips the row gets wrong "
                             "repeated (the hard-example round, docs/duplex.md; 0: none)")
    parser.add_argument("--hard-example-clips", type=argument_type(parse_width), default=HARD_EXAMPLE_CLIPS,
                        help="training clips the row scores to find them")
    parser.add_argument("--hard-example-repeat", type=argument_type(parse_width), default=HARD_EXAMPLE_REPEAT,
                        help="times each is added")
    parser.add_argument("--val-clips", type=int, default=1000, help="unseen train-split clips to choose the rule on")
    parser.add_argument("--threshold", type=float, help="fix the rule's threshold (default: chosen on validation)")
    parser.add_argument("--min-frames", type=int, help="fix the rule's consecutive irq frames (with --threshold)")
    parser.add_argument("--window", type=int, default=0, help="restart listening rows after this many frames (0: never)")
    parser.add_argument("--refeed", type=int, default=24, help="frames fed again to a restarted row")
    parser.add_argument("--seed", type=int, default=0, help="draws the clips (and, by default, the training)")
    parser.add_argument("--train-seed", type=int,
                        help="the model's start and clip order (and the teachers'), default: --seed; other training "
                             "seeds on the same clips (with --cache, without making them again)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--workers", type=int, default=1, help="processes that make the clips (same clips for any)")
    parser.add_argument("--cache", help="keep the clips' examples in this folder and reuse them in later runs (the "
                                        "same examples as made anew: keyed by everything they depend on)")
    parser.add_argument("--cost", action="store_true", help="measure the listening row's cost instead")
    parser.add_argument("--cost-size", choices=("released", "tiny"), default="released")
    parser.add_argument("--cost-context", type=int, default=256)
    parser.add_argument("--cost-steps", type=int, default=20)
    parser.add_argument("--cost-lag-seconds", type=float, default=10.0,
                        help="--cost: seconds of real-time microphone to measure the listening row's lag on (0: skip)")
    parser.add_argument("--dtype", default="auto", help="--cost: the model's dtype (auto: the hardware's fast one)")
    parser.add_argument("--cpu", action="store_true", help="--cost on the CPU even when a GPU is there")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_listen_training_arguments(parser, args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": machine()}
    if args.cost:
        result["cost"] = cost(args)
        for row in result["cost"]["results"]:
            adapter = f" ({row['listen_adapter']} adapter)" if row["listen_adapter"] else ""
            print(f"{args.cost_size} sizes, listen_input={row['listen_input']}{adapter}: "
                  f"{row['steps_per_s_without']:.1f} steps/s without, "
                  f"{row['steps_per_s_with_listening_row']:.1f} with the listening row (x{row['slowdown']:.2f}), "
                  f"{row['steps_per_s_catching_up']:.1f} with it catching up ({row['catch_up_frames']} frames a step: "
                  f"{row['frames_heard_per_s_catching_up']:.1f} frames/s heard); "
                  + "".join(f"after {row['lag_seconds']:g} s of real-time microphone, reading up to {n} a step: "
                            f"lag {lag['lag_s']:.2f} s, answer at {lag['answer_steps_per_s']:.1f} steps/s; "
                            for n, lag in row["lag_by_catch_up_frames"].items()) +
                  f"front end {row['front_end_ms_per_frame']:.2f} ms/frame; "
                  f"real time needs {row['realtime_steps_per_s']:.1f} steps/s")
    else:
        result["proof"] = proof(args)
        print_proof(result["proof"])
    result["machine"]["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print("machine:", json.dumps(result["machine"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=float)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
