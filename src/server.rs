//! Server wiring: services, health, reflection, graceful shutdown.
