"""Stateful streaming decoding of the SNAC codec: every frame goes through the decoder once.

SNAC's decoder without local attention (the 24 kHz model) is a chain of convolutions, transposed convolutions,
pointwise activations (Snake, noise, tanh) and residual sums, all with a fixed reach. Streamed frame by frame, each
layer keeps between calls only what its next outputs still need: a convolution the last ``(kernel - 1) * dilation``
inputs (its left padding at the start), a transposed convolution the inputs whose contributions overlap the next
outputs and the part of its padding still to crop, a residual sum the inputs still waiting for the branch's outputs.
A call then returns exactly the waveform samples that no later frame can change, equal to the one-shot decode's up
to float rounding (noise off); :meth:`CodecStream.flush` pads the right edge as the one-shot decode does. The samples
of the last ``delay_samples`` of the frames pushed so far wait for later frames: that is the decoder's right-hand
reach (4,757 samples = 2.3 frames at 24 kHz).

The streamed layers run the codec's own modules and weights (Snake, noise and the quantizer through their own
forward; convolutions with their weight-normed weights, computed once when the :class:`StreamingCodecDecoder` is
built). A decoder it cannot stream exactly (local attention: the 32/44 kHz models; an unknown layer) is refused.
This file is shipped as remote code: it imports only torch and siblings.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


class CodecStreamingError(ValueError):
    """The codec's decoder cannot be streamed exactly (it has a layer without a fixed, finite reach)."""


@dataclass
class _State:
    """Per-stream state: one tensor slot and one counter per stateful layer (tensors have a batch dimension)."""

    tensors: list[torch.Tensor | None]
    counts: list[int]

    def copy(self) -> "_State":
        # the layers never modify a state tensor in place: a shallow copy is an independent snapshot
        return _State(list(self.tensors), list(self.counts))


