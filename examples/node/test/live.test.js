// Against a live server (TASKSERVICE_ADDRESS, default 127.0.0.1:50051) with
// the demo tasks, as `taskservice dev` runs it: ci.sh starts one.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';

import * as grpc from '@grpc/grpc-js';

import { TaskServiceClient, TaskServiceError, decodeError, loadProtos } from '../client.js';

const ADDRESS = process.env.TASKSERVICE_ADDRESS || '127.0.0.1:50051';
const RUN = `node-${process.pid}-${Date.now().toString(36)}`;
let keys = 0;
/** An exclusivity key no other test (or run) uses. */
const uniqueKey = (what) => `${RUN}-${what}-${++keys}`;
const TIMEOUT = { timeout: 30_000 };

let client;
before(async () => {
  client = new TaskServiceClient(ADDRESS);
  // Fail fast, and say why, when no server is there (rather than a deadline per test).
  const probe = new TaskServiceClient(ADDRESS, { timeoutMs: 3_000 });
  try {
    assert.equal(await probe.health(''), 'SERVING');
  } catch (error) {
    throw new Error(`no healthy taskservice at ${ADDRESS} (start \`taskservice dev\` or set TASKSERVICE_ADDRESS): ${error.message}`);
  } finally {
    probe.close();
  }
});
after(() => client.close());

/** Every message of a watch, to the stream's end. */
async function watchAll(selector) {
  const seen = [];
  for await (const task of client.watch(selector)) seen.push(task);
  return seen;
}

/** Watch until `state`; leaving the loop early cancels the stream. */
async function waitFor(taskId, state) {
  for await (const task of client.watch({ task_id: taskId })) {
    if (task.state === state) return task;
    assert.equal(task.terminal, false, `ended ${task.state} before ${state}`);
  }
  assert.fail(`the stream ended before ${state}`);
}

/** The TaskServiceError `promise` rejects with. */
async function rejection(promise) {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof TaskServiceError, `not a TaskServiceError: ${error}`);
    return error;
  }
  assert.fail('the call succeeded');
}

test('health check answers SERVING', TIMEOUT, async () => {
  assert.equal(await client.health(''), 'SERVING');
  assert.equal(await client.health('taskservice.v1.TaskService'), 'SERVING');
});

test('ListTaskTypes lists the demos, defaults as plain JS values', TIMEOUT, async () => {
  const types = await client.listTaskTypes();
  const dummy = types.find((type) => type.name === 'demo.dummy');
  assert.ok(dummy, `no demo.dummy in ${types.map((t) => t.name)}`);
  assert.equal(dummy.default_exclusivity_key, 'demo');
  assert.deepEqual(
    dummy.parameters.map((p) => [p.name, p.default_value, p.required]),
    [['name', 'Bob', false], ['seconds', 5, false]],
  );
  assert.ok(types.some((type) => type.name === 'demo.fail'));
  // No key settings of its own: the server's slots and line limit (0), no
  // quiet period, and REPLACE terminates it.
  assert.deepEqual(
    [dummy.key_slots, dummy.key_line_limit, dummy.quiet_period, dummy.quiet_after_success, dummy.replace_mode],
    [0, 0, null, false, 'CANCEL_MODE_TERMINATE'],
  );
});

test('a started task is watched to SUCCEEDED, in order, its result a plain JS value', TIMEOUT, async () => {
  const key = uniqueKey('run');
  const { task, already_existed } = await client.start({ task_name: 'demo.dummy', kwargs: { name: 'Ada', seconds: 0.2 }, exclusivity_key: key });
  assert.equal(already_existed, false);
  assert.equal(task.exclusivity_key, key);
  assert.equal(task.state, 'TASK_STATE_QUEUED');
  assert.equal(typeof task.sequence, 'number');

  const seen = await watchAll({ task_id: task.id });
  const last = seen.at(-1);
  assert.equal(last.state, 'TASK_STATE_SUCCEEDED');
  assert.equal(last.outcome, 'result');
  assert.equal(last.result, 'Hello Ada!');
  assert.equal(last.error, null);
  assert.ok(last.end_time instanceof Date && last.end_time >= last.create_time);
  // Only the last message is terminal, and sequence numbers go strictly up.
  assert.deepEqual(seen.map((t) => t.terminal), [...seen.slice(1).map(() => false), true]);
  for (let i = 1; i < seen.length; i++) assert.ok(seen[i].sequence > seen[i - 1].sequence, `sequence ${seen.map((t) => t.sequence)}`);
  assert.ok(last.sequence >= task.sequence + 2, 'at least a start and an end after the Start');

  // Resuming after the terminal state yields nothing; GetStatus agrees.
  assert.deepEqual(await watchAll({ task_id: task.id, after_sequence: last.sequence }), []);
  const status = await client.getStatus({ exclusivity_key: key });
  assert.equal(status.id, task.id);
  assert.equal(status.sequence, last.sequence);
});

