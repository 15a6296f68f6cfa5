// node wait-healthy.js ADDRESS [SECONDS [PID]]: exit 0 as soon as the server at
// ADDRESS answers grpc.health.v1 Check with SERVING; 1 after SECONDS (default
// 30), or as soon as process PID (the server being started) has ended.
import { readFileSync } from 'node:fs';

import { TaskServiceClient } from './client.js';

const [address = '127.0.0.1:50051', seconds = '30', pid] = process.argv.slice(2);

function alive(processId) {
  try {
    // A child that ended but was not reaped yet (a zombie) still takes signals.
    if (readFileSync(`/proc/${processId}/stat`, 'utf8').match(/\) (\S)/)?.[1] === 'Z') return false;
  } catch {
    // No /proc (not Linux), or no such process: kill(0) below tells.
  }
  try {
    process.kill(Number(processId), 0);
    return true;
  } catch (error) {
    return error.code === 'EPERM';
  }
}
const deadline = Date.now() + Number(seconds) * 1000;
// Retry connecting every 100-500 ms, not grpc-js's default backoff (1 s growing
// to 2 min), so a server that comes up is seen at once.
const channelOptions = { 'grpc.initial_reconnect_backoff_ms': 100, 'grpc.max_reconnect_backoff_ms': 500 };
const client = new TaskServiceClient(address, { timeoutMs: 1_000, channelOptions });
let last = 'no answer';
while (Date.now() < deadline) {
  if (pid && !alive(pid)) {
    last = `process ${pid} ended`;
    break;
  }
  try {
    last = await client.health('taskservice.v1.TaskService');
    if (last === 'SERVING') break;
  } catch (error) {
    last = error.message;
  }
  await new Promise((resolve) => setTimeout(resolve, 200));
}
client.close();
if (last !== 'SERVING') {
  console.error(`taskservice at ${address} not SERVING (waited up to ${seconds}s): ${last}`);
  process.exit(1);
}
