// Conversions, checked through the serializers grpc-js really uses (no server
// needed): Value/Struct round-trips, the camelCase pitfall of the well-known
// types, 64-bit integers, and the decoding of a google.rpc.Status trailer.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import protobuf from 'protobufjs';
import googleProtoFiles from 'google-proto-files';

import {
  DEFAULT_PROTO_DIR,
  LOADER_OPTIONS,
  TaskServiceError,
  dateToTimestamp,
  decodeError,
  fromListValue,
  fromStruct,
  fromValue,
  loadProtos,
  startRequest,
  toListValue,
  toPlainTask,
  toPlainTaskType,
  toSafeNumber,
  toStruct,
  toValue,
} from '../client.js';

const { packageDefinition } = loadProtos();
const Start = packageDefinition['taskservice.v1.TaskService'].Start;
const GetStatus = packageDefinition['taskservice.v1.TaskService'].GetStatus;
const ListTaskTypes = packageDefinition['taskservice.v1.TaskService'].ListTaskTypes;

/** `request` as the server would read it: encoded and decoded again. */
const overTheWire = (method, request) => method.requestDeserialize(method.requestSerialize(request));
const responseOverTheWire = (method, response) => method.responseDeserialize(method.responseSerialize(response));

const NESTED = {
  name: 'Ada',
  count: 3,
  ratio: -0.25,
  big: 2 ** 53 - 1,
  on: true,
  off: false,
  nothing: null,
  empty_string: '',
  zero: 0,
  list: [1, 'two', null, false, [], {}, [3, [4]], { deep: { deeper: ['x'] } }],
  object: { a: { b: { c: [true, null, 1.5] } }, 'key with spaces': 'ok', ünïcode: 'ß✓' },
};

test('Struct and ListValue round-trip nested objects, lists, null, numbers, strings and bools', () => {
  const request = overTheWire(Start, { task_name: 'x', args: toListValue([NESTED, 1, null]), kwargs: toStruct(NESTED) });
  assert.deepEqual(fromStruct(request.kwargs), NESTED);
  assert.deepEqual(fromListValue(request.args), [NESTED, 1, null]);
});

test('every JSON kind round-trips as a single Value, including a task result', () => {
  for (const value of [null, 0, -1, 1.5, 1e300, '', 'text', true, false, [], {}, [null], { a: null }, NESTED]) {
    const task = { id: 'i', sequence: '1', result: toValue(value) };
    const decoded = responseOverTheWire(GetStatus, { task }).task;
    assert.equal(decoded.outcome, 'result');
    assert.deepEqual(fromValue(decoded.result), value);
    assert.deepEqual(toPlainTask(decoded).result, value);
  }
});

test('JS values JSON cannot express are refused, not mangled', () => {
  assert.throws(() => toValue(NaN), TypeError);
  assert.throws(() => toValue(Infinity), TypeError);
  assert.throws(() => toValue(() => 1), TypeError);
  assert.throws(() => toValue(2n ** 60n), TypeError);
  const cyclic = { a: 1 };
  cyclic.self = cyclic;
  assert.throws(() => toStruct(cyclic), /cyclic/);
  // As JSON.stringify does: undefined keys are left out, undefined in a list is null,
  // a Date becomes its ISO string; a repeated (not cyclic) object is fine.
  const shared = { s: 1 };
  const request = overTheWire(Start, {
    kwargs: toStruct({ gone: undefined, list: [undefined], when: new Date(0), x: shared, y: shared }),
  });
  assert.deepEqual(fromStruct(request.kwargs), { list: [null], when: '1970-01-01T00:00:00.000Z', x: shared, y: shared });
});

test('well-known types are camelCase even with keepCase: string_value is silently dropped', () => {
  // keepCase holds for taskservice's own fields...
  const ok = overTheWire(Start, { task_name: 'demo.dummy', kwargs: { fields: { name: { stringValue: 'Ada' } } } });
  assert.equal(ok.task_name, 'demo.dummy');
  assert.deepEqual(ok.kwargs.fields.name, { stringValue: 'Ada', kind: 'stringValue' });
  // ...but not for google.protobuf.Value: protobufjs defines it camelCase, and an
  // unknown key is ignored without a word. What goes on the wire is an empty Value.
  const dropped = overTheWire(Start, { task_name: 'demo.dummy', kwargs: { fields: { name: { string_value: 'Ada' } } } });
  assert.deepEqual(dropped.kwargs.fields.name, {});
  assert.throws(() => fromValue(dropped.kwargs.fields.name), /no kind set/);
  // The converters always write the camelCase form.
  assert.deepEqual(toValue('Ada'), { stringValue: 'Ada' });
});

