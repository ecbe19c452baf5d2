//! Domain model: instances, specs, states and transitions, operations, naming rules.
