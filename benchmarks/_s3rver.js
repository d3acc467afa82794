// s3rver (npm, a file-backed S3-compatible server) on 127.0.0.1 with a bucket "bench", answering
// every request LATENCY_MS late, as S3 answers 15-30 ms after a request. Prints its port.
//   node --openssl-legacy-provider benchmarks/_s3rver.js DIRECTORY LATENCY_MS
// s3rver signs ListObjectsV2 continuation tokens with DES, which OpenSSL 3 keeps in its legacy
// provider: without that flag every listing past 1,000 keys fails with InternalError.
'use strict';
const S3rver = require('s3rver');

const [directory, latencyArg] = process.argv.slice(2);
const latencyMs = Number(latencyArg || 0);
const server = new S3rver({
  address: '127.0.0.1', port: 0, silent: true, directory,
  configureBuckets: [{ name: 'bench' }],
});
// first in the chain, so every request waits, whatever route answers it
server.middleware.unshift(async (ctx, next) => {
  if (latencyMs > 0) await new Promise(resolve => setTimeout(resolve, latencyMs));
  await next();
});
server.run().then(address => console.log(address.port));
