"""Synthetic data for duplex interruption (Mini-Omni2 §4.3; docs/duplex.md): "stop omni" spoken over backgrounds.

A clip is a background (speech of espeak-ng voices, and on request flite's, at random speeds and pitches saying random
sentences, on request with made-up words among them, or noise/music-like signals: white, pink, brown noise, tones,
chords, babble; on request hum, sweeps, clatter, and mixtures of two kinds), into which a spoken "stop omni" in a
random voice is mixed at a random level, followed by a 0-10 s tail of background. Its listening frames are labelled
``n_irq`` before the tail and ``irq`` from the frame in which the command ends (:func:`frame_labels`). Negatives have
no command, or a near miss ("stop", "omni", "stop on me", "top omni"; on request, a sound-alike of the command: one or
two of its phonemes changed) in its place; on request, background talkers say sound-alikes among their words.

Clips are made at 16 kHz (a microphone's rate); the model hears them through the listening front end
(:class:`~mini_omni2.duplex_mini_omni2.MiniOmni2ListenFrontEnd`), which resamples them exactly as it does a live
stream. Everything is deterministic given ``(seed, split, index)``. Splits: ``"train"``, and ``"test"`` whose voices
(espeak-ng accents *and* variants), background words and two noise kinds (pink noise, chords) never occur in
``"train"``.

``datasets.Dataset.from_generator(duplex_generator, gen_kwargs=dict(split="train", num_examples=1000, seed=0))``
builds a dataset; :class:`DuplexPreprocessor` maps it to listening inputs and frame labels for the collator.
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import subprocess
import tempfile
import zlib
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np

from ..token_layout import LISTEN_FEATURES, LISTEN_TASK

#: Rate of the synthetic clips (a microphone's); the front end resamples them to the codec's rate.
CLIP_SAMPLING_RATE = 16000
COMMAND_TEXTS = ("stop omni", "Stop Omni.", "stop, omni!", "Stop omni!")
NEAR_MISSES = ("stop", "omni", "stop on me", "top omni")
SPLITS = ("train", "test")

#: espeak-ng English accents (``espeak-ng --voices=en``) and voice variants (``espeak-ng --voices=variant``), split so
#: that a test voice has both an accent and a variant never used in training.
ACCENTS = {
    "train": ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan"),
    "test": ("en-029", "en-gb-x-gbcwmd"),
}
#: espeak-ng voices of other languages that read the English words with their own letter-to-sound rules and phonemes:
#: foreign accents, which the train split adds to its own when asked (``make_clip(foreign_accents=True)``). The
#: test split's accents are English ones training never hears; these widen what training hears, never the test.
FOREIGN_ACCENTS = ("de", "nl", "it", "es", "pl", "cs", "fi", "cy")
VARIANTS = {
    "train": (
        "m1", "m2", "m3", "m4", "m5", "m6", "m8", "f1", "f2", "f3", "f5", "croak", "klatt", "klatt2", "klatt4",
        "klatt5", "klatt6", "adam", "Alex", "Alicia", "Andrea", "antonio", "benjamin", "boris", "caleb", "david",
        "Denis", "Diogo", "ed", "edward2", "Gene", "Gene2", "grandma", "grandpa", "gustave", "Henrique", "Hugo",
        "iven", "iven3", "iven4", "Jacky", "john", "kaukovalta", "Lee", "marcelo", "Marco", "Mario", "Michael",
        "michel", "miguel", "Mike", "Nguyen", "pablo", "paul", "pedro", "quincy", "rob", "sandro", "shelby", "steph",
        "steph3", "victor", "zac",
    ),
    "test": (
        "m7", "f4", "klatt3", "Andy", "Annie", "aunty", "belinda", "edward", "iven2", "linda", "max", "norbert",
        "robert", "steph2", "travis",
    ),
}
#: Made-up voice variants per split (:func:`random_variant`): espeak-ng offers a few dozen hand-made variants, too few
#: for a listener to learn the command rather than the voices; the train split adds this many random ones (formants,
#: pitch, voice quality). The test split has none: its voices are all hand-made variants training never hears.
RANDOM_VARIANTS = {"train": 150, "test": 0}
RANDOM_VARIANT_PREFIX = "mo2rnd"
#: Voices of a second synthesiser, flite (``apt-get install flite``): diphone (kal, kal16) and clustergen (awb, rms,
#: slt) voices built from recordings of real speakers, a timbre espeak-ng's formant synthesis never has. The value is
#: each voice's median F0 in Hz (librosa's pyin over a sentence at flite's defaults), so that a pool's pitch draw moves
#: a flite voice around its own pitch (rms ignores pitch settings). Flite voices are named ``"flite:NAME"``.
FLITE_VOICES = {"kal": 91.0, "kal16": 94.0, "awb": 121.0, "rms": 100.0, "slt": 172.0}
FLITE_PREFIX = "flite:"
#: Fraction of a split's pool utterances (background sentences and phrases) said by a flite voice rather than an
#: espeak-ng one. 0 (the recipe) draws nothing, so the clips are those every measurement scored.
FLITE_FRACTION = {"train": 0.0, "test": 0.0}


def random_variant_name(index: int) -> str:
    """The espeak-ng variant name of made-up voice ``index`` (:func:`random_variant`)."""
    return f"{RANDOM_VARIANT_PREFIX}{index}"


def random_variant_index(voice: str) -> int | None:
    """The made-up variant's index of an ``accent+variant`` voice; None for a hand-made variant."""
    variant = voice.partition("+")[2]
    return int(variant[len(RANDOM_VARIANT_PREFIX):]) if variant.startswith(RANDOM_VARIANT_PREFIX) else None


#: Klatt synthesiser modes a random variant may use (the test split's ``klatt3`` is not among them).
RANDOM_VARIANT_KLATT = (1, 2, 4, 5, 6)

#: Background kinds per split. Noise and music: the test split's (pink noise, chords) are never heard in training;
#: speech (one talker) and babble (3-6 talkers) occur in both, with each split's own voices and words.
KINDS = {
    "train": ("white", "brown", "tones", "speech", "babble"),
    "test": ("pink", "chords", "speech", "babble"),
}
SPEECH_KINDS = ("speech", "babble")
#: Kinds no split uses by default, for ``make_clip(kinds=...)`` and ``bench_duplex.py --train-kinds``: mains hum,
#: sirens/whistles and clatter. Measured in docs/duplex.md (runs 28-29 and 34-35): no gain over the default kinds.
EXTRA_KINDS = ("hum", "sweeps", "clatter")

