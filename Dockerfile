# The instance-manager control plane's image (see README "## Container image").
#
#   docker build -t instance-manager .          # or: podman build --format docker ...
#
# Build arguments (base images are arguments so that a mirror or a pinned digest can be
# used): RUST_IMAGE, RUNTIME_IMAGE, and BINARY_SOURCE — `builder` (default: a release build
# in the builder stage) or `local` (the binary at BINARY in the build context, e.g. after
# `cargo build --release`; `make image-test` uses it to build the same runtime stage on a
# local base). The runtime stage is the same either way.
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
ARG BINARY_SOURCE=builder

# ---- builder: release build, dependencies in their own cached layer --------------------
FROM ${RUST_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
# The dependency layer depends only on the manifest, the lock file, build.rs and the
# protos: stand-in sources (every target the manifest names, so that cargo accepts it) are
# compiled once with every dependency, and that layer is reused until one of those changes.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
RUN mkdir -p src tests examples \
    && echo 'fn main() {}' > src/main.rs \
    && : > src/lib.rs \
    && sed -n 's/^name = "\([a-z0-9_]*\)"$/\1/p' Cargo.toml \
       | while read -r target; do \
           echo 'fn main() {}' > "tests/$target.rs"; \
           echo 'fn main() {}' > "examples/$target.rs"; \
         done \
    && cargo build --release --locked --bin instance-manager \
    && rm -rf src
# The stand-ins under tests/ and examples/ stay: the manifest names those targets.
COPY src ./src
# COPY keeps the files' own times, which can be older than the stand-ins' build: touched,
# cargo rebuilds the crate itself (and only it).
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin instance-manager \
    && cp target/release/instance-manager /instance-manager

# ---- where the runtime stage takes the binary from ------------------------------------
FROM builder AS binary-builder

FROM scratch AS binary-local
ARG BINARY=target/release/instance-manager
COPY ${BINARY} /instance-manager

# hadolint ignore=DL3006
FROM binary-${BINARY_SOURCE} AS binary

# ---- runtime ---------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
# ca-certificates: TLS to AWS and to MySQL (db_tls = verified). mariadb-client: backups,
# offboarding archives and restores run `mariadb-dump` and `mariadb` as child processes
# (README "### Where the dump runs"); a MySQL 8 server needs MySQL's client programs in
# their place (db_dump_command, db_client_command).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates mariadb-client \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 instance-manager \
    && useradd --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin instance-manager
COPY --from=binary /instance-manager /usr/local/bin/instance-manager
# Inside a container: JSON log lines (no colour: stderr is not a terminal), listening on
# every interface. Environment variables beat the configuration file, so IM_LISTEN here
# wins over a `listen` in config.toml: set IM_LISTEN to move the port. The root file system
# may be read-only: the only files the service writes (the dump programs' temporary option
# files) go to TMPDIR, which needs a writable volume (tmpfs / emptyDir) on /tmp.
ENV IM_LOG_FORMAT=json \
    IM_LISTEN=0.0.0.0:50051 \
    TMPDIR=/tmp
USER 10001:10001
EXPOSE 50051
# grpc.health.v1 Check on the local port: healthy only while the server answers SERVING
# (it says NOT_SERVING until the state store answers, and while draining). A server with
# TLS needs IM_SERVER=https://localhost:50051 and IM_CA_FILE for this.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["instance-manager", "healthcheck", "--timeout-secs", "3"]
ENTRYPOINT ["instance-manager"]
CMD ["serve", "--config", "/etc/instance-manager/config.toml"]
