"""A saved folder loads with ``trust_remote_code=True`` alone, in a process that cannot import mini_omni2."""

import json
import subprocess
import sys
import textwrap

import torch

from conftest import sine

BLOCKED_LOADER = textwrap.dedent(
    """
    import sys, json
    class BlockMiniOmni2:
        def find_spec(self, name, path=None, target=None):
            if name == "mini_omni2" or name.startswith("mini_omni2."):
                raise ImportError("mini_omni2 is not installed here")
    sys.meta_path.insert(0, BlockMiniOmni2())
    try:
        import mini_omni2
        raise SystemExit("mini_omni2 was importable")
    except ImportError:
        pass
    import numpy as np, torch
    from transformers import AutoConfig, AutoModel, AutoModelForMultimodalLM, AutoProcessor
    folder = sys.argv[1]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForMultimodalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    t = np.arange(4800) / 16000
    batch = processor(audio=(0.3 * np.sin(2 * np.pi * 220 * t).astype("float32"), 16000), output="text")
    batch.pop("request_index")
    with torch.no_grad():
        logits = model(**batch).logits
    print(json.dumps({
        "config": type(config).__module__, "model": type(model).__module__, "base": type(base).__name__,
        "processor": type(processor).__module__, "last_logits": logits[0, -1, :8].tolist(),
    }))
    """
)


def test_saved_folder_loads_without_the_package(model, processor, tmp_path):
    folder = tmp_path / "tiny-mini-omni2"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_mini_omni2.MiniOmni2Config",
        "AutoModel": "modeling_mini_omni2.MiniOmni2Model",
        "AutoModelForMultimodalLM": "modeling_mini_omni2.MiniOmni2ForConditionalGeneration",
    }
    for name in ("configuration_mini_omni2.py", "modeling_mini_omni2.py", "processing_mini_omni2.py", "token_layout.py"):
        assert (folder / name).exists()

    script = tmp_path / "load.py"
    script.write_text(BLOCKED_LOADER)
    result = subprocess.run(
        [sys.executable, str(script), str(folder)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model"].startswith("transformers_modules")
    assert report["processor"].startswith("transformers_modules")
    assert report["base"] == "MiniOmni2Model"

    batch = processor(audio=(sine(0.3), 16000), output="text")
    batch.pop("request_index")
    with torch.no_grad():
        expected = model(**batch).logits[0, -1, :8]
    assert torch.allclose(torch.tensor(report["last_logits"]), expected, atol=1e-5)