_WORDS = """
time year people way day man thing woman life child world school state family student group country problem hand
part place case week company system program question work government number night point home water room mother area
money story fact month lot right study book eye job word business issue side kind head house service friend father
power hour game line end member law car city community name president team minute idea kid body information back
parent face others level office door health person art war history party result change morning reason research girl
guy moment air teacher force education foot boy age policy music market sense nation plan college interest death
experience effect class control care field development role effort rate heart drug show leader light voice wife police
mind price report decision son view relationship town road arm difference value building action model season society
tax director position player record paper space ground form event official matter center couple site project activity
star table need court oil situation cost industry figure street image phone data picture practice piece land product
doctor wall patient worker news test movie north love support technology step baby computer type attention film tree
source organization hair window evidence population truth song river garden summer winter yellow green orange purple
silver golden quiet happy early late small large quick slow bright dark warm cold simple ready open little round
always never often sometimes together again almost already maybe perhaps really very quite rather soon
walk talk run read write sing swim climb build carry cook drive draw listen learn think watch bring follow travel
""".split()
#: Background words per split (alternate words of the list): the test split's sentences use none of train's words.
WORDS = {"train": tuple(_WORDS[0::2]), "test": tuple(_WORDS[1::2])}

#: Made-up words for background talkers (``make_clip(pseudo_word_fraction=...)``), spelled from these syllable parts
#: and read by espeak-ng's letter rules. The 135 words of a split cover few of the sounds of the other's: the test
#: split's "company", "computer", "money" sound like "omni" to rows that rarely heard such sounds from a background
#: talker (docs/duplex.md, runs 90-94), so a training talker may say sounds that are *not* the command. Measured in
#: runs 95-97: no gain, so the recipe does not use them.
PSEUDO_ONSETS = ("", "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
                 "bl", "br", "cl", "cr", "dr", "fl", "gr", "pl", "pr", "sk", "sl", "sp", "st", "str", "tr", "sh", "ch",
                 "th", "qu")
PSEUDO_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "ai", "ay", "ee", "ea", "oo", "ou", "ow", "oi", "y")
PSEUDO_CODAS = ("", "", "", "", "m", "n", "p", "t", "k", "s", "l", "r", "mp", "mb", "nt", "nd", "ng", "st", "ck", "sh")
#: The words of the command and of the near misses, which clips say only in the phrase's place.
_PHRASE_WORDS = frozenset(w.strip(",.!").lower() for t in COMMAND_TEXTS + NEAR_MISSES for w in t.split())
#: Spellings a made-up word may not take: the command's and near misses' words, and every split's real words.
_NOT_PSEUDO = _PHRASE_WORDS | set(_WORDS)


def pseudo_word(rng: np.random.Generator) -> str:
    """A made-up word of 1-4 syllables (:data:`PSEUDO_ONSETS` x :data:`PSEUDO_VOWELS` x :data:`PSEUDO_CODAS`), never
    a word of the command, the near misses or :data:`WORDS`."""
    while True:
        word = "".join(PSEUDO_ONSETS[rng.integers(len(PSEUDO_ONSETS))] + PSEUDO_VOWELS[rng.integers(len(PSEUDO_VOWELS))]
                       + PSEUDO_CODAS[rng.integers(len(PSEUDO_CODAS))] for _ in range(int(rng.integers(1, 5))))
        if word not in _NOT_PSEUDO:
            return word


#: Sound-alikes of the command (``make_clip(sound_alike_fraction=..., talker_sound_alike_fraction=...)``, options;
#: docs/duplex.md): the command's phonemes in espeak-ng's mnemonics, one slot per phoneme, and what each slot may
#: become ("" drops it). A sound-alike changes one or two slots to a clearly different phoneme (never an allophone
#: that an accent uses for the command itself, such as the final vowel's [I] or the first vowel's [A:]), so it is
#: never the command; it is made from the command's sounds alone, not from any split's words. Wake-word training
#: uses such adversarial negatives to teach a detector the command's exact sounds rather than its rough outline.
COMMAND_PHONEMES = ("s", "t", "'0", "p", " ", "'0", "m", "n", "i")
CONFUSABLE_PHONEMES = {
    0: ("S", "f", "T", ""),
    1: ("k", "p", "n", "l", ""),
    2: ("'E", "'V", "'a", "'I", "'oU", "'u:", "'eI", "'aI"),
    3: ("k", "t", "m", "n", ""),
    5: ("'V", "'E", "'a", "'oU", "'I", "'aU", "'u:"),
    6: ("n", "b", "l", "N", ""),
    7: ("l", "d", "t", "r", ""),
    8: ("eI", "oU", "aI", "@", "u:"),
}


def sound_alike(rng: np.random.Generator) -> str:
    """A sound-alike of the command (:data:`CONFUSABLE_PHONEMES`): one or two of its phonemes changed, as espeak-ng
    phoneme input (``[[...]]``)."""
    phonemes = list(COMMAND_PHONEMES)
    slots = sorted(CONFUSABLE_PHONEMES)
    for slot in rng.choice(slots, size=int(rng.integers(1, 3)), replace=False):
        options = CONFUSABLE_PHONEMES[int(slot)]
        phonemes[int(slot)] = options[rng.integers(len(options))]
    return "[[" + "".join(phonemes) + "]]"


def is_sound_alike(spoken: str) -> bool:
    """Whether a clip's ``spoken`` is a sound-alike (:func:`sound_alike`) rather than a phrase of text."""
    return spoken.startswith("[[")


#: Common English words for background talkers (``make_clip(common_word_fraction=...)``): the most frequent
#: ``COMMON_WORDS_COUNT`` words of wordfreq's English list, spelled with letters only. A split's talkers never say the
#: other split's :data:`WORDS` nor a form of them (:func:`_same_stem`), so the held-out sentences' words stay unheard;
#: nor the command's and near misses' words ("stopped" neither), which clips say only in the phrase's place.
COMMON_WORDS_COUNT = 5000
#: Sentences of common words per split (drawn once, said by espeak-ng once: a larger pool than the split's own words
#: need, since each of its thousands of words should be heard).
COMMON_POOL_SIZE = {"train": 1500, "test": 500}