def _cat(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    if first is None or first.shape[-1] == 0:
        return second
    if second is None or second.shape[-1] == 0:
        return first
    return torch.cat([first, second], dim=-1)


class _Layer:
    """A streamed layer. ``step`` takes the new final input samples (``None``: none) and returns the new final
    output samples; ``finish`` returns the rest once the input has ended; ``delay`` maps the input's right-hand
    delay (samples at the input rate) to the output's."""

    slot: int = -1
    initial_count: int = 0  # the counter's value at the start of a stream

    def step(self, x: torch.Tensor | None, state: _State) -> torch.Tensor | None:
        raise NotImplementedError

    def finish(self, state: _State) -> torch.Tensor | None:
        return None

    def delay(self, upstream: int) -> int:
        return upstream

    def keeps_length(self) -> bool:
        """Whether the output has as many samples as the input (required inside a residual sum)."""
        return True


class _Pointwise(_Layer):
    """A sample-wise layer (Snake, tanh, noise, a 1x1 convolution): runs on the new samples alone."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]):
        self.function = function

    def step(self, x, state):
        return None if x is None else self.function(x)


class _Conv(_Layer):
    """A stride-1 zero-padded convolution; keeps the last ``(kernel - 1) * dilation`` inputs."""

    def __init__(self, conv: nn.Conv1d, weight: torch.Tensor):
        self.weight, self.bias = weight, conv.bias
        self.dilation, self.groups = conv.dilation[0], conv.groups
        self.span = (conv.kernel_size[0] - 1) * self.dilation
        self.padding = conv.padding[0]

    def _apply(self, z: torch.Tensor) -> torch.Tensor | None:
        if z.shape[-1] <= self.span:
            return None
        return F.conv1d(z, self.weight, self.bias, dilation=self.dilation, groups=self.groups)

    def step(self, x, state):
        if x is None:
            return None
        memory = state.tensors[self.slot]
        if memory is None:  # the left edge: the one-shot decode's zero padding
            memory = x.new_zeros(x.shape[0], x.shape[1], self.padding)
        z = _cat(memory, x)
        state.tensors[self.slot] = z[..., max(z.shape[-1] - self.span, 0) :] if self.span else z[..., :0]
        return self._apply(z)

    def finish(self, state):
        memory = state.tensors[self.slot]
        if memory is None:
            return None
        return self._apply(F.pad(memory, (0, self.padding)))

    def delay(self, upstream):
        return upstream + self.span - self.padding

    def keeps_length(self):
        return 2 * self.padding == self.span


class _ConvTranspose(_Layer):
    """A transposed convolution (upsampling by its stride). Output ``n`` of the uncropped convolution is final once
    input ``n // stride`` exists; the last ``span // stride`` inputs still add to later outputs, so they are kept.
    The counter holds how much of the left crop (the padding) is still to drop."""

    def __init__(self, conv: nn.ConvTranspose1d, weight: torch.Tensor):
        self.weight, self.bias = weight, conv.bias
        self.stride, self.dilation, self.groups = conv.stride[0], conv.dilation[0], conv.groups
        self.span = (conv.kernel_size[0] - 1) * self.dilation
        self.padding, self.output_padding = conv.padding[0], conv.output_padding[0]
        self.keep = self.span // self.stride
        self.kernel = conv.kernel_size[0]
        # (in, out * kernel), a view: each input step's contribution to the kernel's outputs, for _full
        self.matrix = weight.flatten(1) if self.groups == 1 else None
        self.initial_count = self.padding  # the one-shot decode's left crop

    def _full(self, z: torch.Tensor) -> torch.Tensor:
        """The uncropped transposed convolution of ``z``.

        A streamed piece is short (a few latent steps), where PyTorch's CPU ``conv_transpose1d`` falls back to a
        kernel that is several times slower than a matrix product; so with ``groups == 1`` the product of every
        input with the kernel is taken by ``matmul`` and overlap-added by ``fold`` (col2im): the same sums.
        """
        if self.matrix is None:
            return F.conv_transpose1d(z, self.weight, self.bias, stride=self.stride, groups=self.groups,
                                      dilation=self.dilation)
        batch, channels, steps = z.shape
        # one (batch * steps, in) x (in, out * kernel) product: the kernel is read once for the whole batch
        products = z.transpose(1, 2).reshape(batch * steps, channels) @ self.matrix
        products = products.view(batch, steps, -1).transpose(1, 2)  # (batch, out * kernel, steps)
        length = (steps - 1) * self.stride + self.span + 1
        full = F.fold(products, (1, length), kernel_size=(1, self.kernel), dilation=(1, self.dilation),
                      stride=(1, self.stride))[:, :, 0]
        return full if self.bias is None else full + self.bias[:, None]

    def _crop_left(self, y: torch.Tensor, state: _State) -> torch.Tensor | None:
        drop = min(state.counts[self.slot], y.shape[-1])
        state.counts[self.slot] -= drop
        return y[..., drop:] if y.shape[-1] > drop else None

    def step(self, x, state):
        if x is None:
            return None
        memory = state.tensors[self.slot]
        held = 0 if memory is None else memory.shape[-1]
        z = _cat(memory, x)
        state.tensors[self.slot] = z[..., z.shape[-1] - min(self.keep, z.shape[-1]) :]
        y = self._full(z)[..., held * self.stride : z.shape[-1] * self.stride]
        return self._crop_left(y, state)

    def finish(self, state):
        memory = state.tensors[self.slot]
        if memory is None:
            return None
        held = memory.shape[-1]
        if held:
            tail = self._full(memory)[..., held * self.stride :]
        else:
            tail = memory.new_zeros(memory.shape[0], self.weight.shape[1] * self.groups, 0)
        right = self.padding - self.output_padding  # the one-shot decode's right crop (< 0: bias-only samples)
        if right > 0:
            tail = tail[..., : max(tail.shape[-1] - right, 0)]
        elif right < 0:
            extra = tail.new_zeros(tail.shape[0], tail.shape[1], -right)
            if self.bias is not None:
                extra = extra + self.bias[:, None]
            tail = _cat(tail, extra)
        return self._crop_left(tail, state) if tail.shape[-1] else None

    def delay(self, upstream):
        return upstream * self.stride + self.padding

    def keeps_length(self):
        return False


class _Sequence(_Layer):
    def __init__(self, layers: list[_Layer]):
        self.layers = layers

    def step(self, x, state):
        for layer in self.layers:
            x = layer.step(x, state)
        return x

    def finish(self, state):
        x = None
        for layer in self.layers:
            x = _cat(layer.step(x, state), layer.finish(state))
        return x

    def delay(self, upstream):
        for layer in self.layers:
            upstream = layer.delay(upstream)
        return upstream

    def keeps_length(self):
        return all(layer.keeps_length() for layer in self.layers)


class _Residual(_Layer):
    """``x + branch(x)``: holds the inputs until the branch's outputs for them are final."""

    def __init__(self, branch: _Layer):
        self.branch = branch

    def _add(self, y: torch.Tensor | None, state: _State) -> torch.Tensor | None:
        if y is None:
            return None
        held = state.tensors[self.slot]
        state.tensors[self.slot] = held[..., y.shape[-1] :]
        return held[..., : y.shape[-1]] + y

    def step(self, x, state):
        y = self.branch.step(x, state)
        state.tensors[self.slot] = _cat(state.tensors[self.slot], x)
        return self._add(y, state)

    def finish(self, state):
        return self._add(self.branch.finish(state), state)

    def delay(self, upstream):
        return self.branch.delay(upstream)


def _snac_layers():
    from snac.layers import DecoderBlock, NoiseBlock, ResidualUnit, Snake1d

    return DecoderBlock, NoiseBlock, ResidualUnit, Snake1d


def _build(module: nn.Module, noise: bool, layers: list[_Layer]) -> _Layer:
    """The streamed form of one decoder module; ``layers`` collects the stateful ones (for their slots)."""
    DecoderBlock, NoiseBlock, ResidualUnit, Snake1d = _snac_layers()
    if isinstance(module, (nn.Sequential, DecoderBlock)):
        children = module if isinstance(module, nn.Sequential) else module.block
        return _Sequence([_build(child, noise, layers) for child in children])
    if isinstance(module, ResidualUnit):
        branch = _build(module.block, noise, layers)
        if not branch.keeps_length():
            raise CodecStreamingError("a SNAC ResidualUnit whose branch changes the length cannot be streamed")
        layer = _Residual(branch)
    elif isinstance(module, (Snake1d, nn.Tanh, nn.Identity)):
        return _Pointwise(module)
    elif isinstance(module, NoiseBlock):
        return _Pointwise(module if noise else nn.Identity())
    elif isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
        _check_conv(module)
        with torch.no_grad(), parametrize.cached():
            weight = module.weight.detach()
        if isinstance(module, nn.ConvTranspose1d):
            layer = _ConvTranspose(module, weight)
        else:
            layer = _Conv(module, weight)
            if layer.span == 0 and layer.padding == 0:  # a 1x1 convolution: stateless
                return _Pointwise(partial(F.conv1d, weight=weight, bias=module.bias, groups=module.groups))
    else:
        name = type(module).__name__
        hint = " (local attention: the 32/44 kHz SNAC models)" if name == "LocalMHA" else ""
        raise CodecStreamingError(
            f"cannot stream the codec's decoder exactly: it has a {name} layer{hint}; streaming supports "
            "convolutions, transposed convolutions, Snake, noise, tanh and residual units (SNAC 24 kHz). "
            "Use chunk_mode='context' for this codec."
        )
    layer.slot = len(layers)
    layers.append(layer)
    return layer


def _check_conv(conv: nn.Module) -> None:
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        raise CodecStreamingError(f"cannot stream a convolution with padding {padding!r} ({conv.padding_mode})")
    if isinstance(conv, nn.Conv1d) and not isinstance(conv, nn.ConvTranspose1d) and conv.stride[0] != 1:
        raise CodecStreamingError(f"cannot stream a strided convolution in the decoder (stride {conv.stride[0]})")


def _snac_of(codec: Any) -> nn.Module:
    snac = getattr(codec, "snac", None)
    if snac is None or not hasattr(codec, "layout") or not hasattr(snac, "decoder"):
        raise TypeError(f"expected a MiniOmni2Codec (model.codec, with .snac and .layout), got {type(codec).__name__}")
    return snac


@dataclass
class CodecStream:
    """One stream's decoding state (a request's answer): frames go in, final waveform samples come out.

    Use :meth:`StreamingCodecDecoder.stream` to make one, :meth:`push` for each piece of frames as it arrives and
    :meth:`flush` once at the end. ``frames`` counts the frames pushed, ``samples`` the samples returned.
    """

    decoder: "StreamingCodecDecoder"
    state: _State
    frames: int = 0
    samples: int = 0
    flushed: bool = False

    def push(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (n, 7) of codes -> the waveform samples (m,) that are now final (float32, codec device)."""
        if frames.ndim != 2:
            raise ValueError(f"CodecStream.push takes frames (n, 7), got shape {tuple(frames.shape)}")
        return self.decoder.push([self], frames[None])[0]

    def flush(self) -> torch.Tensor:
        """End the stream: the remaining samples, as the one-shot decode ends (the stream is then closed)."""
        return self.decoder.flush([self])[0]

    def peek(self) -> torch.Tensor:
        """The samples that :meth:`flush` would return now, without ending the stream (a provisional tail)."""
        return self.decoder.peek(self)

    @property
    def pending_samples(self) -> int:
        """Samples of the frames pushed so far that are not final yet (they wait for later frames)."""
        return self.frames * self.decoder.samples_per_frame - self.samples


_SHARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # codec -> {noise: (param versions, decoder)}


class StreamingCodecDecoder:
    """SNAC's decoder as a stateful stream: each frame is decoded once, and each call returns the final samples.

    Args:
        codec: a ``MiniOmni2Codec`` (``model.codec``) whose decoder has no local attention (SNAC 24 kHz; the tiny
            test codec). Its weights are read now: build a new decoder after changing them.
        noise (`bool`): SNAC's learned noise (random, so a noisy stream cannot equal another decode); ``False``
            makes the stream equal the one-shot ``codec.decode(frames, noise=False)`` to float rounding.

    Raises:
        CodecStreamingError: the decoder has a layer that cannot be streamed exactly (local attention, ...).

    Example::

        decoder = StreamingCodecDecoder(model.codec, noise=False)
        stream = decoder.stream()
        audio = [stream.push(frames[k : k + 1]) for k in range(len(frames))] + [stream.flush()]
        # torch.cat(audio) == model.codec.decode(frames, noise=False)[0]
    """

    def __init__(self, codec: Any, noise: bool = False):
        snac = _snac_of(codec)
        self.codec = codec
        self.noise = bool(noise)
        self._layers: list[_Layer] = []
        self._decoder = _build(snac.decoder.model, self.noise, self._layers)
        self._check_quantizer(snac)
        self.samples_per_frame = int(codec.samples_per_frame)
        self.latent_steps_per_frame = int(snac.vq_strides[0])
        self.device = next(snac.parameters()).device
        upsampling = self._decoder.delay(1) - self._decoder.delay(0)
        if upsampling * self.latent_steps_per_frame != self.samples_per_frame:
            expected = self.samples_per_frame // self.latent_steps_per_frame
            raise CodecStreamingError(f"the decoder upsamples by {upsampling}, expected {expected}")
        #: samples of the pushed frames that wait for later frames (the decoder's right-hand reach)
        self.delay_samples = self._decoder.delay(0)

    @classmethod
    def shared(cls, codec: Any, noise: bool = False) -> "StreamingCodecDecoder":
        """The decoder of ``codec`` for this noise setting, built once and shared by every stream (a server opens
        one stream per request: the weight-normed weights are not recomputed and stored again for each). Rebuilt when
        the codec's parameters changed in place since."""
        versions = tuple(p._version for p in _snac_of(codec).parameters())
        per_codec = _SHARED.setdefault(codec, {})
        cached = per_codec.get(bool(noise))
        if cached is None or cached[0] != versions:
            cached = (versions, cls(codec, noise=noise))
            per_codec[bool(noise)] = cached
        return cached[1]

    @staticmethod
    def _check_quantizer(snac: nn.Module) -> None:
        for quantizer in snac.quantizer.quantizers:
            if quantizer.out_proj.kernel_size[0] != 1:
                raise CodecStreamingError("the quantizer's output projection must be pointwise (kernel 1)")

    @property
    def lookahead_frames(self) -> int:
        """Frames that must follow a frame before its samples are all final (3 for SNAC 24 kHz)."""
        return math.ceil(self.delay_samples / self.samples_per_frame)

    def stream(self) -> CodecStream:
        """A new stream (one per request)."""
        return CodecStream(self, _State([None] * len(self._layers), [layer.initial_count for layer in self._layers]))

    # ----- batched calls (streams that have seen the same number of frames) -----------------------------------
    @torch.no_grad()
    def push(self, streams: list[CodecStream], frames: torch.Tensor) -> list[torch.Tensor]:
        """Push ``frames`` (B, n, 7) to B streams in one batched call; returns each stream's new final samples.

        The streams must have seen the same number of frames (their states then have the same shapes).
        """
        if frames.ndim != 3 or frames.shape[0] != len(streams):
            raise ValueError(f"expected frames (batch={len(streams)}, n, 7), got shape {tuple(frames.shape)}")
        self._check_streams(streams)
        if frames.shape[1] == 0:
            return [torch.zeros(0, device=self.device) for _ in streams]
        layout = self.codec.layout
        if not bool(layout.is_code(frames).all()):
            raise ValueError("codec frames must hold codes only; use TokenLayout.sanitize_frames first")
        codes = [level.to(self.device) for level in layout.frames_to_snac(frames.long())]
        latent = self.codec.snac.quantizer.from_codes(codes)
        state = self._stack(streams)
        audio = self._decoder.step(latent, state)
        for stream in streams:
            stream.frames += frames.shape[1]
        return self._unstack(streams, state, audio)

    @torch.no_grad()
    def flush(self, streams: list[CodecStream]) -> list[torch.Tensor]:
        """End B streams (same number of frames) in one call: each one's remaining samples."""
        self._check_streams(streams)
        state = self._stack(streams)
        audio = self._decoder.finish(state)
        outputs = self._unstack(streams, state, audio)
        for stream in streams:
            stream.flushed = True
        return outputs

    @torch.no_grad()
    def peek(self, stream: CodecStream) -> torch.Tensor:
        """What ``flush`` would return now, the stream left as it was."""
        self._check_streams([stream])
        audio = self._decoder.finish(stream.state.copy())
        return torch.zeros(0, device=self.device) if audio is None else audio[0, 0].float()

    def _check_streams(self, streams: list[CodecStream]) -> None:
        if not streams:
            raise ValueError("no streams given")
        for stream in streams:
            if stream.decoder is not self:
                raise ValueError("a stream belongs to the decoder that made it")
            if stream.flushed:
                raise ValueError("the stream was flushed (ended); start a new one")
        if len({stream.frames for stream in streams}) != 1:
            counts = [stream.frames for stream in streams]
            raise ValueError(f"streams decoded together must have seen the same number of frames, got {counts}")

    @staticmethod
    def _stack(streams: list[CodecStream]) -> _State:
        if len(streams) == 1:
            return streams[0].state
        states = [stream.state for stream in streams]
        tensors = [None if parts[0] is None else torch.cat(parts) for parts in zip(*(s.tensors for s in states))]
        return _State(tensors, list(states[0].counts))

    def _unstack(self, streams: list[CodecStream], state: _State, audio: torch.Tensor | None) -> list[torch.Tensor]:
        outputs = []
        for b, stream in enumerate(streams):
            if len(streams) > 1:
                tensors = [None if t is None else t[b : b + 1] for t in state.tensors]
                stream.state = _State(tensors, list(state.counts))
            wave = torch.zeros(0, device=self.device) if audio is None else audio[b, 0].float()
            stream.samples += wave.shape[-1]
            outputs.append(wave)
        return outputs


__all__ = ["StreamingCodecDecoder", "CodecStream", "CodecStreamingError"]
