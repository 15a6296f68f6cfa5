"""The gRPC server (installed as taskservice.server): the servicer, one module
per operation, and what they run on."""