def _same_stem(word: str, other: str) -> bool:
    """Whether ``word`` may be ``other`` or a form of it by its spelling: it begins with ``other`` (``other`` of at
    most 4 letters) or with all of ``other`` but its last two letters ("companies" / "company", "computing" /
    "computer"). Errs towards yes ("many" / "man"): a word wrongly left out costs nothing."""
    stem = other if len(other) <= 4 else other[:-2]
    return word.startswith(stem)


@lru_cache(maxsize=None)
def common_words(split: str) -> tuple[str, ...]:
    """The split's common English words (of the :data:`COMMON_WORDS_COUNT` most frequent, by ``wordfreq``): none of
    the command's or near misses' words, none of the other split's :data:`WORDS`, and no form of either
    (:func:`_same_stem`; "on" and "me" only as such)."""
    _check_split(split)
    try:
        from wordfreq import top_n_list
    except ImportError as error:
        raise ImportError("common_word_fraction needs wordfreq: pip install wordfreq") from error
    others = [w for s in SPLITS if s != split for w in WORDS[s]] + [w for w in _PHRASE_WORDS if len(w) > 2]
    return tuple(
        word for word in top_n_list("en", COMMON_WORDS_COUNT)
        if word.isascii() and word.isalpha() and word not in _PHRASE_WORDS
        and not any(_same_stem(word, other) for other in others)
    )


# ----- voices ------------------------------------------------------------------------------------------------------
def _tool(name: str, needed_by: str) -> str:
    """The path of the system tool ``name`` (a Debian package of the same name), or an error saying what needs it."""
    exe = shutil.which(name)
    if exe is None:
        raise RuntimeError(f"{name} is not installed (apt-get install {name}); {needed_by} needs it")
    return exe


def _espeak() -> str:
    return _tool("espeak-ng", "the duplex data")


@lru_cache(maxsize=1)
def installed_variants() -> frozenset[str]:
    """The voice variants this espeak-ng has (``espeak-ng --voices=variant``, the file names after ``!v/``)."""
    out = subprocess.run([_espeak(), "--voices=variant"], check=True, capture_output=True, text=True).stdout
    return frozenset(line.split("!v/")[1].strip() for line in out.splitlines() if "!v/" in line)


@lru_cache(maxsize=1)
def installed_languages() -> frozenset[str]:
    """The languages this espeak-ng speaks (``espeak-ng --voices``, its second column)."""
    out = subprocess.run([_espeak(), "--voices"], check=True, capture_output=True, text=True).stdout
    return frozenset(line.split()[1] for line in out.splitlines()[1:] if len(line.split()) > 1)


@lru_cache(maxsize=None)
def split_voices(split: str, foreign_accents: bool = False) -> tuple[str, ...]:
    """The espeak-ng voices (``accent+variant``) of a split: its hand-made variants, then its random ones
    (:data:`RANDOM_VARIANTS`), in each of its accents, then (``foreign_accents``, train split only) in each of
    :data:`FOREIGN_ACCENTS`; an espeak-ng lacking a variant or a language is an error. Made once per process:
    every pool utterance draws from it."""
    _check_split(split)
    check_foreign_accents(split, foreign_accents)
    missing = sorted(set(VARIANTS[split]) - installed_variants())
    if missing:
        raise RuntimeError(f"this espeak-ng lacks the voice variants {missing} of split {split!r}")
    accents = ACCENTS[split] + (FOREIGN_ACCENTS if foreign_accents else ())
    missing = sorted(set(accents) - installed_languages())
    if missing:
        raise RuntimeError(f"this espeak-ng lacks the languages {missing} of split {split!r}")
    variants = list(VARIANTS[split]) + [random_variant_name(i) for i in range(RANDOM_VARIANTS[split])]
    return tuple(f"{accent}+{variant}" for accent in accents for variant in variants)


def random_variant(index: int) -> str:
    """The text of made-up espeak-ng voice variant ``index`` (a pure function of it). Every setting is drawn within
    the span of the train split's hand-made variants (read off their files; none from the test split's): a vocal tract
    length that scales the vowel formants 0-3 together (each then jittered), free upper formants 4-8, their heights
    and widths, a pitch base and range, voicing and consonant strength, and now and then a tone (bass/mid/treble)
    curve, echo, breathiness, flutter and roughness; a third use the Klatt synthesiser (never the test's mode 3)."""
    rng = np.random.default_rng([zlib.crc32(b"espeak-variant"), index])

    def draw(low: float, high: float) -> int:
        return int(round(rng.uniform(low, high)))

    low_voice = rng.random() < 0.5
    base = draw(50, 135) if low_voice else draw(130, 240)
    tract = rng.uniform(0.8, 1.05) if low_voice else rng.uniform(1.0, 1.3)
    lines = ["language variant", f"name {random_variant_name(index)}", f"pitch {base} {min(390, draw(base * 1.1, base * 2.0))}"]
    for formant in range(9):
        frequency = 100 * tract * rng.uniform(0.85, 1.15) if formant <= 3 else rng.uniform(40, 150)
        height, width = (draw(50, 150), draw(40, 170)) if formant <= 3 else (draw(0, 150), draw(20, 150))
        lines.append(f"formant {formant} {frequency:.0f} {height} {width}")
    lines += [
        f"voicing {draw(30, 530)}",
        f"consonants {draw(30, 190)} {draw(20, 250)}",
        f"intonation {int(rng.integers(1, 4))}",
        f"flutter {draw(0, 20)}",
        f"roughness {draw(0, 4)}",
        f"stressAdd {' '.join(str(draw(-30, 140)) for _ in range(8))}",
    ]
    if rng.random() < 0.5:
        lines.append(f"tone {draw(60, 650)} {draw(130, 255)} {draw(650, 1500)} {draw(70, 255)} {draw(1500, 4000)} {draw(22, 255)}")
    if rng.random() < 0.2:
        lines.append(f"echo {draw(0, 140)} {draw(0, 80)}")
    if rng.random() < 0.3:
        lines.append("breath " + " ".join(str(draw(0, 10)) for _ in range(8)))
    if rng.random() < 1 / 3:
        lines.append(f"klatt {int(rng.choice(RANDOM_VARIANT_KLATT))}")
    return "\n".join(lines) + "\n"


