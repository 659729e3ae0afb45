"""The token layout of Mini-Omni / Mini-Omni2: the one place that knows ids, stream templates and the delay.

Everything else (config, model, processor, generation, collator, conversion) asks a :class:`TokenLayout`
instead of typing numbers. The facts are SPEC.md §2-4, §6-7; the sizes are parameters so that tiny test
models can shrink them while keeping the same rules.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

# Offsets of the specials inside their blocks (SPEC §2). Text specials follow the tokenizer vocabulary,
# audio specials follow the 4096 codec codes of every layer.
TEXT_SPECIAL_OFFSETS = {"eot": 0, "pad_t": 1, "input_t": 2, "answer_t": 3, "asr": 4, "irq": 5, "n_irq": 6}
AUDIO_SPECIAL_OFFSETS = {
    "eoa": 0,
    "pad_a": 1,
    "input_a": 2,
    "answer_a": 3,
    "split": 4,
    "image": 5,
    "eoimage": 6,
}

#: Output kinds of a request: a spoken answer (text + speech), a text answer, or a transcription.
OUTPUT_SPEECH, OUTPUT_TEXT, OUTPUT_ASR = "speech", "text", "asr"
OUTPUTS = (OUTPUT_SPEECH, OUTPUT_TEXT, OUTPUT_ASR)

#: Named tasks: the release's names (SPEC §4) and this package's image extensions, as (inputs, output).
TASKS: dict[str, tuple[frozenset[str], str]] = {
    "A1A2": (frozenset({"audio"}), OUTPUT_SPEECH),
    "A1T2": (frozenset({"audio"}), OUTPUT_TEXT),
    "A1T1": (frozenset({"audio"}), OUTPUT_ASR),
    "ASR": (frozenset({"audio"}), OUTPUT_ASR),
    "T1A2": (frozenset({"text"}), OUTPUT_SPEECH),
    "T1T2": (frozenset({"text"}), OUTPUT_TEXT),
    "VA1A2": (frozenset({"image", "audio"}), OUTPUT_SPEECH),
    "VA1T2": (frozenset({"image", "audio"}), OUTPUT_TEXT),
    # (extension) image alone (captioning) and image + text prompt
    "VA2": (frozenset({"image"}), OUTPUT_SPEECH),
    "VT2": (frozenset({"image"}), OUTPUT_TEXT),
    "VT1A2": (frozenset({"image", "text"}), OUTPUT_SPEECH),
    "VT1T2": (frozenset({"image", "text"}), OUTPUT_TEXT),
}

#: (extension) The listening row of duplex interruption (docs/duplex.md): its task name in training examples, and
#: what its 7 audio streams hear: the codec's tokens of the incoming audio (the paper's way) or audio features
#: placed through the listening adapter (``pad_a`` placeholders on the audio streams, as for Whisper frames).
LISTEN_TASK = "LISTEN"
LISTEN_CODEC, LISTEN_FEATURES = "codec", "features"
LISTEN_INPUTS = (LISTEN_CODEC, LISTEN_FEATURES)

#: SNAC level of each audio layer, in frame order (SPEC §7): level 0 <- L0; level 1 <- L1, L4; level 2 <- L2, L3, L5, L6.
SNAC_LEVEL_OF_LAYER = (0, 1, 2, 2, 1, 2, 2)


def task_name(inputs: Sequence[str] | frozenset[str], output: str) -> str:
    """The task name for a set of input modalities and an output kind; ValueError if it has no layout."""
    key = (frozenset(inputs), output)
    for name, value in TASKS.items():
        if value == key and name != "ASR":
            return name
    raise ValueError(
        f"No layout for inputs {sorted(inputs)} with output {output!r}. Known tasks: "
        + ", ".join(f"{n} ({'+'.join(sorted(i))} -> {o})" for n, (i, o) in TASKS.items())
    )


def check_listen_rule(threshold: float, min_frames: int = 1) -> None:
    """Refuse what cannot be the listening row's decision rule (docs/duplex.md): it commits to ``irq`` when
    P(irq) >= ``threshold`` (in (0, 1)) on ``min_frames`` (an int >= 1) consecutive frames."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}")
    if isinstance(min_frames, bool) or not isinstance(min_frames, numbers.Integral) or min_frames < 1:
        raise ValueError(f"min_frames must be an int >= 1, got {min_frames!r}")


