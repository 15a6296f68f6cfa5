// A small Node client for taskservice: copy this file (and package.json's
// dependencies) into your project.
//
// It loads the proto at run time with @grpc/proto-loader (no code generation),
// converts between plain JS values and google.protobuf.Value/Struct, turns
// tasks into plain objects (numbers, Dates, JS values), and decodes the
// google.rpc.Status that taskservice puts in the `grpc-status-details-bin`
// trailer into its ErrorInfo and BadRequest. Its channel retries calls that
// fail UNAVAILABLE, as the repository's gRPC service config says, and every
// Start and Cancel carries a request_id, so that a retry never acts twice.

import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import protobuf from 'protobufjs';

const require = createRequire(import.meta.url);

/** Where task_service.proto is found: the repository's protos/ directory.
 * Outside this repository, pass `protoDir` to the functions below. */
export const DEFAULT_PROTO_DIR = fileURLToPath(new URL('../../protos', import.meta.url));

const TASK_SERVICE_PROTO = 'taskservice/v1/task_service.proto';
const SERVICE_CONFIG = 'taskservice/v1/service_config.json';
const HEALTH_PROTO = 'health/v1/health.proto';
const STATUS_PROTOS = ['google/rpc/status.proto', 'google/rpc/error_details.proto'];

/** The directories holding google/rpc/*.proto (google-proto-files) and
 * health/v1/health.proto (grpc-health-check): both from npm, not copies. */
function packagedProtoDirs() {
  const googleProtoFiles = path.dirname(require.resolve('google-proto-files/package.json'));
  const healthCheck = path.dirname(require.resolve('grpc-health-check/package.json'));
  return [googleProtoFiles, path.join(healthCheck, 'proto')];
}

/**
 * How messages look in JS. Every choice here shows up in the objects you read:
 * - keepCase: fields keep the proto's snake_case (`task_name`, `exclusivity_key`).
 *   The well-known types (google.protobuf.Value, Struct, Timestamp, Duration)
 *   are an exception: protobufjs ships them as camelCase definitions, so a Value
 *   is `{stringValue: 'x'}`, never `{string_value: 'x'}` (silently dropped).
 * - longs: String: uint64/int64 (Task.sequence, Timestamp.seconds) arrive as
 *   decimal strings, exact, instead of Long objects (the default) or Numbers
 *   that round silently above 2^53. `toPlainTask` turns them into checked
 *   numbers; never compare the strings ("10" < "9").
 * - enums: String: `state` is 'TASK_STATE_SUCCEEDED', not 3.
 * - defaults: true: unset scalars read as '' / 0 / false, unset messages as null.
 * - oneofs: true: `task.outcome` names the set member ('result' or 'error').
 */
export const LOADER_OPTIONS = Object.freeze({
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});

/**
 * Load the proto files; returns the grpc-js objects `{TaskService, Health,
 * packageDefinition}` (TaskService and Health are client constructors).
 */
export function loadProtos({ protoDir = DEFAULT_PROTO_DIR } = {}) {
  const packageDefinition = protoLoader.loadSync([TASK_SERVICE_PROTO, HEALTH_PROTO], {
    ...LOADER_OPTIONS,
    includeDirs: [protoDir, ...packagedProtoDirs()],
  });
  const loaded = grpc.loadPackageDefinition(packageDefinition);
  return {
    TaskService: loaded.taskservice.v1.TaskService,
    Health: loaded.grpc.health.v1.Health,
    packageDefinition,
  };
}

/**
 * The gRPC service config shipped next to the proto (JSON text), for the
 * channel option 'grpc.service_config': grpc-js then retries a call that fails
 * UNAVAILABLE (a server restarting or draining, a connection cut), up to 5
 * attempts with exponential back-off, for every method. Start and Cancel are
 * in it because this client always sends a request_id (a repeat is answered as
 * the first call was): with the raw stub, send one too, or leave them out.
 */
export function loadServiceConfig({ protoDir = DEFAULT_PROTO_DIR } = {}) {
  return readFileSync(path.join(protoDir, SERVICE_CONFIG), 'utf8');
}

