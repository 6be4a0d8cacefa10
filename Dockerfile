# syntax=docker/dockerfile:1
# One image for every simdevice role: the device agent, the fleet, the local hub and the
# service client. The entrypoint is `simdevice`; the command picks the role.
#
#   docker build -t simdevice .
#   # the local hub (state in a volume; --hostname: the name devices dial)
#   docker run -p 8883:8883 -p 8443:8443 -v simdevice-hub:/var/lib/simdevice \
#       simdevice hub --bind 0.0.0.0 --hostname myhost.example
#   # the agent, configured by a mounted file (the default path) ...
#   docker run -v "$PWD/config.toml:/etc/simdevice/config.toml:ro" simdevice run
#   # ... or by the environment (SIMDEVICE__SECTION__KEY overrides the file)
#   docker run -e SIMDEVICE__IDENTITY__CONNECTION_STRING='HostName=...;DeviceId=...;SharedAccessKey=...' \
#       simdevice run
#
# deploy/compose.yaml runs a hub and two devices. The build needs BuildKit (the default since
# Docker 23) for its cache mounts.

FROM rust:1-bookworm AS build
WORKDIR /src
# .dockerignore keeps target/, .git and the Python venvs out of the context.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin simdevice \
    && install -D -m 0755 target/release/simdevice /out/simdevice

# The same Debian release as the build stage, so the binary's glibc matches. No other
# package: TLS roots are compiled in (webpki-roots), SQLite is bundled.
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 simdevice \
    && useradd --system --uid 10001 --gid simdevice --no-create-home \
        --home-dir /var/lib/simdevice --shell /usr/sbin/nologin simdevice \
    && install -d -o simdevice -g simdevice -m 0700 /var/lib/simdevice \
    && install -d -m 0755 /etc/simdevice
COPY --from=build /out/simdevice /usr/bin/simdevice
USER simdevice:simdevice
WORKDIR /var/lib/simdevice
# State as under systemd: the hub's in /var/lib/simdevice/hub, the agent's (its outbox) in
# $STATE_DIRECTORY. The agent reads /etc/simdevice/config.toml when mounted, else needs its
# identity from SIMDEVICE__IDENTITY__* variables.
ENV SIMDEVICE_HUB_STATE_DIR=/var/lib/simdevice/hub \
    STATE_DIRECTORY=/var/lib/simdevice
VOLUME ["/var/lib/simdevice"]
EXPOSE 8883 8443
ENTRYPOINT ["/usr/bin/simdevice"]
CMD ["hub", "--bind", "0.0.0.0"]
