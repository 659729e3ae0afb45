"""Convert the original Mini-Omni / Mini-Omni2 releases into Hub-ready transformers folders (issue 4).

``mini-omni2 convert --source gpt-omni/mini-omni2 --output ./mini-omni2-hf`` reads the release files (SPEC §8):
``lit_model.pth`` + ``model_config.yaml`` (LitGPT), ``small.pt`` (openai-whisper), ``ViT-B-32.pt`` (OpenAI CLIP,
Mini-Omni2 only), the Qwen2 tokenizer files and the SNAC 24 kHz codec (its own repo), maps every tensor onto
:class:`~mini_omni2.MiniOmni2ForConditionalGeneration` and writes sharded safetensors, ``config.json`` with
``auto_map`` and the code files, ``generation_config.json`` with the release's sampling, the processor and tokenizer,
and (through ``save_pretrained``) the model card, the pipeline and the Inference Endpoints handler. The mapping is strict: any missing, unused or mis-shaped tensor ends in one
:class:`~mini_omni2.conversion.mapping.ConversionError` that lists them all. See ``docs/conversion.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..modeling_mini_omni2 import DTYPES
from .mapping import (
    CLIP,
    LIT,
    SNAC,
    WHISPER,
    ConversionError,
    ConversionReport,
    build_config,
    clip_config,
    litgpt_config,
    map_state_dicts,
    snac_config,
    whisper_config,
)

logger = logging.getLogger(__name__)

DEFAULT_SNAC = "hubertsiuzdak/snac_24khz"
DEFAULT_MAX_SHARD_SIZE = "2GB"

#: The release's files (SPEC §8); ``ViT-B-32.pt`` is needed only when the checkpoint has a vision adapter.
RELEASE_FILES = ["lit_model.pth", "model_config.yaml", "small.pt", "tokenizer.json", "tokenizer_config.json"]
VISION_FILE = "ViT-B-32.pt"
SNAC_FILES = ["config.json", "pytorch_model.bin"]

#: Sampling of the release's inference code (SPEC §6): temperature 0.9, top_k 1 (effectively greedy), top_p 1.0.
RELEASE_SAMPLING = dict(do_sample=True, temperature=0.9, top_k=1, top_p=1.0)

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------------------
def resolve_source(source: str | os.PathLike, allow_patterns: list[str]) -> Path:
    """A local folder as is; an ``owner/name`` that is not a local path is downloaded with ``snapshot_download``."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or not HUB_ID.match(text):
        raise ConversionError([f"source {text!r} is neither a folder nor a Hub repo id (owner/name)"])
    from huggingface_hub import snapshot_download

    logger.info("downloading %s from the Hub", text)
    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=allow_patterns))
    except (OSError, ValueError) as error:  # offline, unknown repo, no access (huggingface_hub's errors)
        raise ConversionError([f"cannot download {text!r} from the Hub: {type(error).__name__}: {error}"]) from None


def _unreadable(path: Path, error: BaseException, expected: str) -> ConversionError:
    """The one error for a release file that cannot be read: its path, what went wrong, what was expected."""
    size = path.stat().st_size if path.is_file() else 0
    what = "is empty" if size == 0 else f"cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    return ConversionError([f"{path} {what}; expected {expected}"], header="A release file is corrupted or foreign")


