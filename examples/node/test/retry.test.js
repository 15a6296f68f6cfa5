// The shipped gRPC service config, as grpc-js reads it (no taskservice needed):
// a stand-in server answers each call UNAVAILABLE once, as a server that
// restarts or drains does, and the client's channel retries it; Start and
// Cancel carry one request_id through every attempt.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import * as grpc from '@grpc/grpc-js';

import { TaskServiceClient, loadProtos, loadServiceConfig } from '../client.js';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
const TASK = { id: '2b1f4bf4-0c39-4e8c-9d59-7d4d4e0c7d11', task_name: 'demo.dummy', state: 'TASK_STATE_QUEUED', sequence: '1' };

/** What the stand-in received: method -> the requests of each attempt. */
const received = {};
let server;
let address;

function failingOnce(method, answer) {
  return (call, callback) => {
    const attempts = (received[method] ??= []);
    attempts.push(call.request);
    if (attempts.length === 1) callback({ code: grpc.status.UNAVAILABLE, details: 'restarting' });
    else callback(null, answer);
  };
}

before(async () => {
  const { TaskService } = loadProtos();
  server = new grpc.Server();
  server.addService(TaskService.service, {
    Start: failingOnce('Start', { task: TASK }),
    GetStatus: failingOnce('GetStatus', { task: TASK }),
    Cancel: failingOnce('Cancel', { task: TASK }),
    ListTaskTypes: failingOnce('ListTaskTypes', { task_types: [] }),
  });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (error, bound) => (error ? reject(error) : resolve(bound)));
  });
  address = `127.0.0.1:${port}`;
});
after(() => server.forceShutdown());

test('reads, Start and Cancel answered UNAVAILABLE once are retried; one request_id per call', async () => {
  const client = new TaskServiceClient(address);
  try {
    // At once: each waits out its own back-off.
    const [task, types] = await Promise.all([
      client.getStatus({ task_id: TASK.id }),
      client.listTaskTypes(),
      client.start({ task_name: 'demo.dummy' }),
      client.cancel({ task_id: TASK.id, request_id: 'mine-1' }),
    ]);
    assert.equal(task.id, TASK.id);
    assert.deepEqual(types, []);
  } finally {
    client.close();
  }
  for (const method of ['GetStatus', 'ListTaskTypes', 'Start', 'Cancel']) assert.equal(received[method].length, 2, method);
  const [first, again] = received.Start.map((request) => request.request_id);
  assert.match(first, UUID);
  assert.equal(again, first);
  assert.deepEqual(received.Cancel.map((request) => request.request_id), ['mine-1', 'mine-1']);
});

test('without the service config the first UNAVAILABLE reaches the caller', async () => {
  delete received.GetStatus;
  const client = new TaskServiceClient(address, { serviceConfig: null });
  try {
    await assert.rejects(client.getStatus({ task_id: TASK.id }), (error) => error.code === grpc.status.UNAVAILABLE);
  } finally {
    client.close();
  }
  assert.equal(received.GetStatus.length, 1);
});

test('every Start and Cancel gets a request_id of its own', async () => {
  delete received.Start;
  delete received.Cancel;
  const client = new TaskServiceClient(address, { serviceConfig: null });
  try {
    for (let i = 0; i < 2; i++) {
      await client.start({ task_name: 'demo.dummy' }).catch(() => {});
      await client.cancel({ task_id: TASK.id }).catch(() => {});
    }
  } finally {
    client.close();
  }
  const ids = [...received.Start, ...received.Cancel].map((request) => request.request_id);
  assert.equal(ids.length, 4);
  assert.ok(ids.every((id) => UUID.test(id)));
  assert.equal(new Set(ids).size, 4);
});

test('grpc-js refuses a service config that breaks its rules, so the shipped one passed them', () => {
  const broken = JSON.parse(loadServiceConfig());
  broken.methodConfig[0].retryPolicy.maxAttempts = 1;
  assert.throws(() => new TaskServiceClient(address, { serviceConfig: JSON.stringify(broken) }), /maxAttempts/);
});