// ---------------------------------------------------------------------------
// google.protobuf.Value / Struct / ListValue <-> plain JS (JSON semantics)

/** A JSON-like JS value as a google.protobuf.Value, in protobufjs's camelCase
 * form. Throws TypeError for what JSON cannot say (NaN, Infinity, functions,
 * cycles, BigInts beyond 2^53). `undefined` becomes null (as JSON.stringify
 * does in arrays); in objects, keys whose value is undefined are left out. */
export function toValue(value, seen = new Set()) {
  if (value === null || value === undefined) return { nullValue: 'NULL_VALUE' };
  if (typeof value === 'object' && typeof value.toJSON === 'function') {
    return toValue(value.toJSON(), seen); // Date -> ISO string, as JSON does
  }
  switch (typeof value) {
    case 'string':
      return { stringValue: value };
    case 'boolean':
      return { boolValue: value };
    case 'number':
      if (!Number.isFinite(value)) throw new TypeError(`${value} cannot be sent: JSON has no NaN or Infinity`);
      return { numberValue: value };
    case 'bigint':
      if (value > BigInt(Number.MAX_SAFE_INTEGER) || value < BigInt(Number.MIN_SAFE_INTEGER)) {
        throw new TypeError(`${value} is beyond 2^53: a google.protobuf.Value number is a double`);
      }
      return { numberValue: Number(value) };
    case 'object': {
      if (seen.has(value)) throw new TypeError('cannot convert a cyclic structure to a google.protobuf.Value');
      seen.add(value);
      try {
        if (Array.isArray(value)) return { listValue: { values: value.map((item) => toValue(item, seen)) } };
        return { structValue: toStruct(value, seen) };
      } finally {
        seen.delete(value);
      }
    }
    default:
      throw new TypeError(`a ${typeof value} cannot be sent as a google.protobuf.Value`);
  }
}

/** A plain object as a google.protobuf.Struct (e.g. StartRequest.kwargs). */
export function toStruct(object, seen = new Set()) {
  if (object === null || typeof object !== 'object' || Array.isArray(object)) {
    throw new TypeError('a google.protobuf.Struct is made from a plain object');
  }
  const fields = {};
  for (const [key, item] of Object.entries(object)) {
    if (item !== undefined) fields[key] = toValue(item, seen);
  }
  return { fields };
}

/** An array as a google.protobuf.ListValue (e.g. StartRequest.args). */
export function toListValue(array) {
  if (!Array.isArray(array)) throw new TypeError('a google.protobuf.ListValue is made from an array');
  return { values: array.map((item) => toValue(item)) };
}

/** A google.protobuf.Value as proto-loader gives it, as a plain JS value.
 * A Value with no kind set is an error, not null: it is what a misspelt
 * `string_value` turns into. */
export function fromValue(value) {
  if (value === null || value === undefined) return null; // an unset message field
  if ('nullValue' in value) return null;
  if ('numberValue' in value) return value.numberValue;
  if ('stringValue' in value) return value.stringValue;
  if ('boolValue' in value) return value.boolValue;
  if ('structValue' in value) return fromStruct(value.structValue);
  if ('listValue' in value) return fromListValue(value.listValue);
  throw new TypeError(`a google.protobuf.Value with no kind set: ${JSON.stringify(value)}`);
}

/** A google.protobuf.Struct as a plain object. */
export function fromStruct(struct) {
  const object = {};
  for (const [key, item] of Object.entries(struct?.fields ?? {})) object[key] = fromValue(item);
  return object;
}

/** A google.protobuf.ListValue as an array. */
export function fromListValue(list) {
  return (list?.values ?? []).map(fromValue);
}

// ---------------------------------------------------------------------------
// 64-bit integers, timestamps, durations

/** A uint64/int64 field as a JS number. proto-loader (longs: String) gives a
 * decimal string; a Long object or a bigint is accepted too, so that a loader
 * with other options cannot leak one. Throws RangeError beyond 2^53 rather
 * than round. */