test('a Struct result arrives as a plain object; progress as numbers', TIMEOUT, async () => {
  const done = await client.run({ task_name: 'demo.progress', kwargs: { steps: 2, seconds_per_step: 0.05 } });
  assert.equal(done.state, 'TASK_STATE_SUCCEEDED');
  assert.deepEqual(done.result, { steps: 2 });
  assert.deepEqual(done.progress, { current: 2, total: 2, message: 'step 2 of 2' });
});

test('ALREADY_EXISTS: ErrorInfo metadata.task_id names the running task', TIMEOUT, async () => {
  const key = uniqueKey('busy');
  const { task: running } = await client.start({ task_name: 'demo.dummy', kwargs: { seconds: 30 }, exclusivity_key: key });
  try {
    const error = await rejection(client.start({ task_name: 'demo.dummy', kwargs: { seconds: 0.1 }, exclusivity_key: key }));
    assert.equal(error.code, grpc.status.ALREADY_EXISTS);
    assert.equal(error.reason, 'TASK_ALREADY_RUNNING');
    assert.equal(error.domain, 'taskservice.dev');
    assert.equal(error.metadata.task_id, running.id);

    // The same with the raw grpc-js stub and decodeError.
    const { TaskService } = loadProtos();
    const raw = new TaskService(ADDRESS, grpc.credentials.createInsecure());
    const rawError = await new Promise((resolve) =>
      raw.Start({ task_name: 'demo.dummy', exclusivity_key: key }, (err) => resolve(err)),
    );
    raw.close();
    assert.equal(rawError.code, grpc.status.ALREADY_EXISTS);
    assert.equal(decodeError(rawError).errorInfo.metadata.task_id, running.id);

    // RETURN_EXISTING answers with the running task instead.
    const existing = await client.start({ task_name: 'demo.dummy', exclusivity_key: key, conflict_policy: 'CONFLICT_POLICY_RETURN_EXISTING' });
    assert.equal(existing.already_existed, true);
    assert.equal(existing.task.id, running.id);
  } finally {
    await client.cancel({ task_id: running.id, mode: 'CANCEL_MODE_KILL' });
  }
});

for (const mode of ['CANCEL_MODE_KILL', 'CANCEL_MODE_TERMINATE']) {
  test(`a ${mode} cancel of a running demo.dummy ends CANCELLED and frees its key`, TIMEOUT, async () => {
    const key = uniqueKey('cancel');
    const { task } = await client.start({ task_name: 'demo.dummy', kwargs: { seconds: 30 }, exclusivity_key: key });
    await waitFor(task.id, 'TASK_STATE_RUNNING');

    const answer = await client.cancel({ task_id: task.id, mode });
    assert.equal(answer.state, 'TASK_STATE_CANCELLED');
    assert.equal(answer.cancel_mode, mode);
    assert.equal(answer.result, undefined);
    const seen = await watchAll({ task_id: task.id });
    assert.equal(seen.at(-1).state, 'TASK_STATE_CANCELLED');

    // Cancelling again answers the cancelled task; the key is free for a new task.
    assert.equal((await client.cancel({ task_id: task.id, mode })).state, 'TASK_STATE_CANCELLED');
    const next = await client.run({ task_name: 'demo.dummy', kwargs: { seconds: 0 }, exclusivity_key: key });
    assert.equal(next.state, 'TASK_STATE_SUCCEEDED');
    const finished = await rejection(client.cancel({ task_id: next.id }));
    assert.equal(finished.code, grpc.status.FAILED_PRECONDITION);
    assert.equal(finished.reason, 'TASK_FINISHED');
  });
}

test('a failed task carries its exception type, message and traceback', TIMEOUT, async () => {
  const done = await client.run({ task_name: 'demo.fail', kwargs: { message: 'boom from node' } });
  assert.equal(done.state, 'TASK_STATE_FAILED');
  assert.equal(done.outcome, 'error');
  assert.equal(done.result, undefined);
  assert.equal(done.error.type, 'ValueError');
  assert.equal(done.error.message, 'boom from node');
  assert.match(done.error.traceback, /ValueError: boom from node/);
});

