// A Node.js client written from the .proto files alone, with only protos/ on its include path
// (@grpc/grpc-js + @grpc/proto-loader, pinned in package.json). tests/test_protos.py runs it against
// a loopback server and compares what it prints with the Python client's results.
//   node tests/node_client.js HOST:PORT PROMPT
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [address, prompt] = process.argv.slice(2);
const definition = protoLoader.loadSync('retroserve/v1/retroserve.proto', {
  includeDirs: [path.join(__dirname, '..', 'protos')],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
});
const api = grpc.loadPackageDefinition(definition).retroserve.v1;
const client = new api.Retroserve(address, grpc.credentials.createInsecure());
const deadline = () => new Date(Date.now() + 120000);

function unary(method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: deadline() }, (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

function stream(request) {
  return new Promise((resolve, reject) => {
    const pieces = [];
    let stopReason = '';
    const call = client.GenerateStream(request, { deadline: deadline() });
    call.on('data', (message) => {
      pieces.push(message.text);
      if (message.stop_reason !== 'STOP_REASON_UNSPECIFIED') stopReason = message.stop_reason;
    });
    call.on('error', reject);
    call.on('end', () => resolve({ text: pieces.join(''), stop_reason: stopReason }));
  });
}

async function main() {
  const request = {
    prompt,
    stopping: { max_new_tokens: 16 },
    retrieval: { mode: 'RETRIEVAL_MODE_CHUNK', return_provenance: true },
  };
  const info = await unary('Info', {});
  const reply = await unary('Generate', request);
  const streamed = await stream(request);
  const invalid = await unary('Generate', { prompt, sampling: { temperature: -1 } }).then(
    () => null, (error) => ({ code: grpc.status[error.code], details: error.details }));
  console.log(JSON.stringify({
    model: info.model,
    text: reply.text,
    stop_reason: reply.stop_reason,
    chunk_ids: reply.retrievals.map((r) => r.neighbours.map((n) => String(n.chunk_id))),
    stream: streamed,
    invalid,
  }));
  client.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
