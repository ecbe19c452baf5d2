//! State store: a trait with versioned conditional writes, DynamoDB and in-memory implementations.