export function toSafeNumber(long) {
  if (typeof long === 'number') {
    if (!Number.isSafeInteger(long)) throw new RangeError(`${long} is not a safe integer`);
    return long;
  }
  const text = typeof long === 'string' || typeof long === 'bigint' ? String(long) : long?.toString?.();
  if (typeof text !== 'string' || !/^-?\d+$/.test(text)) throw new TypeError(`not an integer: ${long}`);
  const number = Number(text);
  if (!Number.isSafeInteger(number)) throw new RangeError(`${text} is beyond 2^53: keep it as a string or BigInt`);
  return number;
}

/** A google.protobuf.Timestamp as a Date (millisecond precision), or null if unset. */
export function timestampToDate(timestamp) {
  if (!timestamp) return null;
  return new Date(toSafeNumber(timestamp.seconds) * 1000 + Math.floor((timestamp.nanos ?? 0) / 1e6));
}

/** Seconds (e.g. 1.5) as a google.protobuf.Duration, for StartOptions. */
export function duration(seconds) {
  if (!Number.isFinite(seconds)) throw new TypeError(`not a duration: ${seconds}`);
  const whole = Math.trunc(seconds);
  return { seconds: String(whole), nanos: Math.round((seconds - whole) * 1e9) };
}

/** A google.protobuf.Duration as seconds (e.g. 1.5), or null if unset. */
export function durationToSeconds(value) {
  if (!value) return null;
  return toSafeNumber(value.seconds) + (value.nanos ?? 0) / 1e9;
}

/** A Date, or a string Date can parse (RFC 3339: '2026-12-24T18:00:00Z'),
 * as a google.protobuf.Timestamp (e.g. StartOptions.start_time). A string
 * without a zone is refused: Date would read it as this machine's local time. */
export function dateToTimestamp(when) {
  if (typeof when === 'string' && !/(Z|[+-]\d\d:?\d\d)$/i.test(when.trim())) {
    throw new TypeError(`${when} has no time zone: add Z (UTC) or an offset such as +01:00`);
  }
  const date = when instanceof Date ? when : typeof when === 'string' ? new Date(when) : null;
  if (!date || Number.isNaN(date.getTime())) throw new TypeError(`not a time: ${when}`);
  const ms = date.getTime();
  const seconds = Math.floor(ms / 1000);
  return { seconds: String(seconds), nanos: (ms - seconds * 1000) * 1e6 };
}

/** The states after which a task never changes. */
export const TERMINAL_STATES = new Set([
  'TASK_STATE_SUCCEEDED',
  'TASK_STATE_FAILED',
  'TASK_STATE_CANCELLED',
  'TASK_STATE_LOST',
]);

/** A taskservice.v1.Task as proto-loader gives it, as a plain object:
 * `sequence` and `fencing_token` numbers, timestamps Dates (or null), `result` a plain JS value
 * (undefined unless outcome is 'result'), `error` {type, message, traceback}
 * or null. `waiting_for` is the id of the task it waits to end while it waits
 * for its exclusivity key (CONFLICT_POLICY_REPLACE, QUEUE_LATEST, QUEUE), else ''. */
export function toPlainTask(task) {
  return {
    ...task,
    sequence: toSafeNumber(task.sequence),
    fencing_token: toSafeNumber(task.fencing_token ?? '0'),
    result: task.outcome === 'result' ? fromValue(task.result) : undefined,
    error: task.outcome === 'error' ? task.error : null,
    create_time: timestampToDate(task.create_time),
    start_time: timestampToDate(task.start_time),
    end_time: timestampToDate(task.end_time),
    scheduled_time: timestampToDate(task.scheduled_time),
    terminal: TERMINAL_STATES.has(task.state),
  };
}

/** A taskservice.v1.TaskType as a plain object: each parameter's
 * `default_value` a plain JS value (undefined if it has none), `quiet_period`
 * seconds (null: no quiet period); `key_slots` and `key_line_limit` (0: the
 * server's setting), `quiet_after_success` and `replace_mode` as sent. */
