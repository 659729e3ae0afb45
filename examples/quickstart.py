"""Ask Mini-Omni2 a question and stream its spoken answer, from Python.

    python examples/quickstart.py --model ./mini-omni2-hf --audio question.wav --out answer.wav
    python examples/quickstart.py                     # offline: the tiny model with RANDOM weights

The text is printed as it comes and the audio chunks are written to the wav as they come; see docs/generation.md.
"""

from __future__ import annotations

import argparse
from threading import Thread

import numpy as np
import soundfile

import mini_omni2  # noqa: F401  (registers the Auto classes)
from mini_omni2 import MiniOmni2IteratorStreamer


def load(model_id: str):
    if model_id == "tiny-random":
        from mini_omni2.tiny import tiny_model, tiny_processor

        print("tiny-random: RANDOM weights, the answer is noise")
        return tiny_model(), tiny_processor()
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    return AutoModelForMultimodalLM.from_pretrained(model_id).eval(), AutoProcessor.from_pretrained(model_id)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--audio", help="spoken question (wav/flac/...)")
    parser.add_argument("--text", default="What is your name?", help="written question, when no --audio")
    parser.add_argument("--out", default="answer.wav")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    model, processor = load(args.model)
    if args.audio:
        inputs = processor(audio=args.audio, output="speech")
    else:
        inputs = processor(text=args.text, output="speech")
    streamer = MiniOmni2IteratorStreamer(processor, timeout=600)
    worker = Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer, max_new_tokens=args.max_new_tokens))
    worker.start()
    chunks, rate = [], None
    for event in streamer:
        if event.text:
            print(event.text, end="", flush=True)
        if event.audio is not None:
            chunks.append(event.audio.numpy())
            rate = event.sampling_rate
    worker.join()
    print()
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    soundfile.write(args.out, audio, rate or 24000)
    print(f"wrote {args.out}: {len(audio) / (rate or 24000):.2f} s")


if __name__ == "__main__":
    main()
