//! gRPC services: request validation, domain <-> proto mapping, errors as `Status`.