def _system_data_dir() -> str:
    """espeak-ng's ``espeak-ng-data`` directory (``espeak-ng --version`` names it)."""
    out = subprocess.run([_espeak(), "--version"], check=True, capture_output=True, text=True).stdout
    path = out.split("Data at:")[-1].strip() if "Data at:" in out else ""
    if not os.path.isdir(os.path.join(path, "voices")):
        raise RuntimeError(f"cannot find espeak-ng's data directory in `espeak-ng --version`: {out.strip()!r}")
    return path


def _link_entries(source: str, target: str, but: str) -> None:
    """Symlink every entry of ``source`` into ``target``, except ``but`` (made as a real directory instead)."""
    for entry in os.listdir(source):
        if entry != but:
            os.symlink(os.path.join(source, entry), os.path.join(target, entry))


#: Made-up variants per private data path: espeak-ng lists at most 349 voices (languages and variants together) in a
#: data path, so the random variants are spread over several paths.
RANDOM_VARIANTS_PER_PATH = 100


@lru_cache(maxsize=None)
def _random_variant_path(shard: int) -> str:
    """A private espeak-ng data path (for ``--path``): links to the system's data, and random variants
    ``shard * RANDOM_VARIANTS_PER_PATH ..`` (the next ``RANDOM_VARIANTS_PER_PATH``) as ``voices/!v/<name>``. Made once
    per process, removed at exit."""
    system = _system_data_dir()
    root = tempfile.mkdtemp(prefix="mini-omni2-espeak-")
    atexit.register(shutil.rmtree, root, True)
    data = os.path.join(root, "espeak-ng-data")
    os.makedirs(os.path.join(data, "voices", "!v"))
    _link_entries(system, data, but="voices")
    _link_entries(os.path.join(system, "voices"), os.path.join(data, "voices"), but="!v")
    for index in range(shard * RANDOM_VARIANTS_PER_PATH, (shard + 1) * RANDOM_VARIANTS_PER_PATH):
        with open(os.path.join(data, "voices", "!v", random_variant_name(index)), "w") as f:
            f.write(random_variant(index))
    return root


def _flite_wav(text: str, name: str, speed: int, pitch: int) -> bytes:
    """The WAV bytes of flite voice ``name`` saying ``text``: espeak-ng's ``speed`` (words/min, 175 its default) as a
    duration stretch and its ``pitch`` (0-99, 50 the voice's own F0) as an octave per 60 steps (the pools' 20-80:
    +- half an octave)."""
    if name not in FLITE_VOICES:
        raise ValueError(f"unknown flite voice {name!r}; expected one of {sorted(FLITE_VOICES)}")
    f0 = FLITE_VOICES[name] * 2 ** ((pitch - 50) / 60)
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "speech.wav")
        subprocess.run(
            [_tool("flite", "FLITE_FRACTION > 0"), "-voice", name, "--setf", f"duration_stretch={175 / speed:.4f}",
             "--setf", f"int_f0_target_mean={f0:.1f}", "-t", text, "-o", out],
            check=True, capture_output=True,
        )
        with open(out, "rb") as f:
            return f.read()