export function toPlainTaskType(type) {
  return {
    ...type,
    parameters: type.parameters.map((p) => ({ ...p, default_value: p.default_value ? fromValue(p.default_value) : undefined })),
    quiet_period: durationToSeconds(type.quiet_period),
  };
}

/**
 * The StartRequest `client.start` sends, from plain JS: `args` an array,
 * `kwargs` an object; `conflict_policy` and `replace_mode` enum names
 * ('CONFLICT_POLICY_QUEUE', 'CANCEL_MODE_KILL'); `options` durations in
 * seconds (`countdown` of any length), `options.start_time` a Date or an
 * RFC 3339 string. countdown and start_time together throw TypeError.
 * `request_id` is a new UUID unless given: every attempt of the request
 * sends the same, so a retried Start returns the first one's task.
 */
export function startRequest({ task_name, args = [], kwargs = {}, exclusivity_key = '', conflict_policy, replace_mode, options, request_id = '' }) {
  const request = {
    task_name,
    args: toListValue(args),
    kwargs: toStruct(kwargs),
    exclusivity_key,
    conflict_policy,
    replace_mode,
    request_id: request_id || randomUUID(),
  };
  if (options) {
    if (options.countdown !== undefined && options.start_time !== undefined) {
      throw new TypeError('give options.countdown or options.start_time, not both');
    }
    request.options = { queue: options.queue ?? '' };
    for (const name of ['countdown', 'time_limit', 'soft_time_limit']) {
      if (options[name] !== undefined) request.options[name] = duration(options[name]);
    }
    if (options.start_time !== undefined) request.options.start_time = dateToTimestamp(options.start_time);
  }
  return request;
}

// ---------------------------------------------------------------------------
// Errors: google.rpc.Status in the grpc-status-details-bin trailer

let statusTypes;

/** google.rpc.Status and the detail types, loaded with protobufjs (the parser
 * proto-loader uses) and the same keepCase, from google-proto-files. */
function rpcTypes() {
  if (!statusTypes) {
    const root = new protobuf.Root();
    const [googleProtoFiles] = packagedProtoDirs();
    root.resolvePath = (origin, target) => (path.isAbsolute(target) ? target : path.join(googleProtoFiles, target));
    root.loadSync(STATUS_PROTOS, { keepCase: true });
    root.resolveAll();
    statusTypes = root;
  }
  return statusTypes;
}

/**
 * What a failed call says, decoded: `{code, codeName, message, errorInfo,
 * badRequest, details}`. `errorInfo` is google.rpc.ErrorInfo `{reason, domain,
 * metadata}` (metadata.task_id names the running task on ALREADY_EXISTS),
 * `badRequest` is google.rpc.BadRequest `{field_violations: [{field,
 * description, ...}]}`; each is null when absent. `details` holds every
 * detail, unpacked where its type is known (`{type_url, value}` otherwise).
 * Works on any grpc-js ServiceError; without the trailer (e.g. a deadline or
 * a connection failure) only code and message are set.
 */
export function decodeError(error) {
  const code = typeof error?.code === 'number' ? error.code : grpc.status.UNKNOWN;
  const decoded = {
    code,
    codeName: grpc.status[code] ?? String(code),
    message: error?.details ?? error?.message ?? '',
    errorInfo: null,
    badRequest: null,
    details: [],
  };
  const raw = error?.metadata?.get?.('grpc-status-details-bin')?.[0];
  if (!raw) return decoded;
  const root = rpcTypes();
  let status;
  try {
    status = root.lookupType('google.rpc.Status').decode(raw);
  } catch {
    return decoded; // not a google.rpc.Status: code and message are all there is
  }
  decoded.message = status.message || decoded.message;
  for (const any of status.details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    let type = null;
    try {
      type = root.lookupType(typeName);
    } catch {
      // A detail type this client does not know: keep it packed.
    }
    if (!type) {
      decoded.details.push({ type_url: any.type_url, value: any.value });
      continue;
    }
    const value = type.toObject(type.decode(any.value), LOADER_OPTIONS);
    decoded.details.push({ type_url: any.type_url, value });
    if (typeName === 'google.rpc.ErrorInfo' && !decoded.errorInfo) decoded.errorInfo = value;
    if (typeName === 'google.rpc.BadRequest' && !decoded.badRequest) decoded.badRequest = value;
  }
  return decoded;
}