test('uint64 sequence: strings with longs String, Long objects without; compared as checked numbers', () => {
  const wire = GetStatus.responseSerialize({ task: { id: 'i', sequence: '10' } });
  assert.equal(LOADER_OPTIONS.longs, String);
  assert.equal(GetStatus.responseDeserialize(wire).task.sequence, '10');

  // proto-loader's default: a Long object, which neither compares nor serializes to JSON as a number.
  const defaults = protoLoader.loadSync('taskservice/v1/task_service.proto', { keepCase: true, includeDirs: [DEFAULT_PROTO_DIR] });
  const leaked = defaults['taskservice.v1.TaskService'].GetStatus.responseDeserialize(wire).task.sequence;
  assert.equal(typeof leaked, 'object');
  assert.equal(JSON.stringify(leaked), '{"low":10,"high":0,"unsigned":true}');
  assert.equal(toSafeNumber(leaked), 10); // toSafeNumber accepts it anyway

  // Strings do not compare as numbers; toSafeNumber's results do.
  assert.equal('10' > '9', false);
  assert.equal(toSafeNumber('10') > toSafeNumber('9'), true);
  assert.equal(toPlainTask({ sequence: '10' }).sequence, 10);

  // longs Number would round beyond 2^53 without a word; String + toSafeNumber refuses.
  const huge = GetStatus.responseSerialize({ task: { sequence: '9007199254740993' } });
  const asNumber = protoLoader.loadSync('taskservice/v1/task_service.proto', { keepCase: true, longs: Number, includeDirs: [DEFAULT_PROTO_DIR] });
  assert.equal(asNumber['taskservice.v1.TaskService'].GetStatus.responseDeserialize(huge).task.sequence, 9007199254740992);
  const asString = GetStatus.responseDeserialize(huge).task.sequence;
  assert.equal(asString, '9007199254740993');
  assert.throws(() => toSafeNumber(asString), RangeError);
});

test('decodeError unpacks ErrorInfo and BadRequest from grpc-status-details-bin', () => {
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) => (target.startsWith('/') ? target : googleProtoFiles.getProtoPath('..', target));
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  const pack = (name, object) => {
    const type = root.lookupType(name);
    return { type_url: `type.googleapis.com/${name}`, value: type.encode(type.fromObject(object)).finish() };
  };
  const Status = root.lookupType('google.rpc.Status');
  const status = Status.encode(
    Status.fromObject({
      code: grpc.status.ALREADY_EXISTS,
      message: 'a task already runs under key k',
      details: [
        pack('google.rpc.ErrorInfo', { reason: 'TASK_ALREADY_RUNNING', domain: 'taskservice.dev', metadata: { task_id: 't-1' } }),
        pack('google.rpc.BadRequest', { field_violations: [{ field: 'kwargs.name', description: 'bad' }] }),
        { type_url: 'type.googleapis.com/example.Unknown', value: Buffer.from([8, 1]) },
      ],
    }),
  ).finish();
  const metadata = new grpc.Metadata();
  metadata.set('grpc-status-details-bin', Buffer.from(status));
  const error = Object.assign(new Error('6 ALREADY_EXISTS: x'), { code: grpc.status.ALREADY_EXISTS, details: 'x', metadata });

  const decoded = decodeError(error);
  assert.equal(decoded.codeName, 'ALREADY_EXISTS');
  assert.equal(decoded.message, 'a task already runs under key k');
  assert.deepEqual(decoded.errorInfo, { reason: 'TASK_ALREADY_RUNNING', domain: 'taskservice.dev', metadata: { task_id: 't-1' } });
  assert.equal(decoded.badRequest.field_violations[0].field, 'kwargs.name');
  assert.equal(decoded.details.length, 3);
  assert.equal(decoded.details[2].type_url, 'type.googleapis.com/example.Unknown');

  const wrapped = new TaskServiceError(error);
  assert.equal(wrapped.reason, 'TASK_ALREADY_RUNNING');
  assert.equal(wrapped.metadata.task_id, 't-1');
  assert.equal(wrapped.cause, error);

  // No trailer (a deadline, a refused connection): code and message only.
  const bare = decodeError(Object.assign(new Error('x'), { code: grpc.status.DEADLINE_EXCEEDED, details: 'Deadline exceeded', metadata: new grpc.Metadata() }));
  assert.deepEqual([bare.codeName, bare.message, bare.errorInfo, bare.badRequest], ['DEADLINE_EXCEEDED', 'Deadline exceeded', null, null]);

  // A trailer that is not a google.rpc.Status (a proxy's, say) is ignored, not thrown.
  const garbage = new grpc.Metadata();
  garbage.set('grpc-status-details-bin', Buffer.from([0xff, 0xff, 0xff]));
  const odd = decodeError(Object.assign(new Error('x'), { code: grpc.status.INTERNAL, details: 'boom', metadata: garbage }));
  assert.deepEqual([odd.codeName, odd.message, odd.errorInfo], ['INTERNAL', 'boom', null]);
});

