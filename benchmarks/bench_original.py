"""The original release's decoding loop beside this package's, in one run, at the released sizes with random weights.

The original code is not part of this package: pass a checkout of https://github.com/gpt-omni/mini-omni2 with
``--original PATH``. Its LitGPT ``GPT`` is built from the release's ``model_config.yaml`` fields (the same dict the
conversion tests write, ``tests/original_checkpoints.release_yaml``) with random weights, and its batch decoding step
``litgpt.generate.base.next_token_image_batch`` (a spoken answer's speech row and its text twin: 2 rows, sampling
with the release's top_k=1) is timed after a prefill of the same length as ours. Then this package's ``generate``
decodes the same kind of request (1 spoken question, batch parallel) and its decode steps/s are taken without the
streamed audio, as in ``bench_generate.py``. Both use the same dtype and threads. Only ``litgpt.utils`` (which
imports the ``lightning`` training stack) is replaced by a stub holding the one helper the model code needs.

    python benchmarks/bench_original.py --original /path/to/mini-omni2 --dtype float32 --steps 24
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_generate import build, make_inputs, run_generate  # noqa: E402
from original_checkpoints import release_yaml  # noqa: E402

from mini_omni2 import MiniOmni2Config  # noqa: E402
from mini_omni2.modeling_mini_omni2 import resolve_dtype  # noqa: E402


def import_original(path: Path):
    """The original ``GPT``, ``Config`` and decoding step, imported from a checkout (nothing is copied)."""
    utils = types.ModuleType("litgpt.utils")
    utils.find_multiple = lambda n, k: n if n % k == 0 else n + k - (n % k)  # the one helper config.py uses
    sys.modules["litgpt.utils"] = utils
    sys.path.insert(0, str(path))
    from litgpt.config import Config
    from litgpt.generate.base import next_token_image_batch
    from litgpt.model import GPT

    return GPT, Config, next_token_image_batch


def released_fields() -> dict:
    """The release's ``model_config.yaml``: the tests' field list (every field LitGPT writes), at the released sizes
    of this package's default config (SPEC §1)."""
    config = MiniOmni2Config()
    text, layout = config.text_config, config.token_layout
    fields = release_yaml(vision=True)
    fields.update(
        n_embd=text.hidden_size, n_layer=text.num_hidden_layers, n_head=text.num_attention_heads,
        n_query_groups=text.num_key_value_heads, head_size=text.head_dim, intermediate_size=text.intermediate_size,
        padded_vocab_size=layout.total_vocab_size, vocab_size=layout.total_vocab_size,
        text_vocab_size=layout.text_vocab_size, audio_vocab_size=layout.audio_vocab_size,
        cat_audio_vocab_size=layout.num_audio_layers * layout.audio_vocab_size,
        whisper_adapter_dim=config.audio_feature_dim, vision_adapter_dim=config.vision_feature_dim,
        block_size=text.max_position_embeddings,
    )
    return fields


@torch.no_grad()
def original_steps_per_s(path: Path, dtype: torch.dtype, prompt_len: int, steps: int) -> float:
    GPT, Config, next_token_image_batch = import_original(path)
    config = Config(**released_fields())
    torch.manual_seed(0)
    model = GPT(config).to(dtype).eval()
    model.device = torch.device("cpu")  # the release reads it (lightning's Fabric sets it there)
    model.max_seq_length = prompt_len + steps + 8
    model.set_kv_cache(batch_size=2, dtype=dtype)
    layout = MiniOmni2Config().token_layout
    layout_pad = layout.pad_ids().tolist()  # pad_a per layer, pad_t (SPEC §2)
    prompt = [torch.full((2, prompt_len), layout_pad[s], dtype=torch.long) for s in range(8)]
    next_token_image_batch(model, None, None, prompt, None, None, input_pos=torch.arange(prompt_len),
                           temperature=0.9, top_k=1, top_p=1.0)
    ids = [torch.full((2, 1), layout_pad[s], dtype=torch.long) for s in range(8)]
    position = torch.tensor([prompt_len])
    intervals = []
    for _ in range(steps):
        began = time.perf_counter()
        audio, text = next_token_image_batch(model, None, None, ids, None, None, input_pos=position,
                                             temperature=0.9, top_k=1, top_p=1.0)
        ids = [torch.stack([a[0] + layout.audio_offset(i), torch.tensor(layout_pad[i])])[:, None]
               for i, a in enumerate(audio)] + [torch.cat([text, text])[:, None]]
        position = position + 1
        intervals.append(time.perf_counter() - began)
    del model
    return 1.0 / statistics.median(intervals[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, type=Path, help="a checkout of gpt-omni/mini-omni2")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or auto (both models)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--audio-frames", type=int, default=150, help="Whisper frames of the spoken prompt")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, "cpu")
    device = torch.device("cpu")
    load = os.getloadavg()[0]

    model, processor = build(device, dtype)
    inputs = make_inputs(processor, 1, args.audio_frames, device, dtype)
    prompt_len = inputs["input_ids"].shape[-1]
    model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, decode_audio=False)  # warm-up
    ours = run_generate(model, inputs, args.steps, device)["decode_steps_per_s"]
    del model
    original = original_steps_per_s(args.original, dtype, prompt_len, args.steps)
    row = {"dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "prompt_len": prompt_len,
           "original_steps_per_s": original, "package_steps_per_s": ours, "speedup": ours / original,
           "load_before": load, "load_after": os.getloadavg()[0]}
    print(json.dumps(row))
    print(f"| {row['dtype']} | {original:.2f} | {ours:.2f} | {ours / original:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