/** A failed taskservice call: the grpc-js error (as `cause`) decoded. `reason`
 * and `metadata` come from the ErrorInfo, `violations` from the BadRequest. */
export class TaskServiceError extends Error {
  constructor(cause) {
    const decoded = decodeError(cause);
    super(`${decoded.codeName}: ${decoded.message}`, { cause });
    this.name = 'TaskServiceError';
    this.code = decoded.code;
    this.codeName = decoded.codeName;
    this.reason = decoded.errorInfo?.reason ?? '';
    this.domain = decoded.errorInfo?.domain ?? '';
    this.metadata = decoded.errorInfo?.metadata ?? {};
    this.violations = decoded.badRequest?.field_violations ?? [];
    this.decoded = decoded;
  }
}

// ---------------------------------------------------------------------------
// A promise-based client

function unary(stub, method, request, timeoutMs) {
  const deadline = new Date(Date.now() + timeoutMs);
  return new Promise((resolve, reject) => {
    stub[method](request, { deadline }, (error, response) => {
      if (error) reject(new TaskServiceError(error));
      else resolve(response);
    });
  });
}

/**
 * TaskService and Health over one channel. Methods take and return plain JS:
 * `args` an array, `kwargs` an object, tasks as `toPlainTask` makes them.
 * Failed calls reject with TaskServiceError. `stub` and `healthStub` are the
 * raw grpc-js clients for anything else. `serviceConfig` (JSON text) is the
 * channel's gRPC service config: by default the shipped one (retries, see
 * `loadServiceConfig`); null for none.
 */
export class TaskServiceClient {
  constructor(address, { credentials = grpc.credentials.createInsecure(), channelOptions = {}, protoDir, timeoutMs = 10_000, serviceConfig } = {}) {
    const { TaskService, Health } = loadProtos({ protoDir });
    const config = serviceConfig === undefined ? loadServiceConfig({ protoDir }) : serviceConfig;
    if (config) channelOptions = { 'grpc.service_config': config, ...channelOptions };
    this.stub = new TaskService(address, credentials, channelOptions);
    // Same address, credentials and options: grpc-js shares the connection.
    this.healthStub = new Health(address, credentials, channelOptions);
    this.timeoutMs = timeoutMs;
  }

  /** Start a task; returns `{task, already_existed}` (see `startRequest`).
   * `options` durations are seconds (`{countdown: 2, time_limit: 60}`);
   * `{start_time: new Date(...)}` instead of countdown. A task that waits for
   * its key (conflict_policy 'CONFLICT_POLICY_QUEUE', '..._QUEUE_LATEST',
   * '..._REPLACE' with `replace_mode`) comes back QUEUED with `waiting_for`. */
  async start(fields) {
    const request = startRequest(fields);
    const response = await unary(this.stub, 'Start', request, this.timeoutMs);
    return { task: toPlainTask(response.task), already_existed: response.already_existed };
  }

  /** The task by `{task_id}` or `{exclusivity_key}`. */
  async getStatus(selector) {
    return toPlainTask((await unary(this.stub, 'GetStatus', selector, this.timeoutMs)).task);
  }

  /** Cancel; `mode` is 'CANCEL_MODE_KILL' (the default), 'CANCEL_MODE_TERMINATE' or 'CANCEL_MODE_GRACEFUL'.
   * `request_id` as for start: a new UUID unless given. */
  async cancel({ task_id, mode = 'CANCEL_MODE_KILL', request_id = '' }) {
    const request = { task_id, mode, request_id: request_id || randomUUID() };
    return toPlainTask((await unary(this.stub, 'Cancel', request, this.timeoutMs)).task);
  }