def _torch_load(path: Path, expected: str = "a PyTorch checkpoint (torch.save)") -> Any:
    """``torch.load`` of plain tensors only; memory-mapped where the file format allows it (zip archives). Empty,
    truncated, corrupted or foreign files (a pickle of anything but tensors, text ...) end in a ConversionError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # torch.load raises whatever its unpickler meets: EOFError, UnpicklingError ...
        raise _unreadable(path, error, expected) from error


def _tensor_dict(value: Any, path: Path, expected: str) -> dict[str, torch.Tensor]:
    """A loaded state dict, checked to be a flat mapping of names to tensors."""
    if not isinstance(value, dict):
        raise ConversionError([f"{path}: expected {expected}, found a {type(value).__name__}"],
                              header="A release file is foreign")
    foreign = [f"{k!r} ({type(v).__name__})" for k, v in value.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if foreign:
        raise ConversionError(
            [f"{path}: expected {expected}, but these entries are not tensors: {', '.join(foreign[:5])}"],
            header="A release file is foreign",
        )
    return dict(value)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder and ``constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise _unreadable(path, error, "the OpenAI CLIP TorchScript archive") from error
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_clip_state(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The state dict of an OpenAI CLIP file (TorchScript archive or plain state dict) and, when the archive keeps
    it, the number of attention heads of its visual tower."""
    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch.jit is deprecated, but it is the release's format
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                module = torch.jit.load(str(path), map_location="cpu")
            except Exception as error:  # a damaged archive: RuntimeError from the TorchScript reader, or worse
                raise _unreadable(path, error, "the OpenAI CLIP TorchScript archive") from error
        state = {k: v.detach() for k, v in module.state_dict().items()}
        try:
            heads = int(getattr(module.visual.transformer.resblocks, "0").attn.num_heads)
        except Exception:  # traced archives (OpenAI's) do not keep plain attributes
            heads = None
        return state, heads
    expected = "an OpenAI CLIP TorchScript archive or its state dict"
    state = _torch_load(path, expected)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return _tensor_dict(state, path, expected), None


