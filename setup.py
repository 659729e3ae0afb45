from setuptools import find_packages, setup

setup(
    name="mini-omni2",
    version="0.1.0",
    description="Mini-Omni2 and Mini-Omni as transformers-native models: hear, see, read; answer in text and streaming speech.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["mini_omni2", "mini_omni2.*"]),
    package_data={"mini_omni2.serving": ["static/*.html", "static/*.js"]},  # the voice page
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
        # the server: FastAPI + uvicorn (websockets for /v1/realtime, python-multipart for transcription uploads),
        # silero-vad (turn detection; plain silero-vad needs only torch), soxr (resampling)
        "serve": ["fastapi", "uvicorn", "websockets>=13,<16", "python-multipart", "silero-vad>=5", "soxr"],
        # int8 weight-only layers (MiniOmni2ForConditionalGeneration.quantize_int8)
        "int8": ["torchao"],
        # decoding datasets Audio columns: torchcodec's PyPI wheels need a CUDA torch and FFmpeg (docs/inputs.md)
        "audio": ["datasets>=3.0", "torchcodec"],
        # the serving tests drive the server with the official openai SDK (its realtime client needs websockets)
        # and the voice page with selenium + the system's chromium / chromedriver (installed by scripts/install.sh test)
        # (wordfreq: the duplex clips' common words, make_clip(common_word_fraction=...))
        "test": ["pytest", "hypothesis", "peft>=0.13", "datasets>=3.0", "evaluate", "jiwer", "fastapi", "uvicorn",
                 "websockets>=13,<16", "python-multipart", "silero-vad>=5", "soxr", "openai>=2", "selenium>=4.11",
                 "torchao", "wordfreq"],
    },
    entry_points={"console_scripts": ["mini-omni2=mini_omni2.cli:main"]},
)
