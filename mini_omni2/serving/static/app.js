// The voice page: microphone -> /v1/realtime (OpenAI Realtime API, current generation) -> streamed speech + transcript.
"use strict";

const RATE = 24000; // the API's pcm16 rate; the AudioContext runs at it so no resampling is done here
const params = new URLSearchParams(location.search);
// exposed for tests and curious users: what this page has sent, received and played
const omni = (window.omni = {connected: false, responses: 0, audioBytes: 0, played: 0, transcript: "", events: [],
                             interruptions: 0});

const $ = (id) => document.getElementById(id);
let ws = null, context = null, player = null, micStream = null, capture = null;
let current = null; // the assistant line being written
let answering = false;
let duplex = false; // the server's listening row stops answers on "stop omni" (then speech alone does not)

function setStatus(text, listening) {
  $("status").textContent = text;
  $("status").className = listening ? "listening" : "";
}

function showError(text) { $("error").textContent = text; }

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  div.textContent = text || "";
  $("transcript").appendChild(div);
  return div;
}

function toBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function fromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function floatToPcm16(samples) {
  const out = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    out[i] = s < 0 ? s * 0x8000 : s * 0x7fff;
  }
  return new Uint8Array(out.buffer);
}

function pcm16ToFloat(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(bytes.byteLength >> 1);
  for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true) / 32768;
  return out;
}

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

function sessionUpdate() {
  const maxTokens = params.get("max_output_tokens");
  return {
    type: "session.update",
    session: {
      type: "realtime",
      output_modalities: ["audio"],
      audio: {
        input: {
          format: {type: "audio/pcm", rate: RATE},
          turn_detection: {
            type: "server_vad",
            silence_duration_ms: Number(params.get("silence_ms") || 500),
            create_response: true,
            interrupt_response: true,
          },
        },
        output: {format: {type: "audio/pcm", rate: RATE}},
      },
      ...(maxTokens ? {max_output_tokens: Number(maxTokens)} : {}),
    },
  };
}

function stopPlayback() {
  if (player) player.port.postMessage("flush");
}

function onServerEvent(event) {
  omni.events.push(event.type);
  switch (event.type) {
    case "session.created":
      omni.connected = true;
      duplex = Boolean(event.session.duplex); // the model itself hears "stop omni" (docs/duplex.md)
      send(sessionUpdate());
      break;
    case "session.updated":
      setStatus("listening: speak, then pause", true);
      break;
    case "input_audio_buffer.speech_started":
      // barge-in: the server cancels the answer, the page stops playing it (with duplex the model decides)
      if (!duplex) stopPlayback();
      setStatus("hearing you…", true);
      break;
    case "output_audio_buffer.cleared": // duplex: the model heard "stop omni"
      stopPlayback();
      omni.interruptions += 1;
      setStatus("stopped: listening", true);
      break;
    case "input_audio_buffer.speech_stopped":
      setStatus("thinking…", false);
      break;
    case "conversation.item.created":
      if (event.item.role === "user") {
        const parts = event.item.content.map((c) =>
          c.type === "input_audio" ? "[speech]" : c.type === "input_image" ? "[image]" : c.text || "");
        addTurn("user", parts.join(" "));
      }
      break;
    case "response.created":
      answering = true;
      $("stop").disabled = false;
      current = addTurn("assistant", "");
      break;
    case "response.output_audio.delta": {
      const bytes = fromBase64(event.delta);
      omni.audioBytes += bytes.length;
      if (player) player.port.postMessage(pcm16ToFloat(bytes));
      setStatus("answering…", false);
      break;
    }
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      if (current) current.textContent += event.delta;
      omni.transcript += event.delta;
      break;
    case "response.done":
      answering = false;
      omni.responses += 1;
      $("stop").disabled = true;
      if (current && event.response.status === "cancelled") current.classList.add("cancelled");
      current = null;
      setStatus("listening: speak, then pause", true);
      break;
    case "error":
      showError(`${event.error.code || event.error.type}: ${event.error.message}`);
      break;
  }
}

async function start() {
  showError("");
  context = new AudioContext({sampleRate: RATE});
  await context.audioWorklet.addModule("/static/worklets.js");
  player = new AudioWorkletNode(context, "player-processor");
  player.connect(context.destination);
  player.port.onmessage = (e) => { omni.played = e.data.played; };
  micStream = await navigator.mediaDevices.getUserMedia({
    audio: {channelCount: 1, echoCancellation: true, noiseSuppression: true},
  });
  const source = context.createMediaStreamSource(micStream);
  capture = new AudioWorkletNode(context, "capture-processor");
  capture.port.onmessage = (e) => {
    send({type: "input_audio_buffer.append", audio: toBase64(floatToPcm16(e.data))});
  };
  source.connect(capture);
  await context.resume();

  const scheme = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${scheme}://${location.host}/v1/realtime`);
  ws.onmessage = (message) => onServerEvent(JSON.parse(message.data));
  ws.onclose = () => { omni.connected = false; setStatus("disconnected", false); hangUp(); };
  ws.onerror = () => showError("the connection to the server failed");
  $("talk").textContent = "Hang up";
  $("talk").classList.add("on");
}

function hangUp() {
  if (ws) { const s = ws; ws = null; s.close(); }
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  if (context) context.close();
  context = player = capture = micStream = null;
  $("talk").textContent = "Start talking";
  $("talk").classList.remove("on");
  $("stop").disabled = true;
}

$("talk").onclick = async () => {
  if (ws) { hangUp(); return; }
  try {
    await start();
  } catch (error) {
    showError(`could not start: ${error}`);
    hangUp();
  }
};

$("stop").onclick = () => {
  stopPlayback();
  if (answering) send({type: "response.cancel"});
};

$("image").onchange = () => {
  const file = $("image").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    $("preview").src = reader.result;
    $("preview").style.display = "inline";
    const item = {type: "message", role: "user", content: [{type: "input_image", image_url: reader.result}]};
    if (ws) send({type: "conversation.item.create", item});
    else showError("start talking first, then choose the image for your next turn");
  };
  reader.readAsDataURL(file);
};

fetch("/health").then((r) => r.json()).then((h) => {
  $("model").textContent = `${h.model} on ${h.device} (${h.dtype})`;
  if (h.random_weights) $("warning").textContent = "this server runs a model with RANDOM weights: its answers are noise";
}).catch(() => { $("model").textContent = "server unreachable"; });

if (params.get("autostart")) $("talk").click();