def load_whisper(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    expected = "an openai-whisper checkpoint (a dict with 'dims' and 'model_state_dict')"
    checkpoint = _torch_load(path, expected)
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        found = sorted(map(str, checkpoint))[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConversionError([f"{path}: not {expected}; found {found}"], header="A release file is foreign")
    if not isinstance(checkpoint["dims"], dict):
        raise ConversionError([f"{path}: 'dims' must be a dict of sizes, found {type(checkpoint['dims']).__name__}"])
    return dict(checkpoint["dims"]), _tensor_dict(checkpoint["model_state_dict"], path, expected)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise _unreadable(path, error, "the LitGPT model_config.yaml (a YAML mapping)") from error
    if not isinstance(raw, dict):
        raise ConversionError([f"{path} is empty or not a mapping; expected the LitGPT model_config.yaml"])
    return raw


def _read_json(path: Path, expected: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _unreadable(path, error, expected) from error
    if not isinstance(raw, dict):
        raise ConversionError([f"{path} is not a JSON object; expected {expected}"])
    return raw


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


# ----------------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------------
def _progress(enabled: bool, desc: str) -> Callable[[Iterable], Iterable]:
    def wrap(iterable: Iterable) -> Iterable:
        if not enabled:
            return iterable
        from tqdm.auto import tqdm

        items = list(iterable)
        return tqdm(items, desc=desc, total=len(items), unit="part")

    return wrap


def load_sources(
    source: str | os.PathLike, snac: str | os.PathLike | None = None, progress: bool = True
) -> dict[str, Any]:
    """Read every release file. Returns a dict with the raw configs and state dicts (and the folders used)."""
    folder = resolve_source(source, RELEASE_FILES + [VISION_FILE])
    snac_folder = resolve_source(snac or DEFAULT_SNAC, SNAC_FILES)
    missing = [f"{folder}: missing {name}" for name in RELEASE_FILES if not (folder / name).is_file()]
    missing += [f"{snac_folder}: missing {name}" for name in SNAC_FILES if not (snac_folder / name).is_file()]
    if missing:
        raise ConversionError(missing, header="The release files are incomplete")

    steps = ["model_config.yaml", LIT, WHISPER, SNAC, CLIP]
    loaded: dict[str, Any] = {"folder": folder, "snac_folder": snac_folder}
    for step in _progress(progress, "reading the release")(steps):
        if step == "model_config.yaml":
            loaded["lit_raw"] = _read_yaml(folder / "model_config.yaml")
        elif step == LIT:
            expected = "the LitGPT state dict of Mini-Omni (names -> tensors)"
            state = _torch_load(folder / "lit_model.pth", expected)
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]  # LitGPT training checkpoints nest the weights under "model"
            loaded["lit_state"] = _tensor_dict(state, folder / "lit_model.pth", expected)
        elif step == WHISPER:
            loaded["whisper_dims"], loaded["whisper_state"] = load_whisper(folder / "small.pt")
        elif step == SNAC:
            loaded["snac_raw"] = _read_json(snac_folder / "config.json", "the SNAC config.json")
            expected = "the SNAC state dict (names -> tensors)"
            state = _torch_load(snac_folder / "pytorch_model.bin", expected)
            loaded["snac_state"] = _tensor_dict(state, snac_folder / "pytorch_model.bin", expected)
        elif step == CLIP:
            has_vision = any(k.startswith("vision_adapter.") for k in loaded["lit_state"])
            loaded["has_vision"] = has_vision
            loaded["clip_state"], loaded["clip_heads"] = None, None
            if has_vision:
                if not (folder / VISION_FILE).is_file():
                    raise ConversionError(
                        [f"{folder}: missing {VISION_FILE} (the checkpoint has vision_adapter.* weights: Mini-Omni2)"],
                        header="The release files are incomplete",
                    )
                loaded["clip_state"], loaded["clip_heads"] = load_clip_state(folder / VISION_FILE)
    return loaded


def convert_state(loaded: dict[str, Any], progress: bool = True):
    """Config, target state dict and report from :func:`load_sources`'s output; raises :class:`ConversionError`."""
    problems: list[str] = []
    report = ConversionReport()
    lit = litgpt_config(loaded["lit_raw"], problems, report.notes)
    whisper = whisper_config(loaded["whisper_dims"], problems)
    clip = clip_config(loaded["clip_state"], problems, loaded["clip_heads"]) if loaded["has_vision"] else None
    codec = snac_config(loaded["snac_raw"], problems)
    config = build_config(lit, whisper, clip, codec, problems)
    if problems or config is None:
        raise ConversionError(problems or ["no config could be built"], header="The release's configs cannot be converted")

    try:
        model = build_empty_model(config)
    except (ValueError, TypeError, RuntimeError, AssertionError) as error:  # sizes the modules cannot be built with
        raise ConversionError([f"{type(error).__name__}: {error}"], header="The release's sizes do not build a model") from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    target, mapped = map_state_dicts(
        loaded["lit_state"],
        lit,
        loaded["whisper_state"],
        loaded["clip_state"],
        loaded["snac_state"],
        expected,
        config,
        progress=_progress(progress, "mapping tensors"),
    )
    mapped.notes = report.notes + mapped.notes
    if not loaded["has_vision"]:
        mapped.notes.append("no vision_adapter.* weights: converted as Mini-Omni (no vision encoder)")
    return model, target, mapped


def build_empty_model(config):
    """The model with uninitialised weights (every tensor is overwritten by the conversion)."""
    from transformers.initialization import no_init_weights

    from ..modeling_mini_omni2 import MiniOmni2ForConditionalGeneration

    with no_init_weights():
        model = MiniOmni2ForConditionalGeneration(config)
    return model.eval()


def _load_into(model, target: dict[str, torch.Tensor], progress: bool) -> None:
    params = dict(model.state_dict())
    with torch.no_grad():
        for name in _progress(progress, "copying weights")(sorted(target)):
            params[name].copy_(target[name].to(params[name].dtype))


def _release_generation_config():
    """The release's sampling (SPEC §6), as generate (issue 3) defines it when available."""
    try:
        from ..generation_mini_omni2 import release_generation_config
    except ImportError:
        from transformers import GenerationConfig

        return GenerationConfig(**RELEASE_SAMPLING)
    return release_generation_config()


def card_arguments(source: str | os.PathLike, config) -> dict[str, str]:
    """The model card's ``base_model`` and origin sentence for a conversion of ``source``."""
    from ..hub_mini_omni2 import RELEASES

    text = str(source)
    base_model = text if HUB_ID.match(text) and not Path(text).exists() else RELEASES[bool(config.has_vision)]
    origin = (
        f"This is the original release [`{base_model}`](https://huggingface.co/{base_model}) converted with "
        "`mini-omni2 convert` into a transformers model. Every tensor of the release is used, except the Whisper "
        "text decoder and the CLIP text tower, which the model never runs. The SNAC 24 kHz codec is included, so the "
        "model speaks on its own."
    )
    return {"base_model": base_model, "origin": origin}


#: Weight files a conversion writes (``save_pretrained``): removed from the output folder before writing, so that an
#: older conversion's shards or index cannot be left behind and be taken for the new one.
WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                "pytorch_model.bin.index.json")


def check_output_folder(output: Path, source: str | os.PathLike) -> None:
    """Refuse, before any work, an output that cannot be written: a file, an unwritable folder, the source itself."""
    existing = output
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if output.exists() and not output.is_dir():
        raise ConversionError([f"output {output} exists and is not a folder"], header="Cannot write the output")
    if not existing.is_dir():
        raise ConversionError([f"output {output}: {existing} is not a folder"], header="Cannot write the output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConversionError([f"output {output}: {existing} is not writable"], header="Cannot write the output")
    source_path = Path(source).expanduser()
    if source_path.is_dir() and output.exists() and output.resolve() == source_path.resolve():
        raise ConversionError([f"output {output} is the release folder itself; write the conversion elsewhere"],
                              header="Cannot write the output")


def remove_stale_weights(output: Path) -> list[str]:
    """Delete the weight files of an earlier conversion in ``output`` (:data:`WEIGHT_FILES`); returns their names."""
    removed = sorted({path.name for pattern in WEIGHT_FILES for path in output.glob(pattern) if path.is_file()})
    for name in removed:
        (output / name).unlink()
    if removed:
        logger.info("removed the weights of an earlier conversion in %s: %s", output, ", ".join(removed))
    return removed


def _written_weights(output: Path, problems: list[str]) -> set[str]:
    """The tensor names really in the folder's safetensors files, checked against the index (if any) file by file."""
    from safetensors import safe_open

    files = sorted(path.name for path in output.glob("model*.safetensors"))
    held: dict[str, set[str]] = {}
    for name in files:
        with safe_open(str(output / name), "pt") as handle:
            held[name] = set(handle.keys())
    index = output / "model.safetensors.index.json"
    if not index.is_file():
        if files != ["model.safetensors"]:
            problems.append(f"expected model.safetensors alone (no index), found {files}")
        return set().union(*held.values()) if held else set()
    weight_map = json.loads(index.read_text())["weight_map"]
    named = set(weight_map.values())
    for name in sorted(named - set(files)):
        problems.append(f"model.safetensors.index.json names {name}, which is not in the folder")
    for name in sorted(set(files) - named):
        problems.append(f"{name} is in the folder but not in model.safetensors.index.json (a stale shard)")
    for tensor, name in sorted(weight_map.items()):
        if name in held and tensor not in held[name]:
            problems.append(f"model.safetensors.index.json puts {tensor!r} in {name}, which does not hold it")
    return {tensor for name in named & set(files) for tensor in held[name]}


def _verify_folder(output: Path, expected_names: set[str]) -> None:
    """Check what a Hub user needs: auto_map + code files, processor auto_map, and the weights really written."""
    problems = []
    config = json.loads((output / "config.json").read_text())
    auto_map = config.get("auto_map", {})
    for auto in ("AutoConfig", "AutoModelForMultimodalLM"):
        if auto not in auto_map:
            problems.append(f"config.json: auto_map lacks {auto}")
    processor_path = output / "processor_config.json"
    processor_map = json.loads(processor_path.read_text()).get("auto_map", {}) if processor_path.is_file() else {}
    if "AutoProcessor" not in processor_map:
        problems.append("processor_config.json: auto_map lacks AutoProcessor")
    for reference in list(auto_map.values()) + list(processor_map.values()):
        for ref in reference if isinstance(reference, list) else [reference]:
            if ref and not (output / (ref.split(".")[0] + ".py")).is_file():
                problems.append(f"auto_map names {ref} but its code file is not in the folder")
    names = _written_weights(output, problems)
    if names != expected_names:
        problems.append(
            f"the written weights differ from the model's: missing {sorted(expected_names - names)[:5]}, "
            f"extra {sorted(names - expected_names)[:5]}"
        )
    if problems:
        raise ConversionError(problems, header=f"The written folder {output} is not Hub-ready")


def _shard_size(value: str | int) -> str | int:
    """``max_shard_size`` as ``save_pretrained`` takes it ('2GB' or bytes), checked before any work."""
    from transformers.utils.hub import convert_file_size_to_int

    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    try:
        size = convert_file_size_to_int(value)
    except (ValueError, TypeError, AttributeError):
        size = None
    if isinstance(value, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"max_shard_size must be a size like '2GB' or a positive number of bytes, got {value!r}")
    return value


def convert_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    snac: str | os.PathLike | None = None,
    dtype: str = "float32",
    push_to_hub: str | None = None,
    *,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
    private: bool | None = None,
    eval_results: Any = None,
) -> Path:
    """Convert an original Mini-Omni / Mini-Omni2 release into a Hub-ready folder; returns the folder.

    Args:
        source: a release folder or its Hub id (``gpt-omni/mini-omni2``, ``gpt-omni/mini-omni``).
        output: the folder to write (created; existing files of the same names are replaced, and the weight files of
            an earlier conversion are removed first). It is checked before anything is read.
        snac: the SNAC folder or Hub id (default ``hubertsiuzdak/snac_24khz``).
        dtype: ``float32`` (exact), ``bfloat16`` or ``float16`` for everything but the codec, which stays float32.
        push_to_hub: a repo id to upload the folder to (created if needed).
        max_shard_size: safetensors shard size for ``save_pretrained``.
        progress: show tqdm progress bars.
        private: visibility of a repo created by ``push_to_hub``.
        eval_results: ``mini-omni2 eval`` results (dicts or JSON paths) for the model card's evaluation section.

    Raises:
        ConversionError: (a ``ValueError``) listing every problem found, if the release cannot be converted exactly.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    max_shard_size = _shard_size(max_shard_size)
    from .. import register
    from ..processing_mini_omni2 import MiniOmni2Processor

    register()
    output = Path(output).expanduser()
    check_output_folder(output, source)
    loaded = load_sources(source, snac, progress=progress)
    model, target, report = convert_state(loaded, progress=progress)
    _load_into(model, target, progress)
    expected_names = set(target)
    del target, loaded["lit_state"], loaded["whisper_state"], loaded["snac_state"], loaded["clip_state"]

    torch_dtype = DTYPES[dtype]
    if torch_dtype != torch.float32:
        model.to(torch_dtype)
        if model.codec is not None:
            model.codec.float()  # the codec is kept in float32 (``_keep_in_fp32_modules_strict``)
    model.config.dtype = torch_dtype
    model.generation_config = _release_generation_config()

    tokenizer = load_tokenizer(loaded["folder"])
    image_processor = None
    if model.config.has_vision:
        from transformers import CLIPImageProcessorPil

        size = model.config.vision_config.image_size
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = MiniOmni2Processor.from_config(model.config, tokenizer=tokenizer, image_processor=image_processor)

    output.mkdir(parents=True, exist_ok=True)
    remove_stale_weights(output)
    if progress:
        logger.info("writing %s", output)
    # the model card, the pipeline and the endpoint handler are written by save_pretrained (hub_mini_omni2)
    model.save_pretrained(str(output), max_shard_size=max_shard_size, repo_id=push_to_hub,
                          eval_results=eval_results, **card_arguments(source, model.config))
    processor.save_pretrained(str(output))
    _verify_folder(output, expected_names)
    logger.info("converted %s -> %s\n%s", source, output, report.summary())
    if progress:
        print(report.summary())

    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, exist_ok=True, private=private)
        api.upload_folder(folder_path=str(output), repo_id=push_to_hub, commit_message="Convert with mini-omni2 convert")
    return output


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = "Convert an original Mini-Omni / Mini-Omni2 release into a Hub-ready transformers folder."
    parser.add_argument("--source", required=True, help="release folder or Hub id (gpt-omni/mini-omni2, gpt-omni/mini-omni)")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--snac", default=None, help=f"SNAC folder or Hub id (default {DEFAULT_SNAC})")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights dtype (codec stays float32)")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="safetensors shard size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--eval-results", nargs="+", default=None, metavar="JSON",
                        help="results of `mini-omni2 eval` to put in the model card (model-index)")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    try:
        path = convert_checkpoint(
            args.source,
            args.output,
            snac=args.snac,
            dtype=args.dtype,
            push_to_hub=args.push_to_hub,
            max_shard_size=args.max_shard_size,
            progress=not args.no_progress,
            private=args.private or None,
            eval_results=args.eval_results,
        )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


__all__ = ["ConversionError", "convert_checkpoint", "add_convert_arguments", "run_convert", "DEFAULT_SNAC"]
