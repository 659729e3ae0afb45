// AudioWorklet processors of the voice page: microphone capture and gapless playback (both at the context's rate).

// Posts the microphone's samples (Float32Array, mono) to the page in blocks of ~50 ms.
class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = new Float32Array(Math.round(sampleRate / 20));
    this.filled = 0;
  }
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      let offset = 0;
      while (offset < channel.length) {
        const n = Math.min(channel.length - offset, this.block.length - this.filled);
        this.block.set(channel.subarray(offset, offset + n), this.filled);
        this.filled += n;
        offset += n;
        if (this.filled === this.block.length) {
          this.port.postMessage(this.block.slice(0));
          this.filled = 0;
        }
      }
    }
    return true;
  }
}

// Plays queued Float32Array chunks back to back (no gaps between network chunks); "flush" drops what is queued.
// Reports the samples played so far to the page.
class PlayerProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = [];
    this.offset = 0;
    this.played = 0;
    this.reported = 0;
    this.port.onmessage = (event) => {
      if (event.data === "flush") {
        this.queue = [];
        this.offset = 0;
      } else {
        this.queue.push(event.data);
      }
    };
  }
  process(inputs, outputs) {
    const out = outputs[0][0];
    let written = 0;
    while (written < out.length && this.queue.length) {
      const chunk = this.queue[0];
      const n = Math.min(out.length - written, chunk.length - this.offset);
      out.set(chunk.subarray(this.offset, this.offset + n), written);
      written += n;
      this.offset += n;
      if (this.offset === chunk.length) {
        this.queue.shift();
        this.offset = 0;
      }
    }
    out.fill(0, written);
    this.played += written;
    if (this.played - this.reported >= sampleRate / 10 || (written === 0 && this.played !== this.reported)) {
      this.reported = this.played;
      this.port.postMessage({played: this.played, queued: this.queue.length});
    }
    return true;
  }
}

registerProcessor("capture-processor", CaptureProcessor);
registerProcessor("player-processor", PlayerProcessor);
