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
        "eval": ["datasets>=3.0", "evaluate", "jiwer"],
        "serve": ["fastapi", "uvicorn"],
        "test": ["pytest", "peft>=0.13", "datasets>=3.0", "evaluate", "jiwer"],
    },
    entry_points={"console_scripts": ["mini-omni2=mini_omni2.cli:main"]},
)
