"""The core both sides stand on: settings, states, records, the Lua scripts' contracts,
the exposed task types, the errors, metrics and logs. Imports neither gRPC nor Celery."""