test('bad arguments answer INVALID_ARGUMENT with BadRequest field violations', TIMEOUT, async () => {
  // A keyword the task does not take.
  const unknown = await rejection(client.start({ task_name: 'demo.dummy', kwargs: { nope: 1 }, exclusivity_key: uniqueKey('bad') }));
  assert.equal(unknown.code, grpc.status.INVALID_ARGUMENT);
  assert.equal(unknown.reason, 'INVALID_ARGUMENT');
  assert.equal(unknown.violations.length, 1);
  assert.match(unknown.violations[0].description, /nope/);

  // The casing pitfall, live: a snake_case `string_value` reaches the server as an
  // empty Value, which it refuses (rather than read as null), naming the field.
  const { TaskService } = loadProtos();
  const raw = new TaskService(ADDRESS, grpc.credentials.createInsecure());
  const misspelt = await new Promise((resolve) =>
    raw.Start(
      { task_name: 'demo.dummy', kwargs: { fields: { name: { string_value: 'Ada' } } }, exclusivity_key: uniqueKey('bad') },
      (err) => resolve(err),
    ),
  );
  raw.close();
  const decoded = decodeError(misspelt);
  assert.equal(decoded.codeName, 'INVALID_ARGUMENT');
  assert.deepEqual(decoded.badRequest.field_violations.map((v) => v.field), ['kwargs.name']);

  // An unknown task type names itself in the ErrorInfo.
  const noType = await rejection(client.start({ task_name: 'demo.nope' }));
  assert.equal(noType.code, grpc.status.INVALID_ARGUMENT);
  assert.equal(noType.reason, 'TASK_TYPE_NOT_FOUND');
  assert.equal(noType.metadata.task_name, 'demo.nope');
});

test('a request_id repeated with equal kwargs answers the same task; changed kwargs are refused', TIMEOUT, async () => {
  const key = uniqueKey('retry');
  const request_id = randomUUID();
  const start = (kwargs) => client.start({ task_name: 'demo.dummy', kwargs, exclusivity_key: key, request_id });
  const first = await start({ name: 'Ada', seconds: 0 });
  // Fields in another order are the same Struct (a map) to the server.
  assert.equal((await start({ seconds: 0, name: 'Ada' })).task.id, first.task.id);
  const changed = await rejection(start({ name: 'Ada ', seconds: 0 }));
  assert.equal(changed.code, grpc.status.INVALID_ARGUMENT);
  assert.deepEqual(changed.violations.map((v) => v.field), ['request_id']);
  assert.equal((await watchAll({ task_id: first.task.id })).at(-1).result, 'Hello Ada!');
});

test('kwargs are checked against the task signature: a nested object where a str goes is refused', TIMEOUT, async () => {
  const error = await rejection(
    client.start({ task_name: 'demo.dummy', kwargs: { name: { a: [1, null, { b: true }] } }, exclusivity_key: uniqueKey('typed') }),
  );
  assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
  assert.deepEqual(error.violations.map((v) => v.field), ['kwargs.name']);
  assert.match(error.violations[0].description, /string/);
});

test('ListTasks pages through the tasks of a key, newest first, filtered by state', TIMEOUT, async () => {
  const key = uniqueKey('list');
  const ids = [];
  for (const name of ['one', 'two', 'three']) ids.push((await client.run({ task_name: 'demo.dummy', kwargs: { name, seconds: 0 }, exclusivity_key: key })).id);
  const listed = [];
  for await (const task of client.listTasks({ exclusivity_key: key, page_size: 2 })) listed.push(task);
  assert.deepEqual(listed.map((t) => t.id), ids.toReversed());
  assert.deepEqual(listed.map((t) => t.result), ['Hello three!', 'Hello two!', 'Hello one!']);
  assert.ok(listed.every((t) => typeof t.sequence === 'number' && t.end_time instanceof Date));
  const failed = await client.listTasksPage({ exclusivity_key: key, states: ['TASK_STATE_FAILED'] });
  assert.deepEqual(failed.tasks, []);
});

test('CancelTasks cancels the tasks of a key: a running one is asked to stop and ends CANCELLED', TIMEOUT, async () => {
  const key = uniqueKey('many');
  const { task } = await client.start({ task_name: 'demo.dummy', kwargs: { seconds: 30 }, exclusivity_key: key });
  await waitFor(task.id, 'TASK_STATE_RUNNING');
  const done = await client.cancelTasks({ exclusivity_key: key, mode: 'CANCEL_MODE_KILL' });
  assert.deepEqual(done, { ended_count: 0, requested_count: 1, task_ids: [task.id] });
  assert.equal((await watchAll({ task_id: task.id })).at(-1).state, 'TASK_STATE_CANCELLED');
  // Nothing is left to cancel; a terminal state is refused, naming the field.
  assert.deepEqual(await client.cancelTasks({ exclusivity_key: key }), { ended_count: 0, requested_count: 0, task_ids: [] });
  const refused = await rejection(client.cancelTasksPage({ exclusivity_key: key, states: ['TASK_STATE_SUCCEEDED'] }));
  assert.equal(refused.code, grpc.status.INVALID_ARGUMENT);
  assert.deepEqual(refused.violations.map((v) => v.field), ['states']);
});

