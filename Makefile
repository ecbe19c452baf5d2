# One-command entry points (see README). Everything runs through bash scripts
# in scripts/ so that it works the same from a shell, make, and CI.
.PHONY: dev test check bootstrap fmt clippy bench image-test

ifdef CI
export CARGO_TERM_COLOR := never
endif

# Run the service locally: emulators (moto :4566, MariaDB :3306), bootstrap, serve :50051.
dev:
	bash scripts/dev.sh

# Start the dev emulators and create the table, leaving moto running.
bootstrap:
	bash scripts/dev.sh bootstrap

# Whole test suite (unit, integration, doc) against a fresh moto.
test:
	bash scripts/test.sh

# The container image's runtime stage, built with podman on a local Debian base (mmdebstrap)
# and run read-only as its non-root user against moto and MariaDB: health, a CreateInstance.
# Not part of `test`: it installs podman/runc/mmdebstrap if missing and takes minutes.
image-test:
	bash scripts/image-test.sh

# Every benchmark (unary API overhead, footprint, backup/restore), one report on stdout and
# in target/bench-report.md (not a test: asserts nothing about time).
bench:
	bash scripts/bench.sh

# Formatting and lints.
check: fmt clippy

fmt:
	cargo fmt --check

# Everything with the `emulator` feature (as `make test` builds it), and the production
# build (no features) on its own.
clippy:
	cargo clippy --all-targets --features emulator -- -D warnings
	cargo clippy --lib --bins -- -D warnings