  /** One CancelTasks call: cancel up to `page_size` (0: 100) of the QUEUED and
   * RUNNING tasks matching the filters, newest first; returns `{ended_count,
   * requested_count, task_ids, next_page_token}`. Running ones are asked to stop
   * (`mode` as for cancel), not waited for. */
  async cancelTasksPage({ page_size = 0, page_token = '', states = [], task_name = '', exclusivity_key = '', mode = 'CANCEL_MODE_KILL' } = {}) {
    const request = { page_size, page_token, states, task_name, exclusivity_key, mode };
    const { ended_count, requested_count, task_ids, next_page_token } = await unary(this.stub, 'CancelTasks', request, this.timeoutMs);
    return { ended_count, requested_count, task_ids, next_page_token };
  }

  /** CancelTasks call after call, following the tokens to the end (same
   * filters as cancelTasksPage); returns `{ended_count, requested_count, task_ids}` summed. */
  async cancelTasks(filters = {}) {
    const done = { ended_count: 0, requested_count: 0, task_ids: [] };
    let page_token = '';
    do {
      const page = await this.cancelTasksPage({ ...filters, page_token });
      done.ended_count += page.ended_count;
      done.requested_count += page.requested_count;
      done.task_ids.push(...page.task_ids);
      page_token = page.next_page_token;
    } while (page_token);
    return done;
  }

  /** The startable task types, as `toPlainTaskType` makes them. */
  async listTaskTypes() {
    const { task_types } = await unary(this.stub, 'ListTaskTypes', {}, this.timeoutMs);
    return task_types.map(toPlainTaskType);
  }

  /** One page of ListTasks: `{tasks, next_page_token}`, tasks newest first.
   * A page may be short (even empty) while next_page_token is set. */
  async listTasksPage({ page_size = 0, page_token = '', states = [], task_name = '', exclusivity_key = '' } = {}) {
    const request = { page_size, page_token, states, task_name, exclusivity_key };
    const response = await unary(this.stub, 'ListTasks', request, this.timeoutMs);
    return { tasks: response.tasks.map(toPlainTask), next_page_token: response.next_page_token };
  }

  /** Every task ListTasks finds, page after page (same filters as
   * listTasksPage): `for await (const task of client.listTasks({states: ['TASK_STATE_RUNNING']}))`. */
  async *listTasks(filters = {}) {
    let page_token = '';
    do {
      const page = await this.listTasksPage({ ...filters, page_token });
      yield* page.tasks;
      page_token = page.next_page_token;
    } while (page_token);
  }

  /**
   * Every change of a task, as plain tasks, until (and including) its terminal
   * state: `for await (const task of client.watch({task_id}))`. Resume a
   * dropped watch with `after_sequence` (the last `sequence` you got). Leaving
   * the loop early cancels the call. Errors throw TaskServiceError.
   */
  async *watch({ task_id, exclusivity_key, after_sequence = 0 }, { signal } = {}) {
    const request = task_id ? { task_id } : { exclusivity_key };
    request.after_sequence = String(after_sequence);
    const call = this.stub.WatchStatus(request);
    const abort = () => call.cancel();
    signal?.addEventListener('abort', abort, { once: true });
    try {
      for await (const message of call) yield toPlainTask(message.task);
    } catch (error) {
      throw error?.code !== undefined && error?.metadata ? new TaskServiceError(error) : error;
    } finally {
      signal?.removeEventListener('abort', abort);
      // Leaving early: end the call on the server too. Its CANCELLED status
      // then arrives as an 'error' event nobody is iterating for any more.
      call.on('error', () => {});
      call.cancel(); // a no-op once the server ended the stream
    }
  }

  /** Start, then watch to the end; returns the terminal task. */
  async run(request) {
    const { task } = await this.start(request);
    let last = task;
    for await (const update of this.watch({ task_id: task.id })) last = update;
    return last;
  }

  /** grpc.health.v1 Check: 'SERVING', 'NOT_SERVING', ... for `service`
   * ('' is the server as a whole). */
  async health(service = 'taskservice.v1.TaskService') {
    return (await unary(this.healthStub, 'Check', { service }, this.timeoutMs)).status;
  }

  close() {
    this.stub.close();
    this.healthStub.close();
  }
}