test('an unknown task id answers NOT_FOUND, on GetStatus and WatchStatus', TIMEOUT, async () => {
  const id = randomUUID();
  const error = await rejection(client.getStatus({ task_id: id }));
  assert.equal(error.code, grpc.status.NOT_FOUND);
  assert.equal(error.reason, 'TASK_NOT_FOUND');
  const watched = await rejection(watchAll({ task_id: id }));
  assert.equal(watched.code, grpc.status.NOT_FOUND);
});

test('QUEUE_LATEST: the newest start waits for the holder (waiting_for), superseding the one before', TIMEOUT, async () => {
  const key = uniqueKey('latest');
  const { task: holder } = await client.start({ task_name: 'demo.dummy', kwargs: { seconds: 30 }, exclusivity_key: key });
  const latest = (name) =>
    client.start({ task_name: 'demo.dummy', kwargs: { name, seconds: 0 }, exclusivity_key: key, conflict_policy: 'CONFLICT_POLICY_QUEUE_LATEST' });
  const { task: first } = await latest('first');
  const { task: second, already_existed } = await latest('second');
  assert.equal(already_existed, false);
  for (const waiting of [first, second]) {
    assert.equal(waiting.state, 'TASK_STATE_QUEUED');
    assert.equal(waiting.waiting_for, holder.id);
  }
  const superseded = (await watchAll({ task_id: first.id })).at(-1);
  assert.equal(superseded.state, 'TASK_STATE_CANCELLED');
  assert.equal(superseded.error.type, 'Superseded');
  assert.equal(superseded.start_time, null); // it never ran

  await client.cancel({ task_id: holder.id, mode: 'CANCEL_MODE_KILL' });
  const done = (await watchAll({ task_id: second.id })).at(-1);
  assert.equal(done.state, 'TASK_STATE_SUCCEEDED');
  assert.equal(done.result, 'Hello second!');
  assert.equal(done.waiting_for, '');
});

test('REPLACE with replace_mode KILL stops the running holder and runs the new task after it', TIMEOUT, async () => {
  const key = uniqueKey('replace');
  const { task: holder } = await client.start({ task_name: 'demo.dummy', kwargs: { seconds: 30 }, exclusivity_key: key });
  await waitFor(holder.id, 'TASK_STATE_RUNNING');
  const { task } = await client.start({
    task_name: 'demo.dummy',
    kwargs: { name: 'new', seconds: 0 },
    exclusivity_key: key,
    conflict_policy: 'CONFLICT_POLICY_REPLACE',
    replace_mode: 'CANCEL_MODE_KILL',
  });
  assert.equal(task.state, 'TASK_STATE_QUEUED');
  assert.equal(task.waiting_for, holder.id);
  const done = (await watchAll({ task_id: task.id })).at(-1);
  assert.equal(done.result, 'Hello new!');
  const replaced = await client.getStatus({ task_id: holder.id });
  assert.equal(replaced.state, 'TASK_STATE_CANCELLED');
  assert.equal(replaced.cancel_mode, 'CANCEL_MODE_KILL');
  assert.ok(done.start_time >= replaced.end_time, 'the new task ran before the old one ended');
});

test('a countdown of days holds the key until cancelled; a start_time runs when due', TIMEOUT, async () => {
  const key = uniqueKey('later');
  const before = Date.now();
  const { task: far } = await client.start({ task_name: 'demo.dummy', kwargs: { seconds: 0 }, exclusivity_key: key, options: { countdown: 2 * 86400 } });
  assert.equal(far.state, 'TASK_STATE_QUEUED');
  const ahead = far.scheduled_time.getTime() - before;
  assert.ok(ahead >= 2 * 86400_000 - 1000 && ahead <= 2 * 86400_000 + 60_000, `scheduled ${far.scheduled_time.toISOString()}`);
  const held = await rejection(client.start({ task_name: 'demo.dummy', exclusivity_key: key }));
  assert.equal(held.code, grpc.status.ALREADY_EXISTS);
  assert.equal(held.metadata.task_id, far.id);
  assert.equal((await client.cancel({ task_id: far.id })).state, 'TASK_STATE_CANCELLED');

  const due = new Date(Math.ceil(Date.now() / 1000) * 1000 + 1000);
  const { task } = await client.start({ task_name: 'demo.dummy', kwargs: { seconds: 0 }, exclusivity_key: key, options: { start_time: due } });
  assert.equal(task.scheduled_time.getTime(), due.getTime());
  const done = (await watchAll({ task_id: task.id })).at(-1);
  assert.equal(done.state, 'TASK_STATE_SUCCEEDED');
  assert.ok(done.start_time >= due, `ran at ${done.start_time.toISOString()}, due ${due.toISOString()}`);
  const both = await client.start({ task_name: 'demo.dummy', options: { countdown: 1, start_time: due } }).catch((error) => error);
  assert.ok(both instanceof TypeError, 'countdown with start_time is refused before any call');
});