test('startRequest: waiting policies, replace_mode, a countdown of days or a start_time, on the wire', () => {
  const replacing = overTheWire(
    Start,
    startRequest({
      task_name: 'demo.dummy',
      exclusivity_key: 'k',
      conflict_policy: 'CONFLICT_POLICY_REPLACE',
      replace_mode: 'CANCEL_MODE_GRACEFUL',
      options: { countdown: 3 * 86400 + 0.25 },
    }),
  );
  assert.equal(replacing.conflict_policy, 'CONFLICT_POLICY_REPLACE');
  assert.equal(replacing.replace_mode, 'CANCEL_MODE_GRACEFUL');
  assert.deepEqual(replacing.options.countdown, { seconds: '259200', nanos: 250_000_000 });
  assert.equal(replacing.options.start_time, null);

  // A Date, or an RFC 3339 string with its zone: the same instant, in UTC.
  for (const start_time of [new Date(Date.UTC(2031, 6, 1, 7, 30, 15, 250)), '2031-07-01T09:30:15.250+02:00']) {
    const later = overTheWire(Start, startRequest({ task_name: 'demo.dummy', conflict_policy: 'CONFLICT_POLICY_QUEUE_LATEST', options: { start_time } }));
    assert.equal(later.conflict_policy, 'CONFLICT_POLICY_QUEUE_LATEST');
    assert.equal(later.replace_mode, 'CANCEL_MODE_UNSPECIFIED'); // the task type's
    assert.deepEqual(later.options.start_time, { seconds: String(Date.UTC(2031, 6, 1, 7, 30, 15) / 1000), nanos: 250_000_000 });
    assert.equal(later.options.countdown, null);
  }
  assert.equal(overTheWire(Start, startRequest({ task_name: 'x', conflict_policy: 'CONFLICT_POLICY_QUEUE' })).conflict_policy, 'CONFLICT_POLICY_QUEUE');

  // Refused before any call: both times, a time without a zone, no time at all.
  assert.throws(() => startRequest({ task_name: 'x', options: { countdown: 5, start_time: new Date() } }), /countdown or options.start_time, not both/);
  assert.throws(() => startRequest({ task_name: 'x', options: { start_time: '2031-07-01T09:30:00' } }), /no time zone/);
  assert.throws(() => dateToTimestamp('soon Z'), /not a time/);
  assert.throws(() => dateToTimestamp(42), /not a time/);
});

test('a waiting task names the task it waits for; a task type its key settings', () => {
  const task = { id: 'i', sequence: '2', state: 'TASK_STATE_QUEUED', waiting_for: 'holder-id', scheduled_time: { seconds: '1940000000', nanos: 0 } };
  const waiting = toPlainTask(responseOverTheWire(GetStatus, { task }).task);
  assert.equal(waiting.waiting_for, 'holder-id');
  assert.deepEqual(waiting.scheduled_time, new Date(1_940_000_000_000));
  assert.equal(toPlainTask(responseOverTheWire(GetStatus, { task: { id: 'j', sequence: '1' } }).task).waiting_for, '');

  const { task_types } = responseOverTheWire(ListTaskTypes, {
    task_types: [
      { name: 'reports.build', key_slots: 3, key_line_limit: 10, quiet_period: { seconds: '90', nanos: 500_000_000 }, quiet_after_success: true, replace_mode: 'CANCEL_MODE_KILL' },
      { name: 'demo.plain', parameters: [{ name: 'n', default_value: toValue(5) }] },
    ],
  });
  const [shaped, plain] = task_types.map(toPlainTaskType);
  assert.deepEqual(
    [shaped.key_slots, shaped.key_line_limit, shaped.quiet_period, shaped.quiet_after_success, shaped.replace_mode],
    [3, 10, 90.5, true, 'CANCEL_MODE_KILL'],
  );
  assert.deepEqual([plain.key_slots, plain.quiet_period, plain.replace_mode], [0, null, 'CANCEL_MODE_UNSPECIFIED']);
  assert.equal(plain.parameters[0].default_value, 5);
});
