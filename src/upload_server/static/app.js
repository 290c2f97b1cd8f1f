// The upload page: choose or drop files, send each to POST /api/v1/upload with XMLHttpRequest (for its
// upload progress events), read the NDJSON answer as it streams (progress lines, then events, actors, files
// and the summary) and show the result. Files of RESUMABLE_FROM_BYTES and more go through tus instead
// (tus-js-client, vendored beside this file), so that a reload or a lost connection resumes where the server
// stopped; their answer is fetched from /api/v1/files/{id}/result and shown the same way. No build step;
// served under a CSP that forbids inline script and style, so everything is built with DOM calls and styled
// by class.
"use strict";

(() => {
  const UPLOAD_URL = "/api/v1/upload";
  const HEALTH_URL = "/api/v1/health";
  const CONTENT_TYPES = {
    zip: "application/zip",
    gz: "application/gzip",
    json: "application/json",
    ndjson: "application/x-ndjson",
    jsonl: "application/x-ndjson",
  };
  const ACCEPTED_TEXT = ".zip, .gz, .json, .ndjson or .jsonl";
  const ACTORS_SHOWN = 100; // rows of the actors table; the filter reaches all of them
  const MAX_BUSY_RETRIES = 10; // 503 SERVER_BUSY answers retried (after Retry-After) before giving up
  const SVG_NS = "http://www.w3.org/2000/svg";
  const READ_EVERY_MS = 250; // how often the streaming answer is read
  const TUS_URL = "/api/v1/files";
  // From this size on a file goes through tus: a reload, a crash or a lost connection then costs at most the
  // chunk in flight, not the whole upload. Smaller files keep the single POST, whose answer streams
  // processing progress (a tus result is read only once it is ready), and which works without tus.
  const RESUMABLE_FROM_BYTES = 8 * 1024 * 1024;
  // One PATCH per chunk: each one's bytes are fsynced and its offset recorded before it is acknowledged,
  // and a proxy's request-size limit then bounds a chunk, not the whole file (Cloudflare's 100 MB; nginx's
  // default of 1 MiB would still need raising).
  const RESUMABLE_CHUNK_BYTES = 8 * 1024 * 1024;

  // ------------------------------------------------------------------ numbers, in the reader's locale
  const integer = new Intl.NumberFormat();
  const oneDecimal = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
  const seconds = new Intl.NumberFormat(undefined, { style: "unit", unit: "second", unitDisplay: "long" });
  const minutes = new Intl.NumberFormat(undefined, { style: "unit", unit: "minute", unitDisplay: "long" });
  const percent = new Intl.NumberFormat(undefined, { style: "percent" });
  const collator = new Intl.Collator(undefined, { sensitivity: "base", numeric: true });
  const BYTE_UNITS = ["bytes", "KiB", "MiB", "GiB", "TiB"]; // the server's sizes are binary (K = 1024)

  function formatBytes(n) {
    let value = n;
    let unit = 0;
    while (value >= 1024 && unit < BYTE_UNITS.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return `${unit === 0 ? integer.format(value) : oneDecimal.format(value)} ${BYTE_UNITS[unit]}`;
  }

  function ms(milliseconds) {
    return `${integer.format(Math.round(milliseconds || 0))} ms`;
  }

  function formatDuration(s) {
    if (!Number.isFinite(s)) return "";
    return s < 90 ? seconds.format(Math.ceil(s)) : minutes.format(Math.round(s / 60));
  }

  // ---------------------------------------------------------------------------------- small helpers
  // Retry-After in seconds (the server's form) or an HTTP date; at least one second.
  function retryAfterSeconds(value) {
    const s = /^\d+$/.test(value || "") ? Number(value) : (Date.parse(value) - Date.now()) / 1000;
    return Math.max(1, Math.ceil(s) || 5);
  }

  function jsonOrNull(text) {
    try {
      return JSON.parse(text);
    } catch {
      return null;
    }
  }

  // The server's JSON error in an answer's text, or null (a proxy's page, say: then described by status).
  function errorIn(text) {
    const value = jsonOrNull(text);
    return (value && value.error) || null;
  }

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function extensionOf(name) {
    const dot = name.lastIndexOf(".");
    return dot < 0 ? "" : name.slice(dot + 1).toLowerCase();
  }

  function isAccepted(file) {
    return Object.hasOwn(CONTENT_TYPES, extensionOf(file.name));
  }

  // ------------------------------------------------------------------------------- errors in words
  const BAD_ZIP_REASONS = {
    truncated: "it is cut short (was the download or copy complete?)",
    bad_local_header: "an entry's header is damaged",
  };
  const FILE_ERRORS = {
    INVALID_JSON: "not valid JSON",
    JSON_TOO_DEEP: "its JSON is nested too deeply",
    BAD_COMPRESSED_DATA: "its compressed data is damaged",
    ENCRYPTED_ENTRY: "it is encrypted",
    UNSUPPORTED_COMPRESSION: "it is compressed with a method the server does not read",
    VALUE_TOO_LARGE: "one value in it is larger than the server's memory budget for one value",
  };
  const IGNORED_REASONS = {
    directory: "a folder",
    macos_metadata: "macOS metadata",
    hidden_file: "a hidden file",
    nested_archive: "an archive inside the archive (not opened)",
    unsupported_name: "not named .json, .ndjson or .jsonl",
  };
  const SKIPPED_REASONS = {
    not_an_object: "values that are not objects",
    no_actor: "events without an actor",
    invalid_actor: "events whose actor has no usable id",
  };

  function zipBombWords(d) {
    switch (d.reason) {
      case "too_many_entries":
        return `it has ${integer.format(d.entries)} entries; the server opens at most ${integer.format(d.max_entries)}.`;
      case "ratio":
        return `“${d.entry}” would expand ${integer.format(Math.round(d.ratio))} times; the server allows at most ${integer.format(d.max_ratio)} times.`;
      case "total_uncompressed": {
        const size = d.declared_uncompressed_bytes ?? d.uncompressed_bytes;
        const limit = d.max_uncompressed_bytes ?? d.limit;
        return `it expands to more than ${formatBytes(limit)}${size ? ` (${formatBytes(size)})` : ""}.`;
      }
      case "overlapping_entries":
        return "its entries overlap, a trick used to make small archives expand enormously.";
      default:
        return "it expands far beyond what its headers declare.";
    }
  }

  function describeError(status, error, file) {
    const code = error && error.code;
    const d = (error && error.detail) || {};
    switch (code) {
      case "PAYLOAD_TOO_LARGE":
        return `This file is ${formatBytes(file.size)}; the server accepts at most ${formatBytes(d.max_upload_bytes)} in one upload.`;
      case "UNSUPPORTED_MEDIA_TYPE":
        return "The server did not recognise this file as a ZIP archive, a gzip file or JSON text. It judges by the first bytes, not by the name.";
      case "EMPTY_UPLOAD":
        return "The file is empty.";
      case "BAD_ZIP":
        return `The ZIP archive cannot be read: ${BAD_ZIP_REASONS[d.reason] || "it is damaged or not a ZIP archive"}.`;
      case "ZIP_BOMB":
        return `The archive was refused as a likely ZIP bomb: ${zipBombWords(d)}`;
      case "NO_JSON_FILES":
        return `The archive holds no .json, .ndjson or .jsonl file to process (it has ${integer.format(d.entries || 0)} entries).`;
      case "PROCESSING_TIMEOUT":
        return `Processing took longer than the server allows (${formatDuration(d.process_timeout_s)}); it stopped the work.`;
      case "INSUFFICIENT_STORAGE":
        if (d.reason === "spool_budget" && d.spool_budget) {
          return `This file is ${formatBytes(file.size)}; the server's storage for uploads holds ${formatBytes(d.spool_budget)} in all.`;
        }
        return "The server ran out of disk space while receiving this file.";
      case "WORKER_CRASHED":
        return "A worker process of the server died while reading this file. Trying again may work.";
      default:
        if (error && error.message) return `The server refused the upload (${status}): ${error.message}`;
        return status ? `The server answered with status ${status}.` : "The connection to the server was lost.";
    }
  }

  // Why a 503 that carries Retry-After came; the page then counts down and tries again.
  function busyWords(error) {
    const d = (error && error.detail) || {};
    if (error && error.code === "QUEUE_TIMEOUT") return "The upload waited longer than the server allows for a free worker.";
    if (d.reason === "spool_budget") return "The server's storage for uploads is taken by uploads in progress.";
    if (d.reason === "queue_full") return "More uploads are waiting for the server's workers than it lets wait.";
    return "The server is busy with other uploads.";
  }

  function fileOutcome(file) {
    const err = file.error;
    if (err) {
      const words = FILE_ERRORS[err.code] || err.message || err.code;
      const where = [];
      if (err.line !== undefined) where.push(`line ${integer.format(err.line)}`);
      if (err.offset !== undefined) where.push(`byte ${integer.format(err.offset)}`);
      return { failed: true, text: `Failed: ${words}${where.length ? ` (${where.join(", ")})` : ""}.`, why: err.message };
    }
    const skipped = skippedWords(file.skipped || {});
    return { failed: false, text: skipped ? `Read; skipped ${skipped}.` : "Read.", why: "" };
  }

  function skippedWords(skipped) {
    return Object.entries(skipped)
      .filter(([, n]) => n > 0)
      .map(([reason, n]) => `${integer.format(n)} ${SKIPPED_REASONS[reason] || reason}`)
      .join(", ");
  }

  // ---------------------------------------------------------------------------- the NDJSON answer
  // Reads the growing responseText of an XMLHttpRequest line by line. Event lines are only counted and
  // kept for download: each run of them goes into a Blob at once, as a copy. Kept as substrings they would
  // each hold on to the whole responseText read at that time: 330,000 events (a 100 MB answer) held
  // 760-950 MB of JS heap that way. Every other line is parsed.
  const EVENT_PREFIX = '{"kind":"event"';

  class AnswerReader {
    constructor(onProgress) {
      this.offset = 0;
      this.events = 0;
      this.eventParts = [];
      this.actors = [];
      this.files = [];
      this.summary = null;
      this.error = null;
      this.onProgress = onProgress;
    }

    feed(text) {
      let start = this.offset;
      let run = -1; // where the current run of event lines began
      let end = text.indexOf("\n", start);
      while (end >= 0) {
        if (text.startsWith(EVENT_PREFIX, start)) {
          if (run < 0) run = start; // the common case, without the cost of parsing it
          this.events += 1;
        } else {
          if (run >= 0) this.keepEvents(text.slice(run, start));
          run = -1;
          if (end > start) this.line(text.slice(start, end + 1));
        }
        start = end + 1;
        end = text.indexOf("\n", start);
      }
      if (run >= 0) this.keepEvents(text.slice(run, start));
      this.offset = start;
    }

    keepEvents(lines) {
      this.eventParts.push(new Blob([lines]));
    }

    line(line) {
      const value = JSON.parse(line);
      switch (value.kind) {
        case "event": this.events += 1; this.keepEvents(line); break; // written another way
        case "progress": this.onProgress(value); break;
        case "actor": this.actors.push(value); break;
        case "file": this.files.push(value); break;
        case "summary": this.summary = value; break;
        case "error": this.error = value.error; break;
        default: break; // a kind this page does not know yet: ignored, as the README allows
      }
    }

    // The JSON answer the server gives without Accept: application/x-ndjson, rebuilt from the lines.
    jsonAnswer() {
      const { kind, ...rest } = this.summary;
      const answer = {};
      for (const [key, value] of Object.entries(rest)) {
        if (key === "ignored") answer.files = this.files.map(({ kind: _, ...file }) => file);
        answer[key] = value;
        if (key === "ignored") answer.actors = this.actors.map(({ kind: _, ...actor }) => actor);
      }
      return answer;
    }
  }

  // What a 202 from …/result says, in words.
  const RESULT_STATES = {
    queued: "Waiting for a free worker…",
    processing: "The server is reading the files…",
  };

  // -------------------------------------------------------------------------------- one upload card
  let uploadsMade = 0; // numbers each card's ids

  class Upload {
    constructor(file) {
      this.file = file;
      this.xhr = null;
      this.tus = null; // the tus-js-client upload in progress, for files sent resumably
      this.timer = null;
      this.finished = false;
      this.busyRetries = 0;
      this.card = document.getElementById("upload-template").content.firstElementChild.cloneNode(true);
      this.part = (selector) => this.card.querySelector(selector);
      uploadsMade += 1;
      const id = `upload-${uploadsMade}`;
      this.part(".upload-name").id = `${id}-name`;
      this.card.setAttribute("aria-labelledby", `${id}-name`);
      this.part(".upload-name").textContent = file.name;
      this.part(".upload-size").textContent = formatBytes(file.size);
      this.part(".cancel").setAttribute("aria-label", `Cancel ${file.name}`);
      this.part(".cancel").addEventListener("click", () => this.cancel());
      this.part(".retry").addEventListener("click", () => this.retryNow());
      this.setStatus("Waiting for the uploads before it.");
      this.done = new Promise((resolve) => { this.resolve = resolve; });
    }

    setStatus(text) {
      this.part(".status").textContent = text;
    }

    start() {
      if (this.finished) return this.done;
      this.showError("", false);
      this.part(".phase-process").hidden = true;
      this.reader = new AnswerReader((p) => this.showProcessing(p));
      this.lastRead = 0;
      this.sent = { at: performance.now(), bytes: 0, rate: 0 };
      if (!this.isResumable()) this.startPost();
      else this.startResumable().catch((error) => this.fail(`The resumable upload could not start: ${error.message}`));
      return this.done;
    }

    isResumable() {
      return this.file.size >= RESUMABLE_FROM_BYTES && Boolean(window.tus && window.tus.isSupported);
    }

    startPost() {
      const xhr = new XMLHttpRequest();
      this.xhr = xhr;
      xhr.open("POST", UPLOAD_URL);
      xhr.setRequestHeader("Accept", "application/x-ndjson");
      xhr.setRequestHeader("Content-Type", CONTENT_TYPES[extensionOf(this.file.name)]);
      // Only the request in progress may change the card: not one that was given up (failed or cancelled).
      const on = (target, type, handle) => target.addEventListener(type, (e) => this.xhr === xhr && handle(e));
      on(xhr.upload, "progress", (e) => this.showUpload(e.loaded, e.lengthComputable ? e.total : this.file.size));
      on(xhr.upload, "load", () => this.enterProcessing());
      on(xhr, "progress", () => this.readAnswer());
      on(xhr, "load", () => this.answered());
      on(xhr, "error", () => this.fail(describeError(0, null, this.file)));
      on(xhr, "abort", () => this.cancelled());
      this.setStatus("Uploading…");
      xhr.send(this.file);
    }

    // ------------------------------------------------------------------- the resumable path (tus)
    // tus-js-client keeps the upload's URL in localStorage under the file's fingerprint (name, type, size,
    // last modified, endpoint): the same file chosen again after a reload continues from the offset the
    // server reports. The entry stays until the result is read, so a reload while the server processes
    // the upload finds it too (the HEAD says it is whole, and the page goes on to its result).
    async startResumable() {
      const upload = new window.tus.Upload(this.file, {
        endpoint: TUS_URL,
        chunkSize: RESUMABLE_CHUNK_BYTES,
        metadata: { filename: this.file.name, filetype: CONTENT_TYPES[extensionOf(this.file.name)] },
        removeFingerprintOnSuccess: false,
        onAfterResponse: (request, response) => {
          if (this.tus === upload && request.getMethod() === "HEAD" && response.getStatus() === 200) {
            this.resumedAt(Number(response.getHeader("Upload-Offset")));
          }
        },
        onProgress: (sent, total) => this.tus === upload && this.showUpload(sent, total),
        onSuccess: () => this.tus === upload && this.awaitResult(upload),
        onError: (error) => this.tus === upload && this.resumableFailed(error),
      });
      this.tus = upload;
      this.sent = null; // the speed is measured from the first progress, which may be a resumed offset
      const previous = await upload.findPreviousUploads();
      if (this.tus !== upload) return; // cancelled meanwhile
      previous.sort((a, b) => Date.parse(b.creationTime) - Date.parse(a.creationTime));
      if (previous.length > 0) upload.resumeFromPreviousUpload(previous[0]);
      this.setStatus(previous.length > 0 ? "Resuming an earlier upload of this file…" : "Uploading…");
      upload.start();
    }

    resumedAt(offset) {
      const of = `${formatBytes(offset)} of ${formatBytes(this.file.size)}`;
      this.setStatus(offset < this.file.size
        ? `Resumed at ${of}: the server kept what it had received.`
        : "The server has all of this file already; its result follows.");
      this.showUpload(offset, this.file.size);
    }

    // The upload is whole: wait while the server queues and processes it (202, Retry-After), then show
    // its answer (NDJSON, read as the POST path reads its own) or its error.
    async awaitResult(upload) {
      this.enterProcessing();
      const url = `${upload.url}/result`;
      let response;
      try {
        for (;;) {
          response = await fetch(url, { headers: { Accept: "application/x-ndjson" }, cache: "no-store" });
          if (this.tus !== upload || response.status !== 202) break;
          const waiting = jsonOrNull(await response.text()) || {}; // {"id", "state", "retry_after_s"}
          this.part(".detail-process").textContent = RESULT_STATES[waiting.state] || "Waiting for the server…";
          const seconds = retryAfterSeconds(response.headers.get("retry-after"));
          await new Promise((resume) => setTimeout(resume, seconds * 1000));
          if (this.tus !== upload) return;
        }
        if (this.tus !== upload) return;
        const type = response.headers.get("content-type") || "";
        if (response.status !== 200 || !type.startsWith("application/x-ndjson")) {
          const text = await response.text();
          // The server's own error is the upload's final answer; another's (a proxy's page) may pass.
          if (errorIn(text) !== null) await this.forget(upload);
          if (this.tus === upload) this.settle(response.status, type, text);
        } else if (await this.readStreaming(response, upload)) {
          await this.forget(upload); // before the card ends, so that the same file chosen next is new
          if (this.tus === upload) this.answerEnded();
        }
      } catch {
        if (this.tus !== upload) return undefined;
        return this.fail(`${describeError(0, null, this.file)} Choose the same file again to fetch its result.`);
      }
      return undefined;
    }

    // The answer read piece by piece as it arrives, so that the tab never holds all of its text at once
    // (the POST path's XMLHttpRequest must). False when the card was cancelled or failed meanwhile.
    async readStreaming(response, upload) {
      const decoder = new TextDecoder();
      const pieces = response.body.getReader();
      let pending = ""; // the last line's start, until its end arrives
      for (;;) {
        const { done, value } = await pieces.read();
        if (this.tus !== upload) return false;
        pending += decoder.decode(value, { stream: !done });
        if (!this.feedAnswer(pending)) return false;
        pending = pending.slice(this.reader.offset);
        this.reader.offset = 0;
        this.part(".detail-process").textContent = `${integer.format(this.reader.events)} events so far`;
        if (done) return true;
      }
    }

    // The page holds the answer now: the browser's note of the upload and the server's copy can go.
    async forget(upload) {
      try {
        const url = new URL(upload.url, location.href).href; // kept as the server's Location: relative
        for (const previous of await upload.findPreviousUploads()) {
          if (new URL(previous.uploadUrl, location.href).href === url) {
            await upload.options.urlStorage.removeUpload(previous.urlStorageKey);
          }
        }
        await fetch(upload.url, { method: "DELETE", headers: { "Tus-Resumable": "1.0.0" } });
      } catch {
        // Left behind, the server's copy expires after --result-ttl and a stale note is dropped on its 404.
      }
    }

    resumableFailed(error) {
      const response = error && error.originalResponse;
      const status = response ? response.getStatus() : 0;
      const words = describeError(status, response ? errorIn(response.getBody()) : null, this.file);
      this.fail(status === 0 ? `${words} Choose the same file again to continue where it stopped.` : words);
    }

    showUpload(loaded, total) {
      const now = performance.now();
      if (!this.sent) this.sent = { at: now, bytes: loaded, rate: 0 };
      const elapsed = (now - this.sent.at) / 1000;
      if (elapsed >= 0.25) {
        // Smoothed over the last few readings, so speed and time left do not jump about.
        const rate = (loaded - this.sent.bytes) / elapsed;
        this.sent = { at: now, bytes: loaded, rate: this.sent.rate ? 0.7 * this.sent.rate + 0.3 * rate : rate };
      }
      const bar = this.part(".bar-upload");
      bar.max = total || 1;
      bar.value = loaded;
      const parts = [`${formatBytes(loaded)} of ${formatBytes(total)} sent (${percent.format(total ? loaded / total : 1)})`];
      if (this.sent.rate > 0 && loaded < total) {
        parts.push(`${formatBytes(this.sent.rate)}/s`, `${formatDuration((total - loaded) / this.sent.rate)} left`);
      }
      this.part(".detail-upload").textContent = parts.join(" · ");
    }

    enterProcessing() {
      this.showUpload(this.file.size, this.file.size);
      this.part(".phase-process").hidden = false;
      this.part(".bar-process").removeAttribute("value"); // indeterminate until a progress line arrives
      this.part(".detail-process").textContent = "Waiting for the server…";
      this.setStatus("Uploaded; the server is reading the files.");
    }

    isNdjson() {
      const type = this.xhr.getResponseHeader("content-type") || "";
      return this.xhr.status === 200 && type.startsWith("application/x-ndjson");
    }

    // False (and the card failed) when the answer has a line that is not JSON.
    feedAnswer(text) {
      try {
        this.reader.feed(text);
        return true;
      } catch {
        const xhr = this.xhr;
        this.fail("The server's answer could not be read (a line that is not JSON).");
        if (xhr) xhr.abort();
        return false;
      }
    }

    readAnswer() {
      // Each read of responseText costs a copy of all of it (Chromium flattens the growing string): read
      // at most every READ_EVERY_MS, which is still finer than the server's progress lines.
      const now = performance.now();
      if (now - this.lastRead < READ_EVERY_MS) return;
      this.lastRead = now;
      if (!this.isNdjson() || !this.feedAnswer(this.xhr.responseText)) return;
      if (!this.reader.sawProgress) {
        this.part(".detail-process").textContent = `${integer.format(this.reader.events)} events so far`;
      }
    }

    showProcessing(p) {
      this.reader.sawProgress = true;
      const bar = this.part(".bar-process");
      const byBytes = p.bytes_total > 0;
      bar.max = (byBytes ? p.bytes_total : p.files_total) || 1;
      bar.value = byBytes ? p.bytes_done : p.files_done;
      const parts = [`${integer.format(p.files_done)} of ${integer.format(p.files_total)} files`];
      if (byBytes) parts.push(`${formatBytes(p.bytes_done)} of ${formatBytes(p.bytes_total)}`);
      parts.push(`${integer.format(p.events)} events`);
      this.part(".detail-process").textContent = parts.join(" · ");
    }

    answered() {
      const xhr = this.xhr;
      const retryAfter = xhr.getResponseHeader("retry-after");
      if (xhr.status === 503 && retryAfter) return this.busy(busyWords(errorIn(xhr.responseText)), retryAfter);
      return this.settle(xhr.status, xhr.getResponseHeader("content-type") || "", xhr.responseText);
    }

    // A whole answer, from either path: the NDJSON stream shown as the result, or the error in words.
    settle(status, contentType, text) {
      if (status === 200 && contentType.startsWith("application/x-ndjson")) {
        return this.feedAnswer(text) ? this.answerEnded() : undefined;
      }
      return this.fail(describeError(status, errorIn(text), this.file));
    }

    answerEnded() {
      if (this.reader.summary) return this.succeed();
      if (this.reader.error) return this.fail(`The server stopped part-way: ${describeError(200, this.reader.error, this.file)}`);
      return this.fail("The answer ended before its summary line, so it is incomplete. Try again.");
    }

    busy(why, retryAfter) {
      this.busyRetries += 1;
      if (this.busyRetries > MAX_BUSY_RETRIES) {
        return this.fail(`${why} It stayed so through ${integer.format(MAX_BUSY_RETRIES)} tries; try again later.`);
      }
      let left = retryAfterSeconds(retryAfter);
      this.showError(`${why} Retrying in ${formatDuration(left)}…`, true);
      this.timer = setInterval(() => {
        left -= 1;
        if (left <= 0) return this.retryNow();
        this.part(".error-text").textContent = `${why} Retrying in ${formatDuration(left)}…`;
      }, 1000);
      this.setStatus("Waiting to retry.");
    }

    retryNow() {
      clearInterval(this.timer);
      this.timer = null;
      this.start();
    }

    showError(text, retry) {
      this.part(".error-text").textContent = text;
      this.part(".retry").hidden = !retry;
    }

    fail(text) {
      this.finish("Failed.");
      this.part(".phase-process").hidden = true;
      this.showError(text, false);
    }

    cancel() {
      if (this.timer !== null) {
        clearInterval(this.timer);
        this.timer = null;
        this.showError("", false);
        return this.cancelled();
      }
      if (this.xhr) return this.xhr.abort(); // its abort event ends the card
      if (this.tus) {
        this.tus.abort(true).catch(() => null); // true: DELETE, so the server drops its bytes and its work
        return this.cancelled("Cancelled. The server removes what it received of this file.");
      }
      return this.cancelled(); // still waiting in the queue
    }

    cancelled(words = "Cancelled. The server stops its work on this upload when the connection closes.") {
      this.finish(words);
      this.card.classList.add("is-cancelled");
    }

    finish(status) {
      this.finished = true;
      this.xhr = null; // and with it the answer's text
      this.tus = null; // its callbacks no longer change the card
      this.setStatus(status);
      this.part(".cancel").hidden = true;
      this.card.classList.add("is-finished");
      this.resolve();
    }

    succeed() {
      const { summary } = this.reader;
      this.finish(`Done: ${integer.format(summary.summary.events)} events read.`);
      this.part(".phase-process").hidden = true;
      renderResult(this.card, this.reader, this.file);
    }
  }

  // ----------------------------------------------------------------------------------- the result
  function renderResult(card, reader, file) {
    const part = (selector) => card.querySelector(selector);
    const answer = reader.summary;
    const s = answer.summary;
    const skipped = Object.values(s.skipped || {}).reduce((a, b) => a + b, 0);
    const counts = { ...s, skipped };
    for (const dd of card.querySelectorAll("dd[data-count]")) {
      dd.textContent = integer.format(counts[dd.dataset.count] || 0);
    }
    const skippedText = skippedWords(s.skipped || {});
    const timing = answer.timing_ms || {};
    part(".received").textContent =
      `${formatBytes(answer.size_bytes)} received as ${answer.content_kind}` +
      `${skippedText ? `; skipped ${skippedText}` : ""}. ` +
      `Receiving took ${ms(timing.receive)}, ${Math.round(timing.queue || 0) > 0 ? `waiting for a worker ${ms(timing.queue)}, ` : ""}processing ${ms(timing.process)}.`;
    part(".result").hidden = false; // before the chart, which is drawn to the width it is given
    const chartId = `${card.getAttribute("aria-labelledby")}-chart`;
    part(".chart-title").id = chartId;
    drawChart(part(".chart"), s.event_types || {}, chartId);
    new ActorsTable(part(".actors"), part(".actor-filter"), part(".actors-shown"), reader.actors);
    renderFiles(part(".files tbody"), reader.files, answer.ignored || []);
    const base = file.name.replace(/\.[^.]*$/, "");
    setDownload(part(".download-json"), [JSON.stringify(reader.jsonAnswer(), null, 2)], "application/json", `${base}.answer.json`);
    setDownload(part(".download-ndjson"), reader.eventParts, "application/x-ndjson", `${base}.events.ndjson`);
  }

  function setDownload(link, parts, type, name) {
    link.href = URL.createObjectURL(new Blob(parts, { type }));
    link.download = name;
  }

  // Drawn in the figure's own pixel width, so its text keeps the page's size; drawn again when that
  // width changes (a rotated phone, a resized window).
  function drawChart(figure, types, labelledBy) {
    let drawnWidth = 0;
    const draw = () => {
      const width = Math.round(figure.clientWidth);
      if (width === drawnWidth || width === 0) return;
      drawnWidth = width;
      figure.replaceChildren(...eventTypeChart(types, labelledBy, width));
    };
    draw();
    new ResizeObserver(draw).observe(figure);
  }

  // Event types as horizontal bars: one row per type, its name and count above its bar, so long names
  // fit a 375 px screen.
  function eventTypeChart(types, labelledBy, width) {
    const entries = Object.entries(types).sort((a, b) => b[1] - a[1] || collator.compare(a[0], b[0]));
    if (entries.length === 0) return [el("p", "No events.")];
    const row = 32;
    const max = entries[0][1] || 1;
    const svg = document.createElementNS(SVG_NS, "svg");
    svg.setAttribute("viewBox", `0 0 ${width} ${entries.length * row}`);
    svg.setAttribute("width", String(width));
    svg.setAttribute("height", String(entries.length * row));
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-labelledby", labelledBy);
    svg.setAttribute("class", "bars");
    const total = entries.reduce((sum, [, n]) => sum + n, 0);
    const described = entries.map(([type, n]) => `${type}: ${integer.format(n)}`).join(", ");
    svg.append(svgNode("desc", { textContent: described }));
    entries.forEach(([type, n], i) => {
      const y = i * row;
      const g = svgNode("g", { class: "bar", "data-type": type, "data-count": String(n) });
      g.append(
        svgNode("text", { x: 0, y: y + 13, class: "bar-label", textContent: type }),
        svgNode("text", { x: width, y: y + 13, class: "bar-value", textContent: `${integer.format(n)} (${percent.format(n / total)})` }),
        svgNode("rect", { x: 0, y: y + 18, height: 10, rx: 2, width: Math.max(2, (n / max) * width), class: "bar-fill" }),
      );
      svg.append(g);
    });
    return [svg];
  }

  function svgNode(tag, attributes) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (name === "textContent") node.textContent = value;
      else node.setAttribute(name, String(value));
    }
    return node;
  }

  class ActorsTable {
    constructor(table, filter, shown, actors) {
      this.table = table;
      this.shown = shown;
      this.actors = actors;
      this.sort = { key: "events", descending: true };
      this.query = "";
      filter.addEventListener("input", () => {
        this.query = filter.value.trim().toLocaleLowerCase();
        this.render();
      });
      for (const button of table.querySelectorAll("th button")) {
        button.addEventListener("click", () => this.sortBy(button.dataset.sort));
      }
      this.render();
    }

    sortBy(key) {
      // A new column starts in its natural order (most events first, logins A to Z); again reverses it.
      this.sort = key === this.sort.key ? { key, descending: !this.sort.descending } : { key, descending: key === "events" };
      for (const button of this.table.querySelectorAll("th button")) {
        const active = button.dataset.sort === key;
        button.parentElement.setAttribute("aria-sort", active ? (this.sort.descending ? "descending" : "ascending") : "none");
      }
      this.render();
    }

    compare(a, b) {
      const byLogin = collator.compare(a.login || "", b.login || "");
      const primary = this.sort.key === "events" ? a.events - b.events || -byLogin : byLogin || b.events - a.events;
      return this.sort.descending ? -primary : primary;
    }

    render() {
      const matching = this.query
        ? this.actors.filter((a) => (a.login || "").toLocaleLowerCase().includes(this.query))
        : this.actors.slice();
      matching.sort((a, b) => this.compare(a, b));
      const rows = matching.slice(0, ACTORS_SHOWN).map((actor) => {
        const tr = el("tr");
        tr.append(el("td", actor.login || `#${actor.id}`), el("td", integer.format(actor.events), "num"));
        return tr;
      });
      this.table.tBodies[0].replaceChildren(...rows);
      const total = integer.format(this.actors.length);
      this.shown.textContent = this.query
        ? `${integer.format(matching.length)} of ${total} actors match; ${matching.length > ACTORS_SHOWN ? `showing the first ${integer.format(ACTORS_SHOWN)}` : "all shown"}.`
        : `Showing ${integer.format(rows.length)} of ${total} actors.`;
    }
  }

  function renderFiles(tbody, files, ignored) {
    const rows = files.map((file) => {
      const outcome = fileOutcome(file);
      const tr = el("tr", null, outcome.failed ? "file-failed" : "");
      const cell = el("td", outcome.text);
      if (outcome.why) cell.append(el("span", ` ${outcome.why}`, "why"));
      tr.append(el("td", file.name, "name"), el("td", formatBytes(file.size_bytes || 0), "num size"),
        el("td", outcome.failed ? "—" : integer.format(file.events), "num events"), cell);
      return tr;
    });
    for (const item of ignored) {
      const tr = el("tr", null, "file-ignored");
      tr.append(el("td", item.name, "name"), el("td", "", "num size"), el("td", "—", "num events"),
        el("td", `Ignored: ${IGNORED_REASONS[item.reason] || item.reason}.`));
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
  }

  // ------------------------------------------------------------------------------ choosing files
  const queue = [];
  let running = false;

  async function runQueue() {
    if (running) return;
    running = true;
    while (queue.length > 0) {
      await queue.shift().start();
    }
    running = false;
  }

  function addFiles(files) {
    const refused = [];
    const list = document.getElementById("uploads");
    for (const file of files) {
      if (!isAccepted(file)) {
        refused.push(file.name);
        continue;
      }
      const upload = new Upload(file);
      list.prepend(upload.card);
      queue.push(upload);
    }
    const message = document.getElementById("refused");
    message.textContent = refused.length
      ? `Not uploaded: ${refused.map((n) => `“${n}”`).join(", ")}. Only ${ACCEPTED_TEXT} files are accepted.`
      : "";
    runQueue();
  }

  function setUpDropping() {
    const zone = document.getElementById("drop-zone");
    let depth = 0; // dragenter/dragleave fire for every child crossed
    document.addEventListener("dragenter", (e) => {
      e.preventDefault();
      depth += 1;
      zone.classList.add("is-dragging");
    });
    document.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (depth === 0) zone.classList.remove("is-dragging");
    });
    document.addEventListener("dragover", (e) => e.preventDefault());
    document.addEventListener("drop", (e) => {
      e.preventDefault();
      depth = 0;
      zone.classList.remove("is-dragging");
      if (e.dataTransfer && e.dataTransfer.files.length) addFiles(e.dataTransfer.files);
    });
  }

  async function showLimit() {
    // The server's own limit, to say it before a too-large file is sent (the server still decides).
    try {
      const health = await (await fetch(HEALTH_URL, { cache: "no-store" })).json();
      const limit = health.limits && health.limits.max_upload_bytes;
      if (limit) document.getElementById("limit").textContent = `, up to ${formatBytes(limit)} each.`;
    } catch {
      // No limit shown: the page works without it.
    }
  }

  function main() {
    const input = document.getElementById("file-input");
    document.getElementById("choose").addEventListener("click", () => input.click());
    input.addEventListener("change", () => {
      addFiles(input.files);
      input.value = ""; // choosing the same file again is a new upload
    });
    setUpDropping();
    showLimit();
  }

  main();
})();
