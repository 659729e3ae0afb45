"""Helpers of the duplex tests: a model whose listening row says ``irq`` at a chosen frame."""

from __future__ import annotations

import time

import torch


class ScriptedListener:
    """Wraps a model's forward: the listening row's state logits say ``irq`` at listening frame ``irq_at`` (counted
    over the frames the row reads) and ``n_irq`` before; every other logit is the real model's. A listening row is
    recognised by what it is fed: ``n_irq`` on its text stream (a speaking row is fed a sampled text token: the tests
    check their answers' text holds no ``n_irq``)."""

    def __init__(self, model, irq_at: int | None, step_seconds: float = 0.0, no_eoa: bool = False):
        self.layout = model.config.token_layout
        self.forward = model.forward
        self.irq_at = irq_at
        self.step_seconds = step_seconds  # a slower decoding step, to let a client's audio arrive mid-answer
        self.no_eoa = no_eoa  # answers never end by themselves (only the last layer's eoa ends one)
        self.frames = 0
        self.calls: list[dict] = []
        self.fed_frames: list[list[int]] = []  # the codec frames fed to listening rows, in order (codec input)
        self.irq_call: int | None = None  # the index in calls of the step whose frame said irq
        model.forward = self

    def __call__(self, input_ids=None, inputs_embeds=None, **kwargs):
        out = self.forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if self.no_eoa and out.audio_logits is not None:
            out.audio_logits[:, -1, :, self.layout.eoa] = float("-inf")
        if input_ids is None or "logits_to_keep" not in kwargs:
            return out  # a prefill (embeddings) or a forward outside the engine: no state is read
        if self.step_seconds:
            time.sleep(self.step_seconds)
        layout = self.layout
        width = input_ids.shape[-1]  # > 1: a listening row catches up on several frames in this step
        fed = kwargs["attention_mask"][:, -width:].bool()  # the columns each row is fed (padding: 0)
        listening = (input_ids[:, layout.text_stream, -1] == layout.n_irq).nonzero().flatten().tolist()
        sliced = kwargs.get("listen_logits_rows") is not None  # the sliced head: listening rows get their 2 states
        rows = kwargs["listen_logits_rows"] if sliced else kwargs.get("text_logits_rows")
        rows = list(range(input_ids.shape[0])) if rows is None else rows.tolist()
        pad = layout.layershift(layout.pad_a, 0)
        for r in listening:
            self.fed_frames += [input_ids[r, :7, c].tolist() for c in range(width)
                                if fed[r, c] and int(input_ids[r, 0, c]) != pad]
        read = [row for row in rows if row in listening]  # a waiting row is fed but not read
        self.calls.append({"rows": input_ids.shape[0], "read": read, "width": width})
        for k, row in enumerate(rows):
            if row in read:
                for c in range(width):  # in order: the frames of a catching-up row, one column each
                    if not fed[row, c]:
                        continue
                    state = layout.irq if self.frames == self.irq_at else layout.n_irq
                    if state == layout.irq:
                        self.irq_call = len(self.calls) - 1
                    logits = torch.tensor([10.0 if s == state else -10.0 for s in layout.listen_states])
                    if sliced:
                        out.listen_logits[k, c] = logits
                    else:
                        out.text_logits[k, c, list(layout.listen_states)] = logits
                    self.frames += 1
        return out
