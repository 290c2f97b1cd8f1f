// Upload a file with tus-js-client in chunks; abort once `abortAt` bytes are acknowledged, then resume the
// same upload from its URL with a fresh Upload object (as a page reload would), and print the URL.
// usage: node tus_upload.mjs <endpoint> <file> <chunkSize> <abortAt>
import { readFileSync } from "node:fs";
import * as tus from "tus-js-client";

const [endpoint, path, chunkSize, abortAt] = process.argv.slice(2);
const data = readFileSync(path);

function start(options) {
  return new Promise((resolve, reject) => {
    const upload = new tus.Upload(data, {
      endpoint,
      chunkSize: Number(chunkSize),
      retryDelays: [],
      metadata: { filename: "day.zip" },
      ...options,
      onError: reject,
      onSuccess: () => resolve(upload),
    });
    if (options.onChunk) {
      upload.options.onChunkComplete = (_size, accepted) => options.onChunk(upload, accepted, resolve);
    }
    upload.start();
  });
}

const first = await start({
  onChunk: (upload, accepted, resolve) => {
    if (accepted >= Number(abortAt)) {
      upload.abort().then(() => resolve(upload));
    }
  },
});
const url = first.url;
let resumedFrom = -1;
await start({
  uploadUrl: url,
  onProgress: (sent) => {
    if (resumedFrom < 0) resumedFrom = sent;
  },
});
console.log(JSON.stringify({ url, resumedFrom, size: data.length }));