def normalize_listen_rule(rule: dict | None) -> dict | None:
    """``listen_rule`` as stored: ``None``, or ``{"threshold": float, "min_frames": int}`` (``min_frames`` defaults
    to 1); anything else is refused with what was given."""
    if rule is None:
        return None
    if not isinstance(rule, dict) or "threshold" not in rule or set(rule) - {"threshold", "min_frames"}:
        raise ValueError(f'listen_rule must be None or {{"threshold": t, "min_frames": m}}, got {rule!r}')
    threshold, min_frames = rule["threshold"], rule.get("min_frames", 1)
    check_listen_rule(threshold, min_frames)
    return {"threshold": float(threshold), "min_frames": int(min_frames)}


@dataclass
class PromptLayout:
    """The 8 id streams of one prompt and the positions whose audio-stream embeddings take features."""

    streams: list[list[int]]
    audio_positions: list[int] = field(default_factory=list)
    image_positions: list[int] = field(default_factory=list)
    listen_positions: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.streams[0])


@dataclass(frozen=True)
class TokenLayout:
    """Vocabulary, stream and delay rules of the 8-stream model (SPEC §2-4, §6-7)."""

    text_vocab_size: int = 152000
    num_text_special_tokens: int = 64
    audio_codebook_size: int = 4096
    audio_vocab_size: int = 4160
    num_audio_layers: int = 7
    num_image_tokens: int = 50

    def __post_init__(self) -> None:
        if self.audio_vocab_size - self.audio_codebook_size < len(AUDIO_SPECIAL_OFFSETS):
            raise ValueError("audio_vocab_size must leave room for the audio specials after the codebook")
        if self.num_text_special_tokens < len(TEXT_SPECIAL_OFFSETS):
            raise ValueError("num_text_special_tokens must leave room for the text specials")
        if self.num_text_special_tokens >= self.text_vocab_size:
            raise ValueError("text_vocab_size must be larger than num_text_special_tokens")

    @classmethod
    def of(cls, owner: Any) -> "TokenLayout":
        """The layout whose sizes are ``owner``'s attributes of the same names (a config or a processor)."""
        return cls(**{name: getattr(owner, name) for name in asdict(cls())})

    def sizes(self) -> dict[str, int]:
        """The sizes as keyword arguments (for a config or a processor)."""
        return asdict(self)

    # ----- sizes ---------------------------------------------------------------------------------------
    @property
    def total_vocab_size(self) -> int:
        """Rows of the shared embedding table and of the LM head (181,120 for the release)."""
        return self.text_vocab_size + self.audio_vocab_size * self.num_audio_layers

    @property
    def num_streams(self) -> int:
        return self.num_audio_layers + 1

    @property
    def text_stream(self) -> int:
        """Index of the text stream: the last one (7)."""
        return self.num_audio_layers

    @property
    def tokenizer_vocab_size(self) -> int:
        """Ids below this are plain tokenizer ids (151,936 for the release)."""
        return self.text_vocab_size - self.num_text_special_tokens

    # ----- special ids ---------------------------------------------------------------------------------
    def text_special(self, name: str) -> int:
        return self.tokenizer_vocab_size + TEXT_SPECIAL_OFFSETS[name]

    def audio_special(self, name: str) -> int:
        """Local id (0..audio_vocab_size) of an audio special; use :meth:`layershift` for the global id."""
        return self.audio_codebook_size + AUDIO_SPECIAL_OFFSETS[name]

    @property
    def eot(self) -> int:
        return self.text_special("eot")

    @property
    def pad_t(self) -> int:
        return self.text_special("pad_t")

    @property
    def input_t(self) -> int:
        return self.text_special("input_t")

    @property
    def answer_t(self) -> int:
        return self.text_special("answer_t")

    @property
    def asr(self) -> int:
        return self.text_special("asr")

    @property
    def irq(self) -> int:
        """(extension) Listening row state: the user interrupts; stop speaking."""
        return self.text_special("irq")

    @property
    def n_irq(self) -> int:
        """(extension) Listening row state: no interruption; go on speaking."""
        return self.text_special("n_irq")

    @property
    def eoa(self) -> int:
        return self.audio_special("eoa")

    @property
    def pad_a(self) -> int:
        return self.audio_special("pad_a")

    @property
    def input_a(self) -> int:
        return self.audio_special("input_a")

    @property
    def answer_a(self) -> int:
        return self.audio_special("answer_a")

    @property
    def image(self) -> int:
        return self.audio_special("image")

    @property
    def eoimage(self) -> int:
        return self.audio_special("eoimage")

    # ----- id arithmetic -------------------------------------------------------------------------------
    def audio_offset(self, layer: int) -> int:
        """First global id of audio layer ``layer`` (0-based)."""
        if not 0 <= layer < self.num_audio_layers:
            raise ValueError(f"audio layer must be in [0, {self.num_audio_layers}), got {layer}")
        return self.text_vocab_size + self.audio_vocab_size * layer

    def layershift(self, local_id: int, layer: int) -> int:
        """Global id of local audio id ``local_id`` in layer ``layer``: ``c + text_vocab + audio_vocab * i``."""
        return local_id + self.audio_offset(layer)

    def stream_offsets(self, device: torch.device | None = None) -> torch.Tensor:
        """Per-stream offset from local to global ids, shape (8,): audio layers then 0 for the text stream."""
        offsets = [self.audio_offset(i) for i in range(self.num_audio_layers)] + [0]
        return torch.tensor(offsets, dtype=torch.long, device=device)

    def pad_ids(self, device: torch.device | None = None) -> torch.Tensor:
        """Global id each stream is padded with, shape (8,): ``pad_a`` of every audio layer, then ``pad_t``."""
        local = torch.tensor([self.pad_a] * self.num_audio_layers + [self.pad_t], dtype=torch.long, device=device)
        return local + self.stream_offsets(device)

    def is_padding(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(..., 8, seq) ids -> (..., seq) bool: positions whose 8 ids are all padding (``pad_a`` per layer, ``pad_t``).

        No prompt layout starts with such a position (SPEC §4: ``input_a``, ``input_t`` or ``image`` come first), so
        a row that does was left padded; inside a prompt they are the feature positions of an audio segment.
        """
        pad = self.pad_ids(input_ids.device)
        return (input_ids == pad[:, None]).all(dim=-2)

    def stream_vocab_sizes(self) -> list[int]:
        """Number of logit columns each stream samples from: 7 x audio vocab, then the text vocab."""
        return [self.audio_vocab_size] * self.num_audio_layers + [self.text_vocab_size]

    def split_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split head logits (..., total_vocab) into text (..., text_vocab) and audio (..., 7, audio_vocab) views."""
        text = logits[..., : self.text_vocab_size]
        audio = logits[..., self.text_vocab_size : self.total_vocab_size]
        audio = audio.unflatten(-1, (self.num_audio_layers, self.audio_vocab_size))
        return text, audio

    def is_code(self, local_ids: torch.Tensor) -> torch.Tensor:
        """Whether local audio ids are codec codes (not specials)."""
        return (local_ids >= 0) & (local_ids < self.audio_codebook_size)

    # ----- prompt templates (SPEC §4) -------------------------------------------------------------------
    def _audio_fill(self, local_ids: Sequence[int]) -> list[list[int]]:
        return [[self.layershift(c, i) for c in local_ids] for i in range(self.num_audio_layers)]

    def build_prompt(
        self,
        task: str,
        *,
        text_ids: Sequence[int] | None = None,
        num_audio_frames: int | None = None,
    ) -> PromptLayout:
        """The 8 streams of a prompt for ``task`` (a key of :data:`TASKS`), and where features go.

        Segments, in order: image (``image, pad_a x 50, eoimage`` / ``pad_t x 52``), then audio
        (``input_a, pad_a x L, eoa``) or text (``pad_a x (n+2)`` / ``input_t, tokens, eot``), then one answer
        position (``answer_a`` for speech, else ``pad_a``; ``answer_t``, or ``asr`` for transcription).
        After an image the audio segment's text stream is ``pad_t`` and its features start one position
        early, at ``input_a`` (the release's offset, SPEC §4).
        """
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; known tasks: {', '.join(TASKS)}")
        inputs, output = TASKS[task]
        pad_a, pad_t = self.pad_a, self.pad_t
        audio: list[int] = []  # local ids, the same for the 7 audio streams
        text: list[int] = []
        audio_positions: list[int] = []
        image_positions: list[int] = []

        if "image" in inputs:
            start = len(audio)
            audio += [self.image] + [pad_a] * self.num_image_tokens + [self.eoimage]
            text += [pad_t] * (self.num_image_tokens + 2)
            image_positions = list(range(start + 1, start + 1 + self.num_image_tokens))
        if "audio" in inputs:
            if num_audio_frames is None or num_audio_frames < 1:
                raise ValueError(f"task {task} needs num_audio_frames >= 1, got {num_audio_frames}")
            if text_ids:
                raise ValueError(f"task {task} takes no text prompt")
            start = len(audio)
            audio += [self.input_a] + [pad_a] * num_audio_frames + [self.eoa]
            if "image" in inputs:
                text += [pad_t] * (num_audio_frames + 2)
                first = start  # the release puts V+A1 audio features at input_a (SPEC §4)
            else:
                text += [self.input_t] + [pad_t] * num_audio_frames + [self.eot]
                first = start + 1
            audio_positions = list(range(first, first + num_audio_frames))
        elif num_audio_frames is not None:
            raise ValueError(f"task {task} takes no audio")
        if "text" in inputs:
            if text_ids is None or len(text_ids) == 0:
                raise ValueError(f"task {task} needs a non-empty text prompt")
            bad = [t for t in text_ids if not 0 <= t < self.tokenizer_vocab_size]
            if bad:
                raise ValueError(f"text ids must be tokenizer ids in [0, {self.tokenizer_vocab_size}), got {bad[:5]}")
            audio += [pad_a] * (len(text_ids) + 2)
            text += [self.input_t] + list(text_ids) + [self.eot]
        elif text_ids:
            raise ValueError(f"task {task} takes no text prompt")

        audio.append(self.answer_a if output == OUTPUT_SPEECH else pad_a)
        text.append(self.asr if output == OUTPUT_ASR else self.answer_t)
        return PromptLayout(self._audio_fill(audio) + [text], audio_positions, image_positions)

    # ----- the listening row of duplex interruption (extension, docs/duplex.md) ------------------------------
    def build_listen_prompt(self) -> PromptLayout:
        """The listening row's prompt: one position, ``input_a`` on the 7 audio streams over ``n_irq`` (its state)."""
        return PromptLayout(self._audio_fill([self.input_a]) + [[self.n_irq]])

    def listen_step(self, frame: Sequence[int] | torch.Tensor | None = None, state: int | None = None) -> list[int]:
        """The 8 global ids of one listening step: one frame of incoming audio and the row's state.

        Audio stream i holds ``layershift(frame[i], i)`` for codec input (``frame``: the frame's 7 local codes,
        SPEC §7 order) or ``pad_a`` for feature input (``frame=None``: the listening adapter's output replaces the
        7 audio-stream embeddings, as Whisper frames do in a prompt). The text stream carries the row's state,
        ``n_irq`` unless given: the row ends at the first ``irq`` it commits to, so it is fed ``n_irq`` throughout.
        """
        state = self.n_irq if state is None else int(state)
        if state not in (self.irq, self.n_irq):
            raise ValueError(f"the listening row's state must be irq ({self.irq}) or n_irq ({self.n_irq}), got {state}")
        if frame is None:
            local = [self.pad_a] * self.num_audio_layers
        else:
            local = [int(c) for c in (frame.tolist() if isinstance(frame, torch.Tensor) else frame)]
            if len(local) != self.num_audio_layers or not all(0 <= c < self.audio_codebook_size for c in local):
                raise ValueError(
                    f"a listening frame must hold {self.num_audio_layers} codec codes in [0, {self.audio_codebook_size}),"
                    f" got {local}"
                )
        return [self.layershift(c, i) for i, c in enumerate(local)] + [state]

    def build_listen_row(self, num_frames: int | None = None, frames: torch.Tensor | None = None) -> PromptLayout:
        """A whole listening row: the prompt, then one :meth:`listen_step` per frame (all fed ``n_irq``).

        Give ``frames`` (T, 7) of codec codes for codec input, or ``num_frames`` for feature input (the frames' feature
        vectors go to ``listen_positions`` 1..T). The state of frame k is read from the logits at position k + 1.
        """
        if (num_frames is None) == (frames is None):
            raise ValueError("give exactly one of num_frames (feature input) or frames (codec input, shape (T, 7))")
        prompt = self.build_listen_prompt()
        if frames is not None:
            frames = torch.as_tensor(frames, dtype=torch.long)
            if frames.ndim != 2 or frames.shape[1] != self.num_audio_layers:
                raise ValueError(f"frames must have shape (T, {self.num_audio_layers}), got {tuple(frames.shape)}")
            steps = [self.listen_step(frame) for frame in frames]
            positions: list[int] = []
        else:
            if num_frames < 0:
                raise ValueError(f"num_frames must be >= 0, got {num_frames}")
            steps = [self.listen_step(None)] * num_frames
            positions = list(range(len(prompt), len(prompt) + num_frames))
        streams = [row + [step[s] for step in steps] for s, row in enumerate(prompt.streams)]
        return PromptLayout(streams, listen_positions=positions)

    @property
    def listen_states(self) -> tuple[int, int]:
        """The listening row's two states, ``(n_irq, irq)``: the only head columns its decision reads, in the order of
        the state logits that :meth:`irq_probability` takes."""
        return (self.n_irq, self.irq)

    @staticmethod
    def irq_probability(state_logits: torch.Tensor) -> torch.Tensor:
        """P(``irq``) from the two state logits (..., 2) in :attr:`listen_states` order: (...,)."""
        return state_logits.float().softmax(dim=-1)[..., 1]

    def listen_irq_probability(self, text_logits: torch.Tensor) -> torch.Tensor:
        """P(``irq``) from text logits (..., text_vocab), restricted to the two states: (...,)."""
        return self.irq_probability(text_logits[..., list(self.listen_states)])

    def read_listen_state(self, text_logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """The listening row's state from its text logits: ``irq`` where P(irq | irq or n_irq) >= ``threshold``.

        With the default 0.5 this is the argmax over the two states. Returns global ids, shape (...,).
        """
        check_listen_rule(threshold)
        irq = self.listen_irq_probability(text_logits) >= threshold
        return torch.where(irq, self.irq, self.n_irq)

    def text_output_task(self, task: str) -> str:
        """The text-out twin of a speech-out task: the second row of batch parallel decoding (SPEC §6)."""
        inputs, output = TASKS[task]
        if output != OUTPUT_SPEECH:
            raise ValueError(f"task {task} has no speech output")
        return task_name(inputs, OUTPUT_TEXT)

    # ----- answers: the delay pattern (SPEC §6) and back to codec frames (SPEC §7) ----------------------
    def delay_answer(
        self, text_ids: Sequence[int], frames: torch.Tensor | None
    ) -> tuple[list[list[int]], list[list[bool]]]:
        """The streams a model generates for an answer, with which positions carry a training target.

        Speech answer (``frames`` of shape (T, 7) local codes): text stream ``tokens, eot, pad_t...``; audio layer
        i ``pad_a x (i+1), codes, eoa, pad_a...``; length ``max(n+1, T+8)`` (generation stops at layer 7's ``eoa``,
        the last position). Text answer (``frames`` None): text ``tokens, eot``, audio streams ``pad_a`` with no
        target, since generation feeds ``pad_a`` there. Returned ids are global; the flags say what is learned.
        """
        text_ids = list(text_ids)
        if frames is None:
            n = len(text_ids) + 1
            audio_local = [[self.pad_a] * n for _ in range(self.num_audio_layers)]
            audio_learned = [[False] * n for _ in range(self.num_audio_layers)]
            text = text_ids + [self.eot]
            streams = [[self.layershift(c, i) for c in row] for i, row in enumerate(audio_local)] + [text]
            return streams, audio_learned + [[True] * n]
        frames = torch.as_tensor(frames, dtype=torch.long)
        if frames.ndim != 2 or frames.shape[1] != self.num_audio_layers:
            raise ValueError(f"frames must have shape (T, {self.num_audio_layers}), got {tuple(frames.shape)}")
        if not bool(self.is_code(frames).all()):
            raise ValueError(f"frames must hold codec codes in [0, {self.audio_codebook_size})")
        num_frames = frames.shape[0]
        n = max(len(text_ids) + 1, num_frames + self.num_audio_layers + 1)
        text = text_ids + [self.eot] + [self.pad_t] * (n - len(text_ids) - 1)
        streams = []
        for i in range(self.num_audio_layers):
            row = [self.pad_a] * (i + 1) + frames[:, i].tolist() + [self.eoa]
            row += [self.pad_a] * (n - len(row))
            streams.append([self.layershift(c, i) for c in row[:n]])
        return streams + [text], [[True] * n for _ in range(self.num_streams)]

    def undelay(self, audio_tokens: torch.Tensor) -> torch.Tensor:
        """Generated local audio ids (7, N) -> codec frames (T, 7): drop layer i's first i+1, cut to the shortest."""
        if audio_tokens.ndim != 2 or audio_tokens.shape[0] != self.num_audio_layers:
            raise ValueError(f"audio tokens must have shape ({self.num_audio_layers}, N), got {tuple(audio_tokens.shape)}")
        num_frames = max(audio_tokens.shape[1] - self.num_audio_layers, 0)
        rows = [audio_tokens[i, i + 1 : i + 1 + num_frames] for i in range(self.num_audio_layers)]
        return torch.stack(rows, dim=1)

    def frames_to_snac(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """Frames (..., T, 7) -> the 3 SNAC levels (..., T), (..., 2T), (..., 4T) in time order (SPEC §7)."""
        if frames.shape[-1] != self.num_audio_layers or self.num_audio_layers != len(SNAC_LEVEL_OF_LAYER):
            raise ValueError("frames_to_snac needs the 7-layer SNAC layout")
        level0 = frames[..., 0]
        level1 = frames[..., [1, 4]].flatten(-2)
        level2 = frames[..., [2, 3, 5, 6]].flatten(-2)
        return [level0, level1, level2]

    def snac_to_frames(self, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        """The 3 SNAC levels (..., T), (..., 2T), (..., 4T) -> frames (..., T, 7); inverse of :meth:`frames_to_snac`."""
        level0, level1, level2 = codes
        num_frames = level0.shape[-1]
        if level1.shape[-1] != 2 * num_frames or level2.shape[-1] != 4 * num_frames:
            raise ValueError("SNAC levels must have lengths T, 2T and 4T")
        l1 = level1.unflatten(-1, (num_frames, 2))
        l2 = level2.unflatten(-1, (num_frames, 4))
        return torch.stack(
            [level0, l1[..., 0], l2[..., 0], l2[..., 1], l1[..., 1], l2[..., 2], l2[..., 3]], dim=-1
        )

    def sanitize_frames(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Make frames decodable: a non-code id takes its layer's previous code (0 at the start).

        A model may emit a special (e.g. an early ``eoa`` of an inner layer) where a code is expected. Dropping the
        frame would shift timing, so the frame is kept with the previous code of that layer. Returns the frames
        and a bool mask of the ids that were replaced.
        """
        replaced = ~self.is_code(frames)
        if not bool(replaced.any()):
            return frames, replaced
        fixed = frames.clone()
        for k in range(frames.shape[-2]):
            prev = fixed[..., k - 1, :] if k > 0 else torch.zeros_like(fixed[..., 0, :])
            fixed[..., k, :] = torch.where(replaced[..., k, :], prev, fixed[..., k, :])
        return fixed, replaced
