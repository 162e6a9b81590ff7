# kvrouter: one static-ish binary on a slim base, run as a non-root user.
# Build: docker build -t kvrouter:0.1.0 .
# Run:   docker run -p 8000:8000 kvrouter:0.1.0      (kvrouter serve, 4 mock workers)

FROM rust:1.95-bookworm AS build
# protoc: the etcd client's build generates its gRPC code.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p kvrouter \
 && strip target/release/kvrouter

FROM debian:bookworm-slim
# ca-certificates for TLS to etcd/NATS; curl for the health check.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin kvrouter
COPY --from=build /src/target/release/kvrouter /usr/local/bin/kvrouter
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD curl -fsS http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["kvrouter"]
CMD ["serve", "--http-host", "0.0.0.0", "--http-port", "8000"]