def _espeak_wav(text: str, voice: str, speed: int, pitch: int) -> bytes:
    index = random_variant_index(voice)
    path = [] if index is None else ["--path", _random_variant_path(index // RANDOM_VARIANTS_PER_PATH)]
    return subprocess.run(
        [_espeak(), *path, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout


@lru_cache(maxsize=4096)
def speak(text: str, voice: str, speed: int = 175, pitch: int = 50) -> np.ndarray:
    """``text`` said by ``voice`` at ``speed`` (words/min) and ``pitch`` (0-99), trimmed, at 16 kHz: an espeak-ng
    voice, or a flite one named ``"flite:NAME"`` (:data:`FLITE_VOICES`).

    Cached (the same arguments give the same, read-only array)."""
    import soundfile
    import soxr

    if voice.startswith(FLITE_PREFIX):
        wav = _flite_wav(text, voice[len(FLITE_PREFIX):], int(speed), int(pitch))
    else:
        wav = _espeak_wav(text, voice, int(speed), int(pitch))
    data, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    audio = np.asarray(soxr.resample(data, rate, CLIP_SAMPLING_RATE), dtype=np.float32)
    start, end = _speech_bounds(audio)
    audio = audio[start:end].copy()
    audio.flags.writeable = False
    return audio


def _speech_bounds(audio: np.ndarray, frame: int = 160, threshold_db: float = -40.0) -> tuple[int, int]:
    """First and last sample of the 10 ms frames within ``threshold_db`` of the loudest (espeak pads with silence)."""
    n = len(audio) // frame
    if n == 0:
        return 0, len(audio)
    energy = (audio[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
    loud = np.flatnonzero(energy >= energy.max() * 10 ** (threshold_db / 10))
    return int(loud[0]) * frame, int(loud[-1] + 1) * frame


# ----- backgrounds -------------------------------------------------------------------------------------------------
def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x), dtype=np.float64)) + 1e-12)


def _coloured_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise with power spectrum 1/f^exponent (0 white, 1 pink, 2 brown), shaped in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n)
    freqs[0] = freqs[1] if n > 1 else 1.0
    return np.fft.irfft(spectrum / freqs ** (exponent / 2), n).astype(np.float32)


def _note(freq: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """A harmonic note with an attack/decay envelope."""
    t = np.arange(n) / CLIP_SAMPLING_RATE
    wave = sum((0.6**h) * np.sin(2 * np.pi * freq * (h + 1) * t + rng.uniform(0, 2 * np.pi)) for h in range(4))
    envelope = np.minimum(1.0, t / 0.02) * np.exp(-t * rng.uniform(0.5, 4.0))
    return (wave * envelope).astype(np.float32)


def _music(rng: np.random.Generator, n: int, chords: bool) -> np.ndarray:
    """Tones (a random melody) or chords (3-4 note triads and sevenths held 0.5-2 s)."""
    out = np.zeros(n, dtype=np.float32)
    position = 0
    while position < n:
        seconds = rng.uniform(0.5, 2.0) if chords else rng.uniform(0.1, 0.6)
        length = min(int(CLIP_SAMPLING_RATE * seconds), n - position)
        root = 110.0 * 2 ** (rng.integers(0, 36) / 12)
        steps = (0,)
        if chords:
            steps = (0, int(rng.choice([3, 4])), 7) + ((int(rng.choice([10, 11])),) if rng.random() < 0.5 else ())
        for step in steps:
            out[position : position + length] += _note(root * 2 ** (step / 12), length, rng)
        position += length
    return out


#: Utterances per split, drawn from fixed pools so that espeak-ng runs once per utterance (cached) and every clip is a
#: fresh mix: background speech (random sentences of the split's words) and each command / near-miss phrase, each
#: utterance by a random voice of the split at a random speed and pitch.
SPEECH_POOL_SIZE = {"train": 600, "test": 200}
PHRASE_POOL_SIZE = {"train": 300, "test": 100}
#: Sound-alikes per split (:func:`sound_alike`): each pool entry draws its own, so the pool holds many of them.
SOUND_ALIKE_POOL_SIZE = {"train": 1500, "test": 500}
#: Distractors per split (``make_clip(distractor_fraction=...)``): short phrases of the split's words, each entry its
#: own phrase and voice.
DISTRACTOR_POOL_SIZE = {"train": 1500, "test": 500}
#: Words in a distractor: about as long as the command, or a little longer.
DISTRACTOR_WORDS = (1, 4)


#: The pools of utterances besides the split's background sentences and its phrases (``_pool_utterance(pool=...)``):
#: sentences with made-up words, sentences of common words, sound-alikes of the command, the split's sentences
#: with a sound-alike among their words, and distractors (short phrases of the split's words).
PSEUDO_POOL, COMMON_POOL, SOUND_ALIKE_POOL, SOUND_ALIKE_SENTENCE_POOL = "pseudo", "common", "alike", "alike-sentence"
DISTRACTOR_POOL = "distractor"
_PHONEME_POOLS = (SOUND_ALIKE_POOL, SOUND_ALIKE_SENTENCE_POOL)  # espeak-ng phoneme input, which flite does not read
#: Pool sizes of what a clip may say in the command's place besides a phrase (its own pool: PHRASE_POOL_SIZE).
_PHRASE_POOL_SIZES = {SOUND_ALIKE_POOL: SOUND_ALIKE_POOL_SIZE, DISTRACTOR_POOL: DISTRACTOR_POOL_SIZE}


def _pool_text(split: str, pool: str | None, rng: np.random.Generator) -> str:
    """What a pool entry says (``pool`` None: one of the split's background sentences)."""
    if pool == PSEUDO_POOL:
        return " ".join(pseudo_word(rng) if rng.random() < 0.5 else str(rng.choice(WORDS[split]))
                        for _ in range(int(rng.integers(4, 11))))
    if pool == COMMON_POOL:
        return " ".join(rng.choice(common_words(split), size=int(rng.integers(4, 11))))
    if pool == DISTRACTOR_POOL:
        low, high = DISTRACTOR_WORDS
        return " ".join(rng.choice(WORDS[split], size=int(rng.integers(low, high + 1))))
    if pool in _PHONEME_POOLS:
        alike = sound_alike(rng)
        if pool == SOUND_ALIKE_POOL:
            return alike
        words = list(rng.choice(WORDS[split], size=int(rng.integers(3, 9))))
        words.insert(int(rng.integers(len(words) + 1)), alike)
        return " ".join(words)
    return " ".join(rng.choice(WORDS[split], size=int(rng.integers(4, 11))))


def _pool_utterance(
    split: str, entry: int, phrase: str | None = None, pool: str | None = None, foreign_accents: bool = False
) -> tuple[np.ndarray, str, str]:
    """Pool entry ``entry`` of ``phrase``, of ``pool`` (one of the two), or of the split's background sentences
    (neither given). The pools:
    :data:`PSEUDO_POOL`, :data:`COMMON_POOL`, :data:`SOUND_ALIKE_POOL`, :data:`SOUND_ALIKE_SENTENCE_POOL` (these
    two in espeak-ng voices only) and :data:`DISTRACTOR_POOL`. Its espeak-ng voice is one of
    ``split_voices(split, foreign_accents)``. Returns its audio, its voice and what it says."""
    rng = np.random.default_rng([zlib.crc32(f"pool-{split}-{pool or phrase or ''}".encode()), entry])
    voices = split_voices(split, foreign_accents)
    text = phrase or _pool_text(split, pool, rng)
    # no flite draw at 0, nor for phoneme input: the same pools as before
    if pool not in _PHONEME_POOLS and FLITE_FRACTION[split] > 0 and rng.random() < FLITE_FRACTION[split]:
        voices = [FLITE_PREFIX + name for name in FLITE_VOICES]
    voice = voices[rng.integers(len(voices))]
    return speak(text, voice, int(rng.integers(130, 221)), int(rng.integers(20, 81))), voice, text


def _talker(
    rng: np.random.Generator, n: int, split: str, pseudo_word_fraction: float = 0.0, common_word_fraction: float = 0.0,
    talker_sound_alike_fraction: float = 0.0, foreign_accents: bool = False,
) -> np.ndarray:
    """One talker's turn of ``n`` samples: utterances of the split's pool with short pauses, from a random offset; a
    ``pseudo_word_fraction`` of them from its pool of sentences with made-up words, a ``common_word_fraction`` from
    its pool of sentences of common words and a ``talker_sound_alike_fraction`` from its sentences with a sound-alike
    of the command (the fractions sum to at most 1), in the voices of ``split_voices(split, foreign_accents)``."""
    pieces, total = [], 0
    shares = (pseudo_word_fraction, common_word_fraction, talker_sound_alike_fraction)
    while total < n:
        entry = int(rng.integers(SPEECH_POOL_SIZE[split]))
        draw = rng.random() if any(shares) else 1.0  # none: the same clips
        pool = None
        if draw < shares[0]:
            pool = PSEUDO_POOL
        elif draw < shares[0] + shares[1]:  # its own, larger pool; the entry above stays drawn first, as before
            pool, entry = COMMON_POOL, int(rng.integers(COMMON_POOL_SIZE[split]))
        elif draw < sum(shares):
            pool, entry = SOUND_ALIKE_SENTENCE_POOL, int(rng.integers(SOUND_ALIKE_POOL_SIZE[split]))
        speech, _, _ = _pool_utterance(split, entry, pool=pool, foreign_accents=foreign_accents)
        pause = np.zeros(int(CLIP_SAMPLING_RATE * rng.uniform(0.05, 0.6)), dtype=np.float32)
        pieces += [speech, pause]
        total += len(speech) + len(pause)
    audio = np.concatenate(pieces)
    start = int(rng.integers(0, max(len(audio) - n, 0) + 1))
    return audio[start : start + n]


def _hum(rng: np.random.Generator, n: int) -> np.ndarray:
    """Mains hum (50 or 60 Hz and 2-12 of its harmonics, random strengths) over faint white noise: an appliance."""
    t = np.arange(n) / CLIP_SAMPLING_RATE
    base = float(rng.choice([50.0, 60.0])) * rng.uniform(0.99, 1.01)
    audio = sum(
        rng.uniform(0.1, 1.0) * np.sin(2 * np.pi * base * h * t + rng.uniform(0, 2 * np.pi))
        for h in range(1, int(rng.integers(3, 14)))
    )
    return (audio + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _sweeps(rng: np.random.Generator, n: int) -> np.ndarray:
    """Sirens and whistles: a tone with two overtones whose pitch glides up and down (0.3-3 s per glide)."""
    pitch = np.empty(n)
    position = 0
    while position < n:
        length = min(int(CLIP_SAMPLING_RATE * rng.uniform(0.3, 3.0)), n - position)
        low, high = sorted(rng.uniform(300.0, 2500.0, size=2))
        glide = np.linspace(low, high, length) if rng.random() < 0.5 else np.linspace(high, low, length)
        pitch[position : position + length] = glide
        position += length
    phase = 2 * np.pi * np.cumsum(pitch) / CLIP_SAMPLING_RATE
    return sum((0.5**h) * np.sin((h + 1) * phase) for h in range(3)).astype(np.float32)


def _clatter(rng: np.random.Generator, n: int) -> np.ndarray:
    """Dishes, keys and knocks: 2-20 impacts per second, each a ringing band of noise (0.5-8 kHz) that dies away."""
    from scipy.signal import butter, lfilter

    audio = np.zeros(n, dtype=np.float64)
    for start in np.sort(rng.integers(0, n, size=max(1, int(rng.poisson(rng.uniform(2, 20) * n / CLIP_SAMPLING_RATE))))):
        length = min(int(CLIP_SAMPLING_RATE * rng.uniform(0.02, 0.3)), n - int(start))
        centre = rng.uniform(500.0, 6000.0)
        b, a = butter(2, [centre / 1.3, min(centre * 1.3, 7900.0)], btype="band", fs=CLIP_SAMPLING_RATE)
        burst = lfilter(b, a, rng.standard_normal(length)) * np.exp(-np.arange(length) / (length / 5))
        audio[start : start + length] += rng.uniform(0.2, 1.0) * burst / _rms(burst)
    return audio.astype(np.float32)


def background(
    kind: str,
    n: int,
    rng: np.random.Generator,
    split: str,
    pseudo_word_fraction: float = 0.0,
    common_word_fraction: float = 0.0,
    talker_sound_alike_fraction: float = 0.0,
    foreign_accents: bool = False,
) -> np.ndarray:
    """``n`` samples of a background of ``kind`` (one of :data:`KINDS` or :data:`EXTRA_KINDS`), at unit RMS; its
    talkers say sentences with made-up words for a ``pseudo_word_fraction`` of their utterances, sentences of
    common words (:func:`common_words`) for a ``common_word_fraction`` and sentences with a sound-alike of the
    command (:func:`sound_alike`) for a ``talker_sound_alike_fraction``, with :data:`FOREIGN_ACCENTS` among their
    voices when ``foreign_accents``."""
    if kind in ("white", "pink", "brown"):
        audio = _coloured_noise(rng, n, {"white": 0.0, "pink": 1.0, "brown": 2.0}[kind])
    elif kind in ("tones", "chords"):
        audio = _music(rng, n, chords=kind == "chords")
    elif kind == "hum":
        audio = _hum(rng, n)
    elif kind == "sweeps":
        audio = _sweeps(rng, n)
    elif kind == "clatter":
        audio = _clatter(rng, n)
    elif kind == "speech":
        audio = _talker(rng, n, split, pseudo_word_fraction, common_word_fraction, talker_sound_alike_fraction,
                        foreign_accents)
    elif kind == "babble":
        talkers = int(rng.integers(3, 7))
        audio = sum(_talker(rng, n, split, pseudo_word_fraction, common_word_fraction, talker_sound_alike_fraction,
                            foreign_accents) for _ in range(talkers))
    else:
        check_kinds([kind])  # raises: every known kind is handled above
    return (audio / _rms(audio)).astype(np.float32)


# ----- clips -------------------------------------------------------------------------------------------------------
def perturb(utterance: np.ndarray, rng: np.random.Generator, speed: tuple[float, float]) -> np.ndarray:
    """Every clip's own version of a pooled utterance: played ``speed`` times faster (tempo and pitch, as a tape;
    resampled with soxr) through a random first-order spectral tilt (a microphone's colour)."""
    import soxr
    from scipy.signal import lfilter

    factor = float(rng.uniform(*speed))
    audio = np.asarray(soxr.resample(utterance, CLIP_SAMPLING_RATE, CLIP_SAMPLING_RATE / factor), dtype=np.float32)
    tilt = float(rng.uniform(-0.7, 0.7))  # > 0 brightens (pre-emphasis), < 0 darkens (one-pole low-pass)
    if tilt >= 0:
        audio = lfilter([1.0, -tilt], [1.0], audio)
    else:
        audio = lfilter([1.0 + tilt], [1.0, tilt], audio)
    return np.asarray(audio, dtype=np.float32)


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """``kinds`` as a tuple, if it is a non-empty choice of :data:`KINDS` and :data:`EXTRA_KINDS`; else a ValueError.
    A clip draws its kind evenly from the tuple, so a kind named twice is drawn twice as often."""
    known = sorted({k for split_kinds in KINDS.values() for k in split_kinds} | set(EXTRA_KINDS))
    unknown = sorted(set(kinds) - set(known))
    if not kinds or unknown:
        raise ValueError(f"kinds must be background kinds of {known}, got unknown {unknown or 'none'}")
    return tuple(kinds)


def check_fraction(value: float, name: str) -> None:
    """A ValueError unless the share ``name`` of :func:`make_clip` is in [0, 1]."""
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_talk_fractions(
    pseudo_word_fraction: float, common_word_fraction: float, talker_sound_alike_fraction: float = 0.0
) -> None:
    """A ValueError unless the talkers' shares of made-up words, of common words and of sentences with a sound-alike
    of the command are each in [0, 1] and sum to <= 1."""
    shares = {"pseudo_word_fraction": pseudo_word_fraction, "common_word_fraction": common_word_fraction,
              "talker_sound_alike_fraction": talker_sound_alike_fraction}
    for name, share in shares.items():
        check_fraction(share, name)
    if sum(shares.values()) > 1:
        given = {name: share for name, share in shares.items() if share}
        raise ValueError(f"{' + '.join(given)} must be <= 1, got {' + '.join(str(v) for v in given.values())}")


def check_mixture_fraction(mixture_fraction: float) -> None:
    """A ValueError unless ``mixture_fraction`` (of :func:`make_clip`) is in [0, 1]."""
    check_fraction(mixture_fraction, "mixture_fraction")


def check_clip_fractions(positive_fraction: float, near_miss_fraction: float) -> None:
    """A ValueError unless the shares of positives and of near misses (of :func:`make_clip`) are >= 0 and sum to <= 1
    (the rest are background alone)."""
    if not (positive_fraction >= 0 and near_miss_fraction >= 0 and positive_fraction + near_miss_fraction <= 1):
        raise ValueError(f"positive_fraction and near_miss_fraction must be >= 0 and sum to <= 1, got "
                         f"{positive_fraction} and {near_miss_fraction}")


def check_foreign_accents(split: str, foreign_accents: bool) -> None:
    """Foreign accents widen what training hears; in the test split they would be accents training has heard."""
    if not isinstance(foreign_accents, bool):
        raise TypeError(f"foreign_accents must be True or False, got {foreign_accents!r}")
    if foreign_accents and split != "train":
        raise ValueError(f"foreign_accents is an option of the train split (its accents and FOREIGN_ACCENTS), "
                         f"got split {split!r}, whose accents must stay unheard in training")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def make_clip(
    split: str,
    index: int,
    seed: int = 0,
    positive_fraction: float = 0.5,
    near_miss_fraction: float = 0.25,
    lead_seconds: tuple[float, float] = (1.0, 8.0),
    tail_seconds: tuple[float, float] = (0.0, 10.0),
    negative_seconds: tuple[float, float] = (3.0, 15.0),
    snr_db: tuple[float, float] = (5.0, 20.0),
    speed_perturbation: tuple[float, float] = (0.85, 1.15),
    level_db: tuple[float, float] = (-35.0, -15.0),
    kinds: Sequence[str] | None = None,
    mixture_fraction: float = 0.0,
    pseudo_word_fraction: float = 0.0,
    common_word_fraction: float = 0.0,
    sound_alike_fraction: float = 0.0,
    talker_sound_alike_fraction: float = 0.0,
    distractor_fraction: float = 0.0,
    foreign_accents: bool = False,
) -> dict:
    """Clip ``index`` of ``split``: deterministic in ``(seed, split, index)``.

    A positive is ``lead_seconds`` of background, the command ("stop omni" in a random voice at ``snr_db`` over the
    background), then ``tail_seconds`` of background; a negative is ``negative_seconds`` of background, with a near
    miss in place of the command for ``near_miss_fraction`` of all clips. The phrase is an utterance of the split's
    pool made the clip's own by :func:`perturb` (``speed_perturbation``). A ``mixture_fraction`` of the clips mix a
    second background of ``kinds`` into the first, 0-15 dB below it (their ``kind`` is ``"first+second"``). Talkers of
    the background say sentences with made-up words (:func:`pseudo_word`) for ``pseudo_word_fraction`` of their
    utterances, and sentences of common English words (:func:`common_words`) for ``common_word_fraction``. A
    ``sound_alike_fraction`` of the near misses are sound-alikes of the command (:func:`sound_alike`), and the talkers
    say sentences with a sound-alike among their words for ``talker_sound_alike_fraction``. A ``distractor_fraction``
    of the clips of background alone say a distractor in the phrase's place, at the command's level: a short phrase
    of the split's background words (:data:`DISTRACTOR_WORDS`) in a random voice, never the command. With
    ``foreign_accents`` (train split only), the voices of its phrases and talkers include :data:`FOREIGN_ACCENTS`
    (``split_voices``); without, no draw changes. The mix is
    scaled to an RMS of ``level_db`` dBFS. Returns the example (module docstring): ``audio``
    (float32, 16 kHz), ``command_start`` / ``command_end`` in seconds (-1 without the command) and what was said, where
    and by whom.
    """
    _check_split(split)
    check_clip_fractions(positive_fraction, near_miss_fraction)
    check_mixture_fraction(mixture_fraction)
    check_talk_fractions(pseudo_word_fraction, common_word_fraction, talker_sound_alike_fraction)
    check_fraction(sound_alike_fraction, "sound_alike_fraction")
    check_fraction(distractor_fraction, "distractor_fraction")
    check_foreign_accents(split, foreign_accents)
    kinds = check_kinds(kinds) if kinds is not None else KINDS[split]
    talk = (pseudo_word_fraction, common_word_fraction, talker_sound_alike_fraction)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    draw = rng.random()
    positive = draw < positive_fraction
    spoken = ""
    if positive:
        spoken = COMMAND_TEXTS[rng.integers(len(COMMAND_TEXTS))]
    elif draw < positive_fraction + near_miss_fraction:
        spoken = NEAR_MISSES[rng.integers(len(NEAR_MISSES))]
    # no draw without distractors or sound-alikes: the same clips as before
    distractor = not spoken and distractor_fraction > 0 and rng.random() < distractor_fraction
    alike = bool(spoken) and not positive and sound_alike_fraction > 0 and rng.random() < sound_alike_fraction
    kind = kinds[rng.integers(len(kinds))]
    voice = ""
    utterance = np.zeros(0, np.float32)
    if spoken or distractor:
        pool = SOUND_ALIKE_POOL if alike else DISTRACTOR_POOL if distractor else None
        size = _PHRASE_POOL_SIZES.get(pool, PHRASE_POOL_SIZE)[split]
        utterance, voice, spoken = _pool_utterance(split, int(rng.integers(size)), None if pool else spoken,
                                                   pool=pool, foreign_accents=foreign_accents)
        utterance = perturb(utterance, rng, speed_perturbation)
    rate = CLIP_SAMPLING_RATE
    if positive:
        lead = int(rate * rng.uniform(*lead_seconds))
        total = lead + len(utterance) + int(rate * rng.uniform(*tail_seconds))
    else:
        total = max(int(rate * rng.uniform(*negative_seconds)), len(utterance) + rate)
        lead = int(rng.integers(0, total - len(utterance) + 1))
    audio = background(kind, total, rng, split, *talk, foreign_accents)
    if mixture_fraction > 0 and rng.random() < mixture_fraction:  # no draw without mixtures: the same clips as before
        second = kinds[rng.integers(len(kinds))]
        gain = 10 ** (-rng.uniform(0.0, 15.0) / 20)  # drawn before the second background, as it always was
        audio = audio + gain * background(second, total, rng, split, *talk, foreign_accents)
        audio /= _rms(audio)
        kind = f"{kind}+{second}"
    snr, level = float(rng.uniform(*snr_db)), float(rng.uniform(*level_db))
    if spoken:
        gain = 10 ** (snr / 20) / _rms(utterance)  # the background has unit RMS
        audio[lead : lead + len(utterance)] += gain * utterance
    audio *= 10 ** (level / 20) / _rms(audio)
    peak = float(np.abs(audio).max())
    if peak > 0.99:
        audio *= 0.99 / peak
    return {
        "id": f"{split}-{seed}-{index:06d}",
        "task": LISTEN_TASK,
        "audio": audio.astype(np.float32),
        "sampling_rate": rate,
        "command_start": lead / rate if positive else -1.0,
        "command_end": (lead + len(utterance)) / rate if positive else -1.0,
        "spoken": spoken,
        "spoken_start": lead / rate if spoken else -1.0,
        "spoken_end": (lead + len(utterance)) / rate if spoken else -1.0,
        "kind": kind,
        "voice": voice,
        "snr_db": snr if spoken else float("nan"),
        "level_db": level,
    }


def duplex_generator(split: str = "train", num_examples: int = 1000, seed: int = 0, start: int = 0, **kwargs) -> Iterator[dict]:
    """Clips ``start .. start + num_examples - 1`` of ``split`` (keywords: :func:`make_clip`'s), for
    ``datasets.Dataset.from_generator(duplex_generator, gen_kwargs={...})``."""
    _check_split(split)
    for index in range(start, start + num_examples):
        yield make_clip(split, index, seed=seed, **kwargs)


def frame_labels(num_frames: int, command_end: float, frame_seconds: float) -> np.ndarray:
    """Per-frame states: 0 (``n_irq``) before the tail, 1 (``irq``) from the frame in which the command ends.

    Frame k holds the audio of ``[k, k + 1) * frame_seconds``; it is ``irq`` when ``command_end`` (seconds, < 0 for
    none) falls before its end: by then the whole command has been heard.
    """
    ends = (np.arange(num_frames) + 1) * frame_seconds
    if command_end < 0:
        return np.zeros(num_frames, dtype=np.int64)
    return (ends > command_end).astype(np.int64)


def listen_inputs(example: dict, front_end) -> dict:
    """An example's listening frames through ``front_end`` and their labels: ``listen_features`` (T, D) for the
    features input or ``listen_codes`` (T, 7) for the codec input, and ``frame_labels`` (T,)."""
    frames = front_end.frames(np.asarray(example["audio"], dtype=np.float32), int(example["sampling_rate"]))
    labels = frame_labels(frames.shape[0], float(example["command_end"]), front_end.frame_seconds)
    if front_end.listen_input == LISTEN_FEATURES:
        return {"task": LISTEN_TASK, "listen_features": frames.numpy().astype(np.float32), "frame_labels": labels}
    return {"task": LISTEN_TASK, "listen_codes": frames.numpy().astype(np.int64), "frame_labels": labels}


class DuplexPreprocessor:
    """A batched ``.map`` function: clips -> listening inputs through the model's front end, and frame labels.

    ``dataset.map(DuplexPreprocessor(model.listen_front_end()), batched=True, remove_columns=["audio"])``; read the
    result with ``.with_format("numpy")`` (the feature arrays are large for Python lists).
    """

    def __init__(self, front_end):
        self.front_end = front_end

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        size = len(batch["audio"])
        rows = [listen_inputs({k: v[i] for k, v in batch.items()}, self.front_end) for i in range(size)]
        return {name: [row[name] for row in rows] for name in rows[0]} if rows else {}


__all__ = [
    "CLIP_SAMPLING_RATE",
    "COMMAND_TEXTS",
    "NEAR_MISSES",
    "SPLITS",
    "ACCENTS",
    "FOREIGN_ACCENTS",
    "VARIANTS",
    "RANDOM_VARIANTS",
    "random_variant",
    "KINDS",
    "EXTRA_KINDS",
    "check_kinds",
    "check_fraction",
    "check_mixture_fraction",
    "WORDS",
    "pseudo_word",
    "COMMAND_PHONEMES",
    "CONFUSABLE_PHONEMES",
    "sound_alike",
    "is_sound_alike",
    "common_words",
    "check_talk_fractions",
    "check_foreign_accents",
    "split_voices",
    "speak",
    "background",
    "make_clip",
    "duplex_generator",
    "frame_labels",
    "listen_inputs",
    "DuplexPreprocessor",
]
