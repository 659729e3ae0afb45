from setuptools import find_packages, setup

setup(
    name="mini-omni2",
    version="0.1.0",
    description="Mini-Omni2 and Mini-Omni as transformers-native models: hear, see, read; answer in text and streaming speech.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["mini_omni2", "mini_omni2.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "safetensors",
        "huggingface_hub",
        "snac>=1.2",
        "soundfile",
        "librosa",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "train": ["peft>=0.13", "datasets>=3.0", "evaluate", "jiwer"],
        "serve": ["fastapi", "uvicorn"],
        # decoding datasets Audio columns: torchcodec's PyPI wheels need a CUDA torch and FFmpeg (docs/inputs.md)
        "audio": ["datasets>=3.0", "torchcodec"],
        "test": ["pytest", "hypothesis", "peft>=0.13", "datasets>=3.0", "evaluate", "jiwer"],
    },
    # the model cards that `mini-omni2 convert` writes, for non-editable installs
    data_files=[
        ("share/mini_omni2/model_cards/mini-omni2", ["model_cards/mini-omni2/README.md"]),
        ("share/mini_omni2/model_cards/mini-omni", ["model_cards/mini-omni/README.md"]),
    ],
    entry_points={"console_scripts": ["mini-omni2=mini_omni2.cli:main"]},
)
