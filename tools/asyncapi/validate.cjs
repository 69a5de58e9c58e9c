// Validates AsyncAPI documents with the official parser (@asyncapi/parser), the
// one AsyncAPI's own CLI and Studio use: the JSON Schema of the specification
// and its semantic rules (references resolve, operations name their channel's
// messages, examples match their payload schema, ...).
//
//   node validate.cjs <install prefix>  <  {"<label>": "<document text>", ...}
//
// prints {"<label>": [{code, message, path, severity}, ...]}; severity 0 is
// an error, 1 a warning, 2 information, 3 a hint. The parser is loaded from
// <install prefix>/node_modules (make install puts it in .venv/asyncapi).
"use strict";

const { createRequire } = require("node:module");
const path = require("node:path");

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

async function main() {
  const prefix = process.argv[2];
  if (!prefix) throw new Error("usage: node validate.cjs <install prefix> < documents.json");
  const { Parser } = createRequire(path.resolve(prefix, "package.json"))("@asyncapi/parser");
  const documents = JSON.parse(await readStdin());
  const parser = new Parser();
  const report = {};
  for (const [label, text] of Object.entries(documents)) {
    const diagnostics = await parser.validate(text);
    report[label] = diagnostics.map((d) => ({
      code: String(d.code),
      message: d.message,
      path: d.path.map(String),
      severity: d.severity,
    }));
  }
  process.stdout.write(JSON.stringify(report));
}

main().catch((error) => {
  console.error(error.stack || String(error));
  process.exit(2);
});
